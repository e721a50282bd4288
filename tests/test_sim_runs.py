"""The simulator's fast paths change nothing: runs of steps planned ahead (from the step that finishes
a prompt on), the decode-only step without the queues' bookkeeping, and the load view's kept costs
give the same requests, times and decisions as driving every step through the scheduler proper and
scoring every candidate again (:mod:`nbkit.sim.runs`, :mod:`nbkit.sim.load_view`)."""

from __future__ import annotations

import gc
import io
import random

import pytest

from nbkit.policies import LeastLoadPolicy, LeastOutstandingPolicy, RankLoad, RequestInfo, get_policy
from nbkit.sim import hardware as H
from nbkit.sim.config import single_instance_config
from nbkit.sim.engine import Engine
from nbkit.sim.simulator import Simulator
from nbkit.traces import SubRequest, TraceRequest, TraceSession

from test_sim_speed import H100_THEN, cfg_of, inst, mixed


def shared_prefixes(n, rate, seed):
    """Prompts with token ids on a dozen shared documents: prefix-cache hits, evictions."""
    rng = random.Random(seed)
    docs = [tuple(rng.randrange(32000) for _ in range(rng.randint(200, 1500))) for _ in range(12)]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        ids = rng.choice(docs) + tuple(rng.randrange(32000) for _ in range(rng.randint(5, 200)))
        out.append(TraceRequest(len(ids), rng.randint(4, 300), int(t * 1e9), input_tok_ids=ids))
    return out


def scenarios():
    cpu = H.get_hardware("cpu").replace(decode_overhead_s=0.003)
    small = dict(kv_cache_gb=0.25)
    subs = tuple(SubRequest(300, 40, tool_duration_ns=200_000_000) for _ in range(4))
    return {
        # tiny KV cache: preemptions, requests with several token segments
        "preempt": (lambda **kw: Simulator(cfg_of([inst("tiny", "cpu", kv_cache_gb=0.02)] * 2), policy="power_of_two",
                                           hardware={"cpu": cpu}, seed=3, **kw), mixed(300, 8.0, seed=1)),
        # prefix caching with evictions and preemptions, routed on the exact KV index
        "prefix": (lambda **kw: Simulator(cfg_of([inst(**small)] * 3), policy="kv_aware", seed=1, hardware=H100_THEN,
                                          **kw), shared_prefixes(800, 40.0, 3)),
        # V0: new requests join every num_scheduler_steps steps; a prompt prefilled in a step of its own
        "v0": (lambda **kw: Simulator(cfg_of([inst(num_scheduler_steps=8, enable_chunked_prefill=False, kv_cache_gb=0.5),
                                              inst(num_scheduler_steps=4, kv_cache_gb=0.5)]), policy="LOAD", **kw),
               mixed(400, 12.0, seed=7)),
        "pd": (lambda **kw: Simulator(cfg_of([inst(pd_type="prefill"), inst(pd_type="decode")]), policy="RR",
                                      hardware=H100_THEN, **kw), mixed(200, 10.0, seed=2)),
        "sessions": (lambda **kw: Simulator(cfg_of([inst(), inst(tp_size=2)]), policy="session", hardware=H100_THEN,
                                            **kw), [TraceSession(f"s{k}", k * 30_000_000, subs) for k in range(30)]),
    }


def outcome(sim, trace):
    res = sim.run(trace)
    recs = [(r.request_id, r.instance_id, r.ttft_s, r.e2e_s, r.itl_s, r.queue_wait_s, r.preemptions, r.cached_tokens)
            for r in res.records]
    engines = [(e.steps, e.gen_tokens, e.prompt_tokens, e.preemptions, e.prefix_hits, list(e.step_ends))
               for e in sim.engines]
    return recs, engines, [e.busy_time for e in sim.engines]


@pytest.mark.parametrize("name", list(scenarios()))
def test_planned_runs_and_decode_steps_are_step_by_step_scheduling(name, monkeypatch):
    make, trace = scenarios()[name]
    fast_sim = make()
    fast = outcome(fast_sim, trace)
    assert any(e.macro for e in fast_sim.engines)
    # interval lines turn planning off: every step is an event of its own
    step_by_step = outcome(make(log_interval=1e9, log_file=io.StringIO()), trace)
    # and without the decode-only shortcut every step goes through the scheduler proper
    monkeypatch.setattr(Engine, "_decode_step", lambda self, now: None)
    proper = outcome(make(log_interval=1e9, log_file=io.StringIO()), trace)
    assert fast[:2] == step_by_step[:2] == proper[:2]
    assert fast[2] == pytest.approx(proper[2], rel=1e-12)   # busy time: a run's steps summed as one span


@pytest.mark.parametrize("policy", ["least_load", "least_outstanding", "least_load:kv_weight=64"])
def test_kept_costs_decide_as_scoring_every_candidate(policy, monkeypatch):
    trace = mixed(1500, 50.0, seed=4)
    cfg = single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=6)
    kept = Simulator(cfg, policy=policy).run(trace)
    monkeypatch.setattr(LeastLoadPolicy, "cost_of", lambda self: None)       # every decision: policy.select
    monkeypatch.setattr(LeastOutstandingPolicy, "cost_of", lambda self: None)
    scored = Simulator(cfg, policy=policy).run(trace)
    assert [(r.request_id, r.instance_id, r.ttft_s, r.e2e_s) for r in kept.records] == \
           [(r.request_id, r.instance_id, r.ttft_s, r.e2e_s) for r in scored.records]


def test_select_by_cost_is_select_to_the_reason_and_the_random_draws():
    rng = random.Random(7)
    for trial in range(400):
        n = rng.randint(1, 9)
        cands = [RankLoad(f"r{k}", k, in_flight=rng.randint(0, 3), pending_prefill_tokens=rng.choice([0, 100, 250]),
                          pending_decode_tokens=rng.choice([0, 50, 100]), running=rng.randint(0, 4),
                          waiting=rng.randint(0, 2), kv_cache_usage=rng.choice([0.0, 0.25, 0.5]),
                          stale=rng.random() < 0.3) for k in range(n)]
        for spec in ("least_load", "least_load:tokens_per_waiting=10", "least_outstanding"):
            a, b = get_policy(spec, seed=trial), get_policy(spec, seed=trial)
            cost = b.cost_of()
            assert cost is not None
            want = a.select(cands, RequestInfo())
            got = b.select_by_cost(cands, [cost(c) for c in cands], RequestInfo())
            assert got == want and a.rng.random() == b.rng.random(), (spec, cands)


def test_a_subclass_that_selects_otherwise_has_no_cost():
    class Last(LeastLoadPolicy):
        def _select(self, candidates, request):
            return super()._select(candidates[-1:], request)

    class Counting(LeastLoadPolicy):      # only its hooks differ: it still selects by load
        def on_dispatch(self, choice, request):
            pass

    assert Last().cost_of() is None and Counting().cost_of() is not None
    assert get_policy("power_of_two").cost_of() is None and get_policy("RR").cost_of() is None


def test_a_streamed_run_leaves_nothing_to_the_cycle_collector():
    # finished requests are freed as they finish (no Job <-> Req cycles): memory stays flat at scale
    sim = Simulator(single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=4), policy="LOAD")
    gc.collect()
    gc.disable()
    try:
        rows = []
        sim.run(mixed(2000, 30.0), rows=rows.append, token_detail=False)
        assert len(rows) == 2000 and gc.collect() == 0
    finally:
        gc.enable()
