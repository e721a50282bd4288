"""The headless multi-node data-parallel form, rehearsed on one machine: a head (API server + rank 0)
and a headless node (rank 1) joined over 127.0.0.1; each DP rank is routable by header."""

from __future__ import annotations

import os

import httpx
import pytest

from conftest import alive
from nbkit import Cluster, data_parallel_specs

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")]


def test_head_plus_headless_node_serve_both_ranks(tiny_model_path, tmp_path):
    specs = data_parallel_specs(tiny_model_path, dp_size=2, nodes=2, address="127.0.0.1")
    cluster = Cluster(specs, port_start=8480, run_dir=tmp_path)
    head, node = cluster.plans
    assert "--headless" in node.argv and "--headless" not in head.argv
    assert head.cores != node.cores
    assert [r.name for r in cluster.ranks] == ["dp-node0/dp0", "dp-node0/dp1"]
    with cluster:
        before = cluster.metrics()
        assert set(before) == {"dp-node0/dp0", "dp-node0/dp1"}
        for rank in cluster.ranks:
            r = httpx.post(f"{rank.url}/v1/completions", headers=dict(rank.headers), timeout=120,
                           json={"model": cluster.model, "prompt": "Hello", "max_tokens": 5, "ignore_eos": True})
            assert r.status_code == 200
        after = cluster.metrics()
        for name in before:
            assert after[name].generation_tokens - before[name].generation_tokens == 5
        assert [s.state for s in cluster.status()] == ["healthy", "healthy"]
        pids = [p.pid for i in range(2) for p in cluster.process(i).processes()]
    assert alive(pids) == []
