"""How fast the simulator runs: 10,000 requests (Poisson arrivals, mixed lengths) over 8 instances
of Llama-3.1-8B on H100 with LOAD routing. Prints wall seconds and simulated figures; no asserts.

    .venv/bin/python benchmarks/sim_speed.py [--requests 10000] [--instances 8] [--rate 60]
                                            [--policy LOAD] [--profile]

The target: <= 5 s wall for the default run on a 2-core machine.
"""

from __future__ import annotations

import argparse
import random
import time

from nbkit.sim import Simulator
from nbkit.sim.config import single_instance_config
from nbkit.traces import TraceRequest


def poisson_trace(n: int, rate: float, seed: int = 0) -> list[TraceRequest]:
    """``n`` requests at ``rate`` req/s; inputs and outputs log-uniform-ish mixes of short and long."""
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--rate", type=float, default=60.0, help="arrivals per simulated second")
    ap.add_argument("--policy", default="LOAD")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the run")
    args = ap.parse_args()

    trace = poisson_trace(args.requests, args.rate)
    cfg = single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=args.instances)
    sim = Simulator(cfg, policy=args.policy, dtype="bfloat16", block_size=16)
    t0 = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        res = prof.runcall(sim.run, trace)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    else:
        res = sim.run(trace)
    wall = time.perf_counter() - t0
    s = res.summary()
    steps = sum(i["steps"] for i in res.instances)
    print(res.format_summary())
    print(f"\nsim_speed: {args.requests} requests x {args.instances} instances ({args.policy}): "
          f"{wall:.2f} s wall for {s['duration_s']:.1f} s simulated "
          f"({s['duration_s'] / wall:.0f}x real time), {steps} engine steps "
          f"({steps / wall / 1e3:.0f}k steps/s), {s['output_toks'] / wall / 1e6:.2f}M simulated tokens/s of wall")


if __name__ == "__main__":
    main()
