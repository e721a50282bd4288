"""The main job in one call: replicas up, a few hundred requests spread over them, a per-replica
summary, a clean stop. ``make demo`` and ``nbkit demo`` run it::

    from nbkit.demo import run_demo
    table = run_demo(n=2, requests=300)      # a pandas DataFrame, one row per replica
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass

import httpx

from . import loop
from .cluster import Cluster, Rank

PROMPTS = [
    "The replica serves many tokens", "A router balances the load", "Our notebook watches the cluster",
    "The scheduler prefills the prompt", "Each core decodes a short reply", "The endpoint answers every request",
]


@dataclass
class Result:
    rank: str
    ok: bool
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


async def _one(client: httpx.AsyncClient, rank: Rank, model: str, prompt: str, max_tokens: int) -> Result:
    t = time.perf_counter()
    try:
        r = await client.post(f"{rank.url}/v1/completions", headers=dict(rank.headers), json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0})
        r.raise_for_status()
        usage = r.json()["usage"]
        return Result(rank.name, True, time.perf_counter() - t, usage["prompt_tokens"], usage["completion_tokens"])
    except (httpx.HTTPError, KeyError, ValueError) as e:
        return Result(rank.name, False, time.perf_counter() - t, error=repr(e))


async def spread_load(ranks: list[Rank], model: str, requests: int = 300, concurrency: int = 32,
                      max_tokens: int = 32, seed: int = 0) -> tuple[list[Result], float]:
    """Send ``requests`` completions, dealt round robin over ``ranks``, ``concurrency`` at a time."""
    rng = random.Random(seed)
    order = itertools.cycle(ranks)
    jobs = [(next(order), rng.choice(PROMPTS)) for _ in range(requests)]
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0), limits=limits) as client:
        async def job(rank: Rank, prompt: str) -> Result:
            async with sem:
                return await _one(client, rank, model, prompt, max_tokens)
        t = time.perf_counter()
        results = await asyncio.gather(*(job(r, p) for r, p in jobs))
        return list(results), time.perf_counter() - t


def summarize(results: list[Result], wall_s: float):
    """Per-replica table: requests, failures, tokens, generated tok/s over the run, mean latency."""
    import pandas as pd

    df = pd.DataFrame([r.__dict__ for r in results])
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
             model: str | None = None, **spec_kwargs):
    """Start ``n`` replicas, send ``requests``, print and return the per-replica table, stop."""
    t = time.perf_counter()
    with Cluster.replicas(model, n=n, **spec_kwargs) as cluster:
        print(f"{n} replicas healthy in {time.perf_counter() - t:.1f} s:")
        for s in cluster.status():
            print(f"  {s.name}: {s.url}  pinned to {s.pinning}  pid {s.pid}  rss {s.rss_gib} GiB")
        print(f"sending {requests} requests ({concurrency} at a time, {max_tokens} tokens each) ...")
        results, wall = loop.run(spread_load(cluster.ranks, cluster.model, requests, concurrency, max_tokens))
        table = summarize(results, wall)
        print(f"done in {wall:.1f} s")
        print(table.to_string())
    print("stopped: no replica left running")
    return table
