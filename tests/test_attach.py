"""Routing over servers nbkit did not start (issue 17, part 2), on simulated servers started by hand:
``nbkit route --worker-urls`` serves the OpenAI SDK over both; ``Cluster.attach`` gives status,
metrics, clients, endpoints, the panel (without start/stop controls) and benchmarks, and its stop
leaves the servers running; ``RoutedClient`` takes URLs; a killed server leaves the routing and
comes back when it answers again; bad URLs are refused naming them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
from conftest import free_port, free_ports, wait_for

from nbkit import Cluster, RoutedClient, bench
from nbkit.cluster.attach import AttachedError
from nbkit.http.ports import port_is_free
from nbkit.policies import available_policies
from nbkit.routing.client import worker_urls
from nbkit.routing.metrics import parse_metrics


pytestmark = pytest.mark.processes  # simulated replicas / kernels: `make test`, not `make test-fast`


def start_server(port: int) -> subprocess.Popen:
    """One simulated OpenAI-compatible server, by hand (nbkit does not know it)."""
    p = subprocess.Popen([sys.executable, "-m", "nbkit.sim.server", "serve", "tiny", "--host", "127.0.0.1",
                          "--port", str(port), "--hardware", "cpu", "--parent-pid", str(os.getpid())],
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for(lambda: healthy(f"http://127.0.0.1:{port}") or p.poll() is not None, 60, f"server on {port}")
    assert p.poll() is None, f"server on {port} exited with {p.returncode}"
    return p


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def stop_server(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
        p.wait(10)


def served(url: str) -> float:
    """Requests the server has finished (its own /metrics)."""
    return sum(m.requests_finished for m in parse_metrics(httpx.get(url + "/metrics", timeout=5).text).values())


@pytest.fixture(scope="module")
def servers():
    ports = free_ports(2, 19410)
    procs = [start_server(p) for p in ports]
    yield [f"http://127.0.0.1:{p}" for p in ports]
    for p in procs:
        stop_server(p)


# -- nbkit route ------------------------------------------------------------------------------------
def test_route_serves_the_openai_sdk_over_both_servers(servers):
    from openai import OpenAI

    port = free_port(19430)
    before = [served(u) for u in servers]
    proc = subprocess.Popen([sys.executable, "-m", "nbkit", "route", "--worker-urls", servers[0] + "/v1", servers[1],
                             "--policy", "round_robin", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}") or proc.poll() is not None, 60, "nbkit route's endpoint")
        assert proc.poll() is None, proc.stdout.read()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY")
        assert [m.id for m in client.models.list().data] == ["tiny"]
        for _ in range(4):
            out = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4)
            assert out.choices[0].text and out.usage.completion_tokens == 4
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
        assert chat.choices[0].message.content
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=6, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text
        spread = [served(u) - b for u, b in zip(servers, before)]
        assert sum(spread) == 6 and min(spread) >= 2, spread
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"nbkit: endpoint http://127.0.0.1:{port}" in out and "over 2 server(s)" in out, out
    assert all(healthy(u) for u in servers), "nbkit route stopped a server it did not start"
    assert port_is_free("127.0.0.1", port)


@pytest.mark.parametrize("bad", ["not-a-url", "ftp://127.0.0.1:8000", "http://127.0.0.1:99999/v1",
                                 "http://127.0.0.1:8000/v1?x=1"])
def test_route_refuses_a_bad_url_naming_it_and_starts_nothing(bad):
    port = free_port(19440)
    out = subprocess.run([sys.executable, "-m", "nbkit", "route", "--worker-urls", "http://127.0.0.1:8000", bad,
                          "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert repr(bad) in out.stderr and "worker URL" in out.stderr, out.stderr
    assert "endpoint" not in out.stdout and port_is_free("127.0.0.1", port)


def test_worker_urls_spellings():
    assert worker_urls("http://a:8000/v1, http://b:8001/,https://c/v1/") == ["http://a:8000", "http://b:8001",
                                                                           "https://c"]
    assert worker_urls(["http://a:8000/v1,http://b:8001", "http://c:1"]) == ["http://a:8000", "http://b:8001",
                                                                            "http://c:1"]
    assert worker_urls("http://gw/team-a/v1") == ["http://gw/team-a"]  # a proxy's path prefix stays
    for bad, why in [("", "no URL"), ("http://a:1,http://a:1/v1", "given twice"), ("a:8000", "'a:8000'"),
                     (["http://a:1", 3], "3")]:
        with pytest.raises(ValueError, match=why):
            worker_urls(bad)
    with pytest.raises(ValueError, match="'nope'"):
        Cluster.attach("nope")


# -- Cluster.attach -------------------------------------------------------------------------------
def test_attach_status_metrics_client_endpoint_and_stop_leaves_servers_running(servers):
    cluster = Cluster.attach(",".join(u + "/v1" for u in servers))
    ep = None
    try:
        assert cluster.attached and cluster.running and cluster.model == "tiny" and len(cluster) == 2
        assert [r.name for r in cluster.ranks] == ["server0", "server1"]
        assert [r.url for r in cluster.ranks] == servers
        df = cluster.status_frame()
        assert list(df["state"]) == ["healthy", "healthy"] and df["pid"].isna().all(), df
        assert list(df["url"]) == servers
        assert sorted(cluster.metrics()) == ["server0", "server1"]
        client = cluster.client("round_robin")
        ranks = [client.sync.complete("Hello", max_tokens=3)["nbkit"]["rank"] for _ in range(4)]
        assert sorted(ranks) == ["server0", "server0", "server1", "server1"]
        chunks = list(client.sync.stream_complete("Hello", max_tokens=5))
        assert chunks[-1]["usage"]["completion_tokens"] == 5
        port = free_port(19450)
        ep = cluster.endpoint(port=port, policy="least_load")
        r = httpx.post(ep.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 3}, timeout=30)  # no model: discovered
        assert r.status_code == 200 and r.json()["model"] == "tiny", r.text
        with pytest.raises(AttachedError, match=r"restart server1 \(http://127\.0\.0\.1:\d+\)"):
            cluster.restart(1)
        with pytest.raises(AttachedError, match="server0"):
            cluster.stop_replica(0)
        with pytest.raises(AttachedError, match="scale"):
            cluster.scale(3)
        assert cluster.restarts == 0 and "attached" in cluster.logs(0)
    finally:
        cluster.stop()
    assert not cluster.running and cluster.state(0) == "detached"
    assert all(healthy(u) for u in servers), "stop() stopped a server nbkit did not start"
    assert port_is_free("127.0.0.1", port), "the endpoint still listens after stop()"
    with pytest.raises(RuntimeError, match="not started"):
        client.sync.complete("Hello", max_tokens=2)
    cluster.start()  # attach again
    try:
        assert cluster.running and [s.state for s in cluster.status()] == ["healthy", "healthy"]
    finally:
        cluster.stop()


def test_every_policy_and_a_benchmark_over_attached_servers(servers):
    cluster = Cluster.attach(servers)
    try:
        for policy in available_policies():
            if policy == "custom":
                continue
            c = cluster.client(policy)
            out = c.sync.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
            assert out["nbkit"]["rank"] in ("server0", "server1"), (policy, out)
            c.close()
        w = bench.synthetic(12, input_len=(8, 40), output_len=(2, 6), seed=0)
        res = bench.run(cluster, w, policy="round_robin", request_rate=50.0, num_prompts=12, progress=False)
        df = res.frame()
        assert len(df) == 12 and (df["outcome"] == "ok").all(), df
        assert set(df["rank"]) == {"server0", "server1"}
        rm = res.replica_metrics
        assert rm is not None and sorted(rm["rank"]) == ["server0", "server1"] and rm["finished"].sum() == 12
    finally:
        cluster.stop()


def test_routed_client_from_urls(servers):
    for target in (f"{servers[0]}/v1,{servers[1]}/v1", [servers[0], servers[1] + "/v1"]):
        client = RoutedClient(target, "round_robin")
        try:
            assert [s.rank.url for s in client.router.states] == servers
            ranks = [client.sync.complete("Hi", max_tokens=2)["nbkit"]["rank"] for _ in range(2)]
            assert sorted(ranks) == ["server0", "server1"] and client.model == "tiny"
        finally:
            client.close()


def test_panel_over_attached_servers_shows_both_and_no_start_stop_controls(servers):
    cluster = Cluster.attach(servers)
    client = cluster.client("round_robin")
    panel = cluster.panel(interval=0.2)
    try:
        client.sync.complete("Hello", max_tokens=4)
        wait_for(lambda: len(panel.monitor.rows) == 2 and panel.monitor.step >= 2, 20, "two panel samples")
        snap = panel.snapshot()
        assert list(snap.index) == ["server0", "server1"] and (snap["state"] == "healthy").all(), snap
        assert 'data-rank="server0"' in panel.table.value and 'data-rank="server1"' in panel.table.value
        assert not panel.controllable
        assert panel.scale_row.layout.display == "none" and panel.replica_row.layout.display == "none"
        assert panel.stop_btn.disabled and panel.restart_btn.disabled and panel.apply.disabled
        assert "attached servers" in panel.header.value
        with pytest.raises(RuntimeError, match="attached"):
            panel._run_action("restart", 0)
    finally:
        panel.close()
        cluster.stop()


def test_a_killed_server_is_marked_down_and_requests_go_to_the_other():
    ports = free_ports(2, 19460)
    procs = [start_server(p) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    events = []
    cluster = Cluster.attach(urls, health_interval=0.3)
    try:
        cluster.add_fault_listener(lambda event, i, detail: events.append((event, i)))
        client = cluster.client("round_robin")
        ep = cluster.endpoint(port=free_port(19470), policy="round_robin")
        procs[1].kill()
        procs[1].wait(10)
        wait_for(lambda: cluster.state(1) == "unhealthy" and ("down", 1) in events, 10, "server1 marked down")
        assert all(st.down for st in client.router.states if st.rank.replica == 1)
        assert all(st.down for st in ep.router.states if st.rank.replica == 1)
        ranks = [client.sync.complete("Hello", max_tokens=2)["nbkit"]["rank"] for _ in range(4)]
        assert ranks == ["server0"] * 4
        for _ in range(3):
            assert httpx.post(ep.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                              timeout=30).status_code == 200
        assert cluster.status()[1].state == "unhealthy" and cluster.status()[0].state == "healthy"
        procs[1] = start_server(ports[1])  # back on its port: routed to again, nothing restarted by nbkit
        wait_for(lambda: ("up", 1) in events and cluster.state(1) == "healthy", 10, "server1 up again")
        ranks = {client.sync.complete("Hello", max_tokens=2)["nbkit"]["rank"] for _ in range(4)}
        assert ranks == {"server0", "server1"}
        assert cluster.restarts == 0
    finally:
        cluster.stop()
        for p in procs:
            stop_server(p)


def test_a_server_down_at_attach_is_out_of_routing_until_it_answers():
    port, dead = free_ports(2, 19480)
    proc = start_server(port)
    try:
        cluster = Cluster.attach([f"http://127.0.0.1:{port}", f"http://127.0.0.1:{dead}"], health_interval=0.3)
        try:
            assert [s.state for s in cluster.status()] == ["healthy", "unhealthy"] and cluster.model == "tiny"
            client = cluster.client("round_robin")
            assert {client.sync.complete("Hi", max_tokens=2)["nbkit"]["rank"] for _ in range(3)} == {"server0"}
        finally:
            cluster.stop()
    finally:
        stop_server(proc)
