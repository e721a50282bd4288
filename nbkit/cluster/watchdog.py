"""Parent-death safety: a tiny watchdog process that kills nbkit's replicas when its parent dies.

The parent (a notebook kernel, a script) holds the write end of a pipe whose read end is the
watchdog's stdin, and registers every replica's process group on it (``+PGID`` / ``-PGID``
lines). When the parent dies by any means — exit, kernel restart, SIGKILL — the kernel closes
the pipe, the watchdog reads EOF, and it sends SIGTERM, then SIGKILL after a grace period, to
the groups still registered. It runs in its own session so a kill of the parent's process group
does not take it down first. It only ever signals groups it was told about.

Usage in the parent::

    from nbkit.cluster.watchdog import guard
    guard().register(pgid)      # after starting a replica in a new session
    guard().unregister(pgid)    # after stopping it cleanly
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

GRACE_S = 4.0


class Guard:
    """The parent's side: starts the watchdog on first use and feeds it process groups."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pid = os.getpid()

    def _ensure(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "nbkit.cluster.watchdog", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )
        return self._proc

    def _send(self, line: str) -> None:
        with self._lock:
            proc = self._ensure()
            assert proc.stdin is not None
            proc.stdin.write(f"{line}\n".encode())
            proc.stdin.flush()

    def register(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def unregister(self, pgid: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._send(f"-{pgid}")
            except (BrokenPipeError, OSError):
                pass

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


_guard: Guard | None = None
_guard_lock = threading.Lock()


def guard() -> Guard:
    global _guard
    with _guard_lock:
        if _guard is None:
            _guard = Guard()
        return _guard


def use_guard(g: Guard) -> None:
    """Make ``g`` this process's guard (before anything registers): a Ray actor's process uses a
    detached watchdog that outlives the worker (see :mod:`nbkit.ray.host`)."""
    global _guard
    with _guard_lock:
        _guard = g


def group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` runs (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies; look closer.
    try:
        import psutil
    except ImportError:
        return True
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return False


def kill_groups(pgids: set[int], grace: float = GRACE_S) -> None:
    """SIGTERM each group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in list(pgids):
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pgids.discard(g)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while pgids and time.monotonic() < deadline:
            pgids = {g for g in pgids if group_alive(g)}
            time.sleep(0.1)
        if not pgids:
            return


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the parent's terminal is not ours
    groups: set[int] = set()
    for raw in sys.stdin.buffer:
        line = raw.decode(errors="replace").strip()
        if len(line) > 1 and line[1:].isdigit():
            (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    kill_groups(groups)


if __name__ == "__main__":
    main()
