"""Routing over real vLLM servers nbkit did not start: ``nbkit route --worker-urls`` over the session's
two vLLM-CPU replicas (to the router they are just two URLs) serves the OpenAI SDK on both, and a
panel over ``Cluster.attach`` of the same URLs shows both ranks with live load and no start/stop."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest
from conftest import free_port, wait_for

from nbkit import Cluster
from nbkit.routing.metrics import parse_metrics

pytestmark = pytest.mark.vllm


def finished(url: str) -> float:
    return sum(m.requests_finished for m in parse_metrics(httpx.get(url + "/metrics", timeout=10).text).values())


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_nbkit_route_over_two_vllm_servers_serves_the_openai_sdk(shared_cluster):
    from openai import OpenAI

    urls = [r.url for r in shared_cluster.ranks]
    before = [finished(u) for u in urls]
    port = free_port(19530)
    proc = subprocess.Popen([sys.executable, "-m", "nbkit", "route", "--worker-urls", *(u + "/v1" for u in urls),
                             "--policy", "round_robin", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}") or proc.poll() is not None, 60, "nbkit route")
        assert proc.poll() is None, proc.stdout.read()
        oai = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY")
        model = shared_cluster.model
        assert [m.id for m in oai.models.list().data] == [model]
        for _ in range(4):
            out = oai.completions.create(model=model, prompt="Hello there", max_tokens=4, extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 4
        chunks = list(oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=6, stream=True, extra_body={"ignore_eos": True}))
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 1
        # round robin over two servers: each finished some of the five requests
        wait_for(lambda: all(finished(u) > b for u, b in zip(urls, before)), 30, "both servers to finish requests")
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert all(healthy(u) for u in urls), "nbkit route must leave the servers running"


def test_panel_over_attached_vllm_servers(shared_cluster):
    attached = Cluster.attach([r.url for r in shared_cluster.ranks])
    try:
        assert attached.model == shared_cluster.model and attached.attached
        client = attached.client("round_robin")
        panel = attached.panel(interval=0.3)
        try:
            for _ in range(4):
                client.sync.complete("Hello the panel", max_tokens=4)
            wait_for(lambda: len(panel.monitor.rows) == 2 and all(r.state == "healthy" for r in panel.monitor.rows),
                     30, "two healthy rows")
            wait_for(lambda: all(r.requests_served > 0 for r in panel.monitor.rows), 30, "served counts per row")
            assert 'data-rank="server0"' in panel.table.value and 'data-rank="server1"' in panel.table.value
            assert not panel.controllable and panel.stop_btn.disabled
        finally:
            panel.close()
            client.close()
    finally:
        attached.stop()
    assert all(healthy(r.url) for r in shared_cluster.ranks), "stopping an attached cluster leaves the servers up"
