"""Replicas: specs and device discovery (:mod:`~nbkit.cluster.spec`), placement and validation as
pure functions (:mod:`~nbkit.cluster.placement`), one replica's process
(:mod:`~nbkit.cluster.process`), the watchdog that stops replicas when the kernel dies
(:mod:`~nbkit.cluster.watchdog`), prefill/decode specs (:mod:`~nbkit.cluster.pd`), the vLLM entry
point, and the :class:`~nbkit.cluster.cluster.Cluster` that ties them to routing."""
