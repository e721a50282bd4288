"""How a simulated run measures up to a real one, and the real runs calibration learns from
(:mod:`nbkit.sim.calibrate`): the trace that pins a profile's parameters down, the trace rebuilt
from a run's records, the figures compared, streams held up by a stall of the measuring side, and
the load each request ran under::

    from nbkit.records import read_csv
    from nbkit.sim import Simulator
    from nbkit.sim.fidelity import calibration_trace, compare, held
    from nbkit.traces import write_trace
    trace = calibration_trace(gap_s=10)
    write_trace("calib.jsonl", trace)          # run it for real: nbkit bench --workload trace ... --output real.csv
    real = read_csv("real.csv")
    sim = Simulator("cpu-1x-tiny.json").run(trace)
    print(compare(real, sim.records)["rel_err"])              # mean TTFT, mean TPOT, throughput
    print(sum(held(r) for r in real), "streams held up before their first token")
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from nbkit.records import RequestResult
from nbkit.traces import TraceRequest

__all__ = ["calibration_trace", "trace_from_records", "compare", "held", "arrival_order", "load_levels",
           "ran_alone"]


def arrival_order(r: RequestResult):
    """Arrival, then the request id (numerically where it is a number): ties keep trace order."""
    rid = r.request_id
    try:
        return (r.arrival_s, 0, int(rid), "")
    except (TypeError, ValueError):
        return (r.arrival_s, 1, 0, str(rid))


def trace_from_records(records: Sequence[RequestResult]) -> tuple[list[TraceRequest], list[RequestResult]]:
    """Flat trace requests rebuilt from a run's records (arrival, input, output), in arrival
    order, and the records in that same order."""
    ok = sorted((r for r in records if r.outcome == "ok" and r.ttft_s is not None and r.e2e_s is not None),
                key=arrival_order)
    if not ok:
        raise ValueError("no successful request with ttft and e2e in the CSV")
    t0 = ok[0].arrival_s
    trace = [TraceRequest(r.input_toks, max(1, r.output_toks), int(round((r.arrival_s - t0) * 1e9))) for r in ok]
    return trace, ok


def calibration_trace(bursts: Sequence[int] = (1, 4, 16, 64, 128), repeats: int = 2,
                      prompt: tuple[int, int] = (16, 512), output: tuple[int, int] = (8, 64),
                      gap_s: float = 20.0, seed: int = 0, singles: int = 16,
                      single_gap_s: float = 2.0, singles_between: bool = False) -> list[TraceRequest]:
    """A trace that pins the parameters down: first ``singles`` requests one at a time,
    ``single_gap_s`` apart (a lone request shows the fixed per-step and per-request costs, which
    big batches hide), then bursts of each size in ``bursts`` (``repeats`` times, shuffled), all
    requests of a burst at once, ``gap_s`` seconds apart so each burst drains before the next;
    prompt and output lengths uniform in the given ranges. Run it on the real hardware with the
    live benchmark, then calibrate on its CSV.

    Without the lone requests a fit on bursts of 1-64 put a lone decode step 22 % too slow on
    vLLM-CPU (2 of 170 requests ran alone): most real traffic runs at low batch sizes.
    ``singles_between=True`` spreads the lone requests over the run instead: before each burst
    (``gap_s`` after the one before, so it has drained) comes its share of them, so a machine
    whose speed drifts over minutes shows both its lone and its batched speed in every stretch.

        >>> from nbkit.traces import write_trace
        >>> write_trace("/tmp/calib.jsonl", calibration_trace(gap_s=10))        # doctest: +SKIP
    """
    import random

    if singles < 0 or single_gap_s <= 0 or gap_s <= 0:
        raise ValueError(f"singles={singles!r} must be >= 0, single_gap_s={single_gap_s!r} and gap_s={gap_s!r} > 0")
    rng = random.Random(seed)
    sizes = [b for b in bursts for _ in range(repeats)]
    rng.shuffle(sizes)
    if singles_between and sizes:
        out, t = [], 0.0
        for k, size in enumerate(sizes):
            for _ in range(singles // len(sizes) + (1 if k < singles % len(sizes) else 0)):
                out.append(TraceRequest(rng.randint(*prompt), rng.randint(*output), int(round(t * 1e9))))
                t += single_gap_s
            for _ in range(size):
                out.append(TraceRequest(rng.randint(*prompt), rng.randint(*output), int(round(t * 1e9))))
            t += gap_s
        return out
    out = [TraceRequest(rng.randint(*prompt), rng.randint(*output), int(round(k * single_gap_s * 1e9)))
           for k in range(singles)]
    t0 = singles * single_gap_s + (gap_s if singles else 0.0)
    for k, size in enumerate(sizes):
        t = int(round((t0 + k * gap_s) * 1e9))
        for _ in range(size):
            out.append(TraceRequest(rng.randint(*prompt), rng.randint(*output), t))
    return out


def compare(real: Sequence[RequestResult], sim: Sequence[RequestResult]) -> dict:
    """Mean TTFT, mean TPOT and output token throughput of two runs, and the relative errors."""
    def figures(rs):
        ok = [r for r in rs if r.outcome == "ok" and r.ttft_s is not None]
        if not ok:
            return {"mean_ttft_s": math.nan, "mean_tpot_s": math.nan, "throughput_tok_s": math.nan}
        t0 = min(r.arrival_s for r in ok)
        t1 = max(r.arrival_s + r.e2e_s for r in ok)
        tp = [r.tpot_s for r in ok if r.tpot_s is not None]
        return {"mean_ttft_s": sum(r.ttft_s for r in ok) / len(ok),
                "mean_tpot_s": sum(tp) / len(tp) if tp else math.nan,
                "throughput_tok_s": sum(r.output_toks for r in ok) / max(t1 - t0, 1e-12)}
    a, b = figures(real), figures(sim)
    return {"real": a, "sim": b, "rel_err": {k: (b[k] - a[k]) / a[k] if a[k] else math.nan for k in a}}


def load_levels(real: Sequence[RequestResult]) -> list[list[int]]:
    """Indices of ``real`` grouped by the number of requests (on the same instance) in flight at
    some point of each one's life, itself included: 1, 2-3, 4-7, 8-15, ..."""
    import bisect

    by_inst: dict[Any, list[int]] = {}
    for i, r in enumerate(real):
        by_inst.setdefault(r.instance_id, []).append(i)
    levels: dict[int, list[int]] = {}
    for idx in by_inst.values():
        starts = sorted(real[i].arrival_s for i in idx)
        ends = sorted(real[i].arrival_s + real[i].e2e_s for i in idx)
        for i in idx:
            a, e = real[i].arrival_s, real[i].arrival_s + real[i].e2e_s
            n = bisect.bisect_left(starts, e) - bisect.bisect_right(ends, a)
            levels.setdefault(max(1, n).bit_length(), []).append(i)
    return [sorted(levels[k]) for k in sorted(levels)]


def held(r: RequestResult, gaps: int = 3, under_s: float = 2e-4) -> bool:
    """Whether the client got a request's first tokens in one burst: its first ``gaps``
    inter-token times are all under ``under_s``. The stream was held up before its first token
    (on this project's 2-core VM under vLLM load, every process, the load generator included,
    stops for 0.1-0.5 s now and then, using no CPU meanwhile), so its TTFT is the stall's, not
    the server's."""
    itl = r.itl_s or []
    return len(itl) >= gaps and max(itl[:gaps]) < under_s


def ran_alone(real: Sequence[RequestResult], i: int) -> bool:
    """Whether no other request on the same instance arrived within 50 ms of request ``i`` (the
    first request of a burst is in flight alone for a moment, but is not a lone request)."""
    r = real[i]
    return not any(o is not r and o.instance_id == r.instance_id and abs(o.arrival_s - r.arrival_s) < 0.05
                   for o in real)
