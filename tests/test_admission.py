"""Tenants in the router and the endpoint, against MockTransport stand-in replicas (no vLLM): who
sent a request (API key, header, ``user``), the admission queue's order (priority, then fair share
across tenants), rate limits (429 + Retry-After in OpenAI's error shape), 401 for unknown keys,
vLLM's own ``priority`` field, and the per-tenant series in ``/metrics``."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from nbkit.policies import RequestInfo
from nbkit.policies.tenants import Tenants
from nbkit.routing.admission import TenantError, Throttled
from nbkit.routing.router import Router
from test_router import Fake, ep_client, make_endpoint, ranks, run

TENANTS = {"tenants": {
    "alice": {"api_key": "key-alice", "weight": 1, "priority": "interactive"},
    "bob": {"api_key": "key-bob", "weight": 1, "priority": "batch", "requests_per_minute": 2},
    "carol": {"api_key": "key-carol", "weight": 3},
}}


def info(tenant="default", priority=0, tokens=100) -> RequestInfo:
    return RequestInfo(prompt_tokens=tokens, max_tokens=0, tenant=tenant, priority=priority)


async def grant_order(router: Router, infos: list[RequestInfo]) -> list[int]:
    """Fill the one slot, queue ``infos`` in order, then free slots one at a time: the order granted."""
    first = await router.acquire(info())
    order: list[int] = []

    async def one(i: int, x: RequestInfo):
        lease = await router.acquire(x)
        order.append(i)
        await asyncio.sleep(0)
        lease.release("ok")

    tasks = []
    for i, x in enumerate(infos):
        tasks.append(asyncio.ensure_future(one(i, x)))
        await asyncio.sleep(0)  # queued in this order
    assert router.queued == len(infos)
    first.release("ok")
    await asyncio.gather(*tasks)
    return order


def test_the_queue_serves_priorities_first_then_fifo():
    router = Router(ranks(1), "round_robin", max_per_rank=1)
    order = run(grant_order(router, [info(priority=10), info(priority=10), info(priority=0), info(priority=5)]))
    assert order == [2, 3, 0, 1]


def test_a_tenant_that_sends_ten_times_more_gets_its_weights_share_not_more():
    router = Router(ranks(1), "round_robin", max_per_rank=1, tenants=TENANTS)
    infos = [info("bob") for _ in range(20)] + [info("alice") for _ in range(4)]  # bob floods first
    order = run(grant_order(router, infos))
    first8 = [("alice" if i >= 20 else "bob") for i in order[:8]]
    assert first8.count("alice") == 4, first8  # equal weights: alice is not stuck behind bob's 20


def test_weights_split_the_backlog():
    router = Router(ranks(1), "round_robin", max_per_rank=1, tenants=TENANTS)
    infos = [info("alice") for _ in range(40)] + [info("carol") for _ in range(40)]
    order = run(grant_order(router, infos))
    first40 = ["carol" if i >= 40 else "alice" for i in order[:40]]
    assert 27 <= first40.count("carol") <= 33, first40  # weight 3 : 1


def test_identify_by_key_header_and_user_and_401_for_unknown_keys():
    router = Router(ranks(1), tenants=TENANTS)
    body = {"prompt": "hi", "max_tokens": 4}
    assert router.describe(body, {"authorization": "Bearer key-carol"}).tenant == "carol"
    got = router.describe(body, {"authorization": "Bearer key-bob"})
    assert (got.tenant, got.priority) == ("bob", 10)
    for headers in ({}, {"authorization": "Bearer nope"}, {"x-nbkit-tenant": "alice"}):
        with pytest.raises(TenantError) as e:
            router.describe(body, headers)
        assert e.value.status == 401
    # the in-kernel client names its tenant without a key; an unknown name is an error naming it
    assert router.describe(body, {"x-nbkit-tenant": "bob"}, trusted=True).tenant == "bob"
    with pytest.raises(TenantError, match="'zed'"):
        router.describe(body, {"x-nbkit-tenant": "zed"}, trusted=True)
    open_router = Router(ranks(1), tenants={"tenants": {"team": {"weight": 2}}})  # no keys at all
    assert open_router.describe({**body, "user": "team"}).tenant == "team"
    assert open_router.describe({**body, "user": "someone"}).tenant == "default"
    assert open_router.describe(body, {"x-nbkit-priority": "batch"}).priority == 10


def test_over_the_rate_limit_is_throttled_once_per_request_and_counted():
    router = Router(ranks(1), tenants=TENANTS)
    bob = router.describe({"prompt": "x"}, {"authorization": "Bearer key-bob"})
    for _ in range(2):
        router.admit(bob, router.new_record("/v1/completions", bob))
    record = router.new_record("/v1/completions", bob)
    with pytest.raises(Throttled) as e:
        router.admit(bob, record)
    assert e.value.status == 429 and 1 <= e.value.retry_after <= 30 and e.value.limit == "requests_per_minute"
    assert record.outcome == "throttled" and router.counters["throttled"] == 1
    snap = router.admission.snapshot()["bob"]
    assert snap["requests"] == 3 and snap["throttled"] == 1 and snap["throttled_requests_per_minute"] == 1


def test_endpoint_answers_401_and_429_in_openais_shape_and_shows_tenants_in_metrics():
    fake, ep = make_endpoint(1, tenants=TENANTS)

    async def main():
        async with await ep_client(ep) as c:
            body = {"model": "m", "prompt": "hi", "max_tokens": 2}
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == 401
            assert "key" in r.json()["error"]["message"] and r.json()["error"]["param"] == "authorization"
            r = await c.post("/v1/completions", json=body, headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401 and "wrong" not in r.text  # never echoes a key
            bob = {"authorization": "Bearer key-bob"}
            assert [(await c.post("/v1/completions", json=body, headers=bob)).status_code
                    for _ in range(2)] == [200, 200]
            r = await c.post("/v1/completions", json=body, headers=bob)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "TooManyRequests" and "requests_per_minute" in r.json()["error"]["message"]
            r = await c.post("/v1/completions", json=body, headers={"authorization": "Bearer key-alice"})
            assert r.status_code == 200
            return (await c.get("/metrics")).text

    text = run(main())
    assert len(fake.seen) == 3  # neither the 401s nor the 429 reached a replica
    assert 'nbkit_tenant_requests_total{tenant="bob"} 3.0' in text
    assert 'nbkit_tenant_throttled_total{limit="requests_per_minute",tenant="bob"} 1.0' in text
    assert 'nbkit_tenant_requests_total{tenant="alice"} 1.0' in text
    assert 'nbkit_requests_total{outcome="throttled",path="/v1/completions"} 1.0' in text


@pytest.mark.parametrize("vllm_priority, sent", [(True, 10), (False, None)])
def test_vllms_priority_field_is_set_only_where_replicas_schedule_by_priority(vllm_priority, sent):
    fake, ep = make_endpoint(1, tenants=TENANTS, vllm_priority=vllm_priority)

    async def main():
        async with await ep_client(ep) as c:
            r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2},
                             headers={"authorization": "Bearer key-bob"})
            assert r.status_code == 200

    run(main())
    assert fake.seen[-1].body.get("priority") == sent


def test_a_bad_tenants_file_names_the_tenant_and_field(tmp_path):
    f = tmp_path / "tenants.toml"
    f.write_text('[tenants.alice]\nweight = 0\n')
    with pytest.raises(ValueError, match=r"tenants\.alice\.weight"):
        Tenants.load(f)
    from nbkit.cli import main
    assert main(["serve", "--tenants", str(f), "--engine", "sim"]) == 2


def test_the_client_sends_tenant_and_priority_as_nbkits_not_as_body_fields():
    from nbkit.routing.client import RoutedClient

    fake = Fake()
    client = RoutedClient(ranks(1), "round_robin", model="m", transport=fake.client(), tenants=TENANTS, local=True)

    async def main():
        await client.complete("hi", tenant="bob", priority="batch")
        await client.aclose()

    run(main())
    seen = fake.seen[-1]
    assert "tenant" not in seen.body and "priority" not in seen.body
    assert seen.headers["x-nbkit-tenant"] == "bob" and client.router.records[-1].tenant == "bob"
    assert client.router.records[-1].priority == 10


def test_interactive_headroom_admits_an_interactive_request_past_the_cap_not_a_batch_one():
    router = Router(ranks(1), "round_robin", max_per_rank=1, interactive_headroom=1)

    async def main():
        batch = await router.acquire(info(priority=10))
        queued = asyncio.ensure_future(router.acquire(info(priority=10)))
        await asyncio.sleep(0)
        assert router.queued == 1  # the cap holds for batch requests
        urgent = await asyncio.wait_for(router.acquire(info(priority=0)), 1.0)  # past the cap, at once
        assert router.in_flight == 2
        third = asyncio.ensure_future(router.acquire(info(priority=0)))
        await asyncio.sleep(0)
        assert router.queued == 2  # the headroom is one slot
        urgent.release("ok")
        second = await asyncio.wait_for(third, 1.0)  # the interactive one goes first
        assert router.queued == 1 and second.info.priority == 0
        second.release("ok")
        batch.release("ok")
        (await asyncio.wait_for(queued, 1.0)).release("ok")

    run(main())
    with pytest.raises(ValueError, match="interactive_headroom"):
        Router(ranks(1), interactive_headroom=-1)
