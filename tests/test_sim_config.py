"""nbkit.sim: the seed cluster config, its validation (errors name the JSON path), model specs and
hardware profiles."""

from __future__ import annotations

import doctest
import json

import pytest

from nbkit.sim import config as sim_config
from nbkit.sim import models as sim_models
from nbkit.sim.config import SimConfigError, load_cluster_config, resolve_instances, single_instance_config
from nbkit.sim.hardware import UnknownHardwareError, get_hardware, load_profile, save_profile
from nbkit.sim.models import SHIPPED, from_config_json, get_model_spec
from nbkit.sim.simulator import Simulator
from nbkit.traces import TraceRequest

#: The seed's config, byte for byte as the issue gives it (with the "..." instance written out).
SEED = ('{"num_nodes": 1, "link_bw": 16, "link_latency": 20000, "nodes": [{"num_instances": 2, "cpu_mem": '
        '{"mem_size": 512, "mem_bw": 256, "mem_latency": 0}, "instances": [{"model_name": '
        '"meta-llama/Llama-3.1-8B", "hardware": "RTXPRO6000", "npu_mem": {"mem_size": 96, "mem_bw": 1597, '
        '"mem_latency": 0}, "pd_type": null, "tp_size": 1}, {"model_name": "meta-llama/Llama-3.1-8B", '
        '"hardware": "RTXPRO6000", "npu_mem": {"mem_size": 96, "mem_bw": 1597, "mem_latency": 0}, '
        '"pd_type": null, "tp_size": 1}]}]}')


def seed() -> dict:
    return json.loads(SEED)


def error_of(data) -> SimConfigError:
    with pytest.raises(SimConfigError) as ei:
        resolve_instances(load_cluster_config(data))
    return ei.value


def test_seed_config_loads_and_runs(tmp_path):
    path = tmp_path / "cluster.json"
    path.write_text(SEED)
    cfg = load_cluster_config(path)
    setups = resolve_instances(cfg, dtype="float16", block_size=16)
    assert [s.key for s in setups] == ["inst0", "inst1"]
    s = setups[0]
    assert (s.model.name, s.hw.name, s.tp_size, s.pd_type, s.block_size) == \
        ("meta-llama/Llama-3.1-8B", "RTXPRO6000", 1, None, 16)
    # units: GB and GB/s; KV = 96 GB * 0.9 - 1.5 GB reserve - 16.06 GB of fp16 weights
    kv_bytes = 96e9 * 0.9 - 1.5e9 - s.model.weight_bytes(2)
    assert s.num_blocks == int(kv_bytes // 131072) // 16
    assert s.mem_bw_gbs == 1597 and s.tp_link_bw_gbs == 16 and s.tp_link_latency_ns == 20000
    trace = [TraceRequest(200 + 10 * i, 20, i * 10_000_000) for i in range(40)]
    res = Simulator(cfg, policy="LOAD", dtype="float16", block_size=16).run(trace)
    assert len(res.records) == 40 and all(r.outcome == "ok" for r in res.records)
    assert {r.instance_id for r in res.records} == {0, 1}


@pytest.mark.parametrize("mutate, path", [
    (lambda d: d["nodes"][0]["instances"][1].update(tp_size=0), "nodes[0].instances[1].tp_size"),
    (lambda d: d["nodes"][0]["instances"][1].update(tp_size="two"), "nodes[0].instances[1].tp_size"),
    (lambda d: d["nodes"][0]["instances"][1].update(colour="red"), "nodes[0].instances[1].colour"),
    (lambda d: d["nodes"][0]["instances"][0].update(pd_type="both"), "nodes[0].instances[0].pd_type"),
    (lambda d: d["nodes"][0]["instances"][0]["npu_mem"].update(mem_bw=-1),
     "nodes[0].instances[0].npu_mem.mem_bw"),
    (lambda d: d["nodes"][0]["instances"][0].pop("npu_mem"), "nodes[0].instances[0].npu_mem"),
    (lambda d: d["nodes"][0]["cpu_mem"].update(mem_size=0), "nodes[0].cpu_mem.mem_size"),
    (lambda d: d.update(link_bw=0), "link_bw"),
    (lambda d: d.update(extra=1), "extra"),
    (lambda d: d.update(num_nodes=2), "num_nodes"),
    (lambda d: d["nodes"][0].update(num_instances=3), "nodes[0].num_instances"),
    (lambda d: d["nodes"][0]["instances"][1].update(hardware="TPU9"), "nodes[0].instances[1].hardware"),
    (lambda d: d["nodes"][0]["instances"][1].update(model_name="nobody/Nothing-1B"),
     "nodes[0].instances[1].model_name"),
    (lambda d: d["nodes"][0]["instances"][1].update(tp_size=3), "nodes[0].instances[1].tp_size"),
    (lambda d: d["nodes"][0]["instances"][0]["npu_mem"].update(mem_size=10),
     "nodes[0].instances[0].npu_mem.mem_size"),
    (lambda d: d["nodes"][0]["instances"][0].update(max_num_seqs=512, max_num_batched_tokens=256),
     "nodes[0].instances[0].max_num_batched_tokens"),
    (lambda d: d["nodes"][0]["instances"][0].update(pd_type="prefill"), "nodes[0].instances[0].pd_type"),
    (lambda d: [i.update(dp_group=7) for i in d["nodes"][0]["instances"]]
     and d["nodes"][0]["instances"][1].update(tp_size=2), "nodes[0].instances[1].dp_group"),
])
def test_errors_name_the_json_path(mutate, path):
    d = seed()
    mutate(d)
    err = error_of(d)
    assert err.path == path, str(err)
    assert str(err).startswith(path + ": ")


def test_error_message_quotes_the_value():
    d = seed()
    d["nodes"][0]["instances"][1]["tp_size"] = 0
    assert str(error_of(d)) == ("nodes[0].instances[1].tp_size: Input should be greater than or equal to 1 "
                                "(got 0)")


def test_optional_instance_keys_accepted():
    d = seed()
    d["nodes"][0]["instances"][0].update(dp_group="a", max_num_seqs=64, max_num_batched_tokens=4096,
                                         gpu_memory_utilization=0.8, block_size=32, enable_prefix_caching=False,
                                         kv_cache_gb=2.0, max_model_len=8192, name="big")
    d["nodes"][0]["instances"][1].update(dp_group="a")
    s0, s1 = resolve_instances(load_cluster_config(d), block_size=16)
    assert (s0.key, s0.block_size, s0.max_num_seqs, s0.enable_prefix_caching, s0.dp_group) == \
        ("big", 32, 64, False, "a")
    assert s0.num_blocks == int(2e9 // 131072) // 32
    assert s1.block_size == 16 and s1.dp_group == "a"


def test_bad_file_and_bad_json(tmp_path):
    with pytest.raises(SimConfigError, match="cannot read"):
        load_cluster_config(tmp_path / "missing.json")
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(SimConfigError, match="not valid JSON"):
        load_cluster_config(p)


def test_pd_config_resolves():
    d = seed()
    d["nodes"][0]["instances"][0]["pd_type"] = "prefill"
    d["nodes"][0]["instances"][1]["pd_type"] = "decode"
    assert [s.pd_type for s in resolve_instances(load_cluster_config(d))] == ["prefill", "decode"]


def test_cpu_profile_kv_cache_is_one_gib_and_block_128():
    (s,) = resolve_instances(single_instance_config("tiny", "cpu"))
    assert s.block_size == 128
    assert s.num_blocks == int(2**30 // s.model.kv_bytes_per_token(2)) // 128


# --------------------------------------------------------------------------------------- models


def test_shipped_specs():
    l8 = get_model_spec("meta-llama/Llama-3.1-8B")
    assert round(l8.num_params / 1e9, 2) == 8.03
    assert l8.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2
    assert round(get_model_spec("meta-llama/Llama-3.1-70B").num_params / 1e9, 1) == 70.6
    assert round(get_model_spec("Qwen/Qwen2.5-7B").num_params / 1e9, 1) == 7.6
    assert get_model_spec("llama-3.1-8b-instruct") is l8
    assert set(SHIPPED) >= {"meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B", "Qwen/Qwen2.5-7B", "tiny"}


def test_tiny_spec_matches_nbkit_tiny(tmp_path):
    # the same LlamaConfig numbers nbkit.tiny._build writes
    cfg = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096,
           "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = from_config_json(tmp_path)
    tiny = get_model_spec("tiny")
    for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
              "vocab_size", "max_position_embeddings"):
        assert getattr(spec, f) == getattr(tiny, f), f
    assert get_model_spec(str(tmp_path)).hidden_size == 256


def test_unknown_model_and_broken_config(tmp_path):
    with pytest.raises(sim_models.UnknownModelError):
        get_model_spec("nobody/Nothing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(sim_models.UnknownModelError, match="lacks"):
        from_config_json(tmp_path)


# ------------------------------------------------------------------------------------- hardware


def test_profiles_and_aliases():
    for name in ("H100", "H200", "A100-80G", "L40S", "RTXPRO6000", "cpu"):
        assert get_hardware(name).name == name
    assert get_hardware("a100").name == "A100-80G"
    assert get_hardware("h100").mem_bw_gbs == 3350
    with pytest.raises(UnknownHardwareError, match="known"):
        get_hardware("TPU9")


def test_profile_save_load_roundtrip(tmp_path):
    p = get_hardware("cpu").replace(compute_eff=0.31, step_overhead_s=0.0061)
    path = save_profile(p, tmp_path / "cpu.json", fit={"loss": 0.01})
    q = load_profile(path)
    assert q == p
    assert get_hardware(str(path)) == p
    # a profile given by path in the config
    d = seed()
    for inst in d["nodes"][0]["instances"]:
        inst.update(hardware=str(path), model_name="tiny", npu_mem={"mem_size": 8, "mem_bw": 20})
    assert resolve_instances(load_cluster_config(d))[0].hw.compute_eff == 0.31
    bad = json.loads(path.read_text())
    bad["turbo"] = True
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(UnknownHardwareError, match="turbo"):
        load_profile(tmp_path / "bad.json")


def test_hardware_overrides_replace_shipped():
    cfg = single_instance_config("tiny", "cpu")
    fitted = get_hardware("cpu").replace(step_overhead_s=0.5)
    (s,) = resolve_instances(cfg, hardware={"cpu": fitted})
    assert s.hw.step_overhead_s == 0.5


def test_module_doctests():
    for mod in (sim_config, sim_models):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.failed == 0, mod.__name__


def test_batching_limits_default_to_vllms_for_the_hardware():
    """vLLM's API server defaults: 8192 tokens / 256 sequences per step on these GPUs, 2048 / 128
    on CPU (times the TP size there); a burst of long prompts on vLLM-CPU is prefilled over
    several steps, and the simulator must do the same. Values in the config win."""
    from nbkit.sim.config import resolve_instances, single_instance_config
    cpu = resolve_instances(single_instance_config("tiny", "cpu"))[0]
    assert (cpu.max_num_batched_tokens, cpu.max_num_seqs) == (2048, 128)
    cpu_tp2 = resolve_instances(single_instance_config("tiny", "cpu", tp_size=2))[0]
    assert (cpu_tp2.max_num_batched_tokens, cpu_tp2.max_num_seqs) == (4096, 256)
    gpu = resolve_instances(single_instance_config("meta-llama/Llama-3.1-8B", "H100", tp_size=2))[0]
    assert (gpu.max_num_batched_tokens, gpu.max_num_seqs) == (8192, 256)
    mine = resolve_instances(single_instance_config("tiny", "cpu", max_num_batched_tokens=4000, max_num_seqs=32))[0]
    assert (mine.max_num_batched_tokens, mine.max_num_seqs) == (4000, 32)
    small = resolve_instances(single_instance_config("tiny", "cpu", max_num_batched_tokens=64))[0]
    assert (small.max_num_batched_tokens, small.max_num_seqs) == (64, 64)  # vLLM needs seqs <= tokens
    many = resolve_instances(single_instance_config("tiny", "cpu", max_num_seqs=4096))[0]
    assert (many.max_num_batched_tokens, many.max_num_seqs) == (4096, 4096)
