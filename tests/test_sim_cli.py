"""nbkit.sim: the command line (run, calibrate, calibration-trace), the per-request CSV in both
time units, and calibration recovering known factors."""

from __future__ import annotations

import doctest
import json
import random
import re
import subprocess
import sys

import pytest

from nbkit import records
from nbkit.records import CSV_COLUMNS, RequestResult, read_csv, write_csv
from nbkit.sim.__main__ import main
from nbkit.sim.calibrate import calibrate
from nbkit.sim.config import single_instance_config
from nbkit.sim.fidelity import calibration_trace, compare
from nbkit.sim.hardware import get_hardware, load_profile
from nbkit.sim.simulator import Simulator
from nbkit.traces import TraceRequest, write_trace

from test_sim_config import SEED

INFO = re.compile(r"^\[INFO\] step=\d+ inst0_batch=\d+ inst1_batch=\d+ prompt_t=[\d.]+k? tok/s "
                  r"decode_t=[\d.]+k? tok/s npu_mem=\[[\d.]+ GB, [\d.]+ GB\]$")


@pytest.fixture
def files(tmp_path):
    cfg = tmp_path / "cluster.json"
    cfg.write_text(SEED)
    rng = random.Random(0)
    t = 0.0
    items = []
    for _ in range(120):
        t += rng.expovariate(20)
        items.append(TraceRequest(rng.randint(50, 900), rng.randint(5, 120), int(t * 1e9)))
    tr = tmp_path / "trace.jsonl"
    write_trace(tr, items)
    return cfg, tr, tmp_path


def test_run_with_the_seed_flags(files, capsys):
    cfg, tr, d = files
    out = d / "out.csv"
    rc = main(["--cluster-config", str(cfg), "--dtype", "float16", "--block-size", "16", "--dataset", str(tr),
               "--output", str(out), "--request-routing-policy", "LOAD", "--log-interval", "1.0", "--token-detail"])
    assert rc == 0
    text = capsys.readouterr().out
    info = [x for x in text.splitlines() if x.startswith("[INFO]")]
    assert len(info) >= 5 and all(INFO.match(x) for x in info), info[:2]
    assert "= nbkit sim =" in text and "Mean TTFT (ms):" in text and "P99 ITL (ms):" in text
    header = out.read_text().splitlines()[0].split(",")
    assert header == list(CSV_COLUMNS)
    recs = read_csv(out)
    assert len(recs) == 120 and {r.instance_id for r in recs} == {0, 1}
    assert all(r.rank == f"inst{r.instance_id}" and r.policy == "least_load" and r.outcome == "ok" for r in recs)
    for r in recs:
        assert len(r.itl_s) == r.output_toks - 1
        if r.output_toks > 1:
            assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / (r.output_toks - 1), rel=1e-6)


def test_run_as_a_module_with_ns_columns(files):
    cfg, tr, d = files
    out = d / "out_ns.csv"
    p = subprocess.run([sys.executable, "-m", "nbkit.sim", "--cluster-config", str(cfg), "--dataset", str(tr),
                        "--output", str(out), "--time-unit", "ns", "--request-routing-policy", "RR", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    header = out.read_text().splitlines()[0]
    assert header == ("request_id,instance_id,rank,policy,arrival_ns,queue_wait_ns,ttft_ns,tpot_ns,itl_ns,e2e_ns,"
                      "input_toks,output_toks,outcome")
    row = out.read_text().splitlines()[1].split(",")
    assert re.fullmatch(r"\d+", row[6])                     # ttft_ns: integer nanoseconds
    recs = read_csv(out)
    assert sorted(r.instance_id for r in recs[:2]) == [0, 1]


def test_csv_round_trip_both_units(tmp_path):
    recs = [RequestResult("0", 1, "inst1", "least_load", 0.5, 0.001, 0.123456789, [0.019, 0.021], 0.163456789,
                          100, 3, "ok"),
            RequestResult("s1/0", 0, "inst0", "session", 1.25, None, 0.2, [], 0.2, 50, 1, "ok"),
            RequestResult("7", None, "", "least_load", 2.0, None, None, [], None, 10, 5, "http_400")]
    for unit in ("s", "ns"):
        p = tmp_path / f"r_{unit}.csv"
        write_csv(recs, p, time_unit=unit)
        back = read_csv(p)
        assert [r.request_id for r in back] == ["0", "s1/0", "7"]
        a, b, c = back
        assert a.instance_id == 1 and a.rank == "inst1" and a.outcome == "ok"
        assert a.ttft_s == pytest.approx(0.123456789, abs=1e-9) and a.e2e_s == pytest.approx(0.163456789, abs=1e-9)
        assert a.itl_s == pytest.approx([0.019, 0.021], abs=1e-9) and a.tpot_s == pytest.approx(0.02)
        assert b.tpot_s is None and b.queue_wait_s is None and b.itl_s == []
        assert c.instance_id is None and c.ttft_s is None and c.outcome == "http_400"
    with pytest.raises(ValueError, match="time_unit"):
        write_csv(recs, tmp_path / "x.csv", time_unit="ms")
    (tmp_path / "bad.csv").write_text("request_id,foo\n1,2\n")
    with pytest.raises(ValueError, match="ttft"):
        read_csv(tmp_path / "bad.csv")


def test_read_csv_takes_the_files_of_the_earlier_writers(tmp_path):
    # the benchmark's (-1 for an unknown replica, "[a, b]") and the simulator's (6-digit ITL) files
    bench_ns = ("request_id,instance_id,rank,policy,arrival_ns,queue_wait_ns,ttft_ns,tpot_ns,itl_ns,e2e_ns,"
                "input_toks,output_toks,outcome\n"
                '2,2,replica2,p,100000000,3836776,1461698156,49372749,"[54818874, 93572170]",1560089200,235,3,ok\n'
                "999,-1,,p,3000000000,,,,[],,0,0,error\n")
    sim_s = ("request_id,instance_id,rank,policy,arrival_s,queue_wait_s,ttft_s,tpot_s,itl_s,e2e_s,input_toks,"
             'output_toks,outcome\n2,0,inst0,round_robin,0.1,0.011,0.022127654,0.002475929,"[0.0024759,0.00247596]",'
             "0.027079512,274,3,ok\n")
    (tmp_path / "b.csv").write_text(bench_ns)
    (tmp_path / "s.csv").write_text(sim_s)
    a, b = read_csv(tmp_path / "b.csv")
    assert a.request_id == "2" and a.instance_id == 2 and a.ttft_s == pytest.approx(1.461698156, abs=1e-12)
    assert a.itl_s == pytest.approx([0.054818874, 0.09357217], abs=1e-12) and a.tpot_s == pytest.approx(0.049195522)
    assert b.instance_id is None and b.outcome == "error" and b.ttft_s is None and b.arrival_s == 3.0
    (c,) = read_csv(tmp_path / "s.csv")
    assert c.rank == "inst0" and c.queue_wait_s == 0.011 and c.itl_s == [0.0024759, 0.00247596]
    assert c.tpot_s == pytest.approx(0.002475929, abs=1e-9)


def test_records_doctests():
    res = doctest.testmod(records, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0 and res.attempted > 5


def test_custom_policy_from_a_file(files, tmp_path, capsys):
    cfg, tr, d = files
    mod = tmp_path / "mypol.py"
    mod.write_text("from nbkit.policies import RankLoad\n"
                   "SEEN = []\n"
                   "def always_one(candidates, request):\n"
                   "    assert all(isinstance(c, RankLoad) for c in candidates)\n"
                   "    return 1\n")
    out = d / "custom.csv"
    rc = main(["--cluster-config", str(cfg), "--dataset", str(tr), "--output", str(out),
               "--request-routing-policy", "CUSTOM", "--custom-policy", f"{mod}:always_one", "--quiet"])
    assert rc == 0
    recs = read_csv(out)
    assert {r.instance_id for r in recs} == {1} and recs[0].policy == "custom:always_one"


def test_errors_exit_2_with_the_reason(files, tmp_path, capsys):
    cfg, tr, d = files
    bad = json.loads(SEED)
    bad["nodes"][0]["instances"][1]["tp_size"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["--cluster-config", str(tmp_path / "bad.json"), "--dataset", str(tr)]) == 2
    assert "nodes[0].instances[1].tp_size" in capsys.readouterr().err
    assert main(["--cluster-config", str(cfg), "--dataset", str(tr), "--request-routing-policy", "NOPE"]) == 2
    assert "unknown routing policy" in capsys.readouterr().err
    assert main(["--cluster-config", str(cfg), "--dataset", str(tr), "--request-routing-policy", "CUSTOM"]) == 2
    assert "--custom-policy" in capsys.readouterr().err
    (tmp_path / "t.jsonl").write_text('{"input_toks": 0, "output_toks": 1, "arrival_time_ns": 0}\n')
    assert main(["--cluster-config", str(cfg), "--dataset", str(tmp_path / "t.jsonl")]) == 2
    assert "input_toks" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ calibrate

TRUE = dict(compute_eff=0.3, step_overhead_s=0.005, seq_overhead_s=0.0012)


def _real_run(tmp_path, unit):
    cfg = single_instance_config("tiny", "cpu", max_num_seqs=128)
    items = calibration_trace((1, 2, 8, 32, 64, 4, 16, 48, 24), repeats=1, gap_s=30.0, seed=3)
    true = get_hardware("cpu").replace(**TRUE)
    res = Simulator(cfg, hardware={"cpu": true}, policy="RR").run(items)
    path = tmp_path / f"real_{unit}.csv"
    res.write_csv(path, time_unit=unit)
    return cfg, path


@pytest.mark.parametrize("unit", ["s", "ns"])
def test_calibrate_recovers_known_factors(tmp_path, unit):
    cfg, path = _real_run(tmp_path, unit)
    fit = calibrate(read_csv(path), cfg, params=("compute_eff", "step_overhead_s", "seq_overhead_s"))
    for k, v in TRUE.items():
        assert fit.fitted[k] == pytest.approx(v, rel=0.03), (k, fit.report())
    assert fit.loss < fit.loss_start / 100
    for k in ("mean_ttft_s", "mean_tpot_s", "throughput_tok_s"):
        assert abs(fit.after["rel_err"][k]) < 0.01
    assert fit.profile.mem_eff == get_hardware("cpu").mem_eff      # not fitted, not moved


def test_calibrate_recovers_the_decode_overhead(tmp_path):
    true = dict(compute_eff=0.35, step_overhead_s=0.002, seq_overhead_s=0.0002, request_overhead_s=0.01,
                decode_overhead_s=0.015)
    cfg = single_instance_config("tiny", "cpu", max_num_seqs=128)
    items = calibration_trace((1, 4, 16, 64), repeats=2, gap_s=20.0, seed=1)
    res = Simulator(cfg, hardware={"cpu": get_hardware("cpu").replace(**true)}, policy="RR").run(items)
    lone = [r for r in res.records if r.output_toks > 1][:1]
    assert lone[0].itl_s[0] > 0.015                       # the client waits for token 2
    path = tmp_path / "real.csv"
    res.write_csv(path)
    fit = calibrate(read_csv(path), cfg, policy="RR",
                    params=("compute_eff", "step_overhead_s", "seq_overhead_s", "request_overhead_s",
                            "decode_overhead_s"))
    for k, v in true.items():
        # decode_overhead_s trades against step_overhead_s x (output - 1): only the spread of
        # output lengths among lone requests tells them apart, and the ridge has a say
        tol = 0.15 if k == "decode_overhead_s" else 0.05
        assert fit.fitted[k] == pytest.approx(v, rel=tol), (k, fit.report())
    # without it, the lone short requests' TPOT cannot be matched as well
    fit0 = calibrate(read_csv(path), cfg, policy="RR",
                     params=("compute_eff", "step_overhead_s", "seq_overhead_s", "request_overhead_s"))
    assert fit.loss < fit0.loss


def test_calibrate_recovers_the_request_overhead_and_the_fixed_costs(tmp_path):
    true = dict(compute_eff=0.35, step_overhead_s=0.003, seq_overhead_s=0.0004, request_overhead_s=0.009)
    cfg = single_instance_config("tiny", "cpu", max_num_seqs=128)
    items = calibration_trace((1, 4, 16, 64), repeats=2, gap_s=20.0, seed=1)
    res = Simulator(cfg, hardware={"cpu": get_hardware("cpu").replace(**true)}, policy="RR").run(items)
    path = tmp_path / "real.csv"
    res.write_csv(path)
    # from the old, far-off starting point: overheads 4x too big, no request overhead
    start = get_hardware("cpu").replace(compute_eff=0.5, step_overhead_s=0.008, seq_overhead_s=0.0008,
                                        request_overhead_s=0.0)
    fit = calibrate(read_csv(path), cfg, start=start, policy="RR",
                    params=("compute_eff", "step_overhead_s", "seq_overhead_s", "request_overhead_s"))
    for k, v in true.items():
        assert fit.fitted[k] == pytest.approx(v, rel=0.05), (k, fit.report())
    for k in ("mean_ttft_s", "mean_tpot_s", "throughput_tok_s"):
        assert abs(fit.after["rel_err"][k]) < 0.01


def test_calibrate_leaves_streams_held_by_a_client_stall_out_of_the_means(tmp_path):
    """A stall on the measuring side delays a request's first tokens, which then arrive in one
    read: its TTFT is the stall's. Such requests are simulated but not compared."""
    import dataclasses

    true = dict(compute_eff=0.35, step_overhead_s=0.003, seq_overhead_s=0.0004, request_overhead_s=0.009)
    cfg = single_instance_config("tiny", "cpu", max_num_seqs=128)
    items = calibration_trace((1, 4, 16, 64), repeats=2, gap_s=20.0, seed=1, singles=32, singles_between=True)
    res = Simulator(cfg, hardware={"cpu": get_hardware("cpu").replace(**true)}, policy="RR").run(items)
    recs, stalled = [], 0
    for k, r in enumerate(sorted(res.records, key=lambda r: r.arrival_s)):
        if k % 12 == 5 and r.output_toks > 4:   # ~8 % of the streams: a 0.2 s stall before the first token
            r = dataclasses.replace(r, ttft_s=r.ttft_s + 0.2,
                                    itl_s=[1e-5, 1e-5, 1e-5] + r.itl_s[3:])
            stalled += 1
        recs.append(r)
    assert stalled >= 8
    params = ("compute_eff", "step_overhead_s", "seq_overhead_s", "request_overhead_s")
    fit = calibrate(recs, cfg, trace=items, policy="RR", params=params)
    kept = calibrate(recs, cfg, trace=items, policy="RR", params=params, drop_held=False)
    err = {k: abs(fit.fitted[k] / v - 1) for k, v in true.items()}
    err_kept = {k: abs(kept.fitted[k] / v - 1) for k, v in true.items()}
    assert err["request_overhead_s"] < 0.1, fit.report()
    assert err_kept["request_overhead_s"] > 2 * err["request_overhead_s"], (fit.report(), kept.report())


def test_calibrate_cli_saves_a_profile_the_run_uses(tmp_path, capsys):
    cfg, path = _real_run(tmp_path, "ns")
    cfg_path = tmp_path / "cpu.json"
    cfg_path.write_text(cfg.model_dump_json())
    prof = tmp_path / "fitted.json"
    rc = main(["calibrate", "--csv", str(path), "--cluster-config", str(cfg_path), "--output", str(prof),
               "--params", "compute_eff,step_overhead_s,seq_overhead_s"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "calibrated profile 'cpu'" in out and "mean_tpot_s" in out
    p = load_profile(prof)
    assert p.name == "cpu" and p.step_overhead_s == pytest.approx(0.005, rel=0.03)
    assert "fit" in json.loads(prof.read_text())
    # predicting another trace with the fitted profile matches the "real" hardware
    rng = random.Random(9)
    t = 0.0
    other = []
    for _ in range(150):
        t += rng.expovariate(30)
        other.append(TraceRequest(rng.randint(10, 500), rng.randint(4, 100), int(t * 1e9)))
    real = Simulator(cfg, hardware={"cpu": get_hardware("cpu").replace(**TRUE)}).run(other).records
    pred = Simulator(cfg, hardware={"cpu": p}).run(other).records
    err = compare(real, pred)["rel_err"]
    # parameters within 0.1 % of the truth still move a few arrivals across a step boundary; with
    # the cpu profile's 2048-token budget a 500-token prompt's wait is chunked, so TTFT moves ~2 %
    assert all(abs(v) < 0.03 for v in err.values()), err
    # and the run command takes it
    tr = tmp_path / "other.jsonl"
    write_trace(tr, other)
    out_csv = tmp_path / "pred.csv"
    assert main(["--cluster-config", str(cfg_path), "--dataset", str(tr), "--output", str(out_csv),
                 "--hardware-profile", str(prof), "--quiet"]) == 0
    got = sorted(read_csv(out_csv), key=lambda r: int(r.request_id))  # written in finish order
    assert [r.e2e_s for r in got] == pytest.approx([r.e2e_s for r in pred], abs=2e-6)  # the CSV's precision


def test_calibration_trace_command(tmp_path, capsys):
    out = tmp_path / "calib.jsonl"
    assert main(["calibration-trace", "--output", str(out), "--bursts", "1,4", "--repeats", "2",
                 "--gap-s", "5", "--singles", "3", "--single-gap-s", "1"]) == 0
    from nbkit.traces import read_trace
    items = read_trace(out)
    assert len(items) == 3 + 10
    # 3 lone requests 1 s apart, then (after one gap) the 4 bursts 5 s apart
    assert sorted({i.arrival_time_ns for i in items}) == [int(t * 1e9) for t in (0, 1, 2, 8, 13, 18, 23)]
    assert [i.arrival_time_ns for i in items[:3]] == [0, 1_000_000_000, 2_000_000_000]


def test_calibration_trace_rejects_bad_singles():
    with pytest.raises(ValueError, match="singles=-1"):
        calibration_trace(singles=-1)


def test_calibration_trace_can_spread_the_lone_requests_between_the_bursts():
    items = calibration_trace(bursts=(1, 4, 16), repeats=2, gap_s=10.0, seed=5, singles=9, single_gap_s=1.0,
                              singles_between=True)
    plain = calibration_trace(bursts=(1, 4, 16), repeats=2, gap_s=10.0, seed=5, singles=9, single_gap_s=1.0)
    assert len(items) == len(plain) == 9 + 2 * (1 + 4 + 16)
    times = sorted({it.arrival_time_ns for it in items})
    at = {t: sum(1 for it in items if it.arrival_time_ns == t) for t in times}
    bursts = [t for t in times if at[t] > 1]
    assert sorted(at[t] for t in bursts) == [4, 4, 16, 16]
    # every burst has lone requests in front of it (9 over 6 slots: 2,2,2,1,1,1), each a second
    # apart, and the first comes gap_s after the burst before, which has drained by then
    gaps = [(b - a) / 1e9 for a, b in zip(times, times[1:])]
    assert min(gaps) >= 1.0
    assert sum(1 for g in gaps if g >= 10.0) == 5
    assert len(times) == 9 + 6 and times[0] == 0


def test_calibrate_shows_its_progress(tmp_path):
    import io
    cfg = single_instance_config("tiny", "cpu", max_num_seqs=64)
    res = Simulator(cfg, policy="RR").run(calibration_trace((1, 8), repeats=1, gap_s=5.0, seed=2))
    path = tmp_path / "real.csv"
    res.write_csv(path)
    out = io.StringIO()
    fit = calibrate(read_csv(path), cfg, policy="RR", params=("compute_eff",), max_evals=4, polish_evals=4,
                    progress=out)
    text = out.getvalue()
    assert "calibrate" in text and "sim" in text and f"-> {fit.loss:.3g}" in text, text
