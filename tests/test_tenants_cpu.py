"""Tenants on two real vLLM-CPU replicas (the session's shared cluster), through the endpoint with
the OpenAI SDK and plain HTTP: unknown API keys get 401, a tenant over its rate limit gets 429 with
Retry-After at once (never a hang), interactive requests pass queued batch ones, and a flooding
tenant gets its weight's share of the slots, not its arrival order's."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import openai
import pytest

from conftest import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")]

TENANTS = {"tenants": {
    "alice": {"api_key": "key-alice", "priority": "interactive", "weight": 1},
    "bob": {"api_key": "key-bob", "priority": "batch", "weight": 1, "requests_per_minute": 3},
    "carol": {"api_key": "key-carol", "priority": "batch", "weight": 1},
    "dave": {"api_key": "key-dave", "priority": "batch", "weight": 1},
}}


@pytest.fixture
def endpoint(shared_cluster):
    ep = shared_cluster.endpoint(port=free_port(8620), policy="least_load", max_per_rank=1, tenants=TENANTS)
    yield ep
    ep.stop()


def sdk(ep, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ep.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_unknown_api_keys_get_401_and_known_ones_are_served(endpoint, shared_cluster):
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(endpoint, "not-a-key").completions.create(model=shared_cluster.model, prompt="hi", max_tokens=2)
    assert e.value.status_code == 401 and "unknown API key" in str(e.value)
    out = sdk(endpoint, "key-alice").chat.completions.create(
        model=shared_cluster.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert out.choices[0].message.content is not None
    assert endpoint.router.records[-1].tenant == "alice"


def test_a_tenant_over_its_limit_gets_429_with_retry_after_at_once(endpoint, shared_cluster):
    client = sdk(endpoint, "key-bob")
    for _ in range(3):
        client.completions.create(model=shared_cluster.model, prompt="hello", max_tokens=2)
    t = time.monotonic()
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=shared_cluster.model, prompt="hello", max_tokens=2)
    assert time.monotonic() - t < 5  # answered, not queued
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert "requests_per_minute" in e.value.response.json()["error"]["message"]
    metrics = httpx.get(f"{endpoint.url}/metrics", timeout=10).text
    assert 'nbkit_tenant_throttled_total{limit="requests_per_minute",tenant="bob"} 1.0' in metrics
    sdk(endpoint, "key-alice").completions.create(model=shared_cluster.model, prompt="hello", max_tokens=2)


def granted_at(rec) -> float:
    return rec.arrival + rec.queue_wait_s


async def flood_then(ep, model, first: list[tuple[str, int]], then: list[tuple[str, int]]):
    """Send ``first`` (key, n) requests, wait until some queue in the endpoint, then ``then``; all
    long enough (64 tokens) that the 2 slots stay busy. Returns the endpoint's records of them."""
    body = {"model": model, "prompt": "Tell me a long story about the sea.", "max_tokens": 64, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=ep.url, timeout=120) as c:
        async def send(key):
            r = await c.post("/v1/completions", json=body, headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        tasks = [asyncio.ensure_future(send(k)) for k, n in first for _ in range(n)]
        deadline = time.monotonic() + 60
        while ep.router.queued < sum(n for _, n in first) - 2:
            assert time.monotonic() < deadline, "the first requests never queued"
            await asyncio.sleep(0.02)
        tasks += [asyncio.ensure_future(send(k)) for k, n in then for _ in range(n)]
        await asyncio.gather(*tasks)
    return list(ep.router.records)[-len(tasks):]


def test_interactive_requests_pass_queued_batch_ones(endpoint, shared_cluster):
    recs = asyncio.run(flood_then(endpoint, shared_cluster.model, [("key-carol", 8)], [("key-alice", 2)]))
    alice = [r for r in recs if r.tenant == "alice"]
    carol_queued = [r for r in recs if r.tenant == "carol" and r.queue_wait_s > 0.05]
    assert len(alice) == 2 and len(carol_queued) >= 4
    assert {r.priority for r in alice} == {0} and {r.priority for r in carol_queued} == {10}
    # alice arrived after carol's queued requests and was admitted before every one still waiting
    waiting = [r for r in carol_queued if granted_at(r) > max(a.arrival for a in alice)]
    assert len(waiting) >= 3
    assert max(granted_at(a) for a in alice) < min(granted_at(r) for r in waiting)


def test_a_flooding_tenant_gets_its_share_not_its_arrival_order(endpoint, shared_cluster):
    recs = asyncio.run(flood_then(endpoint, shared_cluster.model, [("key-carol", 12)], [("key-dave", 4)]))
    dave_arrived = min(r.arrival for r in recs if r.tenant == "dave")
    after = sorted((r for r in recs if granted_at(r) > dave_arrived), key=granted_at)
    first8 = [r.tenant for r in after[:8]]
    # FIFO would admit carol's queued requests first; equal weights alternate them
    assert first8.count("dave") >= 3, first8
