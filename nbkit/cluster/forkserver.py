"""Fork server: vLLM imported once per parent process, each CPU replica forked from it (``fast_start``).

Importing vLLM's CLI and API server takes 8-10 s of a core here, more than the rest of a tiny
replica's start. For plans with ``preload`` (CPU, ``engine="vllm"``, ``fast_start``) nbkit starts
one fork server per parent process (a notebook kernel, a script, a Ray host actor) the first time a
replica needs it: ``python -m nbkit.cluster.forkserver`` imports vLLM and then waits on a pipe.
Each replica is then a fork of it that runs ``vllm serve`` at once. Measured on this 2-core
machine: a 1-core replica answers /health 7.6 s after the fork instead of 16.1 s after a spawn.

A forked replica is what a spawned one is: its own session (``setsid``, so the parent-death
watchdog and ``stop()`` signal its group as before), stdout and stderr appended to its log, stdin
from /dev/null, exactly its plan's environment and working directory, and pinned to its cores
(the OpenMP runtime the server loaded read its variables at import, so the child pins itself with
:func:`nbkit.cluster.vllm_entry.pin_to_omp_cores`). The server reaps its children and reports each
exit status, so the handle's ``poll()`` gives the return code ``subprocess.Popen.poll`` would.
The server exits when its parent closes the pipe (exit, kernel restart, SIGKILL).

Only a plan whose environment matches the server's outside :data:`LATE_VARS` (variables vLLM and
OpenMP read after import) is forked; any other (a user's ``VLLM_LOGGING_LEVEL``, say) is spawned.

Usage (what :class:`~nbkit.cluster.process.ReplicaProcess` does)::

    from nbkit.cluster import forkserver
    srv = forkserver.server_for(env)        # None: spawn instead
    proc = srv.spawn(argv, env, log_path)   # a Popen-like handle: pid, poll(), wait(timeout)
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

ENTRY = "nbkit.cluster.vllm_entry"
READY_TIMEOUT_S = 180.0
# Read by vLLM or OpenMP after import (engine construction, the CPU worker, the pinning below), so a
# forked child may carry its own values; every other variable must equal the server's.
LATE_VARS = frozenset({
    "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "NBKIT_FORK_ENGINE",
    "OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND", "GOMP_CPU_AFFINITY", "KMP_AFFINITY",
})


def import_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of a replica's environment that must be in place when vLLM is imported.

    >>> import_env({"HF_HUB_OFFLINE": "1", "OMP_PLACES": "{0}", "VLLM_CPU_OMP_THREADS_BIND": "0"})
    {'HF_HUB_OFFLINE': '1'}
    """
    return {k: v for k, v in env.items() if k not in LATE_VARS}


def forkable(argv: Sequence[str]) -> bool:
    """A command line the server can run: this interpreter running nbkit's vLLM entry point.

    >>> forkable([sys.executable, "-m", ENTRY, "serve", "m"]), forkable(["vllm", "serve", "m"])
    (True, False)
    """
    return len(argv) > 3 and argv[0] == sys.executable and argv[1] == "-m" and argv[2] == ENTRY


class Forked:
    """A replica forked by the server, with the part of ``subprocess.Popen`` nbkit uses."""

    def __init__(self, server: "ForkServer", pid: int, args: Sequence[str]):
        self.server, self.pid, self.args = server, pid, list(args)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_status(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode


class ForkServer:
    """The parent's side of one fork server: starts it, forks replicas through it, hears their exits."""

    def __init__(self, env: Mapping[str, str]):
        self.env = import_env(env)
        self.log_path = Path(tempfile.gettempdir()) / f"nbkit-forkserver-{os.getpid()}.log"
        self._lock = threading.Lock()
        self._replies: queue.Queue = queue.Queue()
        self._exits: dict[int, int] = {}
        self._ready = threading.Event()
        self._owner = os.getpid()
        with open(self.log_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__], env={**self.env, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, start_new_session=True, close_fds=True)
        self._t0 = time.monotonic()
        threading.Thread(target=self._read, name="nbkit-forkserver", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "exit" in msg:
                self._exits[msg["exit"]] = msg["rc"]
            elif "ready" in msg:
                log.info("forkserver: pid %s has vLLM imported (%.1f s)", self.proc.pid, time.monotonic() - self._t0)
                self._ready.set()
            else:
                self._replies.put(msg)
        self._replies.put({"error": "fork server exited"})

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and self._owner == os.getpid()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if not self.alive or time.monotonic() > deadline:
                return False
        return self.alive

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: str | None = None) -> Forked:
        """Fork one replica; raises ``OSError`` if the server cannot (the caller spawns instead)."""
        if not forkable(argv) or import_env(env) != self.env:
            raise OSError("this command line or environment cannot be forked from the fork server")
        if not self.wait_ready():
            raise OSError(f"the fork server is not running (its log: {self.log_path})")
        req = {"argv": list(argv), "env": dict(env), "cwd": cwd or os.getcwd(), "log": str(log_path)}
        with self._lock:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write((json.dumps(req) + "\n").encode())
                self.proc.stdin.flush()
                reply = self._replies.get(timeout=30)
            except (OSError, queue.Empty) as e:
                raise OSError(f"the fork server did not answer: {e}") from e
        if "pid" not in reply:
            raise OSError(reply.get("error", "the fork server refused"))
        return Forked(self, reply["pid"], argv)

    def exit_status(self, pid: int) -> int | None:
        """A forked replica's return code, or None while it runs (-1 if the server died and the
        replica is gone, its status unknown)."""
        if pid in self._exits:
            return self._exits[pid]
        if self.proc.poll() is not None:
            try:
                os.kill(pid, 0)
                return None
            except ProcessLookupError:
                return self._exits.get(pid, -1)
            except PermissionError:
                return None
        return None

    def close(self) -> None:
        """Stop the server (forked replicas keep running: stop them through their handles)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_server: ForkServer | None = None
_server_lock = threading.Lock()


def server_for(env: Mapping[str, str], wait: bool = True) -> ForkServer | None:
    """This process's fork server if it can fork a replica with ``env`` (started on first use);
    None if not (another environment, or the server failed: spawn instead)."""
    global _server
    with _server_lock:
        if _server is None or not _server.alive:
            _server = ForkServer(env)
        srv = _server
    if srv.env != import_env(env):
        log.debug("forkserver: environment differs from the server's; spawning")
        return None
    if wait and not srv.wait_ready():
        log.warning("forkserver: not ready (log: %s); spawning instead", srv.log_path)
        return None
    return srv


@atexit.register
def shutdown() -> None:
    """Stop this process's fork server, if it runs (the next preload replica starts a new one).
    Replicas forked from it keep running; their exit status is then read from the process table."""
    global _server
    with _server_lock:
        srv, _server = _server, None
    if srv is not None and srv._owner == os.getpid():
        srv.close()
        srv.log_path.unlink(missing_ok=True)


def current() -> ForkServer | None:
    """The running fork server of this process, if any."""
    return _server if _server is not None and _server.alive else None


# -- the server process ----------------------------------------------------------------------------
def _child(req: dict, proto: int) -> None:
    """In the forked child: become the replica process, run vLLM, exit with its status."""
    code = 1
    try:
        os.setsid()
        os.close(proto)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        try:  # ps and psutil show the replica's command line (one string), not the server's; before
            import setproctitle  # the environment changes: it may take over the environment's memory
            setproctitle.setproctitle(" ".join(req["argv"]))
        except ImportError:
            pass
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        from nbkit.cluster import vllm_entry
        vllm_entry.pin_to_omp_cores(os.environ)
        vllm_entry.main(req["argv"][3:])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        os._exit(code)


def _serve() -> None:
    proto = os.dup(1)  # replies on a private descriptor: anything an import prints goes to the log
    os.dup2(2, 1)
    t0 = time.monotonic()
    import nbkit.cluster.vllm_entry  # noqa: F401  (patches importlib.metadata for vllm-cpu first)
    import vllm.entrypoints.cli.main  # noqa: F401
    import vllm.entrypoints.cli.serve  # noqa: F401
    import vllm.entrypoints.openai.api_server  # noqa: F401
    print(f"nbkit fork server {os.getpid()}: vLLM imported in {time.monotonic() - t0:.1f} s", file=sys.stderr)

    def say(msg: dict) -> None:
        os.write(proto, (json.dumps(msg) + "\n").encode())

    say({"ready": True, "pid": os.getpid()})
    buf = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.2)
        if ready:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return  # the parent is gone; its watchdog stops the replicas
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    req = json.loads(line)
                    pid = os.fork()
                except Exception as e:  # a bad request or fork failure: answer, keep serving
                    say({"error": f"{type(e).__name__}: {e}"})
                    continue
                if pid == 0:
                    _child(req, proto)
                say({"pid": pid})
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            say({"exit": pid, "rc": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    _serve()
