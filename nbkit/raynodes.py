"""Ray-based multi-node placement: one pinned vLLM replica per Ray node, routed by nbkit's client.

Use it when the replicas of one model should spread over several machines that already form a
Ray cluster (or when you want to rehearse that on one machine)::

    from nbkit import RoutedClient
    from nbkit.raynodes import RayNodes, RayReplicas

    nodes = RayNodes.local(num_nodes=2)            # rehearsal: a head + 1 node on 127.0.0.1
    # nodes = RayNodes.connect("auto")             # real: join the cluster of `ray start --head ...`
    group = RayReplicas.one_per_node(model, nodes=nodes, port_start=8100)
    try:
        group.start()                              # blocks until every replica answers /health
        group.placement_frame()                    # rank -> node id -> URL, pinning, pids
        client = RoutedClient(group.ranks, "least_load", model=group.model)   # or group.client()
        ...
    finally:
        group.stop()                               # replicas (SIGTERM group -> SIGKILL), then actors
        nodes.shutdown()                           # the rehearsal cluster (a connection: disconnect only)

What runs where
- The kernel (the Ray *driver*) holds :class:`RayNodes` (a Ray connection) and
  :class:`RayReplicas` (actor handles), and sends requests straight to the replicas' URLs
  through :class:`~nbkit.client.RoutedClient`; Ray carries no request traffic.
- On each chosen node, a :class:`ReplicaHost` actor (``num_cpus=0``; ``num_gpus`` = the
  replica's GPUs on GPU nodes, so Ray's ``CUDA_VISIBLE_DEVICES`` scopes it) is placed by
  ``NodeAffinitySchedulingStrategy(node_id, soft=False)``. In its own process it plans the
  replica with :func:`nbkit.plan.plan_replicas` against *that node's* inventory, binds it to the
  node's IP (``VLLM_HOST_IP`` too), spawns it with :class:`nbkit.launch.ReplicaProcess` (own
  session, log file on the node) and waits for ``/health``.
- Nodes that share a machine (the local rehearsal: every node is 127.0.0.1) split its CPU cores:
  with 2 cores, node 0's replica is pinned to core 0 and node 1's to core 1. On separate
  machines each replica gets its whole node. Explicit ``ReplicaSpec.cores`` win.

Nothing left running
- ``group.stop()`` asks every actor to stop its replica (SIGTERM to the process group, SIGKILL
  after ``stop_grace``), then kills the actors. A failed or interrupted ``start()`` does the same.
- If an actor's worker process dies (``ray.kill``, node trouble, the driver's job ending), the
  nbkit watchdog that the actor's process started (:mod:`nbkit.watchdog`, its own session) sees
  EOF and kills the replica's group. Ray's per-worker cleanup cannot reach the replica (new
  session) nor that watchdog, so the watchdog always gets to act.
- :meth:`RayNodes.local` runs the rehearsal cluster (``ray.cluster_utils.Cluster``) inside a
  small helper process in its own session, registered with the kernel's nbkit watchdog:
  ``nodes.shutdown()`` stops it cleanly, and if the kernel dies the watchdog kills the whole
  group (GCS, raylets, agents); the actors' workers then exit and their watchdogs stop the
  replicas. Only processes this module started are ever signalled.

Quirks of Ray 2.60 handled here: ``ray.init`` rewrites ``127.0.0.1`` into the machine's address
(where a loopback-bound cluster does not listen), so the driver connects with that rewrite
switched off. A raylet dies if its dashboard agent has not written its port within 15 s (fixed
in the binary); on a busy 2-core machine the agent's ``import ray`` is the problem, mostly
``jsonschema`` importing ``rfc3987_syntax``, which builds an Earley parser at import (~5 s of
CPU). The rehearsal's Ray processes therefore get a shim that defers that parser to its first
use (same results), the head skips the autoscaler and log monitors, and a failed start is
retried.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .plan import DEFAULT_PORT_START, Inventory, LaunchPlan, ReplicaSpec, SpecError, plan_replicas, resolve_device

HEAD_RESOURCE = "node:__internal_head__"


# -- pure planning (no Ray needed) -------------------------------------------------------------------
@dataclass(frozen=True)
class RayNode:
    """One alive Ray node as the driver sees it (from ``ray.nodes()``)."""

    node_id: str
    address: str
    hostname: str = ""
    is_head: bool = False
    resources: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def cpus(self) -> float:
        return self.resources.get("CPU", 0.0)

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0.0)

    @property
    def labels(self) -> list[str]:
        """Custom resources (e.g. ``node0``), without Ray's built-in and per-address ones."""
        builtin = {"CPU", "GPU", "memory", "object_store_memory"}
        return sorted(k for k in self.resources if k not in builtin and not k.startswith("node:")
                      and not k.startswith("accelerator_type:"))

    @classmethod
    def from_ray(cls, info: dict) -> "RayNode":
        res = dict(info.get("Resources") or {})
        return cls(node_id=info["NodeID"], address=info.get("NodeManagerAddress", ""),
                   hostname=info.get("NodeManagerHostname", ""), is_head=HEAD_RESOURCE in res, resources=res)


def alive_nodes(infos: Sequence[dict]) -> list[RayNode]:
    """``ray.nodes()`` -> alive nodes, head first, then by (address, first custom resource, id)."""
    nodes = [RayNode.from_ray(n) for n in infos if n.get("Alive", n.get("alive", False))]
    return sorted(nodes, key=lambda n: (not n.is_head, n.address, n.labels[:1], n.node_id))


@dataclass(frozen=True)
class Placement:
    """Replica ``index`` goes to ``node``; it is ``slot`` of ``slots`` replicas on that machine."""

    index: int
    spec: ReplicaSpec
    node: RayNode
    slot: int = 0
    slots: int = 1
    port: int = DEFAULT_PORT_START
    name: str = ""


def place(specs: Sequence[ReplicaSpec], nodes: Sequence[RayNode], *, node_ids: Sequence[str] | None = None,
          port_start: int = DEFAULT_PORT_START) -> list[Placement]:
    """One replica per node, in order. Pure: validates and assigns ports, names and machine slots.

    ``node_ids`` picks (and orders) the nodes; by default the first ``len(specs)`` of ``nodes``.
    Replica ``i`` gets ``spec.port`` or ``port_start + i`` (distinct even on one machine) and the
    name ``spec.name`` or ``node{i}``. Nodes with the same address share one machine: each gets a
    ``slot`` so the node-side planner can split that machine's cores.
    """
    if not specs:
        raise SpecError("replicas", [], "at least one replica is needed")
    by_id = {n.node_id: n for n in nodes}
    if node_ids is not None:
        missing = [i for i in node_ids if i not in by_id]
        if missing:
            raise SpecError("node_ids", list(node_ids), f"not alive Ray nodes: {missing} (alive: {sorted(by_id)})")
        if len(set(node_ids)) != len(node_ids):
            raise SpecError("node_ids", list(node_ids), "one replica per node: a node is listed twice")
        chosen = [by_id[i] for i in node_ids]
    else:
        chosen = list(nodes)
    if len(specs) > len(chosen):
        raise SpecError("replicas", len(specs), f"one replica per node needs {len(specs)} nodes, "
                                                f"{len(chosen)} {'given' if node_ids is not None else 'alive'}")
    if len(chosen) > len(specs) and node_ids is not None:
        raise SpecError("node_ids", list(node_ids), f"{len(node_ids)} nodes for {len(specs)} replicas")
    chosen = chosen[:len(specs)]
    ports: list[int] = []
    for i, s in enumerate(specs):
        if s.headless:
            raise SpecError(f"replicas[{i}].headless", True, "headless DP nodes are not placed by RayReplicas; "
                                                             "use data_parallel_specs with one Cluster per node")
        ports.append(s.port if s.port is not None else port_start + i)
    for i, p in enumerate(ports):  # two replicas on one machine cannot share a port
        for j in range(i):
            if ports[j] == p and chosen[j].address == chosen[i].address:
                raise SpecError(f"replicas[{i}].port", p, f"replica {j} uses it on the same machine ({chosen[i].address})")
    names = [s.name or f"node{i}" for i, s in enumerate(specs)]
    if len(set(names)) != len(names):
        raise SpecError("replicas.name", names, "replica names must be unique")
    out, seen = [], {}
    for i, (s, n) in enumerate(zip(specs, chosen)):
        same = [m for m in chosen if m.address == n.address]
        slot = seen.get(n.address, 0)
        seen[n.address] = slot + 1
        out.append(Placement(i, s, n, slot, len(same), ports[i], names[i]))
    return out


def share(items: Sequence[int], slot: int, slots: int) -> tuple[int, ...]:
    """Slot ``slot`` of ``slots`` equal, contiguous shares of ``items``.

    >>> share((0, 1), 0, 2), share((0, 1), 1, 2), share(tuple(range(8)), 1, 3)
    ((0,), (1,), (2, 3))
    """
    per = len(items) // slots
    if per < 1:
        raise SpecError("cores", list(items), f"{len(items)} cores cannot be split over {slots} nodes on one machine")
    items = sorted(items)
    return tuple(items[slot * per:(slot + 1) * per])


def node_spec(p: Placement, inventory: Inventory, host: str) -> ReplicaSpec:
    """The spec as the node runs it: bound to the node's IP, ``VLLM_HOST_IP``, a fixed port, and on a
    machine shared by several nodes, this node's share of the cores."""
    s = p.spec
    update: dict[str, Any] = {"host": host, "port": p.port, "name": p.name,
                              "env": {"VLLM_HOST_IP": host, **s.env}}
    kind = resolve_device(s.device, inventory, f"replicas[{p.index}].device")
    if kind == "cpu" and s.cores is None and p.slots > 1:
        update["cores"] = share(inventory.cores, p.slot, p.slots)
    return s.model_copy(update=update)


def plan_on_node(p: Placement, inventory: Inventory, host: str, *, check_models: bool = True,
                 port_free=None, python: str = sys.executable) -> LaunchPlan:
    """The :class:`LaunchPlan` a :class:`ReplicaHost` runs (pure given the node's inventory)."""
    kw = {} if port_free is None else {"port_free": port_free}
    try:
        plan = plan_replicas([node_spec(p, inventory, host)], inventory, port_start=p.port, check_models=check_models,
                             python=python, **kw)[0]
    except SpecError as e:  # name the replica and the node, not "replicas[0]"
        raise SpecError(e.field.replace("replicas[0]", f"replicas[{p.index}]"), e.value,
                        f"{str(e).split(': ', 1)[-1]} (on Ray node {p.node.node_id[:8]} at {host})") from None
    return LaunchPlan(**{**{f: getattr(plan, f) for f in plan.__dataclass_fields__}, "index": p.index})


def ranks_of(plans: Sequence[LaunchPlan]):
    """Routable :class:`~nbkit.cluster.Rank` s of started plans (a DP group: one per DP rank, by header)."""
    from .cluster import Rank
    out = []
    for p in plans:
        for r in p.http_ranks:
            if p.dp_size > 1:
                out.append(Rank(p.index, r, p.url, f"{p.name}/dp{r}", (("X-data-parallel-rank", str(r)),)))
            else:
                out.append(Rank(p.index, r, p.url, p.name))
    return out


# -- the actor: runs on the chosen node ---------------------------------------------------------------
_DETACH = """\
import os, sys
pid = os.fork()
if pid:
    print(pid, flush=True)
    os._exit(0)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 1)
os.dup2(null, 2)
os.execv(sys.executable, [sys.executable, "-m", "nbkit.watchdog", sys.argv[1]])
"""


def _detached_guard():
    """nbkit's watchdog for an actor's process, started double-forked (reparented to init).

    When a Ray worker exits, the raylet SIGKILLs the worker's *direct* children
    (``RAY_kill_child_processes_on_worker_exit``, on by default). A plain child watchdog would die
    with the replica's leader and leave the rest of its process group (engine core, workers)
    orphaned; a detached one survives, reads EOF on its pipe and kills the registered groups.
    """
    from .watchdog import Guard

    class DetachedGuard(Guard):
        watchdog_pid: int | None = None

        def _ensure(self) -> subprocess.Popen:
            if self._proc is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._proc = subprocess.Popen([sys.executable, "-c", _DETACH, str(os.getpid())],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
                self.watchdog_pid = int(self._proc.stdout.readline())
                self._proc.wait()  # the launcher exits at once; the pipe's write end stays with us
            return self._proc

        def unregister(self, pgid: int) -> None:
            if self._proc is not None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    self._send(f"-{pgid}")

        @property
        def pid(self) -> int | None:
            return self.watchdog_pid

    return DetachedGuard()


class ReplicaHost:
    """Ray actor (wrapped with ``ray.remote`` by :class:`RayReplicas`) that owns one replica on its node.

    Threaded (``max_concurrency`` > 1) so ``stop()`` can interrupt a ``wait_healthy()``. Its
    process registers the replica with a detached nbkit watchdog (see :func:`_detached_guard`).
    """

    def __init__(self, placement: Placement, run_name: str):
        from . import watchdog
        with watchdog._guard_lock:
            watchdog._guard = _detached_guard()  # this process is the actor's alone
        self.placement = placement
        self.run_dir = Path(tempfile.gettempdir()) / "nbkit-runs" / run_name
        self.plan: LaunchPlan | None = None
        self.proc = None

    def where(self) -> dict:
        """Where this actor runs: Ray node id, node IP, hostname, process id."""
        import socket

        import ray
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "hostname": socket.gethostname(), "actor_pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def launch(self) -> dict:
        """Plan against this node's inventory and spawn the replica (returns at once)."""
        import ray

        from .launch import ReplicaProcess
        from .plan import discover
        # Ray sets OMP_NUM_THREADS=1 in a num_cpus=0 worker; vLLM sizes its OpenMP pool from the
        # pinning (VLLM_CPU_OMP_THREADS_BIND), as it does when nbkit starts it locally.
        if "OMP_NUM_THREADS" not in self.placement.spec.env:
            os.environ.pop("OMP_NUM_THREADS", None)
        self.plan = plan_on_node(self.placement, discover(), ray.util.get_node_ip_address())
        self.proc = ReplicaProcess(self.plan, self.run_dir / f"{self.plan.name}.log")
        self.proc.spawn()
        return {"plan": self.plan, "pid": self.proc.pid, "log": str(self.proc.log_path)}

    def wait_healthy(self, timeout: float) -> dict:
        """Block until ``/health`` answers; errors come back as data (exceptions with custom
        constructors do not cross Ray intact)."""
        import asyncio

        from .launch import ReplicaStartError
        try:
            took = asyncio.run(self.proc.wait_healthy(timeout))
            return {"ok": True, "seconds": took}
        except ReplicaStartError as e:
            return {"ok": False, "name": e.name, "reason": e.reason, "log_tail": e.log_tail,
                    "log_path": str(e.log_path)}

    def pids(self) -> dict:
        """The replica's processes (leader + descendants) and this node's nbkit watchdog."""
        from .watchdog import guard
        return {"actor": os.getpid(), "replica": [p.pid for p in self.proc.processes()] if self.proc else [],
                "watchdog": guard().pid}

    def status(self) -> dict:
        p = self.proc
        alive = p is not None and p.alive
        return {"alive": alive, "pid": p.pid if p else None, "returncode": p.returncode if p else None,
                "rss_gib": round(p.rss_bytes() / 2**30, 2) if alive else 0.0}

    def logs(self, n: int = 30) -> str:
        return self.proc.tail(n) if self.proc else ""

    def stop(self, grace: float = 15.0) -> bool:
        """SIGTERM the replica's group, SIGKILL after ``grace``; returns when it is gone."""
        if self.proc is not None:
            self.proc.stop_sync(grace)
        return True


# -- the driver's side --------------------------------------------------------------------------------
_live_groups: "weakref.WeakSet[RayReplicas]" = weakref.WeakSet()
_live_nodes: "weakref.WeakSet[RayNodes]" = weakref.WeakSet()
_atexit_registered = False


def _track(obj) -> None:
    """Remember a live group/nodes handle; the exit hook is registered after ``import ray`` so that
    it runs before Ray's own (atexit is last-in, first-out) while the connection still works."""
    global _atexit_registered
    import ray  # noqa: F401
    if not _atexit_registered:
        atexit.register(_cleanup_at_exit)
        _atexit_registered = True
    (_live_groups if isinstance(obj, RayReplicas) else _live_nodes).add(obj)


def _cleanup_at_exit() -> None:  # a kernel or script that exits normally stops what it started
    for g in list(_live_groups):
        with contextlib.suppress(Exception):
            g.stop()
    for n in list(_live_nodes):
        with contextlib.suppress(Exception):
            n.shutdown()


@contextlib.contextmanager
def _loopback_ray_init(address: str | None):
    """Let ``ray.init`` keep a loopback address: Ray 2.60 rewrites 127.0.0.1/localhost into the
    machine's address (``services.resolve_ip_for_localhost``), where a cluster bound to 127.0.0.1
    does not listen. Switched off for the duration of the call only."""
    host = (address or "").rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost"):
        yield
        return
    import ray._private.ray_constants as rc
    old = rc.ENABLE_RAY_CLUSTER
    rc.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        rc.ENABLE_RAY_CLUSTER = old


def _connect(address: str) -> None:
    import ray
    with _loopback_ray_init(address):
        kw = {"_node_ip_address": "127.0.0.1"} if address.startswith(("127.0.0.1", "localhost")) else {}
        ray.init(address=address, log_to_driver=False, logging_level="warning", **kw)


class RayNodes:
    """A Ray cluster this process is connected to: a local rehearsal it owns, or an existing one.

    >>> nodes = RayNodes.local(num_nodes=2)     # doctest: +SKIP
    >>> nodes.frame()                           # doctest: +SKIP  node id, address, CPUs, GPUs, resources
    >>> nodes.shutdown()                        # doctest: +SKIP
    """

    def __init__(self, address: str, *, owner: "_LocalRay | None" = None, connected_here: bool = True):
        self.address = address
        self._owner = owner
        self._connected_here = connected_here
        self.closed = False
        _track(self)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def local(cls, num_nodes: int = 2, *, cpus_per_node: int = 1, attempts: int = 3,
              timeout: float = 180.0) -> "RayNodes":
        """Start a rehearsal cluster on 127.0.0.1: a head and ``num_nodes - 1`` more nodes, each with
        ``cpus_per_node`` CPUs and a custom resource ``node<k>``; connect this process to it.

        The cluster lives in a helper process (own session, watched by nbkit's watchdog);
        :meth:`shutdown` stops it. Retries a start that fails (busy machine) ``attempts`` times.
        """
        import ray
        if num_nodes < 1:
            raise SpecError("num_nodes", num_nodes, "must be >= 1")
        if ray.is_initialized():
            raise RuntimeError("this process is already connected to Ray; call ray.shutdown() first "
                               "(or use RayNodes.connect())")
        errors = []
        for attempt in range(attempts):
            owner = _LocalRay(num_nodes, cpus_per_node)
            try:
                address = owner.start(timeout)
                _connect(address)
                return cls(address, owner=owner)
            except BaseException as e:  # noqa: BLE001 - nothing may be left behind, then retry or raise
                with contextlib.suppress(Exception):
                    if ray.is_initialized():
                        ray.shutdown()
                owner.stop()
                if not isinstance(e, Exception):
                    raise
                errors.append(f"attempt {attempt + 1}: {e}")
        raise RuntimeError("the local Ray cluster did not start:\n" + "\n".join(errors))

    @classmethod
    def connect(cls, address: str = "auto") -> "RayNodes":
        """Join an existing cluster (``ray start --head ...``; ``"auto"``, ``"IP:6379"``).
        :meth:`shutdown` only disconnects; the cluster keeps running."""
        import ray
        if ray.is_initialized():
            return cls(address, connected_here=False)
        _connect(address)
        return cls(address)

    # -- views -------------------------------------------------------------------------------------
    def nodes(self) -> list[RayNode]:
        """Alive nodes, head first."""
        import ray
        return alive_nodes(ray.nodes())

    @property
    def node_ids(self) -> list[str]:
        return [n.node_id for n in self.nodes()]

    def frame(self):
        """The alive nodes as a DataFrame: node id, address, head, CPUs, GPUs, custom resources."""
        import pandas as pd
        return pd.DataFrame([{"node_id": n.node_id, "address": n.address, "head": n.is_head, "cpus": n.cpus,
                              "gpus": n.gpus, "resources": ",".join(n.labels)} for n in self.nodes()])

    @property
    def owned(self) -> bool:
        """True for a rehearsal cluster started by :meth:`local` (shutdown stops it)."""
        return self._owner is not None

    def pids(self) -> list[int]:
        """Processes of the owned rehearsal cluster (helper, GCS, raylets, agents, workers)."""
        return self._owner.pids() if self._owner else []

    # -- stop ----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop replica groups placed on these nodes, disconnect, and stop the rehearsal cluster if owned.
        Safe to call twice."""
        if self.closed:
            return
        for g in list(_live_groups):
            if g.nodes is self:
                with contextlib.suppress(Exception):
                    g.stop()
        import ray
        if self._connected_here and ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.shutdown()
        if self._owner is not None:
            self._owner.stop()
        self.closed = True
        _live_nodes.discard(self)

    def __enter__(self) -> "RayNodes":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        kind = "local rehearsal" if self.owned else "connected"
        return f"RayNodes({kind}, {self.address}{', closed' if self.closed else ''})"


#: Put first on the rehearsal's PYTHONPATH: ``rfc3987_syntax`` with its parser built on first use.
_RFC3987_SHIM = """\
# nbkit: the real rfc3987_syntax builds an Earley parser when imported (~5 s of CPU, paid by every
# process that imports ray -> jsonschema). Same package, same results; the parser waits for a call.
import importlib.machinery as _m, os as _os, sys as _sys
_shim = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_real = _m.PathFinder.find_spec(__name__, [p for p in _sys.path if _os.path.abspath(p or ".") != _shim])
if _real is None or not _real.submodule_search_locations:
    raise ImportError("rfc3987_syntax is not installed")
__path__[:] = list(_real.submodule_search_locations)


def is_valid_syntax(term, value):
    from .syntax_helpers import is_valid_syntax as f
    return f(term, value)


def parse(term, value):
    from .syntax_helpers import parse as f
    return f(term, value)
"""


class _LocalRay:
    """The helper process that owns a ``ray.cluster_utils.Cluster`` on 127.0.0.1 (see ``_serve_local``)."""

    def __init__(self, num_nodes: int, cpus_per_node: int):
        self.num_nodes, self.cpus_per_node = num_nodes, cpus_per_node
        self.tmp = tempfile.mkdtemp(prefix="nbkit-ray-")  # short: Ray's socket paths must stay < 108 chars
        self.proc: subprocess.Popen | None = None
        self._procs: dict[int, Any] = {}

    def start(self, timeout: float) -> str:
        from .watchdog import guard
        log = open(Path(self.tmp) / "helper.log", "ab")
        env = dict(os.environ, RAY_TMPDIR=self.tmp, RAY_USAGE_STATS_ENABLED="0")
        import importlib.util
        if importlib.util.find_spec("rfc3987_syntax") is not None:
            shim = Path(self.tmp) / "pyshim"
            (shim / "rfc3987_syntax").mkdir(parents=True)
            (shim / "rfc3987_syntax" / "__init__.py").write_text(_RFC3987_SHIM)
            env["PYTHONPATH"] = os.pathsep.join([str(shim)] + [p for p in [env.get("PYTHONPATH")] if p])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nbkit.raynodes", "--nodes", str(self.num_nodes), "--cpus", str(self.cpus_per_node)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True,
            close_fds=True)
        log.close()
        guard().register(self.proc.pid)  # kernel dies -> the watchdog kills the helper's group
        deadline = time.monotonic() + timeout
        msg: dict = {}
        while not msg and time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if not ready:
                if self.proc.poll() is not None:
                    break
                continue
            line = self.proc.stdout.readline()
            if not line:  # EOF: the helper exited
                break
            with contextlib.suppress(ValueError):
                got = json.loads(line)
                msg = got if isinstance(got, dict) and ("address" in got or "error" in got) else {}
        self._remember()
        if not msg:
            why = "exited" if self.proc.poll() is not None else f"was not ready after {timeout:.0f} s"
            raise RuntimeError(f"the Ray helper {why}; last lines of its log:\n{self._log_tail()}")
        if "error" in msg:
            raise RuntimeError(f"{msg['error']}\n{self._log_tail(4)}")
        return msg["address"]

    def _log_tail(self, n: int = 8) -> str:
        from .launch import tail
        return tail(Path(self.tmp) / "helper.log", n)

    def _remember(self) -> None:
        """Remember the helper's descendants (psutil handles, so a reused pid is never hit)."""
        import psutil
        if self.proc is None:
            return
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self._procs.setdefault(p.pid, p)

    def pids(self) -> list[int]:
        self._remember()
        return [pid for pid, p in self._procs.items() if _running(p)]

    def stop(self, grace: float = 20.0) -> None:
        """Ask the helper to shut Ray down (stdin EOF), then SIGTERM/SIGKILL its group and any
        remembered descendant still running."""
        import psutil

        from .watchdog import _group_alive, guard, kill_groups
        if self.proc is None:
            return
        self._remember()
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        if _group_alive(self.proc.pid):
            kill_groups({self.proc.pid}, grace=3.0)
        left = [p for p in self._procs.values() if _running(p)]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=5)
        with contextlib.suppress(Exception):
            self.proc.wait(1)
        guard().unregister(self.proc.pid)
        self.proc = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def _running(p) -> bool:
    import psutil
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class RayReplicas:
    """vLLM replicas placed one per Ray node by node affinity; routed like a :class:`~nbkit.cluster.Cluster`.

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
            from .tiny import tiny_model
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

        from .launch import ReplicaStartError
        if self._actors:
            raise RuntimeError("already started; stop() first")
        timeout = timeout or self.startup_timeout
        self.placements = self.plan()
        host_cls = ray.remote(ReplicaHost)
        _track(self)
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
        _live_groups.discard(self)

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
        """Routable :class:`~nbkit.cluster.Rank` s (URLs on the nodes' addresses)."""
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
        """A :class:`~nbkit.client.RoutedClient` over these replicas."""
        from .client import RoutedClient
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


# -- the helper process that owns a local rehearsal cluster ------------------------------------------
def _serve_local(num_nodes: int, cpus: int) -> int:
    """Start ``ray.cluster_utils.Cluster`` on 127.0.0.1, print its address as one JSON line, then hold
    it until stdin closes (parent done or dead) or SIGTERM, and shut it down."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cluster = None
    try:
        from ray.cluster_utils import Cluster
        common = {"num_cpus": cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False,
                  "include_log_monitor": False}
        cluster = Cluster(initialize_head=True, head_node_args={**common, "no_monitor": True, "resources": {"node0": 1}})
        for k in range(1, num_nodes):
            cluster.add_node(**common, resources={f"node{k}": 1})
    except Exception as e:  # noqa: BLE001 - reported to the parent, which also kills this process group
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.shutdown()
        return 1
    print(json.dumps({"address": cluster.address}), flush=True)

    def watch_stdin():
        with contextlib.suppress(Exception):
            while sys.stdin.buffer.read(1024):
                pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(0.5):
        pass
    cluster.shutdown()
    if os.path.basename(os.environ.get("RAY_TMPDIR", "")).startswith("nbkit-ray-"):  # ours (the kernel may be gone)
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m nbkit.raynodes", description="hold a local Ray rehearsal cluster")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=1)
    a = ap.parse_args(argv)
    return _serve_local(a.nodes, a.cpus)


if __name__ == "__main__":
    sys.exit(main())
