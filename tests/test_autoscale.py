"""The SLO autoscaler: its rules (pure, nbkit.policies.autoscale) and the simulator running the same
object against simulated replicas with a cold start (nbkit.sim.scaling, ``python -m nbkit.sim
--autoscale``)."""

from __future__ import annotations

import doctest
import html
import json
import random

import pytest

from nbkit.policies import autoscale
from nbkit.policies.autoscale import Autoscaler, AutoscaleSpec, AutoscaleSpecError
from nbkit.sim import Simulator
from nbkit.sim.__main__ import main
from nbkit.sim.config import single_instance_config
from nbkit.traces import TraceRequest, write_trace


def test_doctests():
    assert doctest.testmod(autoscale).failed == 0


def test_spec_parses_short_and_long_names_and_names_bad_fields():
    s = AutoscaleSpec.parse("min=2, max=8, ttft_p90_ms=250, cold_start=45, window_s=20")
    assert (s.min_replicas, s.max_replicas, s.ttft_p90_ms, s.cold_start_s, s.window_s) == (2, 8, 250.0, 45.0, 20.0)
    for text, field in [("max=1,min=2", "max_replicas"), ("ttft_p90_ms=0", "ttft_p90_ms"), ("speed=3", "'speed'"),
                        ("max=x", "max_replicas='x'"), ("up_at=0.5,down_at=0.6", "down_at"), ("max", "'max_replicas'")]:
        with pytest.raises(AutoscaleSpecError, match=field):
            AutoscaleSpec.parse(text)


def feed(s: Autoscaler, t0: float, ttft: float, n: int = 20, span: float = 2.0) -> None:
    for k in range(n):
        s.observe(t0 + k * span / n, ttft)


def test_up_on_a_missed_slo_then_hold_while_starting_and_during_the_cooldown():
    s = Autoscaler(AutoscaleSpec(max_replicas=4, ttft_p90_ms=500, up_cooldown_s=30))
    feed(s, 0.0, 0.9)
    d = s.decide(5.0, ready=1, waiting=3)
    assert (d.direction, d.current, d.desired) == ("up", 1, 2) and "900 ms >= 400 ms" in d.reason
    d = s.decide(10.0, ready=1, starting=1, waiting=3)
    assert d.direction == "hold" and "still starting" in d.reason
    d = s.decide(15.0, ready=2, waiting=3)
    assert d.direction == "hold" and "cooldown" in d.reason
    feed(s, 33.0, 0.9)                          # still missing it 30 s later
    assert s.decide(36.0, ready=2, waiting=3).direction == "up"
    assert [h.direction for h in s.history] == ["up", "up"]   # holds are not kept


def test_a_growing_queue_scales_up_by_what_it_takes_capped():
    s = Autoscaler(AutoscaleSpec(max_replicas=16, max_step=4, min_samples=5))
    feed(s, 0.0, 0.05, n=60, span=30)          # 2 finished/s on one replica: calm TTFT ...
    s.decide(30.0, ready=1, waiting=0)
    d = s.decide(35.0, ready=1, waiting=50)    # ... but 10 more requests wait every second
    assert d.direction == "up" and d.desired == 1 + 4 and "queue grew" in d.reason and "+4" in d.reason
    s2 = Autoscaler(AutoscaleSpec(max_replicas=2, min_samples=5))
    feed(s2, 0.0, 0.05, n=60, span=30)
    s2.decide(30.0, ready=1, waiting=0)
    assert s2.decide(35.0, ready=1, waiting=50).desired == 2    # never above max_replicas
    assert s2.decide(80.0, ready=2, waiting=90).direction == "hold"  # at max: says so
    assert "at max_replicas 2" in s2.decide(90.0, ready=2, waiting=200).reason


def test_down_when_calm_after_the_cooldown_never_below_min():
    s = Autoscaler(AutoscaleSpec(min_replicas=1, max_replicas=4, down_cooldown_s=60))
    feed(s, 0.0, 0.05)
    d = s.decide(10.0, ready=3, waiting=0)
    assert (d.direction, d.desired) == ("down", 2) and "nothing waiting" in d.reason
    assert "cooldown" in s.decide(20.0, ready=2, waiting=0).reason
    assert s.decide(80.0, ready=2, waiting=0).direction == "down"
    assert s.decide(200.0, ready=1, waiting=0).direction == "hold"      # at min
    busy = Autoscaler(AutoscaleSpec())
    feed(busy, 0.0, 0.05)
    assert busy.decide(5.0, ready=2, waiting=1).direction == "hold"     # requests wait: no scale-down


def test_no_scale_down_that_the_measured_capacity_would_not_carry():
    s = Autoscaler(AutoscaleSpec(min_samples=5, window_s=10, down_cooldown_s=0))
    feed(s, 0.0, 0.6, n=50, span=10)      # saturated: 5 finished/s on one replica while requests waited
    s.decide(10.0, ready=1, waiting=5)
    assert s.capacity == pytest.approx(5.0)
    feed(s, 10.0, 0.02, n=150, span=10)   # then calm at 15/s on 4 replicas
    d = s.decide(20.0, ready=4, waiting=0)
    assert d.direction == "hold" and "would not fit in 3" in d.reason
    feed(s, 20.0, 0.02, n=50, span=10)    # 5/s: fits in 3 at 0.8 x 5/s each
    assert s.decide(30.0, ready=4, waiting=0).direction == "down"


def step_trace(seed=0):
    """5 req/s, then 60 req/s for 150 s, then 5 req/s: a load step one H100 replica cannot carry."""
    rng, t, out = random.Random(seed), 0.0, []
    for rate, dur in ((5, 100), (60, 150), (5, 350)):
        end = t + dur
        while (t := t + rng.expovariate(rate)) <= end:
            out.append(TraceRequest(rng.randint(200, 2000), rng.randint(50, 400), int(t * 1e9)))
    return out


def test_the_simulator_scales_out_through_a_load_step_and_back_in():
    trace = step_trace()
    cfg = single_instance_config("meta-llama/Llama-3.1-8B", "H100")
    fixed = Simulator(cfg, policy="least_load").run(trace).summary()
    spec = "min=1,max=8,ttft_p90_ms=300,cold_start_s=60"
    res = Simulator(cfg, policy="least_load", autoscale=spec).run(trace)
    s, sc = res.summary(), res.scaling
    assert s["completed"] == len(trace) and s["failed"] == 0             # nothing lost to a scale-down
    ups = [e for e in sc["events"] if e["direction"] == "up"]
    downs = [e for e in sc["events"] if e["direction"] == "down"]
    assert ups and downs and ups[0]["t_s"] < 160 and downs[-1]["t_s"] > ups[-1]["t_s"]
    assert 1 < sc["peak_replicas"] <= 8
    assert sc["timeline"][-1]["serving"] < sc["peak_replicas"]            # scaled back in after the step
    assert s["ttft_s"]["p90"] < fixed["ttft_s"]["p90"] / 2                # it paid off
    # a started replica serves only after its cold start: nothing reaches inst1 before then
    first_inst1 = min(r.arrival_s for r in res.records if r.rank == "inst1")
    assert first_inst1 >= ups[0]["t_s"] + 60 - 1e-6
    assert 0 < sc["replica_seconds"] < 8 * s["duration_s"]
    again = Simulator(cfg, policy="least_load", autoscale=spec).run(trace)   # deterministic
    assert again.scaling["events"] == sc["events"]


def test_autoscale_needs_one_instance_to_copy():
    cfg = single_instance_config("meta-llama/Llama-3.1-8B", "H100", n=2)
    with pytest.raises(ValueError, match="autoscale: .* one instance"):
        Simulator(cfg, autoscale="max=4")


def test_cli_autoscale_prints_and_writes_the_decisions(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(single_instance_config("meta-llama/Llama-3.1-8B", "H100").model_dump_json())
    tr = tmp_path / "t.jsonl"
    write_trace(tr, step_trace())
    summ = tmp_path / "s.json"
    rc = main(["--cluster-config", str(cfg), "--dataset", str(tr), "--summary-json", str(summ),
               "--autoscale", "min=1,max=6,ttft_p90_ms=300,cold_start_s=30"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Autoscaling: " in out and " up " in out and "SLO" in out
    sc = json.loads(summ.read_text())["scaling"]
    assert sc["spec"]["max_replicas"] == 6 and sc["events"][0]["direction"] == "up"
    with pytest.raises(SystemExit) as e:
        main(["--cluster-config", str(cfg), "--dataset", str(tr), "--autoscale", "max=4,speed=2"])
    assert e.value.code == 2 and "autoscale option 'speed'" in capsys.readouterr().err


def test_with_a_capacity_reading_it_adds_what_the_load_needs_even_while_replicas_start():
    s = Autoscaler(AutoscaleSpec(max_replicas=16, max_step=8, min_samples=5, window_s=10, up_cooldown_s=0))
    feed(s, 0.0, 2.0, n=100, span=10)          # one replica finished 10/s while requests waited
    d = s.decide(10.0, ready=1, waiting=100)
    assert s.capacity == pytest.approx(10.0) and d.direction == "up"
    # 2 starting; the need is ~10/s finished + 100 waiting cleared in 10 s = 20/s -> 3 replicas at 0.8 x 10/s
    d = s.decide(15.0, ready=1, starting=d.desired - 1, waiting=100)
    assert d.direction in ("hold", "up") and d.desired <= 4
    feed(s, 15.0, 2.0, n=100, span=5)
    d = s.decide(20.0, ready=1, starting=2, waiting=400)   # far more waits now: more, despite the starting ones
    assert d.direction == "up" and d.desired > 3 and "req/s to serve" in d.reason


def test_no_scale_down_while_the_finish_rate_rises():
    s = Autoscaler(AutoscaleSpec(min_samples=5, window_s=10, down_cooldown_s=0))
    feed(s, 0.0, 0.02, n=20, span=10)
    assert s.decide(10.0, ready=3, waiting=0).direction == "down"   # 2/s, calm
    feed(s, 10.0, 0.02, n=60, span=10)                              # 6/s: rising
    d = s.decide(20.0, ready=2, waiting=0)
    assert d.direction == "hold" and "rising" in d.reason


def test_the_panel_shows_the_last_decision_and_the_ups_and_downs():
    from types import SimpleNamespace

    from nbkit.ui.panel import scaling_html
    s = Autoscaler(AutoscaleSpec(max_replicas=3))
    feed(s, 100.0, 0.9)
    up = s.decide(105.0, ready=1, waiting=2)
    hold = s.decide(106.0, ready=1, starting=1, waiting=2)
    view = SimpleNamespace(last=hold, decisions=s.history, started_at=100.0)
    text = scaling_html(view)
    assert hold.direction == "hold" and "still starting" in text           # the last decision, a hold too
    assert html.escape(up.reason) in text and "<td>5</td><td>up</td>" in text   # the up, 5 s in
    assert "no autoscaler" in scaling_html(None)
