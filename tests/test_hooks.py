"""The public hooks that the UI, the bench and the PD forwarder use instead of other objects'
private parts: router listeners and live limits, Lease.backdate, the blocking forms generated from
one implementation (nbkit.loop.on_loop / blocking, client.sync), and the monitor reading the
routers' scrape instead of scraping again."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from types import SimpleNamespace

import pytest

from nbkit import loop
from nbkit.policies import RequestInfo
from nbkit.routing.client import RoutedClient
from nbkit.routing.metrics import EngineMetrics
from nbkit.ui.monitor import Monitor
from test_router import Fake, assert_clean, held_handler, post, ranks, routed_client, run, setup, until


def test_router_listeners_see_records_when_created_and_when_finished():
    fake, router, fwd = setup(2)
    created, finished = [], []
    remove_created = router.add_listener(lambda r: created.append((r.id, r.outcome)), when="created")
    router.add_listener(lambda r: finished.append((r.id, r.outcome)))
    router.add_listener(lambda r: 1 / 0)  # a broken listener changes nothing

    async def main():
        await post(fwd)
        await post(fwd)
        remove_created()
        await post(fwd)

    run(main())
    assert [c[1] for c in created] == ["pending", "pending"]  # created before routing, twice
    assert [f[1] for f in finished] == ["ok", "ok", "ok"]
    assert [f[0] for f in finished] == [r.id for r in router.records]
    with pytest.raises(ValueError, match="when="):
        router.add_listener(print, when="later")


def test_set_max_concurrency_admits_queued_requests_at_once():
    fake, router, fwd = setup(2, max_concurrency=1)
    gates, entries = held_handler(fake, router)

    async def main():
        first = asyncio.create_task(post(fwd, tag="1"))
        await until(lambda: len(entries) == 1, what="first in flight")
        second = asyncio.create_task(post(fwd, tag="2"))
        await until(lambda: router.queued == 1, what="second queued behind the cap")
        router.set_max_concurrency(2)
        await until(lambda: len(entries) == 2 and router.queued == 0, what="second admitted")
        assert router.max_concurrency == 2
        router.set_max_concurrency(0)  # 0 means no cap, as the panel's slider says
        assert router.max_concurrency is None
        for tag in ("1", "2"):
            gates[tag].set()
        await asyncio.gather(first, second)

    run(main())
    with pytest.raises(ValueError, match="max_concurrency"):
        router.set_max_concurrency(-1)
    assert_clean(router)


def test_lease_backdate_moves_ttft_and_e2e_earlier():
    _, router, _ = setup(1)

    async def main():
        lease = await router.acquire(RequestInfo(prompt_tokens=4, max_tokens=2))
        lease.backdate(0.5)
        lease.first_token()
        lease.release("ok")
        return lease.record

    rec = run(main())
    assert rec.ttft_s >= 0.5 and rec.e2e_s >= rec.ttft_s


class Thing:
    def __init__(self):
        self.threads = []

    @loop.on_loop
    async def awork(self, x: int, *, times: int = 2) -> int:
        """Multiply on nbkit's loop."""
        self.threads.append(threading.current_thread().name)
        await asyncio.sleep(0)
        return x * times

    work = loop.blocking(awork)


def test_one_implementation_gives_an_awaitable_and_a_blocking_form():
    t = Thing()
    assert t.work(3) == 6 and t.work(3, times=3) == 9
    assert asyncio.run(t.awork(4)) == 8
    assert t.threads == ["nbkit-loop"] * 3
    assert t.work.__name__ == "work" and "awork" in t.work.__doc__
    assert list(inspect.signature(t.work).parameters) == ["x", "times"]
    assert inspect.signature(Thing.awork).parameters["times"].default == 2


def test_cluster_actions_are_generated_once_with_matching_signatures():
    from nbkit.cluster.cluster import Cluster
    for name in ("start", "stop", "restart", "scale", "stop_replica", "check_health", "metrics"):
        blocking, awaitable = getattr(Cluster, name), getattr(Cluster, "a" + name)
        assert isinstance(blocking, loop.blocking), name
        assert blocking.impl is awaitable.on_loop, name
        params = list(inspect.signature(awaitable).parameters)[1:]
        assert list(blocking.signature.parameters) == params, name


def test_sync_forms_take_the_async_forms_defaults():
    fake = Fake()
    c = routed_client(fake)
    for name in ("complete", "chat", "stream_complete", "stream_chat"):
        assert inspect.signature(getattr(c.sync, name)) == inspect.signature(getattr(c, name)), name
    c.sync.chat([{"role": "user", "content": "hi"}])
    list(c.sync.stream_complete("hi"))
    assert fake.seen[0].body["max_tokens"] == inspect.signature(RoutedClient.chat).parameters["max_tokens"].default
    assert fake.seen[1].body["max_tokens"] == inspect.signature(RoutedClient.stream_complete).parameters[
        "max_tokens"].default
    with pytest.raises(AttributeError, match="no 'nope'"):
        c.sync.nope
    assert_clean(c.router)


class FakeProbe:
    def __init__(self):
        self.asked = []

    async def metrics(self, url, timeout=None):
        self.asked.append(url)
        return {"0": EngineMetrics(running=9, generation_tokens=100, scraped_at=time.time())}


def fake_cluster(n: int, routers: list):
    rs = ranks(n)
    plans = [SimpleNamespace(index=i, url=r.url, headless=False, dp_size=1, pinning=f"cores {i}", port=8000 + i,
                             device="cpu", name=r.name) for i, r in enumerate(rs)]
    probe = FakeProbe()
    return SimpleNamespace(plans=plans, ranks=rs, routers=lambda: routers, state=lambda i: "healthy",
                           probe=probe, process=lambda i: None), probe


def test_monitor_uses_a_fresh_router_reading_and_scrapes_only_what_no_router_read():
    _, router, _ = setup(2)
    now = time.time()
    router.states[0].scraped = EngineMetrics(running=3, waiting=1, generation_tokens=50, scraped_at=now)
    router.states[1].scraped = EngineMetrics(running=5, scraped_at=now - 60)  # stale: scraped again
    cluster, probe = fake_cluster(2, [router])
    mon = Monitor(cluster)
    rows = loop.run(mon.sample())
    assert probe.asked == [cluster.plans[1].url]
    assert [(r.rank, r.running, r.waiting) for r in rows] == [("replica0", 3, 1), ("replica1", 9, 0)]
    # the next sample computes rates between the readings' own times
    router.states[0].scraped = EngineMetrics(running=3, generation_tokens=150, scraped_at=now + 0.5)
    rows = loop.run(mon.sample())
    assert rows[0].gen_tok_s == pytest.approx(200.0)


def test_monitor_shows_index_blocks_and_predicted_vs_reported_hit_rates():
    from nbkit.policies.kv_index import KVIndex
    from nbkit.routing.state import RequestRecord
    _, router, _ = setup(2)
    cluster, _ = fake_cluster(2, [router])
    ix = cluster.kv_index = KVIndex()
    ix.apply_batch("replica0", 0, [{"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None,
                                    "token_ids": list(range(32)), "block_size": 16, "lora_name": None}])
    mon = Monitor(cluster)
    now = time.time()
    router.states[0].scraped = EngineMetrics(prefix_cache_queries=100, prefix_cache_hits=10, scraped_at=now)
    loop.run(mon.sample())
    router.records.append(RequestRecord(id=1, path="/v1/completions", policy="kv_aware", rank="replica0",
                                        arrival=time.time(), tokens_in=40, cached_tokens=32, outcome="ok"))
    router.states[0].scraped = EngineMetrics(prefix_cache_queries=140, prefix_cache_hits=42, scraped_at=now + 1)
    rows = loop.run(mon.sample())
    assert rows[0].kv_blocks == 2 and rows[1].kv_blocks is None
    assert rows[0].predicted_hit_pct == 80.0 and rows[0].reported_hit_pct == 80.0  # 32 of 40, since the first reading
    assert rows[1].predicted_hit_pct is None
