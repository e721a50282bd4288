"""A Ray connection: a local rehearsal cluster this process owns, or an existing cluster
(:class:`RayNodes`), and the exit hook that stops what this process started on it."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from nbkit.cluster.spec import SpecError


from nbkit.ray.placement import RayNode, alive_nodes

# -- the driver's side --------------------------------------------------------------------------------
_live_groups: "weakref.WeakSet" = weakref.WeakSet()
_live_nodes: "weakref.WeakSet[RayNodes]" = weakref.WeakSet()
_atexit_registered = False


def track(obj) -> None:
    """Remember a live group/nodes handle; the exit hook is registered after ``import ray`` so that
    it runs before Ray's own (atexit is last-in, first-out) while the connection still works."""
    global _atexit_registered
    import ray  # noqa: F401
    if not _atexit_registered:
        atexit.register(_cleanup_at_exit)
        _atexit_registered = True
    (_live_nodes if isinstance(obj, RayNodes) else _live_groups).add(obj)


def untrack(obj) -> None:
    """Forget a handle that was stopped."""
    _live_groups.discard(obj)
    _live_nodes.discard(obj)


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
        track(self)

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
    from nbkit.syntax_helpers import is_valid_syntax as f
    return f(term, value)


def parse(term, value):
    from nbkit.syntax_helpers import parse as f
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
        from nbkit.cluster.watchdog import guard
        log = open(Path(self.tmp) / "helper.log", "ab")
        env = dict(os.environ, RAY_TMPDIR=self.tmp, RAY_USAGE_STATS_ENABLED="0")
        import importlib.util
        if importlib.util.find_spec("rfc3987_syntax") is not None:
            shim = Path(self.tmp) / "pyshim"
            (shim / "rfc3987_syntax").mkdir(parents=True)
            (shim / "rfc3987_syntax" / "__init__.py").write_text(_RFC3987_SHIM)
            env["PYTHONPATH"] = os.pathsep.join([str(shim)] + [p for p in [env.get("PYTHONPATH")] if p])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nbkit.ray.rehearsal", "--nodes", str(self.num_nodes), "--cpus", str(self.cpus_per_node)],
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
        from nbkit.cluster.process import tail
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

        from nbkit.cluster.watchdog import group_alive, guard, kill_groups
        if self.proc is None:
            return
        self._remember()
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        if group_alive(self.proc.pid):
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
