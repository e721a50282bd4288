"""The simulator runs the live router's admission (tenants, priorities, fair share, rate limits,
slots) on simulated time: what happens to tenant A when B floods, before it happens."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from nbkit.policies.tenants import FairQueue
from nbkit.sim import Simulator
from nbkit.sim import hardware as sim_hardware
from nbkit.sim.config import load_cluster_config
from nbkit.traces import TraceError, TraceRequest, TraceSession, SubRequest, parse_line, read_trace, write_trace


def cfg(n=2):
    h = sim_hardware.get_hardware("H100")
    inst = {"model_name": "meta-llama/Llama-3.1-8B", "hardware": "H100",
            "npu_mem": {"mem_size": h.mem_size_gb, "mem_bw": h.mem_bw_gbs}, "pd_type": None, "tp_size": 1}
    return load_cluster_config({"num_nodes": 1, "link_bw": 16, "link_latency": 20000,
                                "nodes": [{"num_instances": n, "instances": [inst] * n}]})


def poisson(rate, duration, tenant, prompt, output, seed, priority=None):
    rng, t, out = random.Random(seed), 0.0, []
    while (t := t + rng.expovariate(rate)) < duration:
        out.append(TraceRequest(prompt, output, int(t * 1e9), tenant=tenant, priority=priority))
    return out


A = poisson(1.0, 30, "a", 200, 32, seed=1)              # interactive chat, 1 req/s
B = poisson(120.0, 30, "b", 1000, 300, seed=2)          # a batch flood, far over 2 H100s' capacity
TENANTS = {"tenants": {"a": {"priority": "interactive"}, "b": {"priority": "batch"}}}


def by(res, tenant):
    return res.tenants[tenant]


def test_trace_lines_carry_tenant_and_priority_and_bad_ones_name_the_field(tmp_path):
    items = [TraceRequest(8, 4, 0, tenant="a", priority="interactive"), TraceRequest(8, 4, 1, priority=3),
             TraceSession("s", 2, (SubRequest(4, 2),), tenant="b")]
    write_trace(tmp_path / "t.jsonl", items)
    assert read_trace(tmp_path / "t.jsonl") == items
    with pytest.raises(TraceError, match=r"line\.tenant=7"):
        parse_line({"input_toks": 1, "output_toks": 1, "arrival_time_ns": 0, "tenant": 7})
    with pytest.raises(TraceError, match=r"line\.priority=True"):
        parse_line({"input_toks": 1, "output_toks": 1, "arrival_time_ns": 0, "priority": True})


def test_priority_keeps_the_interactive_tenant_fast_while_batch_keeps_its_throughput():
    alone = Simulator(cfg(), policy="least_load", max_per_rank=32).run(A)
    fifo = Simulator(cfg(), policy="least_load", max_per_rank=32).run(A + B)
    fair = Simulator(cfg(), policy="least_load", max_per_rank=32, tenants=TENANTS, interactive_headroom=1).run(A + B)
    p99 = {k: by(r, "a")["ttft_s"]["p99"] for k, r in (("alone", alone), ("fifo", fifo), ("fair", fair))}
    # FIFO: A waits behind the whole flood (minutes); priority + headroom: A never waits for a slot
    assert p99["fifo"] > 100 * p99["fair"]
    assert p99["fair"] < 1.0
    # B is served as fast as under FIFO: it gets what A does not use
    assert by(fair, "b")["completed"] == by(fifo, "b")["completed"] == len(B)
    assert by(fair, "b")["output_throughput"] == pytest.approx(by(fifo, "b")["output_throughput"], rel=0.05)
    # without tenants the trace's names are kept in the records, all in one FIFO queue
    assert set(fifo.tenants) == {"a", "b"} and fifo.summary()["tenants"]["a"]["requests"] == len(A)
    assert "tenant" in fair.format_summary() and "TTFT p99" in fair.format_summary()


def test_weighted_fair_share_under_saturation():
    """Two backlogged batch tenants, weights 3:1, the same arrival pattern: while both wait, the
    queue grants them tokens 3:1 (not 1:1, as FIFO would)."""
    trace = (poisson(60.0, 20, "heavy", 500, 200, seed=3) + poisson(60.0, 20, "light", 500, 200, seed=3))
    tenants = {"tenants": {"heavy": {"weight": 3, "priority": "batch"}, "light": {"weight": 1, "priority": "batch"}}}
    res = Simulator(cfg(), policy="least_load", max_per_rank=16, tenants=tenants).run(trace)
    recs = sorted((r for r in res.records if r.ok), key=lambda r: r.arrival_s + r.e2e_s)
    window = recs[len(recs) // 5: len(recs) // 2]       # both still backlogged here
    n = {t: sum(1 for r in window if r.tenant == t) for t in ("heavy", "light")}
    assert 2.4 < n["heavy"] / n["light"] < 3.6, n
    fifo = Simulator(cfg(), policy="least_load", max_per_rank=16).run(trace)
    recs = sorted((r for r in fifo.records if r.ok), key=lambda r: r.arrival_s + r.e2e_s)
    window = recs[len(recs) // 5: len(recs) // 2]
    n = {t: sum(1 for r in window if r.tenant == t) for t in ("heavy", "light")}
    assert 0.7 < n["heavy"] / n["light"] < 1.4, n


def test_rate_limits_answer_429_and_the_bucket_refills():
    tenants = {"tenants": {"a": {"priority": "interactive"},
                           "b": {"priority": "batch", "requests_per_minute": 600}}}
    res = Simulator(cfg(), policy="least_load", max_per_rank=32, tenants=tenants).run(A + B)
    b = by(res, "b")
    # a full bucket (one minute's worth: 600) and 10/s refill over the 30 s trace
    assert b["completed"] == pytest.approx(600 + 10 * 30, abs=15)
    assert b["throttled"] == len(B) - b["completed"] and b["failed"] == 0
    throttled = [r for r in res.records if r.outcome == "http_429"]
    assert all(r.tenant == "b" and r.ttft_s is None for r in throttled)
    assert by(res, "a")["throttled"] == 0


def test_slots_are_held_by_the_policy_s_choices_and_never_exceeded():
    seen = []

    def pick(cands, req):
        seen.append(len(cands))
        return min(cands, key=lambda c: c.in_flight)

    res = Simulator(cfg(), policy=pick, max_per_rank=4).run(poisson(200.0, 2, "x", 300, 100, seed=4))
    assert res.summary()["completed"] == len(res.records)
    assert min(seen) >= 1 and max(seen) == 2          # a full instance is never offered
    waited = [r.queue_wait_s for r in res.records]
    assert max(waited) > 0.1                           # 400 requests over 8 slots: most waited


def test_unknown_tenant_and_bad_caps_are_named():
    with pytest.raises(ValueError, match="tenant='zed': no such tenant"):
        Simulator(cfg(), tenants=TENANTS).run([TraceRequest(8, 4, 0, tenant="zed")])
    with pytest.raises(ValueError, match="max_per_rank=0"):
        Simulator(cfg(), max_per_rank=0)
    with pytest.raises(ValueError, match="priority"):
        Simulator(cfg(), tenants=TENANTS).run([TraceRequest(8, 4, 0, tenant="a", priority="urgent")])


def test_fair_queue_iterates_lazily_in_service_order():
    q = FairQueue()
    for k in range(6):
        q.push(k, tenant="ab"[k % 2], weight=1, priority=10 if k < 4 else 0, cost=10)
    seen = []
    for item in q:
        seen.append(item)
        if item == 4:
            q.take(item)
            q.push(99, tenant="a", weight=1, priority=0, cost=1)   # pushed meanwhile: not seen
            q.remove(2)                                              # removed meanwhile: skipped
    assert seen == [4, 5, 0, 1, 3]
    assert list(q) == [5, 99, 0, 1, 3]      # 99 is tagged after a's earlier 4: b's 5 goes first


def test_the_command_line_takes_tenants_and_slots(tmp_path):
    write_trace(tmp_path / "t.jsonl", A[:10] + B[:200])
    (tmp_path / "cluster.json").write_text(json.dumps(
        {"num_nodes": 1, "link_bw": 16, "link_latency": 20000,
         "nodes": [{"num_instances": 1, "instances": [{"model_name": "meta-llama/Llama-3.1-8B", "hardware": "H100",
                                                      "npu_mem": {"mem_size": 80, "mem_bw": 3350}, "pd_type": None,
                                                      "tp_size": 1}]}]}))
    (tmp_path / "tenants.toml").write_text('[tenants.a]\npriority = "interactive"\n[tenants.b]\npriority = "batch"\n'
                                           'requests_per_minute = 60\n')
    base = [sys.executable, "-m", "nbkit.sim", "--cluster-config", str(tmp_path / "cluster.json"),
            "--dataset", str(tmp_path / "t.jsonl"), "--request-routing-policy", "least_load"]
    out = subprocess.run(base + ["--tenants", str(tmp_path / "tenants.toml"), "--max-per-rank", "8",
                                 "--summary-json", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "429" in out.stdout
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["tenants"]["b"]["throttled"] == 200 - s["tenants"]["b"]["completed"] > 0
    assert s["tenants"]["a"]["completed"] == 10
    (tmp_path / "bad.toml").write_text("[tenants.a]\nweight = -1\n")
    bad = subprocess.run(base + ["--tenants", str(tmp_path / "bad.toml")], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "tenants.a.weight" in bad.stderr
    bad = subprocess.run(base + ["--max-per-rank", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "max_per_rank=0" in bad.stderr


def test_engines_with_priority_scheduling_serve_interactive_requests_ahead_of_a_backlog():
    """``scheduling_policy: "priority"`` (vLLM's --scheduling-policy priority): with no router-side
    admission at all, the engine's own waiting queue puts interactive requests ahead of a batch
    backlog; FCFS engines make them wait behind it. Bad values name the field."""
    def config(policy):
        c = cfg(1)
        raw = c.model_dump()
        raw["nodes"][0]["instances"][0]["scheduling_policy"] = policy
        return load_cluster_config(raw)

    trace = sorted(poisson(1.0, 30, "a", 200, 32, seed=1, priority="interactive")
                   + poisson(60.0, 30, "b", 1000, 300, seed=2, priority="batch"), key=lambda r: r.arrival_time_ns)
    fcfs = Simulator(config("fcfs"), policy="round_robin").run(trace)
    prio = Simulator(config("priority"), policy="round_robin").run(trace)

    def p99(res, tenant):
        ttft = sorted(r.ttft_s for r in res.records if r.tenant == tenant and r.ttft_s is not None)
        return ttft[int(0.99 * (len(ttft) - 1))]

    assert p99(prio, "a") * 5 < p99(fcfs, "a"), (p99(prio, "a"), p99(fcfs, "a"))
    assert len(prio.records) == len(fcfs.records) == len(trace)
    assert sum(r.output_toks for r in prio.records) == sum(r.output_toks for r in fcfs.records)  # nothing lost
    with pytest.raises(Exception, match="scheduling_policy"):
        config("lifo")
