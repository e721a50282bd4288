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
        self._prev: dict[str, tuple[float, EngineMetrics]] = {}
        self._first: dict[str, EngineMetrics] = {}  # each rank's first reading: hit rates count from it
        self._began = time.time()
        self._last_rates: dict[str, tuple[float, float]] = {}
        self._errors: dict[str, str] = {}
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
        now = time.time()
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
            if rec.outcome not in ("ok", "cancelled", "pending") and rec.error:
                self._errors[rec.rank] = f"{rec.outcome}: {rec.error}"[:200]
            if rec.policy == "kv_aware" and rec.outcome == "ok" and rec.arrival >= self._began and rec.tokens_in:
                acc = predicted.setdefault(rec.rank, [0, 0])
                acc[0] += rec.cached_tokens
                acc[1] += rec.tokens_in
        index = getattr(c, "kv_index", None)
        rows = []
        for rank in ranks:
            p = plans[rank.replica]
            state = c.state(rank.replica)
            res = results.get(p.url)
            m = None
            if isinstance(res, Exception):
                if state == "healthy":
                    self._errors[rank.name] = f"metrics: {res!r}"[:200]
            elif res is not None:
                m = res.get(str(rank.dp_rank)) if p.dp_size > 1 else next(iter(res.values()), None)
            row = RankRow(rank=rank.name, replica=rank.replica, state=state, pinning=p.pinning, port=p.port,
                          routed=routed.get(rank.name, 0), last_error=self._errors.get(rank.name, ""),
                          restarts=c.restarts_of(rank.replica) if hasattr(c, "restarts_of") else 0)
            if m is not None:
                row.running, row.waiting = m.running, m.waiting
                row.kv_cache_pct = round(100 * m.kv_cache_usage, 1)
                row.requests_served = int(m.requests_finished)
                prev = self._prev.get(rank.name)
                if prev is not None and m.scraped_at > prev[0]:  # rates between two readings' own times
                    dt = m.scraped_at - prev[0]
                    row.prompt_tok_s = max(0.0, (m.prompt_tokens - prev[1].prompt_tokens) / dt)
                    row.gen_tok_s = max(0.0, (m.generation_tokens - prev[1].generation_tokens) / dt)
                    self._prev[rank.name] = (m.scraped_at, m)
                elif prev is not None:  # the same reading again: keep the last rates
                    last = self._last_rates.get(rank.name, (0.0, 0.0))
                    row.prompt_tok_s, row.gen_tok_s = last
                else:
                    self._prev[rank.name] = (m.scraped_at, m)
                self._last_rates[rank.name] = (row.prompt_tok_s, row.gen_tok_s)
                first = self._first.setdefault(rank.name, m)
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
        while self.history and now - self.history[0]["t"] > self.window_s:
            self.history.popleft()
        return rows

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
        import pandas as pd
        from dataclasses import asdict
        cols = list(RankRow.__dataclass_fields__)
        return pd.DataFrame([asdict(r) for r in self.rows], columns=cols).set_index("rank")

    def history_frame(self):
        """The bounded history (last ``window_s`` seconds), one row per (time, rank), plus a 'total' rank."""
        import pandas as pd
        df = pd.DataFrame(list(self.history))
        if df.empty:
            return pd.DataFrame(columns=["t", "rank", "gen_tok_s", "prompt_tok_s", "running", "waiting", "ttft_p50_s"])
        total = df.groupby("t", as_index=False)[["gen_tok_s", "prompt_tok_s", "running", "waiting"]].sum()
        total["rank"] = "total"
        out = pd.concat([df, total], ignore_index=True)
        out["time"] = pd.to_datetime(out["t"], unit="s")
        return out

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
