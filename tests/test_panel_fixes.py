"""The panel's numbers and drawing, on two simulated replicas (no vLLM): the total throughput is the sum
of the ranks at every instant, through a first reading, a counter reset and a restart; a failed scrape
stops showing once one succeeds; "max conc." says unlimited; the charts carry a legend and are drawn
off nbkit's loop (the loop that forwards the cluster's requests)."""

from __future__ import annotations

import threading

import httpx
import pytest
from conftest import free_port, wait_for

from nbkit import Cluster, loop
from nbkit.routing.metrics import EngineMetrics
from nbkit.ui import panel as panel_mod
from nbkit.ui.monitor import ERROR_SHOW_S, Monitor


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster.replicas(n=2, engine="sim", port_start=free_port(9140), run_dir=tmp_path_factory.mktemp("panelfix"),
                         stop_grace=2.0)
    c.start(timeout=120)
    yield c
    c.stop()


def reading(t: float, gen: float, prompt: float = 80_200.0, waiting: float = 0.0) -> EngineMetrics:
    return EngineMetrics(generation_tokens=gen, prompt_tokens=prompt, waiting=waiting, scraped_at=t)


def totals_match(mon: Monitor) -> None:
    df = mon.history_frame()
    for t, g in df.groupby("t"):
        ranks = g[g["rank"] != "total"]
        total = g[g["rank"] == "total"]
        assert len(total) == 1, f"one total per instant, got {len(total)} at {t}"
        for col in ("gen_tok_s", "prompt_tok_s", "waiting"):
            assert total[col].iloc[0] == pytest.approx(ranks[col].sum()), (t, col, g.to_string())


def test_total_is_the_sum_of_its_ranks_through_first_reading_reset_and_restart(cluster):
    mon = Monitor(cluster)
    t0 = 1_000_000.0
    # first reading: big cumulative counters (a replica that served a lot before the panel opened)
    rows = mon.update({"replica0": reading(t0, 50_000, 80_000), "replica1": reading(t0, 40_000)}, now=t0)
    assert [r.gen_tok_s for r in rows] == [0.0, 0.0], "a first reading has no rate"
    rows = mon.update({"replica0": reading(t0 + 1, 50_100, 80_200), "replica1": reading(t0 + 1, 40_050)}, now=t0 + 1)
    assert [r.gen_tok_s for r in rows] == [100.0, 50.0] and rows[0].prompt_tok_s == 200.0
    # replica1 restarted: its counters start again from zero
    rows = mon.update({"replica0": reading(t0 + 2, 50_200), "replica1": reading(t0 + 2, 20)}, now=t0 + 2)
    assert [r.gen_tok_s for r in rows] == [100.0, 0.0]
    rows = mon.update({"replica0": reading(t0 + 3, 50_300), "replica1": reading(t0 + 3, 60)}, now=t0 + 3)
    assert [r.gen_tok_s for r in rows] == [100.0, 40.0]
    # a reading a moment after the last (the router's scrape, then the probe's): the last rates stay
    rows = mon.update({"replica0": reading(t0 + 3.01, 50_330), "replica1": reading(t0 + 3.01, 61)}, now=t0 + 3.01)
    assert [r.gen_tok_s for r in rows] == [100.0, 40.0]
    # replica0 replaced by a new process that already counts more than the old one: a new generation
    gens = {"replica0": ("restarted", 1)}
    rows = mon.update({"replica0": reading(t0 + 4, 90_000), "replica1": reading(t0 + 4, 100)}, now=t0 + 4,
                      generations=gens)
    assert [r.gen_tok_s for r in rows] == [0.0, 40.0]  # replica1 over t0+3..t0+4
    rows = mon.update({"replica0": reading(t0 + 5, 90_070)}, now=t0 + 5, generations=gens)  # replica1: no reading
    assert [r.gen_tok_s for r in rows] == [70.0, 0.0]
    totals_match(mon)
    assert mon.history_frame()["gen_tok_s"].max() <= 150.0
    assert "total" in set(mon.history_frame()["rank"])


def test_live_samples_total_equals_sum(cluster):
    client = cluster.client("round_robin")
    try:
        mon = Monitor(cluster)
        for k in range(4):
            client.sync.complete("Hello there " * 4, max_tokens=16)
            mon.sample_now()
        assert (mon.snapshot()["state"] == "healthy").all()
        totals_match(mon)
    finally:
        client.close()


def test_a_failed_scrape_stops_showing_once_a_scrape_succeeds(cluster):
    mon = Monitor(cluster)
    t0 = 2_000_000.0
    rows = mon.update({"replica0": httpx.ReadTimeout("timed out"), "replica1": reading(t0, 1)}, now=t0)
    assert "ReadTimeout" in rows[0].last_error and rows[0].last_error_age_s == 0.0 and rows[1].last_error == ""
    rows = mon.update({"replica1": reading(t0 + 5, 1)}, now=t0 + 5)  # no reading of replica0: still shown, aged
    assert "ReadTimeout" in rows[0].last_error and rows[0].last_error_age_s == 5.0
    cell = panel_mod.rows_html(rows)
    assert "ReadTimeout" in cell and "(5 s ago)" in cell and "opacity:" in cell
    rows = mon.update({"replica0": reading(t0 + 6, 2), "replica1": reading(t0 + 6, 1)}, now=t0 + 6)
    assert rows[0].last_error == "" and rows[0].last_error_age_s is None
    assert "ReadTimeout" not in panel_mod.rows_html(rows)
    # an error that nothing clears goes away after ERROR_SHOW_S
    mon.update({"replica0": httpx.ReadTimeout("timed out")}, now=t0 + 10)
    rows = mon.update({}, now=t0 + 11 + ERROR_SHOW_S)
    assert rows[0].last_error == ""


def test_max_concurrency_reads_unlimited(cluster):
    client = cluster.client("round_robin")
    panel = cluster.panel(interval=0.5)
    try:
        assert panel.concurrency.value == 0 and not panel.concurrency.readout
        assert "unlimited" in panel.concurrency_label.value and "∞" in panel.concurrency_label.value
        panel.concurrency.value = 3
        wait_for(lambda: client.router.max_concurrency == 3, 5, "max concurrency 3")
        assert panel.concurrency_label.value == "3"
        panel.concurrency.value = 0
        wait_for(lambda: client.router.max_concurrency is None, 5, "unlimited")
        assert "unlimited" in panel.concurrency_label.value and "unlimited" in panel.action_line.value
    finally:
        panel.close()
        client.close()


def test_charts_are_drawn_off_nbkits_loop_and_carry_a_legend(cluster, monkeypatch):
    drawn: list[tuple[bool, str, int]] = []
    real = panel_mod.chart_svg

    def spy(df):
        drawn.append((loop.in_loop_thread(), threading.current_thread().name, len(df)))
        return real(df)

    monkeypatch.setattr(panel_mod, "chart_svg", spy)
    client = cluster.client("round_robin")
    panel = cluster.panel(interval=0.2, chart_every=1)
    try:
        for _ in range(3):
            client.sync.complete("Hello", max_tokens=8)
        wait_for(lambda: any(n > 0 for _, _, n in drawn) and "<svg" in panel.chart.value, 30, "a drawn chart")
    finally:
        panel.close()
        client.close()
    assert drawn and not any(on_loop for on_loop, _, _ in drawn), drawn
    assert all(name.startswith("nbkit-panel-chart") for _, name, _ in drawn), drawn
    frame = panel.monitor.history_frame()
    spec = panel_mod.charts(frame).to_dict()
    color = spec["hconcat"][0]["encoding"]["color"]
    assert color["field"] == "rank" and color.get("legend") and color["legend"]["orient"] == "bottom"
    svg = real(frame)
    assert all(name in svg for name in ("replica0", "replica1", "total"))  # the legend's labels
