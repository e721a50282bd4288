"""Routers side by side on real replicas: nbkit's endpoint (each policy), sglang-router (round_robin,
cache_aware, power_of_two) and vllm-router (round_robin, cache_aware), all in front of the same two
vLLM-CPU replicas of the tiny model, on a shared-prefix and a mixed-length workload, in one run.

    .venv/bin/python benchmarks/compare_routers.py [--quick] [--requests 150] [--routers nbkit,sglang,vllm]
                                                  [--workloads shared-prefix,mixed] [--rate auto|R] [--load 0.8]
                                                  [--peers-venv .bench-venv]
Defaults: 150 measured requests per (router, policy, workload) in each of 2 interleaved rounds
(--rounds), 10 routers x 2 workloads, about 15 minutes on 2 cores; --quick: 50 requests each.
One run of 150 requests has a p99 of the 2nd-worst request, which moved by up to 2x between runs
of the same router here: the table pools the rounds and shows each round's p99 beside it.

The peers live in a separate venv so they do not disturb the project's:
    python3 -m venv .bench-venv && .bench-venv/bin/pip install sglang-router==0.3.2 vllm-router==0.1.17
A peer that is missing or fails to start is reported and skipped; the others still run.

What runs (all on 127.0.0.1):
  replicas  2 x `vllm serve` of the tiny model, one core each (nbkit Cluster), started once;
            VLLM_SERVER_DEV_MODE=1 so /reset_prefix_cache empties their prefix caches between runs;
            --kv-blocks caps each replica's KV cache (--num-gpu-blocks-override, 128-token blocks on CPU)
            so that the shared prefixes fit on two replicas split by prefix, not on each one: where a
            request goes decides whether its prefix is cached, as on a loaded GPU
  routers   each in its own process, started, measured and stopped in turn: nbkit's Endpoint (this
            file with --serve-endpoint), `sglang-router launch`, `vllm-router`
  load      nbkit.bench in this process (aiohttp, streaming, usage chunk): open-loop Poisson
            arrivals, the same prompts and the same arrival times (seed) for every router
Workloads
  shared-prefix  --prefixes system prompts of --prefix-len tokens, a --question-len question each, --output-len out
  mixed          prompts of --mixed-input tokens (uniform lo:hi) and outputs of --mixed-output tokens, no sharing
Per run: reset the replicas' prefix caches, send --warmup requests (shared-prefix: other questions
on the same system prompts; not measured), then the measured requests; the replicas' /metrics
before and after give the prefix-cache hit rate (hits / queried prompt tokens) and each replica's
share of the finished requests.
--rate auto (default): per workload, round robin's capacity is measured first (closed loop, 16 in
flight) and every router then gets --load (0.8) x that rate, so the baseline runs near saturation.
--concurrency C instead: closed loop with C requests in flight (throughput at saturation).
Prints one table per workload and the issue's goals; writes benchmarks/results/compare_routers.json
(with the machine described), the same table as compare_routers.txt, and the per-request CSVs
under benchmarks/results/compare_routers/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from router_overhead import Children, _finite, announce_machine, free_port, versions  # noqa: E402

NBKIT_POLICIES = ("round_robin", "least_outstanding", "least_load", "power_of_two", "prefix_affinity")
PEERS = {"sglang": ("round_robin", "cache_aware", "power_of_two"), "vllm": ("round_robin", "cache_aware")}
LABELS = {"nbkit": "nbkit endpoint", "sglang": "sglang-router", "vllm": "vllm-router"}

GOAL_RR_RATIO = 1.6      # nbkit's best p99 TTFT vs its round robin, shared-prefix
GOAL_TOLERANCE = 0.05    # "at least matches": within 5% (run-to-run noise on a shared 2-core machine)


# -- routers ---------------------------------------------------------------------------------------
def router_argv(kind: str, policy: str, port: int, urls: list[str], args) -> list[str] | str:
    """The command line of a router, or why it cannot run."""
    if kind == "nbkit":
        # the same endpoint process as router_overhead.py's (`--serve-endpoint`, aiohttp, gc.freeze)
        return [sys.executable, str(HERE / "router_overhead.py"), "--serve-endpoint", "--port", str(port),
                "--policy", policy, "--parent-pid", str(os.getpid()), "--urls", *urls]
    exe = args.peers_venv / "bin" / ("sglang-router" if kind == "sglang" else "vllm-router")
    if not exe.exists():
        return (f"{exe} not found; install with: python3 -m venv .bench-venv && .bench-venv/bin/pip install "
                "sglang-router==0.3.2 vllm-router==0.1.17 (or pass --peers-venv)")
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls, "--policy", policy,
              "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
              "--worker-startup-check-interval", "1", "--worker-startup-timeout-secs", str(int(args.startup_timeout))]
    if kind == "sglang":
        return [str(exe), "launch", *common, "--log-level", "warn"]
    return [str(exe), *common, "--log-level", "warning"]


async def wait_ready(url: str, model: str, proc, timeout: float) -> str | None:
    """Poll a real one-token completion through ``url``; None when it answers 200, else why not."""
    import httpx
    deadline = time.monotonic() + timeout
    last = ""
    async with httpx.AsyncClient(timeout=10.0) as c:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return f"exited with code {proc.returncode}"
            try:
                r = await c.post(url + "/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 1})
                if r.status_code == 200:
                    return None
                last = f"HTTP {r.status_code}: {r.text[:300]}"
            except Exception as e:  # noqa: BLE001 - still starting
                last = repr(e)
            await asyncio.sleep(0.3)
    return f"not ready after {timeout:.0f} s (last: {last})"


async def wait_idle(urls: list[str], timeout: float = 60.0) -> None:
    """Until no replica runs or queues a request (a cancelled run may leave some behind)."""
    import httpx
    from nbkit.routing.metrics import parse_metrics
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0) as c:
        while time.monotonic() < deadline:
            busy = 0.0
            for u in urls:
                try:
                    for m in parse_metrics((await c.get(u + "/metrics")).text).values():
                        busy += m.running + m.waiting
                except Exception:  # noqa: BLE001
                    pass
            if busy == 0:
                return
            await asyncio.sleep(0.5)


# -- workloads -------------------------------------------------------------------------------------
def build_workloads(args, tokenizer) -> dict:
    """name -> (warm-up workload or None, measured workload)."""
    from nbkit import bench
    from nbkit.bench.workloads import Workload

    out = {}
    n = args.requests
    if "shared-prefix" in args.workloads:
        q = math.ceil(n / args.prefixes)
        w = bench.shared_prefix(args.prefixes, q + args.warmup_per_prefix, args.prefix_len, args.question_len,
                                args.output_len, seed=args.seed, tokenizer=tokenizer)
        warm_ids, seen = set(), {}
        for i, it in enumerate(w.items):
            if seen.get(it.group, 0) < args.warmup_per_prefix:
                seen[it.group] = seen.get(it.group, 0) + 1
                warm_ids.add(i)
        warm = Workload("shared-prefix warm-up", [it for i, it in enumerate(w.items) if i in warm_ids])
        meas = Workload("shared-prefix", [it for i, it in enumerate(w.items) if i not in warm_ids][:n],
                        w.tokenizer, w.params)
        out["shared-prefix"] = (warm if warm.items else None, meas)
    if "mixed" in args.workloads:
        lo, hi = args.mixed_input
        olo, ohi = args.mixed_output
        out["mixed"] = (None, bench.synthetic(n, input_len=(lo, hi), output_len=(olo, ohi), seed=args.seed + 1,
                                              tokenizer=tokenizer, name="mixed"))
    return out


# -- the run ---------------------------------------------------------------------------------------
async def calibrate(cluster, warm, work, args) -> float:
    """Requests/s round robin sustains on ``work`` (closed loop, 16 in flight)."""
    from nbkit import bench

    await bench.reset_prefix_caches(cluster.urls)
    if warm is not None:
        await bench.arun(cluster, warm, policy="round_robin", concurrency=16, progress=False)
    res = await bench.arun(cluster, work, policy="round_robin", concurrency=16, num_prompts=min(len(work), 60),
                           progress=False)
    s = res.summary().iloc[0]
    await bench.reset_prefix_caches(cluster.urls)
    return float(s["request_throughput"])


async def one_run(kind: str, policy: str, wname: str, warm, work, rate: float, ctx: dict, args, rnd: int = 0) -> dict:
    from nbkit import bench

    cluster, children = ctx["cluster"], ctx["children"]
    label = f"{LABELS[kind]} ({policy})"
    load = {"concurrency": args.concurrency} if args.concurrency else {"request_rate": rate}
    row = {"workload": wname, "router": kind, "policy": policy, "label": label, "rate": rate, "round": rnd}
    port = free_port()
    argv = router_argv(kind, policy, port, cluster.urls, args)
    if isinstance(argv, str):
        row["error"] = argv
        return row
    env = dict(os.environ, PYTHONUNBUFFERED="1", RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    proc = children.start(f"{kind}-{policy}", argv, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        err = await wait_ready(url, cluster.model, proc, args.startup_timeout)
        if err:
            row["error"] = f"{' '.join(argv[:2])} ...: {err}\n{children.log_tail(proc)}"
            return row
        await wait_idle(cluster.urls)
        failed = await bench.reset_prefix_caches(cluster.urls)
        row["prefix_cache_reset"] = not failed
        if warm is not None:
            await bench.arun(url, warm, **load, seed=args.seed + 7, model=cluster.model, progress=False,
                             timeout_s=args.request_timeout)
        csv = args.csv_dir / f"{wname}-{kind}-{policy}-r{rnd}.csv"
        res = await bench.arun(url, work, **load, seed=args.seed, model=cluster.model, policy=policy,
                               label=label, replicas=cluster.urls, output=csv, progress=not args.no_progress,
                               timeout_s=args.request_timeout)
    finally:
        children.stop(proc)
    s = res.summary().iloc[0]
    rm = res.replica_metrics
    shares = [] if rm is None else [round(float(x), 3) for x in rm.sort_values("replica")["finished_share"]]
    row.update({
        "sent": int(s["requests"]), "completed": int(s["completed"]), "failed": int(s["failed"]),
        "duration_s": float(s["duration_s"]), "request_throughput": float(s["request_throughput"]),
        "output_throughput": float(s["output_throughput"]), "ttft_p50_ms": float(s["ttft_median_ms"]),
        "ttft_p99_ms": float(s["ttft_p99_ms"]), "tpot_p50_ms": float(s["tpot_median_ms"]),
        "e2e_p99_ms": float(s["e2e_p99_ms"]), "prefix_hit_rate": float(s.get("prefix_hit_rate", float("nan"))),
        "replica_share": shares, "csv": str(csv.relative_to(ROOT)) if csv.is_relative_to(ROOT) else str(csv),
    })
    row["_ttft_ms"] = [r.ttft_s * 1e3 for r in res.requests if r.ok and r.ttft_s is not None]
    row["_e2e_ms"] = [r.e2e_s * 1e3 for r in res.requests if r.ok and r.e2e_s is not None]
    errors = [r for r in res.requests if not r.ok]
    if errors:
        row["error_sample"] = f"{errors[0].outcome}: {errors[0].error[:200]}"
    return row


async def run_all(args, children: Children) -> dict:
    from nbkit import Cluster
    from nbkit.tiny import tiny_model

    model = args.model or str(tiny_model())
    extra = ("--num-gpu-blocks-override", str(args.kv_blocks)) if args.kv_blocks else ()
    cluster = Cluster.replicas(model, n=2, max_model_len=args.max_model_len, extra_args=extra,
                               env={"VLLM_SERVER_DEV_MODE": "1"}, port_start=args.port_start)
    t = time.perf_counter()
    print(f"starting 2 replicas of {model} (kv blocks per replica: {args.kv_blocks or 'vLLM default'}) ...",
          flush=True)
    await cluster.astart()
    print(f"replicas healthy in {time.perf_counter() - t:.0f} s: {', '.join(cluster.urls)}", flush=True)
    ctx = {"cluster": cluster, "children": children}
    rows, rates = [], {}
    started = time.perf_counter()
    try:
        workloads = build_workloads(args, model)
        plan = [("nbkit", p) for p in args.nbkit_policies] if "nbkit" in args.routers else []
        for kind in ("sglang", "vllm"):
            if kind in args.routers:
                plan += [(kind, p) for p in args.peer_policies[kind]]
        for wname, (warm, work) in workloads.items():
            if args.concurrency:
                rate = None
                print(f"\n{wname}: closed loop, {args.concurrency} requests in flight for every router", flush=True)
            elif args.rate == "auto":
                cap = await calibrate(cluster, warm, work, args)
                rate = round(max(0.1, args.load * cap), 2)
                print(f"\n{wname}: round robin sustains {cap:.2f} req/s closed-loop; offering {rate} req/s "
                      f"({args.load:g} x) to every router", flush=True)
            else:
                rate = float(args.rate)
                print(f"\n{wname}: offering {rate} req/s to every router", flush=True)
            rates[wname] = rate
            for rnd in range(args.rounds):
                # interleaved rounds, every other one in reverse order, so a drift of the machine
                # (another process, thermal, caches) does not favour whoever runs first
                order = plan if rnd % 2 == 0 else plan[::-1]
                for kind, policy in order:
                    print(f"  {wname} round {rnd + 1}/{args.rounds}: {LABELS[kind]} ({policy}) ...", flush=True)
                    row = await one_run(kind, policy, wname, warm, work, rate, ctx, args, rnd)
                    if "error" in row:
                        print(f"    not measured: {row['error'].splitlines()[0]}", flush=True)
                    else:
                        print(f"    TTFT p99 {row['ttft_p99_ms']:.0f} ms, {row['output_throughput']:.0f} tok/s, "
                              f"prefix hits {row['prefix_hit_rate']:.0%}, share {row['replica_share']}", flush=True)
                    rows.append(row)
    finally:
        await cluster.astop()
    return {"rows": pooled(rows), "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
            "rates": rates, "elapsed_s": time.perf_counter() - started,
            "replicas": [{"url": p.url, "pinning": p.pinning} for p in cluster.plans]}


def pooled(runs: list[dict]) -> list[dict]:
    """One row per (workload, router, policy) over its rounds: percentiles of all the rounds'
    requests together, throughput and shares averaged, and each round's p99 TTFT kept to show the spread."""
    import numpy as np

    out: dict[tuple, dict] = {}
    for r in runs:
        key = (r["workload"], r["router"], r["policy"])
        if "error" in r:
            out.setdefault(key, {k: r[k] for k in ("workload", "router", "policy", "label", "rate", "error")})
            continue
        agg = out.get(key)
        if agg is None or "error" in agg:
            agg = out[key] = {k: r[k] for k in ("workload", "router", "policy", "label", "rate")}
            agg.update(_runs=[], _ttft=[], _e2e=[])
        agg["_runs"].append(r)
        agg["_ttft"] += r["_ttft_ms"]
        agg["_e2e"] += r["_e2e_ms"]
    rows = []
    for agg in out.values():
        runs_ = agg.pop("_runs", None)
        ttft, e2e = agg.pop("_ttft", []), agg.pop("_e2e", [])
        if runs_:
            mean = lambda k: float(np.mean([x[k] for x in runs_]))  # noqa: E731
            agg.update({
                "rounds": len(runs_), "sent": sum(x["sent"] for x in runs_),
                "completed": sum(x["completed"] for x in runs_), "failed": sum(x["failed"] for x in runs_),
                "request_throughput": mean("request_throughput"), "output_throughput": mean("output_throughput"),
                "ttft_p50_ms": float(np.percentile(ttft, 50)) if ttft else float("nan"),
                "ttft_p99_ms": float(np.percentile(ttft, 99)) if ttft else float("nan"),
                "e2e_p99_ms": float(np.percentile(e2e, 99)) if e2e else float("nan"),
                "ttft_p99_by_round_ms": [round(x["ttft_p99_ms"], 1) for x in runs_],
                "prefix_hit_rate": mean("prefix_hit_rate"),
                "replica_share": [round(float(v), 3) for v in np.mean([x["replica_share"] for x in runs_
                                                                       if x["replica_share"]], axis=0)]
                if any(x["replica_share"] for x in runs_) else [],
                "csv": [x["csv"] for x in runs_],
            })
        rows.append(agg)
    return rows


# -- report ----------------------------------------------------------------------------------------
def fmt(x, spec=".1f", width=9) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return f"{'-':>{width}}"
    return f"{x:{width}{spec}}"


def report(out: dict, args) -> tuple[list[str], list[dict]]:
    lines, goals = [], []
    for wname in out["rates"]:
        rows = [r for r in out["rows"] if r["workload"] == wname]
        how = (f"closed loop, {args.concurrency} in flight" if args.concurrency
               else f"{out['rates'][wname]} req/s (Poisson)")
        lines.append(f"\n{wname} workload, {args.rounds} round(s) x {args.requests} requests per router, {how}, "
                     "2 vLLM-CPU replicas of the tiny model")
        lines.append(f"{'router (policy)':<34}{'ok/sent':>9}{'req/s':>9}{'tok/s':>9}{'TTFT p50':>9}{'TTFT p99':>9}"
                     f"{'E2E p99':>9}{'prefix':>9}  share r0/r1  p99 by round")
        for r in rows:
            if "error" in r:
                lines.append(f"{r['label']:<34} not measured: {r['error'].splitlines()[0][:90]}")
                continue
            share = "/".join(f"{x:.0%}" for x in r["replica_share"]) or "-"
            lines.append(f"{r['label']:<34}{r['completed']:>5}/{r['sent']:<4}{fmt(r['request_throughput'], '.2f')}"
                         f"{fmt(r['output_throughput'], '.0f')}{fmt(r['ttft_p50_ms'], '.0f')}"
                         f"{fmt(r['ttft_p99_ms'], '.0f')}{fmt(r['e2e_p99_ms'], '.0f')}"
                         f"{fmt(r['prefix_hit_rate'] * 100 if r['prefix_hit_rate'] == r['prefix_hit_rate'] else None, '.0f')}%"
                         f"  {share:<11}  {'/'.join(f'{x:.0f}' for x in r.get('ttft_p99_by_round_ms', []))}")
        lines.append("(times in ms over all rounds' requests; prefix = prefix-cache hit rate of the replicas' "
                     "queried prompt tokens; req/s, tok/s, prefix and share: mean of the rounds)")
        ok = [r for r in rows if "error" not in r and r["completed"] == r["sent"]]
        nb = [r for r in ok if r["router"] == "nbkit"]
        peers = [r for r in ok if r["router"] != "nbkit"]
        if nb and peers:
            best_nb = min(nb, key=lambda r: r["ttft_p99_ms"])
            best_peer = min(peers, key=lambda r: r["ttft_p99_ms"])
            v = best_nb["ttft_p99_ms"] / best_peer["ttft_p99_ms"]
            goals.append({"workload": wname, "goal": "nbkit best p99 TTFT <= best peer's", "nbkit": best_nb["label"],
                          "peer": best_peer["label"], "ratio": v, "pass": v <= 1 + GOAL_TOLERANCE})
            best_nb_t = max(nb, key=lambda r: r["output_throughput"])
            best_peer_t = max(peers, key=lambda r: r["output_throughput"])
            v = best_nb_t["output_throughput"] / best_peer_t["output_throughput"]
            goals.append({"workload": wname, "goal": "nbkit best throughput >= best peer's",
                          "nbkit": best_nb_t["label"], "peer": best_peer_t["label"], "ratio": v,
                          "pass": v >= 1 - GOAL_TOLERANCE})
        rr = next((r for r in nb if r["policy"] == "round_robin"), None)
        if wname == "shared-prefix" and rr and nb:
            best_nb = min(nb, key=lambda r: r["ttft_p99_ms"])
            v = rr["ttft_p99_ms"] / best_nb["ttft_p99_ms"]
            goals.append({"workload": wname, "goal": f"nbkit best p99 TTFT >= {GOAL_RR_RATIO}x better than round robin",
                          "nbkit": best_nb["label"], "peer": rr["label"], "ratio": v, "pass": v >= GOAL_RR_RATIO})
    if goals:
        lines.append("")
        for g in goals:
            lines.append(f"{g['workload']}: {g['goal']}: {g['nbkit']} vs {g['peer']}: ratio {g['ratio']:.2f} "
                         f"-> {'PASS' if g['pass'] else 'FAIL'}")
    return lines, goals


def _vllm_version() -> str | None:
    from importlib import metadata
    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="50 requests per run (default 150)")
    ap.add_argument("--requests", type=int, default=None, help="measured requests per (router, policy, workload, round)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="interleaved rounds: every router runs once per round (every other round in reverse "
                         "order); figures pool all rounds' requests (default 2)")
    ap.add_argument("--routers", default="nbkit,sglang,vllm", help="comma-separated from nbkit,sglang,vllm")
    ap.add_argument("--nbkit-policies", default=",".join(NBKIT_POLICIES))
    ap.add_argument("--sglang-policies", default=",".join(PEERS["sglang"]))
    ap.add_argument("--vllm-policies", default=",".join(PEERS["vllm"]))
    ap.add_argument("--workloads", default="shared-prefix,mixed", help="comma-separated from shared-prefix,mixed")
    ap.add_argument("--rate", default="auto", help="req/s offered to every router, or auto (default)")
    ap.add_argument("--load", type=float, default=0.8, help="--rate auto: fraction of round robin's capacity")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="closed loop with this many requests in flight instead of a rate (throughput at saturation)")
    ap.add_argument("--prefixes", type=int, default=8, help="shared-prefix: system prompts (default 8)")
    ap.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: tokens per system prompt")
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--warmup-per-prefix", type=int, default=1,
                    help="shared-prefix: unmeasured requests per system prompt before each run (default 1)")
    ap.add_argument("--mixed-input", default="32:1536", help="mixed: prompt tokens lo:hi (uniform)")
    ap.add_argument("--mixed-output", default="8:128", help="mixed: output tokens lo:hi (uniform)")
    ap.add_argument("--kv-blocks", type=int, default=48,
                    help="KV-cache blocks per replica (128 tokens each on CPU; 0: vLLM's default). Default 48 = "
                         "6144 tokens: half the system prompts fit on each replica, all of them on neither")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--model", default=None, help="default: the tiny model")
    ap.add_argument("--port-start", type=int, default=8700)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers-venv", type=Path, default=ROOT / ".bench-venv")
    ap.add_argument("--startup-timeout", type=float, default=60.0, help="seconds a router may take to be ready")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "compare_routers.json")
    ap.add_argument("--csv-dir", type=Path, default=HERE / "results" / "compare_routers")
    ap.add_argument("--no-progress", action="store_true")
    # internal: nbkit's endpoint in its own process
    args = ap.parse_args(argv)
    args.requests = args.requests or (50 if args.quick else 150)
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: must be >= 1")
    args.routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    args.nbkit_policies = [p.strip() for p in args.nbkit_policies.split(",") if p.strip()]
    args.peer_policies = {k: [p.strip() for p in getattr(args, f"{k}_policies").split(",") if p.strip()]
                          for k in PEERS}
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [r for r in args.routers if r not in LABELS] + [w for w in args.workloads if w not in ("shared-prefix", "mixed")]
    if bad:
        ap.error(f"unknown router/workload {bad}")
    for name in ("mixed_input", "mixed_output"):
        lo, _, hi = getattr(args, name).partition(":")
        setattr(args, name, (int(lo), int(hi or lo)))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    info = announce_machine()
    args.csv_dir.mkdir(parents=True, exist_ok=True)
    children = Children(Path(tempfile.mkdtemp(prefix="nbkit-compare-routers-")))
    try:
        out = asyncio.run(run_all(args, children))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: stopping the processes this benchmark started", file=sys.stderr, flush=True)
        return 130
    finally:
        children.stop_all()
    info["loadavg_at_end"] = list(os.getloadavg())
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    lines, goals = report(out, args)
    print("\n".join(lines))
    # the load average at the end counts the replicas' own processes and threads (API server,
    # engine core, torch threads): only the one at the start says whether other work was running
    busy = info["loadavg_at_start"][0]
    if busy > 1.5 * (info["cores_usable"] or 1):
        print(f"WARNING: load average {busy:.1f} on {info['cores_usable']} cores before the benchmark started: "
              "other work was running; re-run on a quiet machine")
    result = {
        "benchmark": "compare_routers", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
        "versions": {**versions(args.peers_venv), "vllm": _vllm_version()},
        "setup": {"replicas": out["replicas"], "model": args.model or "nbkit tiny model (random weights)",
                  "kv_blocks_per_replica": args.kv_blocks, "max_model_len": args.max_model_len,
                  "requests_per_run": args.requests, "rounds": args.rounds, "rates": out["rates"], "rate_mode": args.rate, "load": args.load,
                  "arrivals": (f"closed loop, {args.concurrency} in flight" if args.concurrency
                               else "Poisson, same seed for every router"), "seed": args.seed,
                  "shared_prefix": {"prefixes": args.prefixes, "prefix_len": args.prefix_len,
                                    "question_len": args.question_len, "output_len": args.output_len,
                                    "warmup_per_prefix": args.warmup_per_prefix},
                  "mixed": {"input": args.mixed_input, "output": args.mixed_output},
                  "load_generator": "nbkit.bench (aiohttp, streamed, ignore_eos)", "quick": args.quick},
        "goals": goals, "rows": out["rows"], "runs": out["runs"], "elapsed_s": round(out["elapsed_s"], 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_finite(result), indent=1) + "\n")
    header = (f"compare_routers, {result['when']}: {info['cpu_model']}, {info['cores_usable']} cores, "
              f"{info.get('memory_gib', '?')} GiB, python {info['python']}, {result['versions']['vllm']}, "
              f"loadavg {info['loadavg_at_start'][0]:.1f} -> {info['loadavg_at_end'][0]:.1f}")
    args.out.with_suffix(".txt").write_text(header + "\n" + "\n".join(lines) + "\n")
    print(f"\nwrote {args.out} and the per-request CSVs under {args.csv_dir} ({out['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
