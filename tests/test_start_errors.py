"""A replica that dies or hangs at start: the error quotes its log, and nothing is left running."""

from __future__ import annotations

import pytest

from conftest import alive
from nbkit import Cluster, ReplicaSpec, ReplicaStartError

pytestmark = pytest.mark.vllm


def test_replica_that_exits_raises_with_its_log_tail(tiny_model_path, tmp_path):
    cluster = Cluster([ReplicaSpec(model=tiny_model_path, cores=(0,), extra_args=("--no-such-vllm-flag",)),
                       ReplicaSpec(model=tiny_model_path, cores=(1,))], port_start=8470, run_dir=tmp_path)
    with pytest.raises(ReplicaStartError) as err:
        cluster.start(timeout=300)
    msg = str(err.value)
    assert "replica0 exited with code" in msg
    assert "no-such-vllm-flag" in msg  # vLLM's own complaint, quoted from the log
    assert len(err.value.log_tail.splitlines()) <= 30
    # the healthy sibling was stopped too: nothing is left running
    assert not cluster.running
    assert all(s.state == "stopped" for s in cluster.status())


def test_replica_that_is_not_healthy_in_time_is_stopped(tiny_model_path, tmp_path):
    cluster = Cluster([ReplicaSpec(model=tiny_model_path, cores=(0,))], port_start=8475, run_dir=tmp_path,
                      stop_grace=3)
    with pytest.raises(ReplicaStartError, match="was not healthy after 4 s"):
        cluster.start(timeout=4)
    proc = cluster.process(0)
    assert proc is not None and alive([proc.pid]) == []
    assert not cluster.running
