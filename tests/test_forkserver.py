"""Unit tests of the fork server's rules: which plans fork from it, which environment it needs at
import time (its process behaviour is tested on real replicas in test_cluster_cpu and test_serve)."""

from __future__ import annotations

import doctest
import sys

from nbkit.cluster import forkserver
from nbkit.cluster.placement import plan_replicas
from nbkit.cluster.spec import GPU, Inventory, ReplicaSpec


def plan(specs, inv):
    return plan_replicas(specs, inv, port_free=lambda h, p: True, check_models=False)


def test_doctests():
    assert doctest.testmod(forkserver).failed == 0


def test_cpu_vllm_fast_start_plans_fork_and_others_spawn():
    cpu = Inventory(cores=(0, 1), gpus=(), memory_gib=0.0)
    fast, slow = plan([ReplicaSpec(model="m", cores=(0,)), ReplicaSpec(model="m", cores=(1,), fast_start=False)], cpu)
    assert fast.preload and forkserver.forkable(fast.argv) and not slow.preload
    assert not plan([ReplicaSpec(model="tiny", engine="sim")], cpu)[0].preload  # the simulator imports no vLLM
    gpu = Inventory(cores=tuple(range(8)), gpus=(GPU(0, "H100", 80.0),), memory_gib=0.0)
    assert not plan([ReplicaSpec(model="m", device="gpu")], gpu)[0].preload  # never fork after CUDA could start


def test_replicas_that_differ_only_in_pinning_share_one_server_environment():
    cpu = Inventory(cores=(0, 1), gpus=(), memory_gib=0.0)
    a, b = plan([ReplicaSpec(model="m"), ReplicaSpec(model="m")], cpu)
    assert a.env != b.env  # each is pinned to its own core ...
    assert forkserver.import_env(a.env) == forkserver.import_env(b.env)  # ... and both fork from one server
    c, = plan([ReplicaSpec(model="m", env={"VLLM_LOGGING_LEVEL": "DEBUG"})], cpu)
    assert forkserver.import_env(c.env) != forkserver.import_env(a.env)  # read at import: spawned instead


def test_only_nbkits_vllm_entry_on_this_interpreter_is_forked():
    assert forkserver.forkable([sys.executable, "-m", "nbkit.cluster.vllm_entry", "serve", "m"])
    assert not forkserver.forkable(["/other/python", "-m", "nbkit.cluster.vllm_entry", "serve", "m"])
    assert not forkserver.forkable([sys.executable, "-m", "nbkit.sim.server", "serve", "m"])
