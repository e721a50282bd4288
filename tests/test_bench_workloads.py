"""nbkit.bench: workload builders (with the tiny model's tokenizer), arrival processes, and the load
generator's scheduling against a fake target (no server)."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from nbkit import bench
from nbkit.bench import arrivals as arr
from nbkit.bench import workloads as wl
from nbkit.bench.targets import FakeTarget, Reply, Target
from nbkit.traces import SubRequest, TraceError, TraceRequest, TraceSession, write_trace


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return wl.get_tokenizer(tiny_model_path)


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


# -- workloads --------------------------------------------------------------------------------------
def test_synthetic_prompts_have_exactly_the_sampled_token_counts(tok, tiny_model_path):
    w = wl.synthetic(60, input_len=(5, 400), output_len=(1, 50), seed=3, tokenizer=tiny_model_path)
    assert len(w) == w.num_requests == 60
    ins = [it.input_toks for it in w.items]
    assert all(len(ids(tok, it.text)) == it.input_toks for it in w.items)
    assert min(ins) >= 5 and max(ins) <= 400 and len(set(ins)) > 20  # really sampled
    assert all(1 <= it.output_toks <= 50 for it in w.items)


def test_text_without_word_tokens_still_has_the_exact_length(tok, tiny_model_path):
    tb = wl.TextBuilder(tiny_model_path)
    tb.words = []  # as for a vocabulary without " word" tokens (SentencePiece): decode/re-encode instead
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64, 300):
        for _ in range(3):
            assert len(ids(tok, tb.text(n, rng))) == n


def test_synthetic_fixed_lengths_and_range_ratio(tok, tiny_model_path):
    fixed = wl.synthetic(10, input_len=128, output_len=16, tokenizer=tiny_model_path)
    assert {it.input_toks for it in fixed.items} == {128} and {it.output_toks for it in fixed.items} == {16}
    assert all(len(ids(tok, it.text)) == 128 for it in fixed.items)
    spread = wl.synthetic(200, input_len=100, output_len=10, range_ratio=0.5, seed=1, tokenizer=tiny_model_path)
    ins = np.array([it.input_toks for it in spread.items])
    assert ins.min() >= 50 and ins.max() <= 150 and ins.std() > 10
    same = wl.synthetic(10, input_len=100, output_len=10, range_ratio=0.5, dist="fixed", tokenizer=tiny_model_path)
    assert {it.input_toks for it in same.items} == {100}


def test_synthetic_is_reproducible_with_a_seed(tiny_model_path):
    a = wl.synthetic(20, input_len=(10, 60), seed=7, tokenizer=tiny_model_path)
    b = wl.synthetic(20, input_len=(10, 60), seed=7, tokenizer=tiny_model_path)
    c = wl.synthetic(20, input_len=(10, 60), seed=8, tokenizer=tiny_model_path)
    assert a.items == b.items
    assert a.items != c.items


def test_sample_lengths_distributions():
    rng = np.random.default_rng(0)
    assert list(wl.sample_lengths(7, 5, rng)) == [7] * 5
    u = wl.sample_lengths((3, 9), 5000, rng)
    assert u.min() == 3 and u.max() == 9
    emp = wl.sample_lengths([10, 20, 30], 1000, rng)
    assert set(emp) == {10, 20, 30}
    normal = wl.sample_lengths(1000, 20000, rng, range_ratio=0.1, dist="normal")
    assert abs(normal.mean() - 1000) < 5 and abs(normal.std() - 100) < 5
    logn = wl.sample_lengths(200, 20000, rng, range_ratio=0.5, dist="lognormal")
    assert abs(np.median(logn) - 200) < 8
    assert wl.sample_lengths(lambda r, n: [0] * n, 3, rng).tolist() == [1, 1, 1]  # floored at 1
    with pytest.raises(ValueError):
        wl.sample_lengths((9, 3), 2, rng)
    with pytest.raises(ValueError):
        wl.sample_lengths(10, 2, rng, range_ratio=0.5, dist="zipf")


def test_shared_prefix_prompts_share_their_token_prefix(tok, tiny_model_path):
    w = wl.shared_prefix(num_prefixes=3, questions_per_prefix=5, prefix_len=150, question_len=(4, 20),
                         output_len=8, seed=2, tokenizer=tiny_model_path)
    assert len(w) == 15
    groups: dict[int, list] = {}
    for it in w.items:
        enc = ids(tok, it.text)
        assert len(enc) == it.input_toks
        groups.setdefault(it.group, []).append(enc)
    assert sorted(groups) == [0, 1, 2] and all(len(g) == 5 for g in groups.values())
    heads = []
    for g in groups.values():
        head = g[0][:150]
        assert all(e[:150] == head for e in g), "prompts of one group must share 150 leading tokens"
        assert len({tuple(e[150:]) for e in g}) == 5, "questions differ"
        heads.append(tuple(head))
    assert len(set(heads)) == 3, "groups have different system prompts"
    # shuffled: groups interleave
    order = [it.group for it in w.items]
    assert order != sorted(order)


def test_multi_turn_sessions(tiny_model_path, tok):
    w = wl.multi_turn(sessions=3, turns=4, first_len=40, turn_len=6, output_len=5, think_s=0.25,
                      num_prefixes=1, prefix_len=30, tokenizer=tiny_model_path)
    assert len(w) == 3 and w.num_requests == 12
    s = w.items[0]
    assert isinstance(s, wl.Session) and len(s.turns) == 4
    assert s.turns[0].input_toks == 70 and len(ids(tok, s.turns[0].text)) == 70
    assert [t.delay_s for t in s.turns] == [0.0, 0.25, 0.25, 0.25]
    assert ids(tok, w.items[1].turns[0].text)[:30] == ids(tok, s.turns[0].text)[:30]  # shared system prompt


def test_trace_workload_reads_flat_lines_and_sessions(tmp_path, tok, tiny_model_path):
    p = tmp_path / "t.jsonl"
    shared = list(range(40))
    write_trace(p, [
        TraceRequest(50, 8, 2_000_000_000, tuple(shared + list(range(100, 110)))),
        TraceRequest(45, 4, 1_000_000_000, tuple(shared + list(range(200, 205)))),
        TraceSession("agent-1", 1_500_000_000, (SubRequest(20, 5, 300_000_000), SubRequest(7, 3, 0),
                                                SubRequest(9, 2))),
        TraceRequest(12, 3, 3_500_000_000),
    ])
    w = wl.from_trace(p, tokenizer=tiny_model_path)
    assert w.has_timestamps and w.num_requests == 6
    at = [it.arrival_s for it in w.items]
    assert at == pytest.approx([0.0, 0.5, 1.0, 2.5])  # sorted, relative to the first arrival
    a, sess, b, c = w.items
    assert (a.input_toks, a.output_toks) == (45, 4) and (b.input_toks, b.output_toks) == (50, 8)
    ea, eb = ids(tok, a.text), ids(tok, b.text)
    assert len(ea) == 45 and len(eb) == 50 and len(ids(tok, c.text)) == 12
    assert ea[:40] == eb[:40] and ea[40] != eb[40]  # shared input_tok_ids prefix -> shared token prefix
    assert isinstance(sess, wl.Session) and sess.session_id == "agent-1"
    assert [t.input_toks for t in sess.turns] == [20, 7, 9]
    assert [t.delay_s for t in sess.turns] == pytest.approx([0.0, 0.3, 0.0])  # tool time of the previous one
    fast = wl.from_trace(p, tokenizer=tiny_model_path, time_scale=0.5)
    assert [it.arrival_s for it in fast.items] == pytest.approx([0.0, 0.25, 0.5, 1.25])


def test_trace_errors_name_the_line(tmp_path, tiny_model_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"input_toks": 3, "output_toks": 2, "arrival_time_ns": 0}) + "\n"
                 + json.dumps({"input_toks": 3, "arrival_time_ns": 5}) + "\n")
    with pytest.raises(TraceError, match=r"bad.jsonl:2.*output_toks"):
        wl.from_trace(p, tokenizer=tiny_model_path)


def test_sharegpt_reads_pairs_and_filters(tmp_path, tok, tiny_model_path):
    conv = lambda q, a: {"id": q[:5], "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    data = [conv("the replica serves many tokens quickly " * 3, "the router balances the load today " * 2),
            conv("hi", "the router balances the load"),                     # prompt too short: dropped
            conv("each core decodes a short reply again", "ok"),             # answer too short: dropped
            conv("our notebook watches the cluster " * 400, "the batch"),   # prompt too long: dropped
            {"id": "x", "conversations": [{"from": "human", "value": "alone"}]},  # no answer: dropped
            conv("the scheduler prefills the prompt " * 2, "a long answer with care " * 3)]
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(data))
    w = wl.sharegpt(p, tokenizer=tiny_model_path, max_input_len=512)
    assert len(w) == 2
    for it in w.items:
        assert it.input_toks == len(ids(tok, it.text)) and it.output_toks >= 4
    fixed = wl.sharegpt(p, n=1, output_len=7, tokenizer=tiny_model_path, max_input_len=512)
    assert len(fixed) == 1 and fixed.items[0].output_toks == 7
    with pytest.raises(ValueError, match="only 2 usable"):
        wl.sharegpt(p, n=5, tokenizer=tiny_model_path, max_input_len=512)


# -- arrivals ---------------------------------------------------------------------------------------
def test_poisson_is_reproducible_and_has_the_right_rate():
    p = arr.Poisson(rate=20.0)
    a, b, c = p.times(20001, seed=5), p.times(20001, seed=5), p.times(20001, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    gaps = np.diff(a)
    assert abs(gaps.mean() - 1 / 20) < 0.02 / 20          # mean rate within 2%
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05     # exponential: CV 1
    bursty = np.diff(arr.Poisson(20.0, burstiness=0.25).times(20001, seed=1))
    assert abs(bursty.mean() - 1 / 20) < 0.05 / 20 and abs(bursty.std() / bursty.mean() - 2.0) < 0.15  # CV 1/sqrt(b)
    assert arr.Poisson(math.inf).times(4).tolist() == [0, 0, 0, 0]


def test_constant_bursts_trace_and_make_arrivals(tiny_model_path):
    assert arr.Constant(4.0).times(5).tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert arr.Bursts(3, 2.0).times(7).tolist() == [0, 0, 0, 2, 2, 2, 4]

    class It:
        def __init__(self, t):
            self.arrival_s = t
    assert arr.TraceTimes(0.5).times(3, items=[It(2.0), It(3.0), It(6.0)]).tolist() == [0, 0.5, 2.0]
    with pytest.raises(ValueError, match="no arrival_s"):
        arr.TraceTimes().times(1, items=[It(None)])
    assert isinstance(arr.make_arrivals(None, 8), arr.ClosedLoop)
    p = arr.make_arrivals(5.0, 8, burstiness=0.5)
    assert isinstance(p, arr.Poisson) and p.max_concurrency == 8 and p.burstiness == 0.5
    assert isinstance(arr.make_arrivals(5.0, kind="constant"), arr.Constant)
    b = arr.make_arrivals(4.0, kind="burst", burst_size=8)
    assert isinstance(b, arr.Bursts) and b.interval_s == 2.0
    trace = wl.Workload("t", [wl.Prompt("x", 1, 1, arrival_s=0.0)])
    assert isinstance(arr.make_arrivals(None, None, workload=trace), arr.TraceTimes)
    assert math.isinf(arr.make_arrivals().rate)
    for bad in (lambda: arr.Poisson(0), lambda: arr.ClosedLoop(0), lambda: arr.Poisson(1, max_concurrency=0),
                lambda: arr.make_arrivals(-1.0)):
        with pytest.raises(ValueError):
            bad()


# -- the load generator against a fake target -------------------------------------------------------
def prompts(n, out=3):
    return wl.Workload("fake", [wl.Prompt(f" p{i}", 2, out) for i in range(n)])


def drive(target, workload, arrivals, **kw):
    return asyncio.run(bench.drive(target, workload, arrivals, **kw))


def test_closed_loop_never_exceeds_its_concurrency():
    t = FakeTarget(ttft_s=0.003, itl_s=0.001)
    rows, dur, peak = drive(t, prompts(40), arr.ClosedLoop(5))
    assert len(rows) == 40 and [r.request_id for r in rows] == list(range(40))
    assert t.max_in_flight == 5 and peak == 5  # reached, never exceeded
    assert all(r.ok and r.output_toks == 3 for r in rows)


def test_closed_loop_with_sessions_counts_sessions_as_users():
    w = wl.Workload("s", [wl.Session(f"s{i}", tuple(wl.Turn(f" t{k}", 2, 2, delay_s=0.002) for k in range(3)))
                          for i in range(6)])
    t = FakeTarget(ttft_s=0.002)
    rows, _, _ = drive(t, w, arr.ClosedLoop(2))
    assert len(rows) == 18 and t.max_in_flight <= 2


def test_open_loop_sends_at_the_planned_times_and_caps_concurrency():
    t = FakeTarget(ttft_s=0.001)
    rows, _, _ = drive(t, prompts(10), arr.Constant(50.0))
    sent = np.array([r.arrival_s for r in rows])
    assert np.all(np.abs(sent - np.arange(10) / 50.0) < 0.015)
    slow = FakeTarget(ttft_s=0.05)
    rows, _, peak = drive(slow, prompts(12), arr.Poisson(math.inf, max_concurrency=3))
    assert len(rows) == 12 and slow.max_in_flight == 3 and peak == 3


def test_request_cap_and_time_cap():
    rows, _, _ = drive(FakeTarget(), prompts(50), arr.Poisson(math.inf), num_prompts=17)
    assert len(rows) == 17
    rows, _, _ = drive(FakeTarget(), prompts(50), arr.Constant(20.0), duration_s=0.5)
    assert 8 <= len(rows) <= 11 and max(r.arrival_s for r in rows) < 0.5
    rows, _, _ = drive(FakeTarget(ttft_s=0.01), prompts(500), arr.ClosedLoop(2), duration_s=0.2)
    assert 10 <= len(rows) < 500


def test_drain_cancels_what_still_runs_and_keeps_a_row():
    t = FakeTarget(ttft_s=5.0)
    rows, _, _ = drive(t, prompts(3), arr.Poisson(math.inf), drain_s=0.1)
    assert len(rows) == 3 and {r.outcome for r in rows} == {"cancelled"}


def test_sessions_send_the_conversation_so_far_sticky_and_stop_on_failure():
    w = wl.Workload("s", [wl.Session("abc", (wl.Turn(" first", 1, 2), wl.Turn(" second", 1, 2, delay_s=0.05),
                                            wl.Turn(" third", 1, 2)))])
    t = FakeTarget()
    rows, _, _ = drive(t, w, arr.Poisson(math.inf))
    assert [c.prompt for c in t.calls] == [" first", " first ok ok second", " first ok ok second ok ok third"]
    assert {c.session_id for c in t.calls} == {"abc"}
    assert [r.turn for r in rows] == [0, 1, 2] and {r.session_id for r in rows} == {"abc"}
    assert rows[1].arrival_s - rows[0].arrival_s >= 0.05  # the tool/think time after turn 0 finished

    class FailSecond(FakeTarget):
        async def send(self, call):
            if len(self.calls) == 1:
                self.calls.append(call)
                return Reply(outcome="http_500", error="boom", output_toks=0)
            return await super().send(call)
    f = FailSecond()
    rows, _, _ = drive(f, w, arr.Poisson(math.inf))
    assert [r.outcome for r in rows] == ["ok", "http_500"]  # the session ends at the failed turn


def test_a_target_that_raises_gives_a_failed_row_not_a_crash():
    class Boom(Target):
        async def send(self, call):
            raise RuntimeError("kaput")
    rows, _, _ = drive(Boom(), prompts(3), arr.Poisson(math.inf))
    assert [r.outcome for r in rows] == ["error"] * 3 and "kaput" in rows[0].error


def test_run_records_rows_ranks_and_policy_via_nbkit_loop():
    t = FakeTarget(ttft_s=0.002, policy="rr", replicas=2)
    res = bench.run(t, prompts(8, out=4), request_rate=100.0, seed=1, progress=False)
    df = res.frame()
    assert len(df) == 8 and set(df["rank"]) == {"replica0", "replica1"} and set(df["instance_id"]) == {0, 1}
    assert set(df["policy"]) == {"rr"} and res.policy == "rr"
    assert res.meta["arrivals"]["arrivals"] == "Poisson" and res.meta["workload"]["requests"] == 8
