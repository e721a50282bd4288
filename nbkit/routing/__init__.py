"""Routing: the router's mechanism (per-rank accounting, admission queue, health, circuit
breaking; :mod:`~nbkit.routing.router`), the probes that read replicas' ``/metrics`` and
``/health`` (:mod:`~nbkit.routing.probes`), forwarding with retries (:mod:`~nbkit.routing.forward`,
:mod:`~nbkit.routing.pd_forward`), and the two front doors: the in-kernel
:class:`~nbkit.routing.client.RoutedClient` and the OpenAI-compatible
:class:`~nbkit.routing.endpoint.Endpoint`. Which rank gets a request is decided by
:mod:`nbkit.policies`.

Imports :mod:`nbkit.http`, :mod:`nbkit.policies` and :mod:`nbkit.loop`; never the cluster or the UI."""
