"""The simulator at fleet scale: the same figures as before it streamed (golden summaries recorded
from the step-by-step simulator before runs were planned ahead, rows streamed and inter-token
lists made optional), the streaming pieces of :mod:`nbkit.records`, and the CSV the command line
streams."""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pytest

from nbkit.records import CsvWriter, RequestResult, Summarizer, read_csv, stats, summarize, weighted_stats, write_csv
from nbkit.sim import hardware as H
from nbkit.sim.__main__ import main
from nbkit.sim.config import load_cluster_config, single_instance_config
from nbkit.sim.simulator import Simulator
from nbkit.traces import SubRequest, TraceRequest, TraceSession, write_trace


def mixed(n, rate, seed=0):
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        k = rng.random()
        if k < 0.5:
            a, b = rng.randint(64, 1024), rng.randint(32, 512)
        elif k < 0.8:
            a, b = rng.randint(1024, 4096), rng.randint(16, 256)
        else:
            a, b = rng.randint(32, 256), rng.randint(512, 1024)
        out.append(TraceRequest(a, b, int(t * 1e9)))
    return out


def inst(model="meta-llama/Llama-3.1-8B", hw="H100", **kw):
    h = H.get_hardware(hw)
    return {"model_name": model, "hardware": hw, "npu_mem": {"mem_size": h.mem_size_gb, "mem_bw": h.mem_bw_gbs},
            "pd_type": None, "tp_size": 1, **kw}


def cfg_of(instances):
    return load_cluster_config({"num_nodes": 1, "link_bw": 16, "link_latency": 20000,
                                "nodes": [{"num_instances": len(instances), "instances": instances}]})


#: the H100 profile the golden summaries were recorded with (2 ms a step; before layer_overhead_s)
H100_THEN = {"H100": H.get_hardware("H100").replace(step_overhead_s=0.002, layer_overhead_s=0.0)}


def scenarios():
    yield "h100x4", Simulator(single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=4), policy="LOAD",
                              dtype="bfloat16", block_size=16, hardware=H100_THEN), mixed(2000, 30.0)
    # tiny KV: preemptions (requests with several token segments); decode_overhead on the first gap
    cpu = H.get_hardware("cpu").replace(decode_overhead_s=0.003)
    yield "cpu_preempt", Simulator(cfg_of([inst("tiny", "cpu", kv_cache_gb=0.02), inst("tiny", "cpu", kv_cache_gb=0.02)]),
                                   policy="power_of_two", hardware={"cpu": cpu}, seed=3), mixed(300, 8.0, seed=1)
    # prefill/decode split
    yield "pd", Simulator(cfg_of([inst(pd_type="prefill"), inst(pd_type="prefill"), inst(pd_type="decode"),
                                  inst(pd_type="decode")]), policy="RR", hardware=H100_THEN), mixed(500, 20.0, seed=2)
    # sessions on the prefix cache, and a request too long to fit
    subs = tuple(SubRequest(300, 40, tool_duration_ns=200_000_000) for _ in range(4))
    tr = [TraceSession(f"s{k}", k * 30_000_000, subs) for k in range(40)] + [TraceRequest(10_000_000, 5, 10)]
    yield "sessions", Simulator(cfg_of([inst(), inst(max_model_len=20_000)]), policy="session", hardware=H100_THEN), tr


KEYS = ("requests", "completed", "failed", "duration_s", "input_toks", "output_toks", "ttft_s", "tpot_s", "itl_s",
        "e2e_s", "queue_wait_s", "preemptions", "per_instance")

#: summaries of the scenarios above from the simulator at commit 7216ef2 (before this work)
GOLDEN = {'h100x4': {'requests': 2000,
            'completed': 2000,
            'failed': 0,
            'duration_s': 75.00515970672092,
            'input_toks': 2070671,
            'output_toks': 670689,
            'ttft_s': {'mean': 0.03420567993302765,
                       'median': 0.0226630150489342,
                       'p90': 0.08400861010562864,
                       'p99': 0.10791592551589055},
            'tpot_s': {'mean': 0.010763242758191807,
                       'median': 0.010658533887085085,
                       'p90': 0.01213514989519932,
                       'p99': 0.014292260410924866},
            'itl_s': {'mean': 0.010613401175664403,
                      'median': 0.009099309468659555,
                      'p90': 0.009663065791045256,
                      'p99': 0.06866184177332002},
            'e2e_s': {'mean': 3.5827379893099547,
                      'median': 2.705274172657285,
                      'p90': 8.019924941068979,
                      'p99': 10.45211179665374},
            'queue_wait_s': {'mean': 0.005018622851992629, 'p99': 0.014239673210520446},
            'preemptions': 0,
            'per_instance': {'inst0': 489, 'inst1': 547, 'inst2': 481, 'inst3': 483}},
 'cpu_preempt': {'requests': 300,
                 'completed': 300,
                 'failed': 0,
                 'duration_s': 44.63324685138199,
                 'input_toks': 314811,
                 'output_toks': 97187,
                 'ttft_s': {'mean': 1.6620680964498622,
                            'median': 0.2674456185081162,
                            'p90': 4.496253464946304,
                            'p99': 6.1068914787633535},
                 'tpot_s': {'mean': 0.012159129618213844,
                            'median': 0.010421789810630428,
                            'p90': 0.02278664082531882,
                            'p99': 0.035892272650978045},
                 'itl_s': {'mean': 0.011907476028300924,
                           'median': 0.006014396444442127,
                           'p90': 0.00786990751219463,
                           'p99': 0.11720371590243772},
                 'e2e_s': {'mean': 5.507666862963168,
                           'median': 5.190702604673433,
                           'p90': 11.380267642601323,
                           'p99': 17.60036191573842},
                 'queue_wait_s': {'mean': 1.4811660180296276, 'p99': 5.810018644754518},
                 'preemptions': 241,
                 'per_instance': {'inst0': 142, 'inst1': 158}},
 'pd': {'requests': 500,
        'completed': 500,
        'failed': 0,
        'duration_s': 31.93676779625078,
        'input_toks': 526287,
        'output_toks': 176167,
        'ttft_s': {'mean': 0.05778616295913324,
                   'median': 0.04075214765075419,
                   'p90': 0.12707413096477344,
                   'p99': 0.18870733305385193},
        'tpot_s': {'mean': 0.009429574411250077,
                   'median': 0.009459478655569809,
                   'p90': 0.009854804594626934,
                   'p99': 0.010024552748561573},
        'itl_s': {'mean': 0.009399905268530363,
                  'median': 0.009475848023880573,
                  'p90': 0.009868574949253528,
                  'p99': 0.010211562985073641},
        'e2e_s': {'mean': 3.3602924805729795,
                  'median': 2.6461369277507094,
                  'p90': 7.164502532152237,
                  'p99': 9.432669169707648},
        'queue_wait_s': {'mean': 0.005100767406058062, 'p99': 0.0756356378677452},
        'preemptions': 0,
        'per_instance': {'inst2': 250, 'inst3': 250}},
 'sessions': {'requests': 161,
              'completed': 160,
              'failed': 1,
              'duration_s': 3.22371217949645,
              'input_toks': 129600,
              'output_toks': 6400,
              'ttft_s': {'mean': 0.01466165908109306,
                         'median': 0.014332519113220782,
                         'p90': 0.018867629750617877,
                         'p99': 0.02443524810647848},
              'tpot_s': {'mean': 0.008825337670803476,
                         'median': 0.008885340411561037,
                         'p90': 0.009193586430622092,
                         'p99': 0.009356140277283586},
              'itl_s': {'mean': 0.008825337670803476,
                        'median': 0.008575755080596936,
                        'p90': 0.009820886441199939,
                        'p99': 0.010107652716198068},
              'e2e_s': {'mean': 0.3588498282424286,
                        'median': 0.361871176143015,
                        'p90': 0.3738145132980205,
                        'p99': 0.37899251514645016},
              'queue_wait_s': {'mean': 0.004288862789684894, 'p99': 0.010102342784866348},
              'preemptions': 0,
              'per_instance': {'inst0': 68, 'inst1': 92}}}


def same(summary: dict, golden: dict) -> None:
    got = json.loads(json.dumps({k: summary.get(k) for k in KEYS}))
    for k in KEYS:
        if k == "itl_s" and got[k] != golden[k]:   # the ITL mean from counted gaps: equal up to rounding
            assert got[k]["mean"] == pytest.approx(golden[k]["mean"], rel=1e-12)
            assert {s: v for s, v in got[k].items() if s != "mean"} == \
                   {s: v for s, v in golden[k].items() if s != "mean"}
        else:
            assert got[k] == golden[k], k


@pytest.mark.parametrize("mode", ["records", "streamed"])
def test_summaries_unchanged(mode):
    for name, sim, tr in scenarios():
        if mode == "records":        # inter-token lists and records kept, as the Python API does by default
            res = sim.run(tr)
            assert len(res.records) == GOLDEN[name]["requests"] and res.summarizer is None
        else:                        # what the command line does: rows streamed, nothing per token
            rows = []
            res = sim.run(tr, rows=rows.append, token_detail=False)
            assert res.records == [] and len(rows) == GOLDEN[name]["requests"]
            assert all(r.itl_s == [] for r in rows)
        same(res.summary(), GOLDEN[name])


def test_planned_runs_change_nothing():
    # the same run with runs of decode steps planned ahead and driven step by step
    name, sim, tr = next(scenarios())
    a = sim.run(tr)
    planned = sum(1 for e in sim.engines if e.macro)
    sim2 = Simulator(single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=4), policy="LOAD",
                     dtype="bfloat16", block_size=16, log_interval=1e9, log_file=io.StringIO(), hardware=H100_THEN)
    b = sim2.run(tr)
    assert planned == 4 and not any(e.macro for e in sim2.engines)
    assert [(r.request_id, r.instance_id, r.ttft_s, r.e2e_s, r.itl_s) for r in a.records] == \
           [(r.request_id, r.instance_id, r.ttft_s, r.e2e_s, r.itl_s) for r in b.records]
    assert [e.steps for e in sim.engines] == [e.steps for e in sim2.engines]
    assert [list(e.step_ends) for e in sim.engines] == [list(e.step_ends) for e in sim2.engines]


def test_weighted_stats_are_numpys_percentiles_of_the_copies():
    rng = random.Random(1)
    for _ in range(500):
        n = rng.randint(1, 30)
        v = [rng.choice([rng.random(), 0.5, 0.25]) for _ in range(n)]
        c = [rng.randint(0, 5) for _ in range(n)]
        if not sum(c):
            continue
        qs = (50, 90, 99, rng.uniform(0, 100))
        got, want = weighted_stats(v, c, qs), stats(np.repeat(v, c), qs)
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-12)
        assert {k: x for k, x in got.items() if k != "mean"} == {k: x for k, x in want.items() if k != "mean"}
    assert math.isnan(weighted_stats([], [])["p99"])


def test_summarizer_equals_summarize_in_any_order():
    rng = random.Random(2)
    rows = [RequestResult(str(k), arrival_s=rng.choice([0.0, k * 0.1]), ttft_s=rng.random(),
                          itl_s=[rng.random() for _ in range(rng.randint(0, 5))], e2e_s=rng.random() * 3,
                          output_toks=rng.randint(1, 6), queue_wait_s=rng.choice([None, rng.random()]),
                          outcome=rng.choice(["ok"] * 5 + ["error"])) for k in range(300)]
    acc = Summarizer(slos="ttft:500")
    shuffled = rows[:]
    rng.shuffle(shuffled)
    for r in shuffled:
        acc.add(r)
    assert acc.summary() == summarize(sorted(shuffled, key=lambda r: r.arrival_s), slos="ttft:500")


def test_csv_writer_is_write_csv_row_by_row(tmp_path):
    rows = [RequestResult("0", 1, "inst1", "p", 0.5, 0.001, 0.123456789, [0.019, 0.021], 0.163456789, 100, 3),
            RequestResult("7", None, "", "p", 2.0, None, None, [], None, 10, 5, "http_400")]
    for unit in ("s", "ns"):
        write_csv(rows, tmp_path / "a.csv", time_unit=unit)
        with CsvWriter(tmp_path / "b.csv", time_unit=unit) as w:
            for r in rows:
                w.write(r)
        assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes() and w.rows == 2
        with CsvWriter(tmp_path / "c.csv", time_unit=unit, token_detail=False) as w:
            for r in rows:
                w.write(r)
        back = read_csv(tmp_path / "c.csv")
        assert [r.itl_s for r in back] == [[], []] and back[0].ttft_s == pytest.approx(0.123456789, abs=1e-9)


def test_command_line_streams_rows_and_lists_tokens_only_when_asked(tmp_path, capsys):
    cfg = tmp_path / "cluster.json"
    cfg.write_text(single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=2).model_dump_json())
    tr = tmp_path / "trace.jsonl"
    write_trace(tr, mixed(200, 10.0, seed=4))
    outs = {}
    for flag in ([], ["--token-detail"]):
        out = tmp_path / f"out{len(flag)}.csv"
        summ = tmp_path / f"s{len(flag)}.json"
        assert main(["--cluster-config", str(cfg), "--dataset", str(tr), "--output", str(out),
                     "--summary-json", str(summ), *flag]) == 0
        assert "wrote 200 rows" in capsys.readouterr().out
        outs[bool(flag)] = (read_csv(out), json.loads(summ.read_text()))
    (plain, s0), (detail, s1) = outs[False], outs[True]
    assert all(r.itl_s == [] for r in plain)
    assert all(len(r.itl_s) == r.output_toks - 1 for r in detail)
    assert sorted((r.request_id, r.ttft_s, r.e2e_s) for r in plain) == sorted((r.request_id, r.ttft_s, r.e2e_s)
                                                                                 for r in detail)
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        assert s0[k] == s1[k]
    assert s0["itl_s"]["p99"] == s1["itl_s"]["p99"] and s0["itl_s"]["median"] == s1["itl_s"]["median"]


def test_a_trace_out_of_order_is_sorted_and_streamed_traces_are_not_held(tmp_path):
    cfg = tmp_path / "cluster.json"
    cfg.write_text(single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=2).model_dump_json())
    items = mixed(60, 10.0, seed=5)
    ordered, shuffled = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_trace(ordered, items)
    mixed_up = items[:]
    random.Random(0).shuffle(mixed_up)
    write_trace(shuffled, mixed_up)
    got = []
    for tr in (ordered, shuffled):
        out = tmp_path / f"{tr.stem}.csv"
        assert main(["--cluster-config", str(cfg), "--dataset", str(tr), "--output", str(out), "--quiet"]) == 0
        got.append(sorted((r.request_id, r.instance_id, r.ttft_s, r.e2e_s) for r in read_csv(out)))
    assert got[0] == got[1] and len(got[0]) == 60
    # the Python API: a list is sorted; an iterator is read as the run goes and must be in order
    sim = Simulator(single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=2), policy="LOAD")
    a = sim.run(mixed_up).summary()
    sim = Simulator(single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=2), policy="LOAD")
    b = sim.run(iter(items)).summary()
    assert a["ttft_s"] == b["ttft_s"] and a["e2e_s"] == b["e2e_s"]
    from nbkit.sim.simulator import TraceOrderError
    with pytest.raises(TraceOrderError):
        Simulator(single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=2)).run(iter(mixed_up))
