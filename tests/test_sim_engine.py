"""nbkit.sim: one engine's scheduler and KV blocks, the performance model, and the cluster
simulator's routing, PD handoff, sessions and DP groups."""

from __future__ import annotations

import doctest
import random
from collections import Counter

import pytest

from nbkit.policies import Choice, RankLoad, RequestInfo, RoundRobinPolicy, get_policy
from nbkit.sim import hardware as sim_hardware
from nbkit.sim import perf as sim_perf
from nbkit.sim import request as sim_request
from nbkit.sim.config import load_cluster_config, resolve_instances, single_instance_config
from nbkit.sim.engine import Engine
from nbkit.sim.perf import StepModel
from nbkit.sim.request import DONE, Req
from nbkit.sim.simulator import Simulator
from nbkit.traces import SubRequest, TraceRequest, TraceSession



def check_engine(eng) -> None:
    """Assert that an engine's block accounting adds up (call it between steps)."""
    from nbkit.sim.request import DECODE

    def blocks_of(r):
        if r.state == DECODE:
            n = r.c0 + eng.g - r.g0 + (1 if eng._dec_alloc and r.g0 <= eng.g else 0)
            return -(-n // eng.bs)
        return r.n_blocks

    assert eng.free_plain >= 0, eng.free_plain
    assert all(v >= 0 for v in eng.cached.values()), "negative refcount"
    assert all(eng.cached[h] == 0 for h in eng.evictable), "evictable block still referenced"
    assert all(b >= 0 for b in eng.bucket) and eng.D >= 0 and eng.in_flight >= 0
    holders = [*eng.running, *eng.handoff]
    plain = sum(blocks_of(r) - len(r.held) for r in holders)
    referenced = sum(1 for v in eng.cached.values() if v > 0)
    assert plain >= 0
    assert plain + referenced == eng.used_blocks(), (plain, referenced, eng.used_blocks())
    assert eng.used_blocks() + eng.free_blocks() == eng.num_blocks
    assert eng.D == sum(1 for r in eng.running if r.state == DECODE)

def engine(model="tiny", hw="cpu", **extra) -> Engine:
    return Engine(resolve_instances(single_instance_config(model, hw, **extra))[0])


def drive(e: Engine, reqs: list[tuple[float, Req]], check: bool = True) -> list[Req]:
    """Run ``e`` on requests arriving at given times; check the block accounting at every step."""
    pending = sorted(reqs, key=lambda x: x[0])
    t = 0.0
    done: list[Req] = []
    i = 0
    while i < len(pending) or e.has_work():
        while i < len(pending) and pending[i][0] <= t:
            assert e.add(pending[i][1], t)
            i += 1
        dt = e.schedule(t)
        if check:
            check_engine(e)
        if dt is None:
            assert i < len(pending), "engine stuck with work but nothing schedulable"
            t = pending[i][0]
            continue
        assert dt > 0
        t += dt
        done += e.finish_step(t)
        if check:
            check_engine(e)
            assert e.free_blocks() <= e.num_blocks and e.used_blocks() >= 0
    return done


def random_reqs(n, seed=0, prompt=(10, 600), output=(1, 80), rate=50.0):
    rng = random.Random(seed)
    t = 0.0
    out = []
    for k in range(n):
        t += rng.expovariate(rate)
        out.append((t, Req(k, rng.randint(*prompt), rng.randint(*output))))
    return out


def test_every_request_finishes_and_blocks_return():
    e = engine(block_size=16, max_num_seqs=32, max_num_batched_tokens=512)
    reqs = random_reqs(200)
    done = drive(e, reqs)
    assert len(done) == 200 and all(r.state == DONE for r in done)
    assert e.used_blocks() == 0 and e.free_blocks() == e.num_blocks
    assert e.in_flight == 0 and e.pend_prefill == 0 and e.pending_decode() == 0
    for r in done:
        times = e.token_times(r)
        assert len(times) == r.output                 # one time per generated token
        assert times == sorted(times) and times[0] == r.first_token and times[-1] == r.finish_time
        assert r.first_sched >= r.arrival


def test_priority_scheduling_preempts_the_lowest_priority_and_admits_by_priority():
    """``scheduling_policy="priority"``: when KV runs out, the running request last in (priority,
    arrival) order is preempted, not the newest; the waiting queue is served in that order."""
    kw = dict(block_size=16, kv_cache_gb=40 * 16 * 1024 / 1e9, max_num_seqs=64)
    for policy in ("fcfs", "priority"):
        e = engine(scheduling_policy=policy, **kw)
        assert e.by_priority == (policy == "priority")
        # batch requests first, then interactive ones: together they outgrow 40 blocks while decoding
        reqs = [(0.0, Req(f"b{i}", prompt=100, output=150, priority=10)) for i in range(3)]
        reqs += [(0.001, Req(f"i{i}", prompt=100, output=150, priority=0)) for i in range(2)]  # these 2 fit
        done = drive(e, reqs)
        assert len(done) == 5 and e.preemptions > 0
        hit = {r.rid: r.preemptions for r in done}
        if policy == "priority":
            assert hit["i0"] + hit["i1"] == 0, hit  # only batch requests gave way
        else:
            assert hit["i0"] + hit["i1"] > 0, hit   # FCFS preempts the newest: interactive ones
    w = engine(scheduling_policy="priority", **kw)
    for rid, prio in (("x", 10), ("y", 0), ("z", 10), ("u", 0)):
        w.add(Req(rid, prompt=8, output=2, priority=prio), now=0.0)
    assert [r.rid for r in w.waiting] == ["y", "u", "x", "z"]


def test_preemption_when_kv_is_tiny_and_everyone_finishes():
    # 40 blocks of 16 tokens: a handful of requests fill it
    e = engine(block_size=16, kv_cache_gb=40 * 16 * 1024 / 1e9, max_num_seqs=64)
    assert e.num_blocks == 40
    reqs = random_reqs(60, seed=1, prompt=(20, 200), output=(20, 150), rate=500.0)
    done = drive(e, reqs)
    assert len(done) == 60
    assert e.preemptions > 0
    assert sum(r.preemptions for r in done) == e.preemptions
    assert e.used_blocks() == 0 and e.free_blocks() == 40
    for r in done:
        assert len(e.token_times(r)) == r.output


def test_request_larger_than_kv_is_rejected():
    e = engine(block_size=16, kv_cache_gb=10 * 16 * 1024 / 1e9)
    assert not e.add(Req("big", 150, 20), 0.0)
    assert e.rejected == 1 and not e.has_work()
    assert e.add(Req("ok", 100, 50), 0.0)


def test_prefix_cache_hits_reduce_prefill_work():
    shared = tuple(range(1000, 1512))                  # 512 shared tokens = 32 blocks of 16

    def reqs():
        rng = random.Random(5)
        return [(0.05 * k, Req(k, 600, 4, ids=shared + tuple(rng.randrange(500) for _ in range(88))))
                for k in range(20)]

    on = engine(block_size=16)
    done_on = drive(on, reqs())
    off = engine(block_size=16, enable_prefix_caching=False)
    done_off = drive(off, reqs())
    assert off.prefix_hits == 0 and off.prompt_tokens == 20 * 600
    assert on.prefix_hits == 19 * 512                  # every request after the first reuses 32 blocks
    assert on.prompt_tokens == 20 * 600 - 19 * 512
    mean = lambda rs: sum(r.first_token - r.arrival for r in rs) / len(rs)  # noqa: E731
    assert mean(done_on) < mean(done_off)
    # cached blocks stay resident (evictable) after everyone is done
    assert on.used_blocks() == 0 and len(on.evictable) > 0


def test_cached_blocks_are_evicted_lru_when_needed():
    e = engine(block_size=16, kv_cache_gb=64 * 16 * 1024 / 1e9)     # 64 blocks
    a = tuple(range(0, 512))
    drive(e, [(0.0, Req("a", 512, 2, ids=a))])
    assert len(e.evictable) == 32
    b = tuple(range(10_000, 10_960))                                 # 60 blocks: must evict
    drive(e, [(1.0, Req("b", 960, 2, ids=b))])
    assert e.used_blocks() == 0 and e.free_blocks() == 64
    check_engine(e)


def test_tp2_halves_compute_and_adds_allreduce():
    cfg1 = single_instance_config("meta-llama/Llama-3.1-8B", "RTXPRO6000", tp_size=1)
    cfg2 = single_instance_config("meta-llama/Llama-3.1-8B", "RTXPRO6000", tp_size=2)
    m1 = StepModel(resolve_instances(cfg1)[0])
    m2 = StepModel(resolve_instances(cfg2)[0])
    prefill = [(2048, 0)]
    b1, b2 = m1.breakdown(prefill), m2.breakdown(prefill)
    assert b1["bound"] == b2["bound"] == "compute"
    assert b2["compute_s"] == pytest.approx(b1["compute_s"] / 2)
    assert b1["allreduce_s"] == 0
    # 2 all-reduces per layer over the cluster link (RTXPRO6000 has no NVLink): 16 GB/s, 20 us
    per = 20e-6 + 2 * (2 - 1) / 2 * 2048 * 4096 * 2 / 16e9
    assert b2["allreduce_s"] == pytest.approx(2 * 32 * per)
    decode = [(1, 1000)] * 32
    d1, d2 = m1.breakdown(decode), m2.breakdown(decode)
    assert d1["bound"] == "memory" and d2["memory_s"] == pytest.approx(d1["memory_s"] / 2)
    assert d2["step_s"] > d1["step_s"] / 2 and d2["allreduce_s"] > 0


def test_step_time_grows_with_batch_and_context():
    m = StepModel(resolve_instances(single_instance_config("meta-llama/Llama-3.1-8B", "H100"))[0])
    assert m.batch_time([(1, 100)] * 8) < m.batch_time([(1, 100)] * 64) < m.batch_time([(1, 4000)] * 64)
    assert m.batch_time([(512, 0)]) < m.batch_time([(4096, 0)])
    assert m.batch_time([]) == pytest.approx(m.hw.step_overhead_s + 32 * m.hw.layer_overhead_s + m.m_const)


def test_the_per_layer_cost_is_not_divided_by_tensor_parallelism():
    """layer_overhead_s: an 80-layer model pays 80 of it a step, at any TP size."""
    def fixed(model, tp, **hw):
        h = sim_hardware.get_hardware("H100").replace(**hw)
        setup = resolve_instances(single_instance_config(model, "H100", tp_size=tp, mem_size=400),
                                  hardware={"H100": h})[0]
        return StepModel(setup).breakdown([(1, 10)])["overhead_s"]
    base = dict(step_overhead_s=0.0005, layer_overhead_s=5e-5, seq_overhead_s=0.0)
    assert fixed("meta-llama/Llama-3.1-8B", 1, **base) == pytest.approx(0.0005 + 32 * 5e-5)
    assert fixed("meta-llama/Llama-3.1-70B", 4, **base) == pytest.approx(0.0005 + 80 * 5e-5)
    assert fixed("meta-llama/Llama-3.1-70B", 1, **base) == fixed("meta-llama/Llama-3.1-70B", 4, **base)


# ------------------------------------------------------------------------------ the cluster


def cfg_of(instances, link_latency=20000, link_bw=16):
    return load_cluster_config({"num_nodes": 1, "link_bw": link_bw, "link_latency": link_latency,
                                "nodes": [{"num_instances": len(instances), "instances": instances}]})


def inst(model="meta-llama/Llama-3.1-8B", hw="H100", **kw):
    h = sim_hardware.get_hardware(hw)
    return {"model_name": model, "hardware": hw, "npu_mem": {"mem_size": h.mem_size_gb, "mem_bw": h.mem_bw_gbs},
            "pd_type": None, "tp_size": 1, **kw}


def trace(n, seed=0, gap_ns=20_000_000, ids=False):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        p = rng.randint(50, 800)
        tok = tuple(rng.randrange(50_000) for _ in range(p)) if ids else None
        out.append(TraceRequest(p, rng.randint(5, 100), k * gap_ns, tok))
    return out


def test_policies_are_nbkit_policy_objects_and_custom_sees_rankloads():
    seen = []

    def pick_last(candidates, request):
        seen.append((list(candidates), request))
        return max(candidates, key=lambda c: c.index)

    sim = Simulator(cfg_of([inst(), inst(), inst()]), policy=pick_last)
    res = sim.run(trace(12))
    assert type(sim.policy).__name__ == "CustomPolicy"
    assert all(r.instance_id == 2 for r in res.records)
    cands, req = seen[-1]
    assert all(isinstance(c, RankLoad) and not c.stale for c in cands)
    assert [c.key for c in cands] == ["inst0", "inst1", "inst2"] and [c.index for c in cands] == [0, 1, 2]
    assert isinstance(req, RequestInfo) and req.prompt_tokens > 0 and req.max_tokens > 0
    # the load it saw: requests in flight on inst2, none elsewhere
    assert cands[2].in_flight >= 1 and cands[2].pending_decode_tokens > 0 and cands[0].in_flight == 0
    assert res.records[0].policy == "custom:test_policies_are_nbkit_policy_objects_and_custom_sees_rankloads." \
                                    "<locals>.pick_last"


def test_round_robin_spreads_evenly():
    sim = Simulator(cfg_of([inst() for _ in range(4)]), policy="RR")
    assert isinstance(sim.policy, RoundRobinPolicy)
    res = sim.run(trace(40))
    assert Counter(r.instance_id for r in res.records) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert [r.instance_id for r in sorted(res.records, key=lambda r: int(r.request_id))][:5] == [0, 1, 2, 3, 0]


def test_policy_instance_and_options_are_used():
    pol = get_policy("least_load", seed=3, tokens_per_waiting=1.0)
    sim = Simulator(cfg_of([inst(), inst()]), policy=pol)
    assert sim.policy is pol
    sim.run(trace(10))
    sim2 = Simulator(cfg_of([inst(), inst()]), policy="power_of_two", policy_options={"kv_weight": 0.0})
    assert sim2.policy.kv_weight == 0.0


def test_prefix_affinity_gets_the_token_ids_as_prefix():
    infos = []
    pol = get_policy("prefix_affinity")
    orig = pol.on_dispatch

    def spy(choice: Choice, request: RequestInfo):
        infos.append(request)
        orig(choice, request)
    pol.on_dispatch = spy
    shared = tuple(range(300))
    tr = [TraceRequest(400, 5, k * 50_000_000, shared + tuple(range(1000 + k * 100, 1100 + k * 100)))
          for k in range(10)]
    res = Simulator(cfg_of([inst(), inst()]), policy=pol).run(tr)
    assert infos[0].prefix == " ".join(map(str, tr[0].input_tok_ids))
    # the shared prefix keeps them together, and the prefix cache hits there
    assert len({r.instance_id for r in res.records}) == 1
    assert sum(i["prefix_hits"] for i in res.instances) >= 9 * 288


def test_pd_handoff_adds_the_transfer_time():
    def run(latency_ns):
        cfg = cfg_of([inst(pd_type="prefill"), inst(pd_type="decode")], link_latency=latency_ns)
        sim = Simulator(cfg, policy="LOAD")
        res = sim.run([TraceRequest(1000, 10, 0)])
        (r,) = res.records
        return r, sim
    fast, sim = run(0)
    slow, _ = run(50_000_000)   # 50 ms more on the link
    assert fast.outcome == slow.outcome == "ok" and fast.instance_id == 1 and fast.prefill_instance == 0
    assert slow.ttft_s - fast.ttft_s == pytest.approx(0.050, abs=1e-9)
    assert slow.e2e_s - fast.e2e_s == pytest.approx(0.050, abs=1e-9)
    # TTFT = the prefill step + the KV transfer (bytes / 16 GB/s) + one decode step of the last
    # prompt token over the 999 transferred ones
    p, d = sim.engines
    kv = 1000 * p.kv_bytes_per_token
    assert p.steps == 1 and d.steps == 10
    decode_step = d.model.step_time(1, 1, 1, 999 + 1, 999 + 1)
    assert fast.ttft_s == pytest.approx(p.step_ends[0] + kv / 16e9 + decode_step, rel=1e-12)
    assert p.used_blocks() == 0 and d.used_blocks() == 0 and len(fast.itl_s) == 9


def test_sessions_chain_turns_and_hit_the_prefix_cache():
    subs = tuple(SubRequest(200, 30, tool_duration_ns=100_000_000) for _ in range(3))
    tr = [TraceSession(f"s{k}", k * 10_000_000, subs) for k in range(4)]
    sim = Simulator(cfg_of([inst(), inst()]), policy="session")
    res = sim.run(tr)
    recs = {r.request_id: r for r in res.records}
    assert len(recs) == 12
    for k in range(4):
        a, b = recs[f"s{k}/0"], recs[f"s{k}/1"]
        assert b.arrival_s == pytest.approx(a.arrival_s + a.e2e_s + 0.1)
        assert b.input_toks == 200 + 30 + 200 and recs[f"s{k}/2"].input_toks == 430 + 30 + 200
        assert a.instance_id == b.instance_id == recs[f"s{k}/2"].instance_id     # sticky
    assert sum(i["prefix_hits"] for i in res.instances) > 0
    assert all(r.cached_tokens > 0 for r in res.records if not r.request_id.endswith("/0"))


def test_dp_group_ranks_step_in_lockstep():
    sim = Simulator(cfg_of([inst(dp_group="g"), inst(dp_group="g")]), policy="RR")
    sim.run(trace(20, gap_ns=5_000_000))
    a, b = sim.engines
    common = set(a.step_ends) & set(b.step_ends)
    assert len(common) >= 0.9 * min(len(a.step_ends), len(b.step_ends))


def test_request_overhead_shifts_ttft_and_e2e_once():
    cfg = single_instance_config("tiny", "cpu")
    base = sim_hardware.get_hardware("cpu")
    items = [TraceRequest(200 + 37 * k, 8 + k, int(k * 0.15e9)) for k in range(12)]
    runs = {o: Simulator(cfg, policy="RR", hardware={"cpu": base.replace(request_overhead_s=o)}).run(items)
            for o in (0.0, 0.02)}
    a, b = runs[0.0].records, runs[0.02].records
    for x, y in zip(a, b):
        assert y.ttft_s == pytest.approx(x.ttft_s + 0.02)
        assert y.e2e_s == pytest.approx(x.e2e_s + 0.02)
        assert y.tpot_s == pytest.approx(x.tpot_s)
    assert "request_overhead_s" in sim_hardware.FITTABLE


def test_decode_overhead_delays_tokens_after_the_first_only():
    cfg = single_instance_config("tiny", "cpu")
    base = sim_hardware.get_hardware("cpu")
    items = [TraceRequest(200 + 37 * k, 1 + k, int(k * 0.5e9)) for k in range(6)]   # spaced: each runs alone
    a, b = (Simulator(cfg, policy="RR", hardware={"cpu": base.replace(decode_overhead_s=o)}).run(items).records
            for o in (0.0, 0.03))
    for x, y in zip(a, b):
        assert y.ttft_s == pytest.approx(x.ttft_s)
        extra = 0.03 if x.output_toks > 1 else 0.0          # a one-token answer has no "rest"
        assert y.e2e_s == pytest.approx(x.e2e_s + extra)
        if x.itl_s:
            assert y.itl_s[0] == pytest.approx(x.itl_s[0] + 0.03)


def test_api_serial_spaces_a_burst_at_the_engine():
    cfg = single_instance_config("tiny", "cpu")
    base = sim_hardware.get_hardware("cpu").replace(request_overhead_s=0.0)
    burst = [TraceRequest(64, 4, 0) for _ in range(5)]
    lone = Simulator(cfg, policy="RR", hardware={"cpu": base.replace(api_serial_s=0.05)}).run(burst[:1]).records
    assert lone[0].ttft_s == pytest.approx(
        Simulator(cfg, policy="RR", hardware={"cpu": base}).run(burst[:1]).records[0].ttft_s + 0.05)
    recs = Simulator(cfg, policy="RR", hardware={"cpu": base.replace(api_serial_s=0.05)}).run(burst).records
    ttfts = sorted(r.ttft_s for r in recs)
    # the k-th request reaches the engine k x 50 ms after the burst: far longer than its prefill
    assert all(0.045 < b - a < 0.08 for a, b in zip(ttfts, ttfts[1:])), ttfts


def test_rejected_request_is_reported():
    cfg = cfg_of([inst("tiny", "cpu", max_model_len=256)])
    res = Simulator(cfg).run([TraceRequest(300, 10, 0), TraceRequest(100, 10, 0)])
    outcomes = sorted(r.outcome for r in res.records)
    assert outcomes == ["http_400", "ok"]


def test_interval_lines_in_the_seed_format(capsys):
    sim = Simulator(cfg_of([inst(), inst()]), log_interval=0.5)
    res = sim.run(trace(50))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines and lines == res.log_lines
    import re
    pat = re.compile(r"^\[INFO\] step=\d+ inst0_batch=\d+ inst1_batch=\d+ prompt_t=[\d.]+k? tok/s "
                     r"decode_t=[\d.]+k? tok/s npu_mem=\[\d+\.\d GB, \d+\.\d GB\]$")
    assert all(pat.match(x) for x in lines), lines[:3]


def test_summary_figures():
    res = Simulator(cfg_of([inst(), inst()])).run(trace(30))
    s = res.summary()
    assert s["completed"] == 30 and s["failed"] == 0
    for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        st = s[k]
        assert 0 < st["median"] <= st["p90"] <= st["p99"]
    assert s["output_throughput"] == pytest.approx(s["output_toks"] / s["duration_s"])
    text = res.format_summary()
    assert "Mean TTFT (ms):" in text and "P99 E2E (ms):" in text and "Per instance: inst0" in text


def test_module_doctests():
    for mod in (sim_perf, sim_hardware, sim_request):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.failed == 0, mod.__name__


# ------------------------------------------------------------------ vLLM V0's scheduler modes
def v0_engine(**extra) -> Engine:
    setup = resolve_instances(single_instance_config("meta-llama/Llama-3.1-8B", "A100-80G", **extra))[0]
    return Engine(setup)


def test_multi_step_lets_new_requests_join_only_every_n_steps():
    e = v0_engine(num_scheduler_steps=10, enable_chunked_prefill=False)
    a, b = Req("a", prompt=50, output=40), Req("b", prompt=50, output=5)
    e.add(a, 0.0)
    t = 0.0
    steps_before_b = 0
    while a.first_token is None or steps_before_b < 3:      # a runs; b arrives 3 steps into a block
        t += e.schedule(t)
        e.finish_step(t)
        steps_before_b += a.first_token is not None
    e.add(b, t)
    joined_at = None
    while e.has_work():
        g = e.g
        t += e.schedule(t)
        if joined_at is None and b.first_sched is not None:
            joined_at = g
        e.finish_step(t)
    # a's prefill ran at step 0, a scheduling step; b arrived at step 4 and waited for the next, step 10
    assert joined_at == 10, joined_at
    assert a.state == DONE and b.state == DONE


def test_without_multi_step_a_new_request_joins_the_next_step():
    e = v0_engine()
    a, b = Req("a", prompt=50, output=40), Req("b", prompt=50, output=5)
    e.add(a, 0.0)
    t = 0.0
    for _ in range(4):
        t += e.schedule(t)
        e.finish_step(t)
    e.add(b, t)
    g = e.g
    e.schedule(t)
    assert b.first_sched == t and e.g == g


def test_unchunked_prefill_adds_its_own_step_to_the_decodes():
    """V0 without chunked prefill: decodes wait for a prompt's own step (times add up); V1 fuses
    the prompt into the decode step (one roofline, shorter)."""
    gaps = {}
    for chunked in (True, False):
        e = v0_engine(enable_chunked_prefill=chunked)
        a = Req("a", prompt=20, output=50)
        e.add(a, 0.0)
        t = 0.0
        for _ in range(5):
            t += e.schedule(t)
            e.finish_step(t)
        decode_only = e.schedule(t)
        t += decode_only
        e.finish_step(t)
        b = Req("b", prompt=3000, output=5)
        e.add(b, t)
        mixed = e.schedule(t)
        gaps[chunked] = (decode_only, mixed)
        prefill_alone = StepModel(e.setup).step_time(3000, 1, 1, 3000 * 3001 / 2, 3000)
        if not chunked:
            assert mixed == pytest.approx(decode_only + prefill_alone, rel=0.02)
    assert gaps[False][1] > gaps[True][1]
    assert gaps[True][0] == pytest.approx(gaps[False][0])


def test_unchunked_budget_defaults_to_max_model_len_and_takes_whole_prompts():
    e = v0_engine(enable_chunked_prefill=False, max_model_len=4096)
    assert e.budget == 4096
    reqs = [Req(f"r{i}", prompt=3000, output=3) for i in range(2)]
    for r in reqs:
        e.add(r, 0.0)
    e.schedule(0.0)
    # one whole 3000-token prompt fits the 4096 budget; the second waits for the next step (not chunked)
    assert [c[1] for c in e._chunks] == [3000]
    with pytest.raises(Exception, match="num_scheduler_steps"):
        resolve_instances(single_instance_config("tiny", "cpu", num_scheduler_steps=0))


def test_cpu_seq_overhead_adds_to_the_profile_per_sequence_and_is_validated():
    def seq(**extra):
        return resolve_instances(single_instance_config("meta-llama/Llama-3.1-8B", "A100-80G", **extra))[0].hw
    base = seq()
    assert seq(cpu_seq_overhead_s=5e-5).seq_overhead_s == pytest.approx(base.seq_overhead_s + 5e-5)
    assert sim_hardware.get_hardware("A100-80G").seq_overhead_s == base.seq_overhead_s   # the shipped one untouched
    with pytest.raises(Exception, match="cpu_seq_overhead_s"):
        seq(cpu_seq_overhead_s=-1)
