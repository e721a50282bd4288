"""The panel's model and controls on two real vLLM-CPU replicas, the session's shared cluster (conftest)
(no browser: see test_browser_panel). The stop and restart buttons' test runs after the others on it."""

from __future__ import annotations

import io
import os
import re
import time

import pytest

from nbkit import loop
from nbkit.demo import closed_loop

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")]

LINE = re.compile(r"^\[INFO\] step=\d+ inst0_batch=\d+ inst1_batch=\d+ prompt_t=[\d.]+k? tok/s "
                  r"decode_t=[\d.]+k? tok/s npu_mem=\[\d+\.\d GB, \d+\.\d GB\]$")


@pytest.fixture
def cluster(shared_cluster):
    return shared_cluster  # the session's two idle replicas (conftest)


@pytest.fixture
def client(cluster):
    c = cluster.client("least_load")
    yield c
    c.close()


def wait_for(pred, timeout=30.0, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


def test_rows_show_live_load_per_rank(cluster, client):
    panel = cluster.panel(interval=0.5)
    try:
        load = loop.submit(closed_loop(client, requests=400, concurrency=16, max_tokens=32))

        def busy():
            snap = panel.snapshot()
            return len(snap) == 2 and (snap["state"] == "healthy").all() and (snap["gen_tok_s"] > 0).all()

        assert wait_for(busy, 60), panel.snapshot().to_string()
        snap = panel.snapshot()
        assert list(snap.index) == ["replica0", "replica1"]
        assert list(snap["pinning"]) == ["cores 0", "cores 1"]
        assert (snap["mem_gb"] > 1).all() and (snap["routed"] > 0).all()
        # the table and the decisions view refresh on the panel's own cadence: poll, never read once
        assert wait_for(lambda: 'data-rank="replica0"' in panel.table.value
                        and 'data-rank="replica1"' in panel.table.value, 20), panel.table.value
        assert wait_for(lambda: "least_load" in panel.decisions.value, 20), panel.decisions.value
        assert wait_for(lambda: "<svg" in panel.chart.value, 20)
        hist = panel.monitor.history_frame()
        assert set(hist["rank"]) == {"replica0", "replica1", "total"}
        assert hist["t"].max() - hist["t"].min() <= panel.monitor.window_s
        load.result(timeout=300)
        # the log tail of the selected replica, as the next refresh shows it
        assert wait_for(lambda: "/v1/completions" in panel.log_view.value, 20), panel.log_view.value[-500:]
    finally:
        panel.close()
    time.sleep(1.0)  # a refresh already under way when the panel closed may still finish
    step = panel.monitor.step
    time.sleep(1.5)
    assert panel.monitor.step == step, "a closed panel kept refreshing"


def test_policy_and_concurrency_controls_reach_the_router(cluster, client):
    panel = cluster.panel(interval=0.5)
    try:
        panel.policy.value = "round_robin"
        assert wait_for(lambda: client.router.policy.name == "round_robin", 5)
        panel.concurrency.value = 3
        assert wait_for(lambda: client.router.max_concurrency == 3, 5)
        panel.concurrency.value = 0
        assert wait_for(lambda: client.router.max_concurrency is None, 5)
        out = client.sync.complete("Hello", max_tokens=2)
        assert client.records[-1].policy == "round_robin" and out["usage"]["completion_tokens"] == 2
        assert wait_for(lambda: "round_robin" in panel.header.value, 5)
    finally:
        panel.close()


def test_apply_shows_what_will_happen_before_doing_it(cluster):
    panel = cluster.panel(interval=1.0)
    try:
        panel.instances.value = 3
        panel._on_apply()
        assert "replicas[2]" in panel.plan_line.value and panel.confirm.layout.display == "none"
        panel.instances.value = 1
        panel._on_apply()
        assert "restart" in panel.plan_line.value and "stop" in panel.plan_line.value
        assert panel.confirm.layout.display is None
        assert len(cluster) == 2  # nothing happened yet
    finally:
        panel.close()


def test_text_log_lines_in_the_seed_format(cluster, client):
    buf = io.StringIO()
    mon = cluster.monitor()
    mon.start_logging(interval=0.3, file=buf)
    try:
        client.sync.complete("Hello", max_tokens=8)
        assert wait_for(lambda: len(buf.getvalue().splitlines()) >= 3, 10)
    finally:
        mon.stop_logging()
    lines = buf.getvalue().splitlines()
    assert all(LINE.match(l) for l in lines), lines[:3]


@pytest.mark.shared_last(3)
def test_stop_and_restart_buttons_and_a_stopped_cluster(cluster, client):
    panel = cluster.panel(interval=0.5)
    try:
        panel._run_action("stop", 1).result(timeout=60)
        assert wait_for(lambda: panel.snapshot().loc["replica1", "state"] == "stopped", 10)
        assert panel.snapshot().loc["replica0", "state"] == "healthy"
        panel._run_action("restart", 1).result(timeout=400)
        assert wait_for(lambda: (panel.snapshot()["state"] == "healthy").all(), 10)
        cluster.stop()
        assert wait_for(lambda: "stopped" in panel.header.value, 10)
        assert wait_for(lambda: (panel.snapshot()["state"] == "stopped").all(), 10)
        assert "refresh error" not in panel.header.value
    finally:
        panel.close()
