"""The Ray actor that owns one replica on its node (:class:`ReplicaHost`), and the detached
watchdog that stops the replica if the actor's process dies."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from nbkit.cluster.spec import LaunchPlan

from nbkit.ray.placement import Placement, plan_on_node


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
os.execv(sys.executable, [sys.executable, "-m", "nbkit.cluster.watchdog", sys.argv[1]])
"""


def _detached_guard():
    """nbkit's watchdog for an actor's process, started double-forked (reparented to init).

    When a Ray worker exits, the raylet SIGKILLs the worker's *direct* children
    (``RAY_kill_child_processes_on_worker_exit``, on by default). A plain child watchdog would die
    with the replica's leader and leave the rest of its process group (engine core, workers)
    orphaned; a detached one survives, reads EOF on its pipe and kills the registered groups.
    """
    from nbkit.cluster.watchdog import Guard

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
        from nbkit.cluster import watchdog
        watchdog.use_guard(_detached_guard())  # this process is the actor's alone
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

        from nbkit.cluster.process import ReplicaProcess
        from nbkit.cluster.spec import discover
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

        from nbkit.cluster.process import ReplicaStartError
        try:
            took = asyncio.run(self.proc.wait_healthy(timeout))
            return {"ok": True, "seconds": took}
        except ReplicaStartError as e:
            return {"ok": False, "name": e.name, "reason": e.reason, "log_tail": e.log_tail,
                    "log_path": str(e.log_path)}

    def pids(self) -> dict:
        """The replica's processes (leader + descendants) and this node's nbkit watchdog."""
        from nbkit.cluster.watchdog import guard
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
