"""vLLM replicas placed one per Ray node by node affinity (:class:`RayReplicas`)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Sequence

from nbkit.cluster.spec import DEFAULT_PORT_START, LaunchPlan, ReplicaSpec, SpecError

from nbkit.ray.host import ReplicaHost
from nbkit.ray.nodes import RayNodes, track, untrack
from nbkit.ray.placement import Placement, RayNode, alive_nodes, place, ranks_of


class RayReplicas:
    """vLLM replicas placed one per Ray node by node affinity; routed like a :class:`~nbkit.cluster.cluster.Cluster`.

    ``specs``: a model (one identical replica per node), a :class:`ReplicaSpec`, or a list of specs
    (replica ``i`` on node ``i``). ``nodes``: a :class:`RayNodes` (default: the Ray connection this
    process already has). ``node_ids`` picks the nodes; default: all alive nodes, head first.
    """

    def __init__(self, specs: str | ReplicaSpec | Sequence[ReplicaSpec], nodes: RayNodes | None = None, *,
                 node_ids: Sequence[str] | None = None, port_start: int = DEFAULT_PORT_START,
                 startup_timeout: float = 600.0, stop_grace: float = 15.0, run_name: str | None = None,
                 **spec_kwargs):
        self.nodes = nodes
        self._specs_arg, self._spec_kwargs = specs, spec_kwargs
        self.node_ids_arg = list(node_ids) if node_ids is not None else None
        self.port_start = port_start
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.run_name = run_name or f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{id(self) % 10000:04d}"
        self.placements: list[Placement] = []
        self.plans: list[LaunchPlan] = []
        self.where: list[dict] = []
        self.logs_at: list[str] = []
        self.started_in: list[float] = []
        self._actors: list = []
        self._pids: dict[int, dict] = {}

    @classmethod
    def one_per_node(cls, model: str | None = None, *, nodes: RayNodes | None = None, num_nodes: int | None = None,
                     address: str | None = None, **kwargs) -> "RayReplicas":
        """One identical replica of ``model`` on each alive node (or the first ``num_nodes``).

        ``model`` defaults to ``$NBKIT_MODEL``, else the generated tiny model (its folder must exist
        on every node). ``address`` connects first when ``nodes`` is not given.
        """
        if nodes is None and address is not None:
            nodes = RayNodes.connect(address)
        if num_nodes is not None and "node_ids" not in kwargs:
            kwargs["node_ids"] = _alive(nodes)[:num_nodes] if num_nodes else []
            if len(kwargs["node_ids"]) < num_nodes:
                raise SpecError("num_nodes", num_nodes, f"only {len(kwargs['node_ids'])} Ray nodes are alive")
        model = model or os.environ.get("NBKIT_MODEL") or None
        if model is None:
            from nbkit.tiny import tiny_model
            model = str(tiny_model())
        return cls(model, nodes, **kwargs)

    # -- planning ------------------------------------------------------------------------------------
    def _specs(self, nodes: list[RayNode]) -> list[ReplicaSpec]:
        s = self._specs_arg
        if isinstance(s, str):
            n = len(self.node_ids_arg) if self.node_ids_arg is not None else len(nodes)
            return [ReplicaSpec(model=s, **self._spec_kwargs)] * n
        if self._spec_kwargs:
            raise TypeError(f"spec keyword arguments {sorted(self._spec_kwargs)} only go with a model name")
        return [s] if isinstance(s, ReplicaSpec) else list(s)

    def plan(self) -> list[Placement]:
        """Where each replica goes (validated, nothing started)."""
        nodes = alive_nodes(_ray_nodes())
        return place(self._specs(nodes), nodes, node_ids=self.node_ids_arg, port_start=self.port_start)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> "RayReplicas":
        """Place an actor on each node, start the replicas in parallel, wait until all are healthy.

        On any error (or an interrupt) everything started so far is stopped before it re-raises.
        """
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from nbkit.cluster.process import ReplicaStartError
        if self._actors:
            raise RuntimeError("already started; stop() first")
        timeout = timeout or self.startup_timeout
        self.placements = self.plan()
        host_cls = ray.remote(ReplicaHost)
        track(self)
        try:
            for p in self.placements:
                gpus = p.spec.workers if p.node.gpus >= 1 and p.spec.device != "cpu" else 0
                self._actors.append(host_cls.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=p.node.node_id, soft=False),
                    num_cpus=0, num_gpus=gpus, max_concurrency=4, max_restarts=0,
                ).remote(p, self.run_name))
            self.where = ray.get([a.where.remote() for a in self._actors], timeout=timeout)
            for p, w in zip(self.placements, self.where):
                if w["node_id"] != p.node.node_id:  # cannot happen with soft=False; say so loudly if it does
                    raise RuntimeError(f"replica {p.index} landed on node {w['node_id']}, not {p.node.node_id}")
            launched = ray.get([a.launch.remote() for a in self._actors], timeout=timeout)
            self.plans = [r["plan"] for r in launched]
            self.logs_at = [r["log"] for r in launched]
            results = ray.get([a.wait_healthy.remote(timeout) for a in self._actors], timeout=timeout + 60)
            bad = [r for r in results if not r["ok"]]
            if bad:
                b = bad[0]
                also = f" (also failed: {', '.join(x['name'] for x in bad[1:])})" if len(bad) > 1 else ""
                raise ReplicaStartError(b["name"], b["reason"] + also, b["log_tail"], Path(b["log_path"]))
            self.started_in = [round(r["seconds"], 1) for r in results]
            self._pids = dict(enumerate(ray.get([a.pids.remote() for a in self._actors], timeout=60)))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every replica (SIGTERM to its group, SIGKILL after ``stop_grace``), then kill the actors.
        Safe to call twice; an actor that is already gone is skipped (its watchdog stopped its replica)."""
        import ray
        actors, self._actors = self._actors, []
        if actors and ray.is_initialized():
            refs = []
            for a in actors:
                with contextlib.suppress(Exception):
                    refs.append(a.stop.remote(self.stop_grace))
            for r in refs:
                with contextlib.suppress(Exception):
                    ray.get(r, timeout=self.stop_grace + 30)
            for a in actors:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)
        untrack(self)

    def __enter__(self) -> "RayReplicas":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- views -----------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return bool(self._actors)

    @property
    def model(self) -> str:
        """The served model name (the ``model`` field of requests)."""
        return (self.plans[0].model if self.plans else
                self._specs_arg if isinstance(self._specs_arg, str) else self._specs([])[0].model)

    @property
    def ranks(self):
        """Routable :class:`~nbkit.routing.rank.Rank` s (URLs on the nodes' addresses)."""
        return ranks_of(self.plans)

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.plans if not p.headless]

    def node_of(self, i: int) -> str:
        """The Ray node id replica ``i`` runs on (as reported by its actor)."""
        return self.where[i]["node_id"] if self.where else self.placements[i].node.node_id

    def pids(self) -> list[int]:
        """Every replica process (leaders and descendants) seen at start and now, on all nodes."""
        import ray
        out = {pid for v in self._pids.values() for pid in v["replica"]}
        if self._actors:
            for got in ray.get([a.pids.remote() for a in self._actors], timeout=60):
                out.update(got["replica"])
        return sorted(out)

    def actor_pids(self) -> list[dict]:
        """Per replica: the actor's worker pid, its watchdog pid and the replica pids (at start)."""
        return [self._pids[i] for i in sorted(self._pids)]

    def logs(self, i: int, n: int = 30) -> str:
        """The last ``n`` lines of replica ``i``'s log (read on its node)."""
        import ray
        return ray.get(self._actors[i].logs.remote(n), timeout=60)

    def placement(self) -> list[dict]:
        """One row per replica: name, node id, node address, URL, pinning, pids, start seconds."""
        import ray
        status = ray.get([a.status.remote() for a in self._actors], timeout=60) if self._actors else []
        rows = []
        for i, p in enumerate(self.plans):
            w = self.where[i] if i < len(self.where) else {}
            st = status[i] if i < len(status) else {}
            rows.append({"rank": p.name, "node_id": w.get("node_id", self.placements[i].node.node_id),
                         "node_ip": w.get("ip"), "url": p.url if not p.headless else "(headless)",
                         "pinning": p.pinning, "actor_pid": w.get("actor_pid"), "replica_pid": st.get("pid"),
                         "alive": st.get("alive", False), "rss_gib": st.get("rss_gib", 0.0),
                         "healthy_after_s": self.started_in[i] if i < len(self.started_in) else None})
        return rows

    def placement_frame(self):
        """:meth:`placement` as a pandas DataFrame indexed by rank name."""
        import pandas as pd
        return pd.DataFrame(self.placement()).set_index("rank")

    def client(self, policy="least_load", **options):
        """A :class:`~nbkit.routing.client.RoutedClient` over these replicas."""
        from nbkit.routing.client import RoutedClient
        return RoutedClient(self.ranks, policy, model=self.model, **options)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RayReplicas({len(self.plans) or len(self.placements)} replicas, {state})"


def _ray_nodes() -> list[dict]:
    import ray
    if not ray.is_initialized():
        raise RuntimeError("not connected to Ray: use RayNodes.local() or RayNodes.connect(address) first")
    return ray.nodes()


def _alive(nodes: RayNodes | None) -> list[str]:
    return [n.node_id for n in (nodes.nodes() if nodes else alive_nodes(_ray_nodes()))]
