"""Cluster(engine="sim"): simulated replicas behind the same Cluster, router, endpoint and monitor
as real vLLM ones — started as processes, routed, scraped, scaled and stopped, no vLLM involved."""

from __future__ import annotations

import asyncio

import httpx
import psutil
import pytest

from conftest import free_port
from nbkit import Cluster
from nbkit.routing.metrics import parse_metrics

N = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster.replicas("meta-llama/Llama-3.1-8B", n=N, engine="sim", sim_hardware="H100",
                         port_start=free_port(8700), run_dir=tmp_path_factory.mktemp("simrun"),
                         extra_args=["--speed", "20"])
    c.start(timeout=120)
    yield c
    c.stop()


def test_status_and_metrics_carry_vllm_names(cluster):
    st = cluster.status_frame()
    assert list(st["state"]) == ["healthy"] * N
    assert set(st["pinning"]) == {"sim H100"}
    text = httpx.get(cluster.ranks[0].url + "/metrics", timeout=10).text
    snap = parse_metrics(text)
    assert set(snap) == {"0"}  # one engine label, as vLLM's
    m = cluster.metrics()
    assert len(m) == N and all(v.kv_cache_usage == 0.0 for v in m.values())


def test_routed_client_spreads_streams_and_records(cluster):
    client = cluster.client("round_robin")

    async def main():
        outs = await asyncio.gather(*(client.complete("Hello there " * 20, max_tokens=8) for _ in range(2 * N)))
        chunks = [c async for c in client.stream_chat([{"role": "user", "content": "Hi"}], max_tokens=5)]
        return outs, chunks

    try:
        outs, chunks = asyncio.run(main())
    finally:
        client.close()
    assert sorted(o["nbkit"]["rank"] for o in outs) == sorted(f"replica{i}" for i in range(N) for _ in range(2))
    assert all(o["usage"]["completion_tokens"] == 8 for o in outs)
    assert sum(1 for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content")) == 5
    frame = client.records_frame()
    assert len(frame) == 2 * N + 1 and set(frame["outcome"]) == {"ok"}
    assert (frame["ttft_s"] > 0).all()


def test_endpoint_serves_the_simulated_cluster(cluster):
    with cluster.endpoint(port=free_port(8790), policy="least_load") as ep:
        r = httpx.post(ep.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.headers["x-nbkit-rank"].startswith("replica")
        assert r.json()["model"] == "meta-llama/Llama-3.1-8B"


def test_stop_leaves_nothing(tmp_path):
    c = Cluster.replicas("tiny", n=2, engine="sim", port_start=free_port(8760), run_dir=tmp_path)
    c.start(timeout=120)
    pids = [c.process(i).pid for i in range(2)]
    assert all(psutil.pid_exists(p) for p in pids)
    c.stop()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
