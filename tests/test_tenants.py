"""Multi-tenant admission core (nbkit.policies.tenants): tenants, rate limits, fair queueing."""

from __future__ import annotations

import doctest
import math
from collections import Counter

import pytest

from nbkit.policies import tenants as tenants_mod
from nbkit.policies.tenants import (
    PRIORITIES, FairQueue, Identity, RateLimiter, Tenant, Tenants, Throttle, TokenBucket,
    parse_priority,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def keyed() -> Tenants:
    return Tenants.from_dict({"tenants": {
        "alice": {"api_key": "key-alice", "weight": 2, "priority": "interactive"},
        "bob": {"api_key": "key-bob", "priority": "batch"},
    }})


def open_tenants() -> Tenants:
    return Tenants([Tenant("alice"), Tenant("bob", priority=10)])


def test_module_doctest():
    assert doctest.testmod(tenants_mod).failed == 0


# ------------------------------------------------------------------------------------ config


def test_load_toml_with_default(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text("""
[tenants.alice]
api_key = "key-alice"
weight = 1
priority = "interactive"
requests_per_minute = 600
tokens_per_minute = 200000

[tenants.bob]
weight = 2.5
priority = 7

[default]
weight = 0.5
priority = "batch"
requests_per_minute = 10
""")
    t = Tenants.load(path)
    assert t.names == ("alice", "bob") and len(t) == 2 and [x.name for x in t] == ["alice", "bob"]
    assert t.get("alice") == Tenant("alice", "key-alice", 1.0, 0, 600.0, 200000.0)
    assert t.get("bob").weight == 2.5 and t.get("bob").priority == 7
    assert t.get("bob").requests_per_minute is None and t.get("bob").api_key is None
    assert t.default == Tenant("default", weight=0.5, priority=10, requests_per_minute=10)
    assert t.get("default") is t.default and t.get("carol") is None
    assert t.requires_key


def test_default_tenant_without_table_and_direct_form():
    t = Tenants.from_dict({"alice": {"weight": 3}, "bob": {}})
    assert t.names == ("alice", "bob") and t.get("alice").weight == 3.0
    assert t.default == Tenant("default") and t.default.weight == 1.0 and t.default.priority == 0
    assert t.default.requests_per_minute is None and t.default.tokens_per_minute is None
    assert not t.requires_key
    assert Tenants.from_dict({"alice": {}, "default": {"priority": 4}}).default.priority == 4
    assert len(Tenants()) == 0 and Tenants().default.name == "default"


@pytest.mark.parametrize("config, where, what", [
    ({"alice": {"weight": 0}}, "tenants.alice.weight", "must be > 0, got 0"),
    ({"alice": {"weight": -1.5}}, "tenants.alice.weight", "must be > 0"),
    ({"alice": {"weight": "heavy"}}, "tenants.alice.weight", "must be a number"),
    ({"alice": {"weight": True}}, "tenants.alice.weight", "must be a number"),
    ({"alice": {"weight": math.inf}}, "tenants.alice.weight", "must be > 0"),
    ({"alice": {"requests_per_minute": 0}}, "tenants.alice.requests_per_minute", "must be > 0"),
    ({"alice": {"tokens_per_minute": -5}}, "tenants.alice.tokens_per_minute", "must be > 0"),
    ({"alice": {"tokens_per_minute": "lots"}}, "tenants.alice.tokens_per_minute", "number"),
    ({"alice": {"priority": "urgent"}}, "tenants.alice.priority", "interactive"),
    ({"alice": {"priority": 1.5}}, "tenants.alice.priority", "bad priority"),
    ({"alice": {"priority": True}}, "tenants.alice.priority", "bad priority"),
    ({"alice": {"api_key": 123}}, "tenants.alice.api_key", "non-empty string"),
    ({"alice": {"api_key": ""}}, "tenants.alice.api_key", "non-empty"),
    ({"alice": {"api_key": "has space"}}, "tenants.alice.api_key", "without whitespace"),
    ({"alice": {"colour": "red"}}, "tenants.alice.colour", "unknown key"),
    ({"alice": 3}, "tenants.alice", "must be a table"),
    ({"tenants": {"alice": {}, "bob": {"weight": 0}}}, "tenants.bob.weight", "must be > 0"),
    ({"tenants": {"alice": {}}, "default": {"weight": 0}}, "default.weight", "must be > 0"),
    ({"tenants": {"alice": {}}, "default": {"bogus": 1}}, "default.bogus", "unknown key"),
    ({"tenants": {"default": {}}}, "tenants.default", "reserved"),
    ({"tenants": {}, "extra": {}}, "extra", "unknown top-level key"),
    ({"tenants": 5}, "tenants", "must be a table"),
    ({"alice": {"api_key": "k1"}, "bob": {"api_key": "k1"}}, "tenants.bob.api_key", "same api_key as tenants.alice"),
])
def test_validation_names_tenant_and_field(config, where, what):
    with pytest.raises(ValueError) as exc:
        Tenants.from_dict(config)
    msg = str(exc.value)
    assert msg.startswith(f"{where}:"), msg
    assert what in msg, msg
    assert "k1" not in msg                          # a duplicated key is never echoed


def test_load_errors_carry_the_path(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[tenants.alice]\nweight = 0\n")
    with pytest.raises(ValueError, match=r"bad\.toml: tenants\.alice\.weight: must be > 0, got 0"):
        Tenants.load(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[tenants.alice\n")
    with pytest.raises(ValueError, match="broken.toml"):
        Tenants.load(broken)


def test_constructor_validation():
    with pytest.raises(ValueError, match="tenants.carol.weight: must be > 0"):
        Tenant("carol", weight=0)
    with pytest.raises(ValueError, match="duplicate tenant name"):
        Tenants([Tenant("a"), Tenant("a")])
    with pytest.raises(ValueError, match="default.api_key: same api_key as tenants.a"):
        Tenants([Tenant("a", api_key="x")], default=Tenant("default", api_key="x"))
    with pytest.raises(ValueError, match="non-empty string"):
        Tenant(" padded ")
    assert Tenant("b", priority="batch").priority == 10


# ------------------------------------------------------------------------------------ identify


def test_identify_without_keys_order_header_user_default():
    t = open_tenants()
    assert not t.requires_key
    # Authorization is ignored when no tenant has a key
    who = t.identify({"Authorization": "Bearer whatever"}, {"user": "bob"})
    assert who == Identity(t.get("bob"), "user", None) and who.ok
    # header beats user, any header case
    assert t.identify({"x-NBKIT-tenant": "alice"}, {"user": "bob"}) == Identity(t.get("alice"), "header")
    assert t.identify({"X-nbkit-tenant": " bob "}).tenant.name == "bob"
    # unknown user falls through to the default
    who = t.identify({}, {"user": "end-user-42"})
    assert who.tenant is t.default and who.source == "default" and who.error is None
    assert t.identify({}, None).source == "default"
    assert t.identify({}, {"user": 17}).source == "default"


def test_identify_unknown_header_tenant_is_400():
    t = open_tenants()
    who = t.identify({"X-Nbkit-Tenant": "mallory"}, {"user": "alice"})
    assert who.tenant is None and not who.ok
    assert who.error == (400, "unknown tenant 'mallory' (X-nbkit-tenant); configured: alice, bob")


def test_identify_with_keys():
    t = keyed()
    assert t.requires_key
    who = t.identify({"authorization": "Bearer key-bob"})
    assert who == Identity(t.get("bob"), "api_key", None)
    assert t.identify({"AUTHORIZATION": "bearer   key-alice "}).tenant.name == "alice"
    # key beats header and user: the header cannot impersonate
    who = t.identify({"Authorization": "Bearer key-bob", "X-nbkit-tenant": "alice"}, {"user": "alice"})
    assert who.tenant.name == "bob" and who.source == "api_key"
    # a header naming an unknown tenant does not matter when the key decides
    assert t.identify({"Authorization": "Bearer key-bob", "X-nbkit-tenant": "zed"}).tenant.name == "bob"


@pytest.mark.parametrize("headers, word", [
    ({}, "missing"),
    ({"X-nbkit-tenant": "alice"}, "missing"),
    ({"Authorization": "Bearer "}, "missing"),
    ({"Authorization": "Basic a2V5LWFsaWNl"}, "missing"),
    ({"Authorization": "Bearer key-carol"}, "unknown"),
    ({"Authorization": "Bearer key-alice2", "X-nbkit-tenant": "alice"}, "unknown"),
])
def test_identify_401(headers, word):
    who = keyed().identify(headers, {"user": "alice"})
    assert who.tenant is None and who.error[0] == 401
    assert word in who.error[1]
    assert "key-carol" not in who.error[1] and "key-alice" not in who.error[1]


# ------------------------------------------------------------------------------------ priority


def test_parse_priority():
    assert PRIORITIES == {"interactive": 0, "batch": 10}
    assert parse_priority("interactive") == 0 and parse_priority("Batch") == 10
    assert parse_priority(3) == 3 and parse_priority(-2) == -2 and parse_priority(" 5 ") == 5
    for bad in (True, False, 1.0, None, "soon", [0]):
        with pytest.raises(ValueError, match="interactive.*batch"):
            parse_priority(bad)
    with pytest.raises(ValueError, match=r"'soon'"):
        parse_priority("soon")


def test_priority_of_and_clamping():
    t = Tenants([Tenant("fast", priority=0), Tenant("slow", priority="batch")])
    fast, slow = t.get("fast"), t.get("slow")
    assert t.priority_of(fast, {}, None) == 0 and t.priority_of(slow, {}, {}) == 10
    assert t.priority_of(fast, {"X-nbkit-priority": "batch"}, None) == 10      # less urgent: ok
    assert t.priority_of(fast, {"x-nbkit-priority": "20"}, {"priority": 5}) == 20   # header first
    assert t.priority_of(fast, {}, {"priority": 5}) == 5                      # body field
    assert t.priority_of(fast, {}, {"priority": "batch"}) == 10
    assert t.priority_of(slow, {"X-nbkit-priority": "interactive"}, None) == 10  # clamped
    assert t.priority_of(slow, {}, {"priority": -100}) == 10                    # clamped
    assert t.priority_of(slow, {}, {"priority": 12}) == 12
    assert t.priority_of(None, {}, {"priority": 3}) == 3                        # default tenant
    with pytest.raises(ValueError, match="X-nbkit-priority"):
        t.priority_of(fast, {"X-nbkit-priority": "asap"}, None)
    with pytest.raises(ValueError, match="priority"):
        t.priority_of(fast, {}, {"priority": "asap"})


# ---------------------------------------------------------------------------------- token bucket


def test_token_bucket_refill_and_retry_after():
    clock = FakeClock()
    b = TokenBucket(60, clock=clock)              # 1 per second, capacity 60
    assert b.capacity == 60 and b.available() == 60
    assert b.try_take(60) == 0.0 and b.available() == pytest.approx(0.0)
    assert b.try_take(1) == pytest.approx(1.0)    # empty, need 1 at 1/s
    assert b.try_take(3) == pytest.approx(3.0)
    clock.t += 0.25
    assert b.try_take(1) == pytest.approx(0.75)
    assert b.available() == pytest.approx(0.25)   # refusals take nothing
    clock.t += 0.75
    assert b.try_take(1) == 0.0 and b.available() == pytest.approx(0.0)
    clock.t += 1000
    assert b.available() == 60                    # capped at capacity
    assert b.try_take(10, now=clock.t) == 0.0 and b.available(now=clock.t) == pytest.approx(50)


def test_token_bucket_burst_and_over_capacity():
    clock = FakeClock()
    b = TokenBucket(120, burst=10, clock=clock)   # 2 per second, capacity 10
    assert b.capacity == 10 and b.available() == 10
    assert b.try_take(25) == 0.0                  # over capacity, bucket full: allowed, empties it
    assert b.available() == 0.0
    assert b.try_take(25) == pytest.approx(5.0)   # waits until full again (10 tokens at 2/s)
    clock.t += 4.0
    assert b.try_take(25) == pytest.approx(1.0)
    clock.t += 1.0
    assert b.try_take(25) == 0.0 and b.available() == 0.0
    with pytest.raises(ValueError):
        TokenBucket(0)
    with pytest.raises(ValueError):
        TokenBucket(60, burst=-1)


def test_token_bucket_clock_going_backwards():
    clock = FakeClock()
    b = TokenBucket(60, clock=clock)
    b.try_take(60)
    assert b.try_take(1, now=clock.t - 50) == pytest.approx(1.0)
    clock.t += 2
    assert b.available() == pytest.approx(2.0)


# ---------------------------------------------------------------------------------- rate limiter


def test_rate_limiter_atomic_and_counters():
    clock = FakeClock()
    t = Tenants([Tenant("a", requests_per_minute=60, tokens_per_minute=600), Tenant("free")])
    lim = RateLimiter(t, clock=clock)
    a = t.get("a")
    assert lim.check(a, 500) is None
    # tokens bucket has 100 left: refuses 300, so the request bucket must not be charged
    th = lim.check(a, 300)
    assert isinstance(th, Throttle) and th.tenant is a and th.limit == "tokens_per_minute"
    assert th.retry_after_s == pytest.approx(20.0)   # 200 tokens missing at 10/s
    assert "tokens_per_minute" in th.message
    for _ in range(5):
        assert lim.check(a, 300) is not None
    assert lim._buckets["a"][1]["requests_per_minute"].available() == pytest.approx(59)
    assert lim._buckets["a"][1]["tokens_per_minute"].available() == pytest.approx(100)
    c = lim.counters
    assert c["a"] == {"admitted": 1, "throttled": 6, "throttled_requests_per_minute": 0,
                      "throttled_tokens_per_minute": 6}
    assert c["free"]["admitted"] == 0 and c["default"]["throttled"] == 0
    # unlimited tenants are always admitted
    for _ in range(1000):
        assert lim.check(t.get("free"), 10**9) is None
    assert lim.counters["free"]["admitted"] == 1000
    c["a"]["admitted"] = 99                         # counters is a copy
    assert lim.counters["a"]["admitted"] == 1


def test_rate_limiter_requests_limit_and_retry_rounding():
    clock = FakeClock()
    a = Tenant("a", requests_per_minute=60)
    lim = RateLimiter([a], clock=clock)
    for _ in range(60):
        assert lim.check(a, 0) is None
    th = lim.check(a, 0)
    assert th.limit == "requests_per_minute" and th.retry_after_s == pytest.approx(1.0)
    clock.t += 0.9999999
    th = lim.check(a, 0)
    assert th.retry_after_s == 0.001                # never below 1 ms
    clock.t += 0.0000001
    assert lim.check(a, 0) is None
    clock.t += 0.3333
    assert lim.check(a, 0).retry_after_s == pytest.approx(0.667)   # rounded up to the ms
    assert lim.counters["a"]["throttled_requests_per_minute"] == 3


def test_rate_limiter_both_refuse_names_the_later_one():
    clock = FakeClock()
    a = Tenant("a", requests_per_minute=60, tokens_per_minute=60)
    lim = RateLimiter([a], clock=clock)
    assert lim.check(a, 60) is None                 # requests 59 left, tokens 0
    th = lim.check(a, 30)
    assert th.limit == "tokens_per_minute" and th.retry_after_s == pytest.approx(30.0)
    clock.t += 30
    assert lim.check(a, 30) is None


def test_rate_limiter_unknown_tenant_and_changed_limits():
    clock = FakeClock()
    lim = RateLimiter(clock=clock)
    t1 = Tenant("x", requests_per_minute=1)
    assert lim.check(t1, 1) is None and lim.check(t1, 1) is not None
    t2 = Tenant("x", requests_per_minute=100)       # config changed: new (full) buckets
    assert lim.check(t2, 1) is None
    assert lim.counters["x"]["admitted"] == 2


# ------------------------------------------------------------------------------------ FairQueue


def drain(q: FairQueue, n: int | None = None) -> list:
    out = []
    while q and (n is None or len(out) < n):
        out.append(q.pop())
    return out


def test_priorities_strictly_first():
    q = FairQueue()
    for i in range(5):
        q.push(("batch", i), tenant="b", weight=100, priority=10, cost=1)
    for i in range(5):
        q.push(("inter", i), tenant="a", weight=0.01, priority=0, cost=100000)
    q.push(("urgent", 0), tenant="c", weight=1, priority=-1, cost=50)
    served = drain(q)
    assert [s[0] for s in served] == ["urgent"] + ["inter"] * 5 + ["batch"] * 5


def test_backlogged_equal_weights_share_regardless_of_push_counts():
    q = FairQueue()
    for i in range(100):
        q.push(("A", i), tenant="A", weight=1, priority=0, cost=100)
    for i in range(10):
        q.push(("B", i), tenant="B", weight=1, priority=0, cost=100)
    first = Counter(t for t, _ in drain(q, 20))
    assert first["B"] == 10 and abs(first["A"] - 10) <= 1


def test_weights_3_to_1_over_long_backlog():
    q = FairQueue()
    for i in range(2000):
        q.push(("A", i), tenant="A", weight=3, priority=0, cost=50 + (i * 37) % 200)
        q.push(("B", i), tenant="B", weight=1, priority=0, cost=50 + (i * 53) % 200)
    cost = Counter()
    for tenant, i in drain(q, 1000):
        cost[tenant] += 50 + (i * (37 if tenant == "A" else 53)) % 200
    assert cost["A"] / cost["B"] == pytest.approx(3.0, rel=0.1)


def test_idle_tenant_joining_late_gets_its_share_not_a_burst():
    q = FairQueue()
    for i in range(300):
        q.push(("A", i), tenant="A", weight=1, priority=0, cost=10)
    q.push(("B", -1), tenant="B", weight=1, priority=0, cost=10)   # B active once, early
    drain(q, 150)                                   # B's early item served, then A alone
    for i in range(50):
        q.push(("B", i), tenant="B", weight=1, priority=0, cost=10)
    nxt = drain(q, 20)
    assert nxt[0][0] == "B" or nxt[1][0] == "B"     # not starved
    share = Counter(t for t, _ in nxt)
    assert 9 <= share["B"] <= 11                    # its share from now on, no accumulated credit


def test_fifo_within_tenant_and_stable_ties():
    q = FairQueue()
    for i in range(5):
        q.push(("A", i), tenant="A", weight=1, priority=0, cost=10)
        q.push(("B", i), tenant="B", weight=1, priority=0, cost=10)
    served = drain(q)
    assert served == [(t, i) for i in range(5) for t in ("A", "B")]
    q = FairQueue()
    for i in range(5):
        q.push(("B", i), tenant="B", weight=1, priority=0, cost=10)
    for i in range(5):
        q.push(("A", i), tenant="A", weight=1, priority=0, cost=10)
    assert drain(q) == [(t, i) for i in range(5) for t in ("B", "A")]
    q = FairQueue()
    for i in range(20):                            # same tenant, varying costs: FIFO
        q.push(i, tenant="A", weight=1, priority=0, cost=(i * 7919) % 500)
    assert drain(q) == list(range(20))


def test_cost_at_least_one_and_validation():
    q = FairQueue()
    q.push("zero", tenant="A", weight=1, priority=0, cost=0)
    q.push("one", tenant="B", weight=1, priority=0, cost=1)
    assert q.stats() == {"A": {"queued": 1, "queued_cost": 1.0}, "B": {"queued": 1, "queued_cost": 1.0}}
    assert list(q) == ["zero", "one"]
    with pytest.raises(ValueError):
        q.push("zero", tenant="A", weight=1, priority=0, cost=5)   # already queued
    with pytest.raises(ValueError):
        q.push("w", tenant="A", weight=0, priority=0, cost=5)
    with pytest.raises(ValueError):
        q.push("c", tenant="A", weight=1, priority=0, cost=math.nan)
    assert len(q) == 2


def test_remove_and_take_during_iteration():
    q = FairQueue()
    items = [[t, i] for i in range(4) for t in ("A", "B")]   # unhashable items
    for it in items:
        q.push(it, tenant=it[0], weight=1, priority=0, cost=10)
    seen = []
    for it in q:
        seen.append(list(it))
        if it == ["A", 0]:
            assert q.remove(["A", 1]) is False      # equal but not the same object
            assert q.remove(items[2]) is True       # ["A", 1]: skipped later in this iteration
        if it[0] == "B" and it[1] % 2 == 1:
            q.take(it)                             # granted out of order
        if it == ["B", 3]:
            q.push(["C", 0], tenant="C", weight=1, priority=0, cost=1)   # not in the snapshot
    assert ["A", 1] not in seen and len(seen) == 7 and ["C", 0] not in seen
    # A1 was not A's newest item, so A2/A3 keep their tags; C joins at V = 30 (B3's start)
    assert list(q) == [["A", 0], ["B", 0], ["A", 2], ["B", 2], ["C", 0], ["A", 3]]
    assert len(q) == 6 and q.stats()["B"] == {"queued": 2, "queued_cost": 20.0}
    with pytest.raises(KeyError):
        q.take(items[2])
    assert q.remove(items[2]) is False
    assert q.peek() == ["A", 0] and len(q) == 6
    q.clear()
    assert not q and len(q) == 0 and list(q) == [] and q.stats() == {}
    with pytest.raises(IndexError):
        q.pop()
    with pytest.raises(IndexError):
        q.peek()


def test_remove_does_not_advance_virtual_clock_but_take_does():
    def run(grant: bool) -> list:
        q = FairQueue()
        for i in range(10):                         # finish tags 10, 20, ..., 100
            q.push(("A", i), tenant="A", weight=1, priority=0, cost=10)
        for o in list(q)[:5]:
            q.take(o) if grant else q.remove(o)
        for i in range(3):
            q.push(("B", i), tenant="B", weight=1, priority=0, cost=10)
        return list(q)[:6]
    # cancelled: V stays 0, B's tags are 10, 20, 30 and go before A5 (60)
    assert run(grant=False) == [("B", 0), ("B", 1), ("B", 2), ("A", 5), ("A", 6), ("A", 7)]
    # granted: V is A4's start (40), B's tags are 50, 60, 70: interleaved
    assert run(grant=True) == [("B", 0), ("A", 5), ("B", 1), ("A", 6), ("B", 2), ("A", 7)]


def test_removing_newest_item_returns_tag_space():
    q = FairQueue()
    q.push("a0", tenant="A", weight=1, priority=0, cost=10)
    q.push("a1", tenant="A", weight=1, priority=0, cost=1000)
    q.push("b0", tenant="B", weight=1, priority=0, cost=10)
    assert q.remove("a1")                           # A's last finish goes back to 10
    q.push("a2", tenant="A", weight=1, priority=0, cost=10)    # finish 20, ahead of nothing of B
    q.push("b1", tenant="B", weight=1, priority=0, cost=10)
    assert list(q) == ["a0", "b0", "a2", "b1"]


def test_empty_level_forgets_history():
    q = FairQueue()
    for i in range(50):
        q.push(("A", i), tenant="A", weight=1, priority=0, cost=10)
    drain(q)                                        # level empty: A's old finish tag is dropped
    q.push(("A", 50), tenant="A", weight=1, priority=0, cost=10)
    q.push(("B", 0), tenant="B", weight=1, priority=0, cost=10)
    assert drain(q) == [("A", 50), ("B", 0)]        # equal tags at a fresh level: push order
