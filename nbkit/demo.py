"""The main job in one call: replicas up, a few hundred routed requests, a per-replica summary, a
clean stop. ``make demo`` and ``nbkit demo`` run it::

    from nbkit.demo import run_demo
    table = run_demo(n=2, requests=300, policy="least_load")   # a DataFrame, one row per replica
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Iterable

from nbkit import loop
from nbkit.routing.client import RoutedClient
from nbkit.cluster.cluster import Cluster
from nbkit.routing.state import RequestRecord

PROMPTS = [
    "The replica serves many tokens", "A router balances the load", "Our notebook watches the cluster",
    "The scheduler prefills the prompt", "Each core decodes a short reply", "The endpoint answers every request",
]


async def closed_loop(client: RoutedClient, requests: int = 300, concurrency: int = 32, max_tokens: int = 32,
                      seed: int = 0) -> float:
    """Send ``requests`` completions through ``client``, ``concurrency`` at a time; returns wall seconds.

    Failed requests are recorded (``client.records``), not raised.
    """
    rng = random.Random(seed)
    prompts = [rng.choice(PROMPTS) for _ in range(requests)]
    sem = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> None:
        async with sem:
            try:
                await client.complete(prompt, max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
            except Exception:  # noqa: BLE001 - the record holds the outcome
                pass

    t = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - t


def summarize(records: Iterable[RequestRecord], wall_s: float):
    """Per-replica table: requests, failures, tokens, generated tok/s over the run, mean latency."""
    import pandas as pd

    df = pd.DataFrame([{"rank": r.rank, "ok": r.outcome == "ok", "latency_s": r.e2e_s or 0.0,
                        "prompt_tokens": r.tokens_in, "completion_tokens": r.tokens_out} for r in records])
    g = df.groupby("rank")
    table = pd.DataFrame({
        "requests": g.size(),
        "failed": g["ok"].apply(lambda s: int((~s).sum())),
        "prompt_tokens": g["prompt_tokens"].sum(),
        "completion_tokens": g["completion_tokens"].sum(),
    })
    table["gen_tok_per_s"] = (table["completion_tokens"] / wall_s).round(1)
    table["mean_latency_s"] = g["latency_s"].mean().round(3)
    total = table.sum(numeric_only=True)
    total["mean_latency_s"] = round(df["latency_s"].mean(), 3)
    total["gen_tok_per_s"] = round(table["completion_tokens"].sum() / wall_s, 1)
    table.loc["total"] = total
    return table.astype({"requests": int, "failed": int, "prompt_tokens": int, "completion_tokens": int})


def run_demo(n: int = 2, requests: int = 300, concurrency: int = 32, max_tokens: int = 32,
             model: str | None = None, policy: str | None = None, **spec_kwargs):
    """Start ``n`` replicas, send ``requests`` through the router, print and return the table, stop.
    ``policy`` None: the cluster's default (``kv_aware``: it routes on the replicas' KV-cache events)."""
    t = time.perf_counter()
    with Cluster.replicas(model, n=n, **spec_kwargs) as cluster:
        print(f"{n} replicas healthy in {time.perf_counter() - t:.1f} s:")
        for s in cluster.status():
            print(f"  {s.name}: {s.url}  pinned to {s.pinning}  pid {s.pid}  rss {s.rss_gib} GiB")
        policy = policy or cluster.default_policy()
        print(f"sending {requests} requests ({concurrency} at a time, {max_tokens} tokens each, policy {policy}) ...")
        with cluster.client(policy) as client:
            wall = loop.run(closed_loop(client, requests, concurrency, max_tokens))
            table = summarize(client.records, wall)
        print(f"done in {wall:.1f} s")
        print(table.to_string())
    print("stopped: no replica left running")
    return table
