"""Per-request records, the per-request CSV shared with the live benchmark, interval lines and the
final summary.

CSV columns (``time_unit="s"``, the live benchmark's)::

    request_id, instance_id, rank, policy, arrival_s, queue_wait_s, ttft_s, tpot_s, itl_s, e2e_s,
    input_toks, output_toks, outcome

``itl_s`` is a JSON list; ``tpot_s = (e2e - ttft) / (output_toks - 1)``, empty when
``output_toks <= 1``. With ``time_unit="ns"`` (the seed format) the time columns are named
``*_ns`` and hold integer nanoseconds. :func:`read_csv` reads both::

    >>> from nbkit.sim.report import RequestRecord, write_csv, read_csv
    >>> r = RequestRecord("0", 1, "inst1", "least_load", 0.5, 0.01, 0.2, 0.02, [0.02, 0.02], 0.24, 100, 3, "ok")
    >>> write_csv("/tmp/r.csv", [r], time_unit="ns")
    >>> read_csv("/tmp/r.csv")[0].ttft_s
    0.2
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

__all__ = ["RequestRecord", "COLUMNS", "TIME_FIELDS", "write_csv", "read_csv", "summarize",
           "format_summary", "fmt_rate", "percentile"]

#: Time columns, without their unit suffix.
TIME_FIELDS = ("arrival", "queue_wait", "ttft", "tpot", "itl", "e2e")


def _columns(unit: str) -> list[str]:
    return ["request_id", "instance_id", "rank", "policy", *(f"{f}_{unit}" for f in TIME_FIELDS),
            "input_toks", "output_toks", "outcome"]


COLUMNS = _columns("s")


@dataclass
class RequestRecord:
    """One request's outcome. Times in seconds from the trace's time zero (``arrival_s``) or
    from the request's arrival (the others)."""

    request_id: str
    instance_id: int | None
    rank: str
    policy: str
    arrival_s: float
    queue_wait_s: float | None
    ttft_s: float | None
    tpot_s: float | None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    input_toks: int = 0
    output_toks: int = 0
    outcome: str = "ok"
    # simulator extras (not in the CSV)
    session: str | None = None
    prefill_instance: int | None = None
    cached_tokens: int = 0
    preemptions: int = 0

    @staticmethod
    def tpot(ttft: float | None, e2e: float | None, output_toks: int) -> float | None:
        if ttft is None or e2e is None or output_toks <= 1:
            return None
        return (e2e - ttft) / (output_toks - 1)


def _fmt_s(x: float | None) -> str:
    return "" if x is None else repr(round(x, 9))


def _fmt_ns(x: float | None) -> str:
    return "" if x is None else str(int(round(x * 1e9)))


def write_csv(path: str | os.PathLike, records: Iterable[RequestRecord], time_unit: str = "s") -> None:
    """Write ``records`` (see the module doc for the columns)."""
    if time_unit not in ("s", "ns"):
        raise ValueError(f"time_unit={time_unit!r}: expected 's' or 'ns'")
    fmt = _fmt_s if time_unit == "s" else _fmt_ns
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(_columns(time_unit))
        for r in records:
            if time_unit == "s":
                itl = "[" + ",".join(f"{x:.6g}" for x in r.itl_s) + "]"
            else:
                itl = "[" + ",".join(str(int(round(x * 1e9))) for x in r.itl_s) + "]"
            w.writerow([r.request_id, "" if r.instance_id is None else r.instance_id, r.rank, r.policy,
                        fmt(r.arrival_s), fmt(r.queue_wait_s), fmt(r.ttft_s), fmt(r.tpot_s), itl,
                        fmt(r.e2e_s), r.input_toks, r.output_toks, r.outcome])


def read_csv(path: str | os.PathLike) -> list[RequestRecord]:
    """Read a per-request CSV written in seconds (``*_s``) or nanoseconds (``*_ns``)."""
    with open(path, newline="", encoding="utf-8") as f:
        rd = csv.DictReader(f)
        cols = rd.fieldnames or []
        if "ttft_ns" in cols:
            unit, scale = "ns", 1e-9
        elif "ttft_s" in cols:
            unit, scale = "s", 1.0
        else:
            raise ValueError(f"{os.fspath(path)}: no ttft_s or ttft_ns column (columns: {', '.join(cols)})")
        missing = [c for c in ("request_id", f"arrival_{unit}", f"ttft_{unit}", f"e2e_{unit}", "input_toks",
                               "output_toks") if c not in cols]
        if missing:
            raise ValueError(f"{os.fspath(path)}: missing column(s) {', '.join(missing)}")

        def num(row, name, line):
            v = row.get(f"{name}_{unit}")
            if v is None or v == "":
                return None
            try:
                return float(v) * scale
            except ValueError:
                raise ValueError(f"{os.fspath(path)}:{line}: {name}_{unit}={v!r} is not a number") from None

        out = []
        for line, row in enumerate(rd, 2):
            itl_raw = row.get(f"itl_{unit}") or "[]"
            try:
                itl = [float(x) * scale for x in json.loads(itl_raw)]
            except (ValueError, TypeError):
                raise ValueError(f"{os.fspath(path)}:{line}: itl_{unit} is not a JSON list") from None
            inst = row.get("instance_id", "")
            try:
                instance_id = int(inst) if inst not in ("", None) else None
            except ValueError:
                instance_id = None
            ttft, e2e = num(row, "ttft", line), num(row, "e2e", line)
            out_toks = int(float(row.get("output_toks") or 0))
            tpot = num(row, "tpot", line) if f"tpot_{unit}" in cols else RequestRecord.tpot(ttft, e2e, out_toks)
            out.append(RequestRecord(
                request_id=row["request_id"], instance_id=instance_id, rank=row.get("rank", "") or "",
                policy=row.get("policy", "") or "", arrival_s=num(row, "arrival", line) or 0.0,
                queue_wait_s=num(row, "queue_wait", line) if f"queue_wait_{unit}" in cols else None,
                ttft_s=ttft, tpot_s=tpot, itl_s=itl, e2e_s=e2e,
                input_toks=int(float(row.get("input_toks") or 0)), output_toks=out_toks,
                outcome=row.get("outcome", "ok") or "ok"))
        return out


# ------------------------------------------------------------------------------------- summary


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an already sorted sequence."""
    n = len(sorted_xs)
    if n == 0:
        return math.nan
    k = (n - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, n - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    try:
        import numpy as np
        a = np.asarray(xs, dtype=float)
        p = np.percentile(a, [50, 90, 99])
        return {"mean": float(a.mean()), "median": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}
    except ImportError:  # pragma: no cover
        s = sorted(xs)
        return {"mean": sum(s) / len(s), "median": percentile(s, 50), "p90": percentile(s, 90),
                "p99": percentile(s, 99)}


def summarize(records: Sequence[RequestRecord], wall_s: float | None = None) -> dict:
    """Counts, throughput and mean/median/p90/p99 of TTFT, TPOT, ITL and E2E (seconds)."""
    ok = [r for r in records if r.outcome == "ok"]
    start = min((r.arrival_s for r in records), default=0.0)
    end = max((r.arrival_s + r.e2e_s for r in ok if r.e2e_s is not None), default=start)
    dur = max(end - start, 1e-12)
    out_toks = sum(r.output_toks for r in ok)
    in_toks = sum(r.input_toks for r in ok)
    itl: list[float] = []
    for r in ok:
        itl.extend(r.itl_s)
    per_inst: dict[str, int] = {}
    for r in ok:
        per_inst[r.rank] = per_inst.get(r.rank, 0) + 1
    s = {
        "requests": len(records), "ok": len(ok), "failed": len(records) - len(ok),
        "duration_s": dur if ok else 0.0, "input_tokens": in_toks, "output_tokens": out_toks,
        "request_throughput": len(ok) / dur if ok else 0.0,
        "output_throughput": out_toks / dur if ok else 0.0,
        "total_throughput": (in_toks + out_toks) / dur if ok else 0.0,
        "ttft_s": _stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": _stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": _stats(itl),
        "e2e_s": _stats([r.e2e_s for r in ok if r.e2e_s is not None]),
        "per_instance": dict(sorted(per_inst.items())),
    }
    if wall_s is not None:
        s["wall_s"] = wall_s
    return s


def format_summary(s: dict, title: str = "nbkit sim") -> str:
    """A text block in the live benchmark's layout (``vllm bench serve``'s), plus a line per
    instance and, when known, the wall time of the simulation."""
    lines = [f"{' ' + title + ' ':=^60}"]

    def add(name, value, fmt="{:.2f}"):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        lines.append(f"{name:<44}{fmt.format(value):>16}")

    add("Policy:", s.get("policy") or "-", "{}")
    add("Successful requests:", s["ok"], "{:d}")
    add("Failed requests:", s["failed"], "{:d}")
    add("Benchmark duration (s):", s["duration_s"])
    add("Total input tokens:", s["input_tokens"], "{:d}")
    add("Total generated tokens:", s["output_tokens"], "{:d}")
    add("Request throughput (req/s):", s["request_throughput"])
    add("Output token throughput (tok/s):", s["output_throughput"])
    add("Total token throughput (tok/s):", s["total_throughput"])
    if s.get("prefix_hit_rate") is not None:
        add("Prefix cache hit rate:", s["prefix_hit_rate"], "{:.1%}")
    if s.get("preemptions"):
        add("Preemptions:", s["preemptions"], "{:d}")
    for m, name in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                    ("itl", "Inter-token Latency"), ("e2e", "End-to-end Latency")):
        lines.append(f"{' ' + name + ' ':-^60}")
        st = s[f"{m}_s"]
        for stat in ("mean", "median", "p90", "p99"):
            label = stat.capitalize() if stat in ("mean", "median") else stat.upper()
            add(f"{label} {m.upper()} (ms):", None if st[stat] is None else st[stat] * 1e3)
    lines.append("=" * 60)
    per = s.get("per_instance") or {}
    if per:
        total = sum(per.values()) or 1
        lines.append("Per instance: " + ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in per.items()))
    if "wall_s" in s:
        lines.append(f"Simulated {s['duration_s']:.2f} s in {s['wall_s']:.2f} s of wall time")
    return "\n".join(lines)


def fmt_rate(x: float) -> str:
    """2400 -> '2.4k', 820 -> '820' (as the live monitor's lines)."""
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"
