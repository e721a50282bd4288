"""What a simulator run gives back (:class:`SimResult`), and the pieces that let a run stream: the
inter-token gaps counted per engine step instead of listed per token, a trace read in order.

A request's inter-token gaps are the gaps between the end times of the engine steps in which it got
its tokens. Most are the gap between two consecutive steps, shared by every request that got a
token in both: :func:`count_gaps` counts them in a difference array over the steps (two additions
a request and run of steps), and :func:`add_counted_gaps` hands each step gap with its count to a
:class:`~nbkit.records.Summarizer` at the end; the few other gaps (across a preemption's pause,
and the first one shifted by the profile's ``decode_overhead_s``) are kept one by one.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Sequence

from nbkit.by_tenant import format_tenants
from nbkit.records import RequestResult, Summarizer, format_summary, summarize, write_csv

__all__ = ["SimResult", "TraceOrderError", "count_gaps", "add_counted_gaps", "in_order", "fmt_rate"]


@dataclass
class SimResult:
    """What :meth:`Simulator.run` returns."""

    records: list[RequestResult]
    instances: list[dict]
    wall_s: float
    sim_time_s: float
    policy: str
    log_lines: list[str] = field(default_factory=list)
    #: the run's figures gathered as requests finished (a run that streamed its rows or kept no
    #: inter-token lists); None: computed from ``records``
    summarizer: Summarizer | None = None
    #: completed requests per instance key, where ``records`` were not kept
    per_instance: dict[str, int] | None = None
    #: autoscaled runs (:meth:`nbkit.sim.scaling.Fleet.report`): each up/down with its reason, the
    #: replicas over time, replica-seconds and the peak; None without autoscaling
    scaling: dict | None = None
    #: per tenant (:func:`nbkit.by_tenant.tenant_summaries`) where the trace names tenants; else None
    tenants: dict | None = None

    def summary(self) -> dict:
        """:func:`~nbkit.records.summarize` of the records, plus the policy, the prefix-cache hit
        rate, preemptions, completed requests per instance (``per_instance``), per-instance
        counters (``instances``) and the simulation's wall time (``wall_s``)."""
        s = self.summarizer.summary() if self.summarizer is not None else summarize(self.records)
        s["policy"] = self.policy
        q = sum(i["prefix_queries"] for i in self.instances)
        s["prefix_hit_rate"] = sum(i["prefix_hits"] for i in self.instances) / q if q else None
        s["preemptions"] = sum(i["preemptions"] for i in self.instances)
        per: dict[str, int] = dict(self.per_instance or {})
        if self.per_instance is None:
            for r in self.records:
                if r.ok:
                    per[r.rank] = per.get(r.rank, 0) + 1
        s["per_instance"] = dict(sorted(per.items()))
        s["instances"] = self.instances
        s["wall_s"] = self.wall_s
        if self.scaling is not None:
            s["scaling"] = self.scaling
        if self.tenants:
            s["tenants"] = self.tenants
        return s

    def format_summary(self) -> str:
        """:func:`~nbkit.records.format_summary` (the live benchmark's layout), a line of requests
        per instance and the simulation's wall time."""
        s = self.summary()
        lines = [format_summary(s, "nbkit sim")]
        per = s["per_instance"]
        if per:
            total = sum(per.values())
            lines.append("Per instance: " + ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in per.items()))
        if sc := s.get("scaling"):
            ups = sum(1 for e in sc["events"] if e["direction"] == "up")
            lines.append(f"Autoscaling: {ups} up, {len(sc['events']) - ups} down, peak {sc['peak_replicas']} "
                         f"replicas, {sc['replica_seconds'] / 3600:.2f} replica-hours")
            lines += [f"  {e['t_s']:8.1f} s  {e['direction']:4} "
                      f"{e['current']} -> {e['desired']}: {e['reason']}" for e in sc["events"][:20]]
        if s.get("tenants"):
            lines.append(format_tenants(s["tenants"]))
        lines.append(f"Simulated {s['duration_s']:.2f} s in {s['wall_s']:.2f} s of wall time")
        return "\n".join(lines)

    def write_csv(self, path, time_unit: str = "s") -> None:
        write_csv(self.records, path, time_unit=time_unit)

    def frame(self):
        """The records as a pandas DataFrame (one row per request; no ITL lists)."""
        import pandas as pd
        return pd.DataFrame([{k: getattr(r, k) for k in (
            "request_id", "instance_id", "rank", "policy", "arrival_s", "queue_wait_s", "ttft_s", "tpot_s",
            "e2e_s", "input_toks", "output_toks", "outcome", "session_id", "turn", "prefill_instance",
            "cached_tokens", "preemptions")} for r in self.records])


def fmt_rate(x: float) -> str:
    """2400 -> '2.4k', 820 -> '820' (as the live monitor's lines)."""
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def count_gaps(wd: array, raw: array, ends, segs, late: float) -> None:
    """Count a request's inter-token gaps: the gap between steps j-1 and j adds one at ``wd[j]``
    (as +1 where a run of such gaps starts, -1 after it ends); the others go to ``raw``. ``segs``
    are the request's ``[a, b)`` step ranges, ``ends`` its engine's step end times, ``late`` the
    delay of tokens 2..n (added to the first gap)."""
    need = segs[-1][1] + 1
    if len(wd) < need:
        wd.frombytes(bytes(wd.itemsize * (need - len(wd) + 4096)))
    first = late > 0          # the first gap still lacks the late offset
    prev_b = -1
    for a, b in segs:
        if prev_b < 0:
            lo = a + 1
        elif a == prev_b:
            lo = a
        else:                 # preempted in between: one gap over the pause
            x = ends[a] - ends[prev_b - 1]
            if first:
                x += late
                first = False
            raw.append(x)
            lo = a + 1
        if lo < b:
            if first:
                first = False
                raw.append((ends[lo] - ends[lo - 1]) + late)
                lo += 1
            if lo < b:
                wd[lo] += 1
                wd[b] -= 1
        prev_b = b


def add_counted_gaps(acc: Summarizer, step_ends: Sequence[array], counted: Sequence[array], raw: array) -> None:
    """Give ``acc`` every engine's step gaps with their counts, and the gaps kept one by one."""
    import numpy as np

    for se, wd in zip(step_ends, counted):
        n = len(se)
        if n < 2 or not len(wd):
            continue
        ends = np.frombuffer(se, dtype=float)
        w = np.cumsum(np.frombuffer(wd, dtype=f"i{wd.itemsize}"), dtype=np.int64)[1:n]
        gaps = ends[1:len(w) + 1] - ends[:len(w)]
        used = w > 0
        acc.add_itl(gaps[used], w[used])
    acc.add_itl(np.frombuffer(raw, dtype=float) if raw else [])


class TraceOrderError(ValueError):
    """A trace given as a stream came out of arrival order."""


def in_order(items):
    """``items`` as they come, checking that they arrive in order."""
    last = -math.inf
    for it in items:
        t = it.arrival_time_ns
        if t < last:
            raise TraceOrderError(f"trace stream not in arrival order ({t} ns after {last} ns): pass a list to "
                             f"have it sorted")
        last = t
        yield it
