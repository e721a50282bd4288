"""Prefill/decode planning (pure): specs, roles, KV connector flags."""

from __future__ import annotations

import json

import pytest

from nbkit import GPU, Inventory, SpecError, plan_replicas
from nbkit.cluster.pd import kv_transfer_config, pd_specs


def _cfg(plan):
    return json.loads(plan.argv[plan.argv.index("--kv-transfer-config") + 1])


def test_cpu_pd_pair_shares_a_folder_and_gets_roles(tmp_path):
    specs = pd_specs("m", prefill=1, decode=1, connector="example", shared_dir=str(tmp_path / "kv"), device="cpu")
    assert [s.role for s in specs] == ["prefill", "decode"] and [s.name for s in specs] == ["prefill0", "decode0"]
    plans = plan_replicas(specs, Inventory(cores=(0, 1), memory_gib=24), port_free=lambda h, p: True,
                          check_models=False)
    cfgs = [_cfg(p) for p in plans]
    assert all(c["kv_connector"] == "ExampleConnector" and c["kv_role"] == "kv_both" for c in cfgs)
    assert {c["kv_connector_extra_config"]["shared_storage_path"] for c in cfgs} == {str(tmp_path / "kv")}
    assert (tmp_path / "kv").is_dir()
    assert [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in plans] == ["0", "1"]


def test_gpu_pd_uses_nixl_and_separate_gpus():
    inv = Inventory(cores=tuple(range(16)), gpus=tuple(GPU(i, "H100", 80.0) for i in range(4)), memory_gib=512)
    specs = pd_specs("org/model", prefill=2, decode=2, connector="nixl", device="gpu", tp_size=1,
                     extra_args=("--max-num-seqs", "64"))
    plans = plan_replicas(specs, inv, port_free=lambda h, p: True, check_models=False)
    assert [p.role for p in plans] == ["prefill", "prefill", "decode", "decode"]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "1", "2", "3"]
    assert all(_cfg(p) == {"kv_connector": "NixlConnector", "kv_role": "kv_both"} for p in plans)
    assert all(p.argv[-2:] == ("--max-num-seqs", "64") for p in plans)


@pytest.mark.parametrize("kwargs, field", [
    (dict(prefill=0), "prefill"), (dict(decode=0), "decode"), (dict(connector="carrier-pigeon"), "connector"),
])
def test_bad_pd_input_names_the_field(kwargs, field, tmp_path):
    with pytest.raises(SpecError) as e:
        pd_specs("m", device="cpu", shared_dir=str(tmp_path), **kwargs)
    assert e.value.field == field


def test_example_connector_needs_a_folder():
    with pytest.raises(SpecError, match="shared_dir"):
        kv_transfer_config("example", None)
