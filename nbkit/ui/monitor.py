"""Live load per rank: samples a Cluster's load (and its routers' records) about once a second
into a bounded history. The load is what the cluster's routers last scraped when that is fresh
(:data:`REUSE_SCRAPE_S`), so watching costs the replicas no extra ``/metrics`` renders; a replica
no router reads is scraped through the cluster's probe. The panel draws it, ``snapshot()`` tabulates it, and the text form
prints one line per interval in the seed format::

    mon = Monitor(cluster)                       # or cluster.monitor()
    mon.sample_now()                             # one sample (blocking); the panel runs it every second
    mon.snapshot()                               # DataFrame, one row per rank
    mon.start_logging(interval=1.0)              # prints lines like:
    # [INFO] step=20 inst0_batch=6 inst1_batch=4 prompt_t=2.4k tok/s decode_t=820 tok/s npu_mem=[2.9 GB, 2.9 GB]

On CPU ``npu_mem`` is each replica's resident memory; on GPUs the used memory of its devices.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TextIO

from nbkit import loop
from nbkit.routing.metrics import EngineMetrics
from nbkit.routing.probes import ProbeError

log = logging.getLogger(__name__)

#: Seconds of history kept for charts.
WINDOW_S = 120.0
#: A router's reading younger than this is used instead of scraping again (a router that does not
#: read load scrapes every 2 s; one that does, every 0.25 s).
REUSE_SCRAPE_S = 2.5
#: Rates are taken over at least this many seconds of a rank's counters: two readings a moment apart
#: (a router's scrape, then the probe's) would divide one burst of tokens by almost nothing.
MIN_RATE_DT = 0.5
#: A rank's last error is shown, with its age, for this long; a failed scrape only until one succeeds.
ERROR_SHOW_S = 60.0


@dataclass
class RankRow:
    """What the panel shows for one rank at one moment."""

    rank: str
    replica: int
    state: str
    pinning: str
    port: int
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_pct: float = 0.0
    prompt_tok_s: float = 0.0
    gen_tok_s: float = 0.0
    requests_served: int = 0
    routed: int = 0
    ttft_p50_s: float | None = None
    mem_gb: float = 0.0
    kv_blocks: int | None = None          # blocks the router's KV-event index holds for the rank
    predicted_hit_pct: float | None = None  # prompt tokens kv_aware expected cached, since the monitor began
    reported_hit_pct: float | None = None   # ... and what vLLM reports as prefix-cache hits over the same time
    restarts: int = 0                       # restarts of its replica by the cluster's supervisor
    last_error: str = ""
    last_error_age_s: float | None = None   # seconds since last_error happened


def fmt_rate(x: float) -> str:
    """2400 -> '2.4k', 820 -> '820'."""
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


@dataclass
class Monitor:
    """Samples a cluster; keeps ``rows`` (latest) and ``history`` (bounded) for views."""

    cluster: object
    window_s: float = WINDOW_S
    rows: list[RankRow] = field(default_factory=list)
    history: deque = field(default_factory=lambda: deque(maxlen=20_000))
    step: int = 0

    def __post_init__(self) -> None:
        self._prev: dict[str, tuple[object, EngineMetrics]] = {}  # rank -> (generation, last rate reading)
        self._first: dict[str, EngineMetrics] = {}  # each rank's first reading: hit rates count from it
        self._began = time.time()
        self._last_rates: dict[str, tuple[float, float]] = {}
        self._errors: dict[str, tuple[str, float]] = {}  # rank -> (message, when)
        self._log_task: asyncio.Task | None = None

    # -- sampling ---------------------------------------------------------------------------------
    def routers(self) -> list:
        return self.cluster.routers()

    def records(self) -> list:
        recs = [r for router in self.routers() for r in list(router.records)]  # appended to from other threads
        recs.sort(key=lambda r: r.arrival)
        return recs

    def _routed_readings(self, now: float) -> dict[str, EngineMetrics]:
        """The freshest reading per rank name among the routers' scrapes (younger than REUSE_SCRAPE_S)."""
        best: dict[str, EngineMetrics] = {}
        for router in self.routers():
            for st in list(router.states):
                m = st.scraped
                if m is not None and now - m.scraped_at <= REUSE_SCRAPE_S and (
                        st.key not in best or m.scraped_at > best[st.key].scraped_at):
                    best[st.key] = m
        return best

    async def _read(self, plan, ranks, routed: dict[str, EngineMetrics]) -> dict[str, EngineMetrics] | Exception:
        """``{engine label: metrics}`` of one replica: from the routers when all its ranks are fresh there."""
        mine = [r for r in ranks if r.replica == plan.index]
        if mine and all(r.name in routed for r in mine):
            return {str(r.dp_rank): routed[r.name] for r in mine}
        try:
            return await self.cluster.probe.metrics(plan.url)
        except (ProbeError, ValueError) as e:
            return e

    async def sample(self) -> list[RankRow]:
        """Read every live replica's load once and update ``rows`` and ``history``."""
        c = self.cluster
        plans = list(c.plans)
        ranks = list(c.ranks)
        routed = self._routed_readings(time.time())
        live = [p for p in plans if not p.headless and c.state(p.index) in ("healthy", "unhealthy", "starting")]
        results = dict(zip([p.url for p in live],
                           await asyncio.gather(*(self._read(p, ranks, routed) for p in live))))
        readings: dict[str, EngineMetrics | Exception] = {}
        for rank in ranks:
            p = plans[rank.replica]
            res = results.get(p.url)
            if isinstance(res, Exception):
                readings[rank.name] = res
            elif res is not None:
                m = res.get(str(rank.dp_rank)) if p.dp_size > 1 else next(iter(res.values()), None)
                if m is not None:
                    readings[rank.name] = m
        return self.update(readings)

    def update(self, readings: dict, now: float | None = None, generations: dict | None = None) -> list[RankRow]:
        """One sample from readings already in hand: ``{rank name: EngineMetrics | Exception}`` (a rank
        left out had no reading). :meth:`sample` scrapes and calls it; tests feed it synthetic readings.

        Rates come only from two readings of the same rank generation at least :data:`MIN_RATE_DT`
        apart: a replica restart (``generations``, by default its restarts and pid) or counters that went
        down start the rank afresh with rate 0, never a cumulative counter over an arbitrary time. The
        history's "total" row at each instant is the sum of the ranks' rows of that instant."""
        c = self.cluster
        plans = list(c.plans)
        now = time.time() if now is None else now
        routed: dict[str, int] = {}
        ttfts: dict[str, list[float]] = {}
        predicted: dict[str, list[int]] = {}  # rank -> [cached tokens, prompt tokens] of kv_aware decisions
        for router in self.routers():  # routed = finished records + in flight now
            for st in router.states:
                routed[st.key] = routed.get(st.key, 0) + st.in_flight
        for rec in self.records():
            routed[rec.rank] = routed.get(rec.rank, 0) + 1
            if rec.ttft_s is not None and rec.outcome == "ok" and now - rec.arrival < 30:
                ttfts.setdefault(rec.rank, []).append(rec.ttft_s)
            if (rec.outcome not in ("ok", "cancelled", "pending") and rec.error
                    and now - rec.arrival <= ERROR_SHOW_S and rec.arrival >= self._errors.get(rec.rank, ("", 0.0))[1]):
                self._errors[rec.rank] = (f"{rec.outcome}: {rec.error}"[:200], rec.arrival)
            if rec.policy == "kv_aware" and rec.outcome == "ok" and rec.arrival >= self._began and rec.tokens_in:
                acc = predicted.setdefault(rec.rank, [0, 0])
                acc[0] += rec.cached_tokens
                acc[1] += rec.tokens_in
        index = getattr(c, "kv_index", None)
        rows = []
        for rank in list(c.ranks):
            p = plans[rank.replica]
            state = c.state(rank.replica)
            res = readings.get(rank.name)
            m = res if isinstance(res, EngineMetrics) else None
            if isinstance(res, Exception) and state == "healthy":
                self._errors[rank.name] = (f"metrics: {res!r}"[:200], now)
            elif m is not None and self._errors.get(rank.name, ("", 0.0))[0].startswith("metrics: "):
                del self._errors[rank.name]  # the scrape works again: its old failure is news no more
            err = self._errors.get(rank.name)
            if err is not None and now - err[1] > ERROR_SHOW_S:  # long past: no longer shown
                del self._errors[rank.name]
                err = None
            row = RankRow(rank=rank.name, replica=rank.replica, state=state, pinning=p.pinning, port=p.port,
                          routed=routed.get(rank.name, 0), last_error=err[0] if err else "",
                          last_error_age_s=round(max(0.0, now - err[1]), 1) if err else None,
                          restarts=c.restarts_of(rank.replica) if hasattr(c, "restarts_of") else 0)
            if m is not None:
                row.running, row.waiting = m.running, m.waiting
                row.kv_cache_pct = round(100 * m.kv_cache_usage, 1)
                row.requests_served = int(m.requests_finished)
                gen = (generations or {}).get(rank.name, self._generation(rank.replica))
                row.prompt_tok_s, row.gen_tok_s = self._rates(rank.name, gen, m)
                first = self._first.get(rank.name)
                if first is None or first.prefix_cache_queries > m.prefix_cache_queries:  # new or reset counters
                    first = self._first[rank.name] = m
                queries = m.prefix_cache_queries - first.prefix_cache_queries
                if queries > 0:
                    row.reported_hit_pct = round(100 * (m.prefix_cache_hits - first.prefix_cache_hits) / queries, 1)
            if index is not None and rank.name in index.ranks:
                row.kv_blocks = index.blocks(rank.name)
            acc = predicted.get(rank.name)
            if acc and acc[1]:
                row.predicted_hit_pct = round(100 * acc[0] / acc[1], 1)
            t = sorted(ttfts.get(rank.name, []))
            row.ttft_p50_s = t[len(t) // 2] if t else None
            row.mem_gb = self._memory_gb(rank.replica)
            rows.append(row)
        self.rows = rows
        self.step += 1
        for r in rows:
            self.history.append({"t": now, "rank": r.rank, "gen_tok_s": r.gen_tok_s, "prompt_tok_s": r.prompt_tok_s,
                                 "running": r.running, "waiting": r.waiting, "ttft_p50_s": r.ttft_p50_s})
        if rows:  # the total of this instant, from these very rows
            self.history.append({"t": now, "rank": "total", "gen_tok_s": sum(r.gen_tok_s for r in rows),
                                 "prompt_tok_s": sum(r.prompt_tok_s for r in rows),
                                 "running": sum(r.running for r in rows), "waiting": sum(r.waiting for r in rows),
                                 "ttft_p50_s": None})
        while self.history and now - self.history[0]["t"] > self.window_s:
            self.history.popleft()
        return rows

    def _generation(self, replica: int):
        """What changes when a replica's process (and so its counters) is replaced: restarts and pid."""
        c = self.cluster
        proc = c.process(replica) if hasattr(c, "process") else None
        return (c.restarts_of(replica) if hasattr(c, "restarts_of") else 0, getattr(proc, "pid", None))

    def _rates(self, name: str, gen, m: EngineMetrics) -> tuple[float, float]:
        """(prompt, generation) tok/s of rank ``name`` from its previous reading of the same generation."""
        prev = self._prev.get(name)
        if (prev is None or prev[0] != gen or m.prompt_tokens < prev[1].prompt_tokens
                or m.generation_tokens < prev[1].generation_tokens):  # first reading, restart or counter reset
            self._prev[name] = (gen, m)
            self._last_rates[name] = (0.0, 0.0)
            return 0.0, 0.0
        dt = m.scraped_at - prev[1].scraped_at
        if dt < MIN_RATE_DT:  # the same reading again, or one a moment later: keep the last rates
            return self._last_rates.get(name, (0.0, 0.0))
        rates = ((m.prompt_tokens - prev[1].prompt_tokens) / dt, (m.generation_tokens - prev[1].generation_tokens) / dt)
        self._prev[name] = (gen, m)
        self._last_rates[name] = rates
        return rates

    def _memory_gb(self, replica: int) -> float:
        plan = self.cluster.plans[replica]
        if plan.device == "gpu":
            return round(_gpu_used_gb(plan.devices), 1)
        proc = self.cluster.process(replica)
        return round(proc.rss_bytes() / 1e9, 1) if proc is not None and proc.alive else 0.0

    def sample_now(self) -> list[RankRow]:
        """Blocking :meth:`sample`."""
        return loop.run(self.sample())

    async def aclose(self) -> None:
        self.stop_logging()

    # -- views ------------------------------------------------------------------------------------
    def snapshot(self):
        """The latest rows as a pandas DataFrame indexed by rank."""
        from dataclasses import asdict

        import pandas as pd
        cols = list(RankRow.__dataclass_fields__)
        return pd.DataFrame([asdict(r) for r in self.rows], columns=cols).set_index("rank")

    def history_frame(self, history: list | None = None):
        """The bounded history (last ``window_s`` seconds), one row per (time, rank), with a 'total' rank
        at each instant (the sum of that sample's ranks). ``history``: a copy of :attr:`history` taken
        earlier (the panel copies it on nbkit's loop and builds the frame on its chart thread)."""
        import pandas as pd
        df = pd.DataFrame(list(self.history) if history is None else history)
        if df.empty:
            return pd.DataFrame(columns=["t", "rank", "gen_tok_s", "prompt_tok_s", "running", "waiting", "ttft_p50_s",
                                         "time"])
        df["time"] = pd.to_datetime(df["t"], unit="s")
        return df

    def log_line(self) -> str:
        """One line in the seed format for the latest sample."""
        by_inst: dict[int, float] = {}
        for r in self.rows:
            by_inst[r.replica] = by_inst.get(r.replica, 0.0) + r.running
        batches = " ".join(f"inst{i}_batch={int(v)}" for i, v in sorted(by_inst.items()))
        prompt = sum(r.prompt_tok_s for r in self.rows)
        gen = sum(r.gen_tok_s for r in self.rows)
        mem: dict[int, float] = {}
        for r in self.rows:
            mem[r.replica] = r.mem_gb
        mems = ", ".join(f"{v:.1f} GB" for _, v in sorted(mem.items()))
        return (f"[INFO] step={self.step} {batches} prompt_t={fmt_rate(prompt)} tok/s "
                f"decode_t={fmt_rate(gen)} tok/s npu_mem=[{mems}]")

    # -- text form ----------------------------------------------------------------------------------
    def start_logging(self, interval: float = 1.0, file: TextIO | None = None) -> None:
        """Print :meth:`log_line` every ``interval`` seconds (on nbkit's loop) until stop_logging()."""
        if interval <= 0:
            raise ValueError(f"log_interval={interval!r}: must be > 0")
        out = file or sys.stdout

        async def run() -> None:
            while True:
                t = time.monotonic()
                try:
                    await self.sample()
                    print(self.log_line(), file=out, flush=True)
                except Exception as e:  # noqa: BLE001 - keep logging through hiccups
                    log.warning("monitor: sample failed: %r", e)
                    print(f"[WARN] monitor: {e!r}", file=out, flush=True)
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - t)))

        self.stop_logging()

        def _start() -> None:
            self._log_task = asyncio.ensure_future(run())

        loop.run_in_loop_thread(_start)

    def stop_logging(self) -> None:
        task = self._log_task
        self._log_task = None
        if task is not None:
            loop.call_soon(task.cancel)


def _gpu_used_gb(devices) -> float:
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(d)).used
                       for d in devices) / 1e9
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML: no figure
        return 0.0
