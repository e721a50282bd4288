"""bench.mix: several tenants' workloads as one, each request carrying who sent it."""

from __future__ import annotations

import asyncio

import pytest

from nbkit import bench
from nbkit.bench.targets import Call, FakeTarget


def parts(rates=True):
    a = bench.synthetic(40, input_len=16, output_len=4, seed=1, name="A")
    b = bench.synthetic(120, input_len=32, output_len=4, seed=2, name="B")
    if not rates:
        return {"a": a, "b": {"workload": b, "priority": "batch"}}
    return {"a": {"workload": a, "rate": 20.0, "priority": "interactive", "api_key": "key-a"},
            "b": {"workload": b, "rate": 60.0, "priority": "batch"}}


def test_rates_give_each_tenant_its_own_arrivals_merged_by_time():
    w = bench.mix(parts(), seed=3)
    assert w.has_timestamps and w.num_requests == 160
    times = [it.arrival_s for it in w.items]
    assert times == sorted(times)
    for tenant, n, rate, prio in (("a", 40, 20.0, "interactive"), ("b", 120, 60.0, "batch")):
        mine = [it for it in w.items if it.tenant == tenant]
        assert len(mine) == n and {it.priority for it in mine} == {prio}
        span = mine[-1].arrival_s - mine[0].arrival_s
        assert n / span == pytest.approx(rate, rel=0.35)          # Poisson at its own rate
    assert w.api_keys == {"a": "key-a"} and "key-a" not in repr(w) and "key-a" not in str(w.params)
    assert bench.mix(parts(), seed=3).items == w.items             # seeded


def test_without_rates_items_interleave_in_proportion_each_part_in_order():
    w = bench.mix(parts(rates=False), seed=0)
    assert not w.has_timestamps
    tenants = [it.tenant for it in w.items]
    assert tenants.count("a") == 40 and tenants.count("b") == 120
    assert 2 <= tenants[:40].count("a") <= 20                       # spread out, not 40 a's first
    a = bench.synthetic(40, input_len=16, output_len=4, seed=1)
    assert [it.text for it in w.items if it.tenant == "a"] == [it.text for it in a.items]
    assert {it.priority for it in w.items if it.tenant == "b"} == {"batch"}


@pytest.mark.parametrize("spec, match", [
    ({"a": {"workload": 3}}, "tenant 'a': 'workload' must be a Workload"),
    ({"a": {"workload": None, "speed": 1}}, "tenant 'a': unknown key"),
    ({"a": {"workload": "W", "rate": -1}}, "tenant 'a': rate=-1"),
    ({"a": {"workload": "W", "priority": "urgent"}}, "tenant 'a': priority"),
    ({"a": {"workload": "W", "rate": 1}, "b": "W"}, "every tenant a rate.*: b"),
    ({}, "no tenants"),
])
def test_bad_parts_are_named(spec, match):
    w = bench.synthetic(4, input_len=8, output_len=2)
    spec = {k: (w if v == "W" else {kk: (w if vv == "W" else vv) for kk, vv in v.items()}) for k, v in spec.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        bench.mix(spec)


def test_requests_carry_tenant_key_and_priority_and_results_split_by_tenant():
    w = bench.mix(parts(), seed=1)
    target = FakeTarget(ttft_s=0.001)
    res = asyncio.run(bench.arun(target, w, progress=False))
    assert len(target.calls) == 160
    a_calls = [c for c in target.calls if c.tenant == "a"]
    assert len(a_calls) == 40 and {c.api_key for c in a_calls} == {"key-a"}
    assert {c.api_key for c in target.calls if c.tenant == "b"} == {None}
    assert a_calls[0].who_headers() == {"authorization": "Bearer key-a", "x-nbkit-priority": "interactive"}
    t = res.by_tenant()
    assert t["a"]["completed"] == 40 and t["b"]["completed"] == 120 and t["b"]["throttled"] == 0
    assert "tenant" in res.report() and "TTFT p99" in res.report()
    assert set(res.frame()["tenant"]) == {"a", "b"}


def test_who_headers_name_the_tenant_without_a_key():
    assert Call(tenant="bob").who_headers() == {"x-nbkit-tenant": "bob"}
    assert Call().who_headers() == {}
