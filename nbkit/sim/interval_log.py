"""What a simulator run reports as it goes and per instance at the end: one line per
``log_interval`` of simulated time in the live monitor's format (``[INFO] step=... instN_batch=...
prompt_t=... decode_t=... npu_mem=[...]``), and each engine's counters."""

from __future__ import annotations

import sys
from typing import Sequence, TextIO

from nbkit.sim.engine import Engine
from nbkit.sim.results import fmt_rate

__all__ = ["IntervalLog", "instance_stats"]


class IntervalLog:
    """Call :meth:`tick` every ``interval`` simulated seconds; ``lines`` keeps what was printed."""

    def __init__(self, engines: Sequence[Engine], interval: float, out: TextIO | None = None):
        self.engines, self.interval = list(engines), interval
        self.out = out if out is not None else sys.stdout
        self.lines: list[str] = []
        self.k = 0
        self.p = [0] * len(self.engines)
        self.d = [0] * len(self.engines)

    def tick(self, t: float) -> None:
        es = self.engines
        self.k += 1
        p = [e.prompt_tokens for e in es]
        d = [e.gen_tokens for e in es]
        prompt = (sum(p) - sum(self.p)) / self.interval
        gen = (sum(d) - sum(self.d)) / self.interval
        self.p, self.d = p, d
        batches = " ".join(f"{e.key}_batch={len(e.running)}" for e in es)
        mems = ", ".join(f"{e.setup.weights_gb + e.used_blocks() * e.bs * e.kv_bytes_per_token / 1e9:.1f} GB"
                         for e in es)
        line = (f"[INFO] step={self.k} {batches} prompt_t={fmt_rate(prompt)} tok/s "
                f"decode_t={fmt_rate(gen)} tok/s npu_mem=[{mems}]")
        self.lines.append(line)
        print(line, file=self.out, flush=True)


def instance_stats(engines: Sequence[Engine]) -> list[dict]:
    """Per engine: its place in the config and its counters (``SimResult.instances``)."""
    return [{"instance_id": e.index, "key": e.key, "pd_type": e.setup.pd_type,
             "tp_size": e.setup.tp_size, "dp_group": e.setup.dp_group,
             "finished": e.finished, "rejected": e.rejected, "steps": e.steps,
             "busy_s": e.busy_time, "prompt_tokens": e.prompt_tokens, "gen_tokens": e.gen_tokens,
             "prefix_queries": e.prefix_queries, "prefix_hits": e.prefix_hits,
             "preemptions": e.preemptions, "num_blocks": e.num_blocks, "block_size": e.bs} for e in engines]
