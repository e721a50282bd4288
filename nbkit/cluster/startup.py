"""Start order and start-up progress of a cluster's replicas.

Order: replicas that share a GPU start one after another, each once the one before it on that
GPU has sized its KV cache (vLLM checks the device's free memory against
``gpu_memory_utilization x total`` and profiles memory at start, so a neighbour still
allocating skews both); every other replica (other GPUs, CPU replicas on their own cores,
simulated ones) starts at once. The order is a pure function of the launch plans::

    from nbkit.cluster.startup import start_after, waves
    start_after(plans)   # {0: (), 1: (0,), 2: (1,), 3: ()}: 0, 1, 2 share GPU 0, 3 has GPU 1
    waves(plans)         # [[0, 3], [1], [2]]

Stages, read from each replica's log as it starts (monotone: a stage never goes back)::

    waiting -> launched -> loading weights -> compiling -> KV cache -> healthy

``compiling`` shows only where vLLM compiles (torch.compile, CUDA graphs; never with
``--enforce-eager``). A replica "has sized its KV cache" at vLLM's ``KV cache size`` /
``Available KV cache memory`` / ``init engine (profile, create kv cache, ...)`` line (the
allocation follows at once), or when it is healthy, whichever comes first.

Progress (:func:`open_progress`): one tqdm bar per replica (``tqdm.auto``: a widget in a
notebook, text in a terminal) with its stage and elapsed seconds, and the log's last line when it
fails; :class:`LineProgress` prints one line per stage change instead (logs, CI).
``Cluster.start(progress=None)`` shows bars when stderr is a terminal or in a notebook kernel,
nothing otherwise (so CI logs stay clean); ``True``/``False`` force it, a file object gets the
bars written to it, and any :class:`Progress` is used as it is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from nbkit.cluster.spec import LaunchPlan

log = logging.getLogger(__name__)

#: The stages of a start, in order; a bar's position is the index.
STAGES = ("waiting", "launched", "loading weights", "compiling", "KV cache", "healthy")
#: The stage at which a replica no longer races the next one on its GPU.
DEVICE_SETTLED = "KV cache"

_PATTERNS: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), s) for p, s in (
    (r"Starting to load model|Loading safetensors checkpoint|Loading weights took|Model loading took",
     "loading weights"),
    ((r"Dynamo bytecode transform|Compiling a graph|torch\.compile took|Directly load the compiled graph"
      r"|Capturing CUDA graphs"), "compiling"),
    ((r"KV cache size:|Available KV cache memory|init engine \(profile, create kv cache"
      r"|nbkit\.sim\.server: .* blocks of \d+"), "KV cache"),
))


def stage_of(line: str) -> str | None:
    """The start stage a vLLM (or ``nbkit.sim.server``) log line announces, else None.

    >>> stage_of("(EngineCore pid=7) INFO [default_loader.py:501] Loading weights took 0.01 seconds")
    'loading weights'
    >>> stage_of("INFO [kv_cache_utils.py:2327] GPU KV cache size: 1,048,576 tokens")
    'KV cache'
    >>> stage_of("INFO [launcher.py:195] Route: /health, Methods: GET") is None
    True
    """
    for pattern, stage in _PATTERNS:
        if pattern.search(line):
            return stage
    return None


def later(a: str, b: str) -> str:
    """The later of two stages."""
    return a if STAGES.index(a) >= STAGES.index(b) else b


class StageLog:
    """Follows one replica's log from where it stood at launch (the file is appended to on every
    start): the stage reached so far and the last non-empty line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.offset = self.path.stat().st_size
        except FileNotFoundError:
            self.offset = 0
        self.stage = "launched"
        self.last_line = ""
        self._partial = ""
        self._new: list[str] = []

    def feed(self, text: str) -> str:
        """Take more log text; returns the stage now."""
        parts = re.split(r"[\r\n]", self._partial + text)
        self._partial = parts.pop()
        for line in parts:
            line = line.strip()
            if not line:
                continue
            self.last_line = line
            found = stage_of(line)
            if found is not None and later(self.stage, found) != self.stage:
                self.stage = found
                self._new.append(found)
        return self.stage

    def take_new(self) -> list[str]:
        """The stages reached since the last call, in order (a poll may read several at once)."""
        new, self._new = self._new, []
        return new

    def poll(self) -> str:
        """Read what the log gained since the last look; returns the stage now."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.stage
        self.offset += len(data)
        self.feed(data.decode(errors="replace"))
        if self._partial.strip():
            self.last_line = self._partial.strip()
        return self.stage


# -- order -------------------------------------------------------------------------------------------
def start_after(plans: Sequence[LaunchPlan], idx: Sequence[int] | None = None) -> dict[int, tuple[int, ...]]:
    """``{i: replicas i waits for}``: for each GPU of replica ``i``, the replica before it (in
    ``idx`` order) on that GPU; nothing for CPU and simulated replicas (they never share a device)."""
    idx = list(range(len(plans))) if idx is None else list(idx)
    last_on: dict[int, int] = {}
    out: dict[int, tuple[int, ...]] = {}
    for i in idx:
        p = plans[i]
        before: list[int] = []
        if p.device == "gpu":
            for d in p.devices:
                if d in last_on and last_on[d] not in before:
                    before.append(last_on[d])
                last_on[d] = i
        out[i] = tuple(before)
    return out


def waves(plans: Sequence[LaunchPlan], idx: Sequence[int] | None = None) -> list[list[int]]:
    """:func:`start_after` as levels: wave ``k`` holds the replicas with ``k`` predecessors in a chain."""
    after = start_after(plans, idx)
    level: dict[int, int] = {}
    out: list[list[int]] = []
    for i, before in after.items():
        k = level[i] = max((level[j] + 1 for j in before), default=0)
        while len(out) <= k:
            out.append([])
        out[k].append(i)
    return out


# -- progress ----------------------------------------------------------------------------------------
class Progress:
    """What a start reports, replica by replica (this base reports nothing)."""

    def begin(self, names: dict[int, str]) -> None: ...

    def stage(self, i: int, stage: str, line: str = "", detail: str = "") -> None: ...

    def done(self, i: int, seconds: float) -> None: ...

    def failed(self, i: int, why: str, line: str = "") -> None: ...

    def close(self) -> None: ...


class _Timed(Progress):
    def begin(self, names: dict[int, str]) -> None:
        self.names = dict(names)
        self.t0: dict[int, float] = {}
        self.seen: dict[int, str] = {}

    def elapsed(self, i: int) -> float:
        return time.monotonic() - self.t0[i] if i in self.t0 else 0.0

    def stage(self, i: int, stage: str, line: str = "", detail: str = "") -> None:
        if stage != "waiting":
            self.t0.setdefault(i, time.monotonic())


class TqdmProgress(_Timed):
    """One tqdm bar per replica: ``replica0 |####   | 2/5 loading weights 12 s``. With ``file``
    the bars are written there (plain tqdm); without, ``tqdm.auto`` picks a notebook widget or
    stderr text."""

    def __init__(self, file: Any = None, refresh_s: float = 1.0):
        self.file, self.refresh_s = file, refresh_s
        self.bars: dict[int, Any] = {}
        self._shown: dict[int, float] = {}

    def begin(self, names: dict[int, str]) -> None:
        super().begin(names)
        if self.file is None:
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
        width = max((len(n) for n in names.values()), default=8)
        for pos, (i, name) in enumerate(names.items()):
            self.bars[i] = tqdm(total=len(STAGES) - 1, desc=name.ljust(width), position=pos, leave=True,
                                file=self.file, postfix=["starting"], dynamic_ncols=self.file is None,
                                bar_format="{desc} |{bar:16}| {n}/{total} {postfix[0]}", ascii=self.file is not None)

    def _show(self, i: int, text: str, n: int | None = None, force: bool = False) -> None:
        bar = self.bars.get(i)
        if bar is None:
            return
        now = time.monotonic()
        changed = n is not None and n != bar.n
        if not (force or changed or now - self._shown.get(i, 0.0) >= self.refresh_s):
            return
        self._shown[i] = now
        bar.postfix = [text]
        if changed:
            bar.update(n - bar.n)
        else:
            bar.refresh()

    def stage(self, i: int, stage: str, line: str = "", detail: str = "") -> None:
        super().stage(i, stage, line, detail)
        text = stage if stage == "waiting" else f"{stage} {self.elapsed(i):.0f} s"
        self._show(i, f"{text} ({detail})" if detail else text, STAGES.index(stage))

    def done(self, i: int, seconds: float) -> None:
        self._show(i, f"healthy in {seconds:.0f} s", len(STAGES) - 1, force=True)
        bar = self.bars.pop(i, None)
        if bar is not None:
            bar.close()

    def failed(self, i: int, why: str, line: str = "") -> None:
        self._show(i, f"failed after {self.elapsed(i):.0f} s: {(line or why)[:160]}", force=True)
        bar = self.bars.pop(i, None)
        if bar is not None:
            bar.close()

    def close(self) -> None:
        for i in list(self.bars):
            bar = self.bars.pop(i)
            bar.postfix = ["not started"]
            bar.close()


class LineProgress(_Timed):
    """One printed line per stage change: ``nbkit: replica0 loading weights (12 s)``."""

    def __init__(self, file: Any = None, prefix: str = "nbkit: "):
        self.file, self.prefix = file, prefix

    def _print(self, text: str) -> None:
        print(self.prefix + text, file=self.file or sys.stderr, flush=True)

    def stage(self, i: int, stage: str, line: str = "", detail: str = "") -> None:
        super().stage(i, stage, line, detail)
        if self.seen.get(i) != stage:
            self.seen[i] = stage
            more = f", {detail}" if detail else ""
            self._print(f"{self.names.get(i, i)} {stage} ({self.elapsed(i):.0f} s{more})")

    def done(self, i: int, seconds: float) -> None:
        self._print(f"{self.names.get(i, i)} healthy in {seconds:.0f} s")

    def failed(self, i: int, why: str, line: str = "") -> None:
        self._print(f"{self.names.get(i, i)} failed after {self.elapsed(i):.0f} s: {line or why}")


def in_notebook() -> bool:
    """True inside a Jupyter kernel (ipykernel)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def open_progress(progress: "bool | None | Progress | Any") -> Progress:
    """The :class:`Progress` that ``Cluster.start(progress=...)`` means (see the module's docstring)."""
    if isinstance(progress, Progress):
        return progress
    if progress is None:
        tty = getattr(sys.stderr, "isatty", None)
        progress = bool(tty and tty()) or in_notebook()
    if progress is True:
        return TqdmProgress()
    if progress is False:
        return Progress()
    if hasattr(progress, "write"):
        return TqdmProgress(file=progress)
    raise TypeError(f"progress={progress!r}: expected True, False, None, a file object or a Progress")


# -- the driver --------------------------------------------------------------------------------------
async def start_replicas(plans: Sequence[LaunchPlan], idx: Sequence[int], launch: Callable[[int], Any], *,
                         timeout: float, probe: Any = None, progress: Progress | None = None,
                         on_healthy: Callable[[int, float], None] | None = None, poll_s: float = 0.25,
                         settle_s: float = 2.0) -> dict[int, float]:
    """Start replicas ``idx`` in :func:`start_after` order and wait until all are healthy.

    ``launch(i)`` returns replica ``i``'s process object, not yet spawned: it has ``log_path``,
    ``spawn()`` and ``async wait_healthy(timeout, probe)`` (a
    :class:`~nbkit.cluster.process.ReplicaProcess`, or a stand-in). ``timeout`` counts from each
    replica's own launch. Returns ``{i: seconds from launch to healthy}``.

    On the first failure the replicas not launched yet are not launched, those that fail within
    ``settle_s`` more are named in the error ("also failed: ..."), the rest are left to the
    caller to stop, and the first error is raised.
    """
    progress = progress or Progress()
    after = start_after(plans, idx)
    settled = {i: asyncio.Event() for i in idx}
    took: dict[int, float] = {}
    errors: list[BaseException] = []  # in the order they happened

    async def one(i: int) -> float:
        name = plans[i].name
        for j in after[i]:
            if not settled[j].is_set():
                progress.stage(i, "waiting", detail=f"after {plans[j].name}, same GPU")
                await settled[j].wait()
        proc = launch(i)
        watch = StageLog(proc.log_path)
        proc.spawn()
        log.info("cluster: %s started (pid %s, %s, port %s)", name, getattr(proc, "pid", None), plans[i].pinning,
                 plans[i].port)
        health = asyncio.ensure_future(proc.wait_healthy(timeout, probe))
        try:
            while not health.done():
                stage = watch.poll()
                for passed in watch.take_new()[:-1]:
                    progress.stage(i, passed, watch.last_line)
                progress.stage(i, stage, watch.last_line)
                if stage == later(stage, DEVICE_SETTLED):
                    settled[i].set()
                await asyncio.wait([health], timeout=poll_s)
            seconds = health.result()
            watch.poll()
            for passed in watch.take_new():  # what the last stretch of the log said
                progress.stage(i, passed, watch.last_line)
        except BaseException as e:
            if not health.done():
                health.cancel()
            watch.poll()
            if not isinstance(e, asyncio.CancelledError):
                progress.failed(i, str(e).splitlines()[0] if str(e) else repr(e), watch.last_line)
            raise
        settled[i].set()
        took[i] = seconds
        progress.done(i, seconds)
        log.info("cluster: %s healthy in %.0f s", name, seconds)
        if on_healthy is not None:
            on_healthy(i, seconds)
        return seconds

    async def guarded(i: int) -> float:
        try:
            return await one(i)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            errors.append(e)
            raise

    progress.begin({i: plans[i].name for i in idx})
    tasks = {i: asyncio.ensure_future(guarded(i)) for i in idx}
    try:
        done, pending = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in done if not t.cancelled() and t.exception() is not None]
        if failed and pending:  # siblings failing for the same reason (a bad flag) are named too
            await asyncio.wait(pending, timeout=settle_s)
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        progress.close()
    if errors:
        first = errors[0]
        log.error("cluster: start failed: %s", str(first).splitlines()[0] if str(first) else repr(first))
        others = ", ".join(n for e in errors[1:] if (n := getattr(e, "name", None)))
        if others and first.args and isinstance(first.args[0], str):
            first.args = (first.args[0] + f"\n(also failed: {others})", *first.args[1:])
        raise first
    return took
