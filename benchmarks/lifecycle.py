"""Cold start and aggregate throughput of replica layouts, measured side by side in one run.

    .venv/bin/python benchmarks/lifecycle.py [--requests 256 --concurrency 128 --max-tokens 64]

Layouts (on this machine's cores; on GPUs pass --device gpu --model ...):
  A  1 replica pinned to 1 core           (cold start reference)
  B  2 replicas, 1 core each, in parallel (cold start vs A; goal <= 1.2x)
  C  1 replica on all cores               (throughput reference)
  D  1 replica, tensor parallel over 2 ranks
Each layout gets the same closed-loop workload (ignore_eos, fixed output length). Prints a table
and writes benchmarks/results/lifecycle.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from nbkit import Cluster, loop
from nbkit.demo import closed_loop


def measure(name: str, cluster: Cluster, args, load: bool = True) -> dict:
    t = time.perf_counter()
    cluster.start()
    cold = time.perf_counter() - t
    row = {"layout": name, "replicas": len(cluster), "pinning": "; ".join(p.pinning for p in cluster.plans),
           "cold_start_s": round(cold, 1)}
    try:
        if load:
            with cluster.client("round_robin") as client:
                # warm-up, then the measured run
                loop.run(closed_loop(client, requests=len(cluster.ranks) * 4, concurrency=8, max_tokens=8))
                client.router.records.clear()
                wall = loop.run(closed_loop(client, requests=args.requests, concurrency=args.concurrency,
                                            max_tokens=args.max_tokens))
                recs = client.records
            ok = [r for r in recs if r.outcome == "ok"]
            row.update(requests=len(recs), failed=len(recs) - len(ok), wall_s=round(wall, 2),
                       gen_tok_per_s=round(sum(r.tokens_out for r in ok) / wall, 1),
                       mean_latency_s=round(sum(r.e2e_s for r in ok) / max(1, len(ok)), 3))
    finally:
        cluster.stop()
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lifecycle.json"))
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    kw = dict(device=args.device, port_start=8600)
    rows = [
        measure("A: 1 replica, 1 core", Cluster.replicas(args.model, n=1, cores=tuple(cores[:1]), **kw), args,
                load=False),
        measure("B: 2 replicas, 1 core each", Cluster.replicas(args.model, n=2, **kw), args),
        measure("C: 1 replica, all cores", Cluster.replicas(args.model, n=1, **kw), args),
        measure("D: 1 replica, TP=2", Cluster.replicas(args.model, n=1, tp=2, **kw), args),
    ]
    ratio = rows[1]["cold_start_s"] / rows[0]["cold_start_s"]
    print()
    print(f"{'layout':32} {'cold start s':>12} {'gen tok/s':>10} {'mean lat s':>10} {'failed':>6}")
    for r in rows:
        print(f"{r['layout']:32} {r['cold_start_s']:>12} {r.get('gen_tok_per_s', '-'):>10} "
              f"{r.get('mean_latency_s', '-'):>10} {r.get('failed', '-'):>6}")
    print(f"\ncold start, 2 replicas in parallel / 1 replica: {ratio:.2f}x (goal <= 1.2x)")
    print(f"throughput, 2 pinned replicas / 1 replica: {rows[1]['gen_tok_per_s'] / rows[2]['gen_tok_per_s']:.2f}x; "
          f"TP=2 / 1 replica: {rows[3]['gen_tok_per_s'] / rows[2]['gen_tok_per_s']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": len(cores),
                    "python": platform.python_version()},
        "workload": {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens},
        "rows": rows, "cold_start_ratio_2_vs_1": round(ratio, 2)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
