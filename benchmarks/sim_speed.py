"""How fast the simulator runs, end to end from the command line: ``python -m nbkit.sim`` on a
Poisson trace (mixed lengths) over N instances of Llama-3.1-8B on H100 with LOAD routing, wall
time including imports, reading the trace and writing the per-request CSV and the summary.

    .venv/bin/python benchmarks/sim_speed.py                  # both rows: 10k x 8, 1M x 64
    .venv/bin/python benchmarks/sim_speed.py --rows 10k       # only the small one
    .venv/bin/python benchmarks/sim_speed.py --out benchmarks/results/sim_speed   # + .json and .txt
    .venv/bin/python benchmarks/sim_speed.py --in-process [--requests 10000] [--instances 8] [--profile]

Rows (arrivals at 7.5 req/s per instance, the same load per instance in both):
- ``10k``: 10,000 requests x 8 instances at 60 req/s; goal <= 2 s wall.
- ``1M``: 1,000,000 requests x 64 instances at 480 req/s; goal <= 60 s wall in bounded memory.

Each row runs the command once in a child process (trace and config written beforehand, not
timed) and reports its wall and CPU seconds (``os.wait4``), peak resident memory and the CSV's
size; the machine's load average is printed with it (timings on a shared machine vary with it).
``--in-process`` runs the simulator in this process instead and prints simulated figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = {"10k": (10_000, 8, 60.0, 2.0), "1M": (1_000_000, 64, 480.0, 60.0)}   # requests, instances, rate, goal s


def poisson_trace(n: int, rate: float, seed: int = 0):
    """``n`` requests at ``rate`` req/s; inputs and outputs log-uniform-ish mixes of short and long."""
    from nbkit.traces import TraceRequest

    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(rate)
        kind = rng.random()
        if kind < 0.5:        # chat
            inp, outp = rng.randint(64, 1024), rng.randint(32, 512)
        elif kind < 0.8:      # long context, short answer
            inp, outp = rng.randint(1024, 4096), rng.randint(16, 256)
        else:                 # long generation
            inp, outp = rng.randint(32, 256), rng.randint(512, 1024)
        out.append(TraceRequest(inp, outp, int(t * 1e9)))
    return out


def cli_row(name: str, workdir: Path, extra: list[str]) -> dict:
    """One row: write the trace and config, run ``python -m nbkit.sim`` once, measure it."""
    from nbkit.sim.config import single_instance_config
    from nbkit.traces import write_trace

    n, inst, rate, goal = ROWS[name]
    trace, cfg = workdir / f"trace_{name}.jsonl", workdir / f"cluster_{inst}.json"
    if not trace.exists():
        write_trace(trace, poisson_trace(n, rate))
    cfg.write_text(single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=inst).model_dump_json())
    out, summ = workdir / f"out_{name}.csv", workdir / f"summary_{name}.json"
    cmd = [sys.executable, "-m", "nbkit.sim", "--cluster-config", str(cfg), "--dtype", "bfloat16",
           "--block-size", "16", "--dataset", str(trace), "--output", str(out), "--summary-json", str(summ),
           "--request-routing-policy", "LOAD", "--quiet", *extra]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{name}: {' '.join(cmd)} exited {p.returncode}")
    s = json.loads(summ.read_text())
    steps = sum(i["steps"] for i in s["instances"])
    return {"row": name, "requests": n, "instances": inst, "rate": rate, "goal_s": goal,
            "wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "sim_wall_s": round(s["wall_s"], 2), "max_rss_mb": round(ru.ru_maxrss / 1024, 1),
            "csv_mb": round(out.stat().st_size / 1e6, 1), "rows": s["requests"], "engine_steps": steps,
            "simulated_s": round(s["duration_s"], 1), "ttft_p50_ms": round(s["ttft_s"]["median"] * 1e3, 2),
            "tpot_p50_ms": round(s["tpot_s"]["median"] * 1e3, 2), "e2e_p99_ms": round(s["e2e_s"]["p99"] * 1e3, 1),
            "load_avg_before": round(load0, 2), "load_avg_after": round(os.getloadavg()[0], 2),
            "met": wall <= goal, "command": " ".join(["python", *cmd[1:]])}


def fmt(r: dict) -> str:
    return (f"{r['row']:>4}: {r['requests']:>9,} requests x {r['instances']:>2} instances: {r['wall_s']:7.2f} s wall "
            f"(goal {r['goal_s']:g} s: {'met' if r['met'] else 'NOT met'}), {r['cpu_s']:.2f} s CPU, simulation "
            f"{r['sim_wall_s']:.2f} s, peak RSS {r['max_rss_mb']:.0f} MB, CSV {r['csv_mb']} MB, "
            f"{r['engine_steps']:,} engine steps for {r['simulated_s']:,} s simulated; load average "
            f"{r['load_avg_before']} -> {r['load_avg_after']}")


def in_process(args) -> None:
    from nbkit.sim import Simulator
    from nbkit.sim.config import single_instance_config

    trace = poisson_trace(args.requests, args.rate)
    cfg = single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=args.instances)
    sim = Simulator(cfg, policy=args.policy, dtype="bfloat16", block_size=16)
    t0 = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        res = prof.runcall(sim.run, trace, rows=lambda r: None, token_detail=False)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    else:
        res = sim.run(trace, rows=lambda r: None, token_detail=False)
    wall = time.perf_counter() - t0
    s = res.summary()
    steps = sum(i["steps"] for i in res.instances)
    print(res.format_summary())
    print(f"\nsim_speed: {args.requests} requests x {args.instances} instances ({args.policy}): "
          f"{wall:.2f} s wall for {s['duration_s']:.1f} s simulated "
          f"({s['duration_s'] / wall:.0f}x real time), {steps} engine steps "
          f"({steps / wall / 1e3:.0f}k steps/s), {s['output_toks'] / wall / 1e6:.2f}M simulated tokens/s of wall")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="10k,1M", help="comma-separated among " + ", ".join(ROWS))
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.txt")
    ap.add_argument("--workdir", default=None, help="where traces and CSVs go (default: a temporary folder)")
    ap.add_argument("--token-detail", action="store_true", help="pass --token-detail (inter-token lists in the CSV)")
    ap.add_argument("--in-process", action="store_true", help="run the simulator in this process instead")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--rate", type=float, default=60.0, help="arrivals per simulated second")
    ap.add_argument("--policy", default="LOAD")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the run (--in-process)")
    args = ap.parse_args()
    if args.in_process:
        in_process(args)
        return
    names = [x.strip() for x in args.rows.split(",") if x.strip()]
    extra = ["--token-detail"] if args.token_detail else []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = []
        for name in names:
            r = cli_row(name, workdir, extra)
            print(fmt(r), flush=True)
            results.append(r)
    if args.out:
        cmd = "python benchmarks/sim_speed.py " + " ".join(sys.argv[1:])
        meta = {"command": cmd, "cores": os.cpu_count(), "python": sys.version.split()[0],
                "note": "2-core machine shared with another job (real-vLLM tests): see each row's load average"}
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
        Path(args.out + ".txt").write_text(f"$ {cmd}\n" + "\n".join(fmt(r) for r in results) + "\n")


if __name__ == "__main__":
    main()
