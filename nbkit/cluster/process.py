"""Processes: start one vLLM server from a :class:`~nbkit.cluster.spec.LaunchPlan`, wait for it, stop it.

A ``preload`` plan (CPU vLLM with ``fast_start``) is forked from the fork server, which imported
vLLM once (:mod:`nbkit.cluster.forkserver`); any other is spawned. Either way each replica runs in
a new session (its own process group), writes one log file, and is
registered with the parent-death watchdog (:mod:`nbkit.cluster.watchdog`). Stopping sends SIGTERM to
the group, then SIGKILL after a grace period, and only ever touches that group and the
replica's own descendants.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import subprocess
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Iterator

import psutil

from nbkit.cluster import forkserver
from nbkit.cluster.spec import LaunchPlan
from nbkit.cluster.watchdog import group_alive, guard
from nbkit.routing.probes import Probe

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 30


class ReplicaStartError(RuntimeError):
    """A replica exited or did not become healthy in time. The message quotes its log tail."""

    def __init__(self, name: str, reason: str, log_tail: str, log_path: Path | None = None):
        self.name, self.reason, self.log_tail, self.log_path = name, reason, log_tail, log_path
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"{name} {reason}{where}. Last {LOG_TAIL_LINES} lines of its log:\n{log_tail}")


def tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    """The last ``n`` lines of a text file ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            lines = deque(f.read().decode(errors="replace").splitlines(), maxlen=n)
    except FileNotFoundError:
        return ""
    return "\n".join(lines)


_live: "weakref.WeakSet[ReplicaProcess]" = weakref.WeakSet()


def preload(plans) -> bool:
    """Blocking: get the fork server ready for ``plans`` that fork from it (``preload``), so that
    their :meth:`ReplicaProcess.spawn` does not wait for it. Call it off the event loop. Returns
    whether one is ready."""
    for p in plans:
        if p.preload and forkserver.forkable(p.argv):
            return forkserver.server_for({**os.environ, **p.env}) is not None
    return False


class ReplicaProcess:
    """One vLLM process of a plan. Not restartable: make a new one to restart."""

    def __init__(self, plan: LaunchPlan, log_path: Path):
        self.plan = plan
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | forkserver.Forked | None = None
        self.started_at: float | None = None
        self.stopped = False
        self.stopping = False  # a stop is under way (its exit is wanted, not a crash)
        self._tree: set[int] = set()

    # -- start -----------------------------------------------------------------------------
    def spawn(self) -> None:
        """Start the process (new session, stdout+stderr to the log). Returns at once."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.plan.env)
        with open(self.log_path, "ab") as log:
            log.write(f"=== nbkit {time.strftime('%Y-%m-%d %H:%M:%S')} start {self.plan.name}: "
                      f"{' '.join(self.plan.argv)}\n".encode())
            log.flush()
            self.proc = self._fork(env)
            if self.proc is None:
                self.proc = subprocess.Popen(
                    list(self.plan.argv), env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                )
        self.started_at = time.time()
        guard().register(self.proc.pid)
        _live.add(self)

    def _fork(self, env: dict[str, str]) -> "forkserver.Forked | None":
        """A ``preload`` plan is forked from the fork server (vLLM imported already); None: spawn it."""
        if not self.plan.preload or not forkserver.forkable(self.plan.argv):
            return None
        srv = forkserver.server_for(env)
        if srv is None:
            return None
        try:
            return srv.spawn(self.plan.argv, env, self.log_path)
        except OSError as e:
            log.warning("process: %s could not be forked (%s); spawning it", self.plan.name, e)
            return None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = LOG_TAIL_LINES) -> str:
        return tail(self.log_path, n)

    def processes(self) -> list[psutil.Process]:
        """The replica's process and all its descendants (API server, engine cores, workers)."""
        if not self.alive:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def rss_bytes(self) -> int:
        total = 0
        for p in self.processes():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    async def wait_healthy(self, timeout: float, probe: Probe | None = None, interval: float = 0.5) -> float:
        """Poll ``/health`` (with ``probe``, or a probe of its own) until it answers 200. Returns
        seconds since spawn.

        Raises :class:`ReplicaStartError` (with the log tail) if the process exits or the
        timeout passes.
        """
        assert self.proc is not None, "spawn() first"
        own = probe is None
        probe = probe or Probe(timeout=5.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                rc = self.proc.poll()
                if rc is not None:
                    raise ReplicaStartError(self.plan.name, f"exited with code {rc} before it was healthy",
                                            self.tail(), self.log_path)
                if self.plan.headless or await probe.health(self.plan.url, 5.0):
                    return time.time() - (self.started_at or time.time())
                if time.monotonic() > deadline:
                    raise ReplicaStartError(self.plan.name, f"was not healthy after {timeout:.0f} s",
                                            self.tail(), self.log_path)
                await asyncio.sleep(interval)
        finally:
            if own:
                await probe.aclose()

    # -- stop ------------------------------------------------------------------------------
    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in list(self._tree):  # descendants that left the group, if any
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    p.send_signal(sig)
            except psutil.Error:
                self._tree.discard(pid)

    def _gone(self) -> bool:
        if self.proc is None:
            return True
        self.proc.poll()  # reap the leader
        if group_alive(self.proc.pid):
            return False
        for pid in list(self._tree):
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.Error:
                pass
            self._tree.discard(pid)
        return True

    def _snapshot_tree(self) -> None:
        self._tree = {p.pid for p in self.processes()}

    def _stopping(self, grace: float) -> Iterator[float]:
        """The stop sequence, one step at a time: yields how long to sleep before the next look.
        SIGTERM to the group, SIGKILL after ``grace`` seconds, done when every process is gone."""
        if self.proc is None or self.stopped:
            return
        self.stopping = True
        self._snapshot_tree()
        self._signal(signal.SIGTERM)
        for sig, wait in ((None, grace), (signal.SIGKILL, 10.0)):
            if sig is not None:
                if self._gone():
                    break
                log.warning("process: %s ignored SIGTERM for %.0f s; SIGKILL", self.plan.name, grace)
                self._signal(sig)
            deadline = time.monotonic() + wait
            while not self._gone() and time.monotonic() < deadline:
                yield 0.1
        self._finish()

    async def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the group, SIGKILL after ``grace`` seconds; returns when all are gone."""
        for pause in self._stopping(grace):
            await asyncio.sleep(pause)

    def stop_sync(self, grace: float = 5.0) -> None:
        """Blocking :meth:`stop`, without an event loop (atexit, signal handlers)."""
        for pause in self._stopping(grace):
            time.sleep(pause)

    def _finish(self) -> None:
        self.stopped = True
        if self.proc is not None:
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            guard().unregister(self.proc.pid)
        _live.discard(self)


_atexit_lock = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    """A script or kernel that exits normally stops what it started (the watchdog covers kills)."""
    with _atexit_lock:
        for r in list(_live):
            r.stop_sync(grace=5.0)
