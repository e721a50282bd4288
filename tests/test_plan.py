"""Pure unit tests of nbkit.cluster.placement: specs in, launch plans out (no GPU, no vLLM, no network)."""

from __future__ import annotations

import socket
import sys

import pydantic
import pytest

from nbkit.cluster.spec import GPU, Inventory, LaunchPlan, ReplicaSpec, SpecError, data_parallel_specs
from nbkit.cluster.placement import cpu_bind, plan_replicas


def free(host, port):
    return True


def cpu_inv(n=2, memory_gib=0.0):
    return Inventory(cores=tuple(range(n)), gpus=(), memory_gib=memory_gib)


def gpu_inv(n=8, cores=16, memory_gib=0.0):
    return Inventory(cores=tuple(range(cores)), gpus=tuple(GPU(i, "H100", 80.0) for i in range(n)),
                     memory_gib=memory_gib)


def plan(specs, inv, **kw):
    kw.setdefault("port_free", free)
    kw.setdefault("check_models", False)
    return plan_replicas(specs, inv, **kw)


def flag_value(argv, flag):
    """The value following ``flag`` in argv (asserts the flag occurs exactly once)."""
    argv = list(argv)
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


def has_seq(argv, seq):
    argv, seq = list(argv), list(seq)
    return any(argv[i:i + len(seq)] == seq for i in range(len(argv) - len(seq) + 1))


# --------------------------------------------------------------------------- CPU pinning


def test_two_cpu_replicas_on_two_cores_get_one_core_each():
    p = plan([ReplicaSpec(model="m", device="cpu")] * 2, cpu_inv(2))
    assert [x.env["VLLM_CPU_OMP_THREADS_BIND"] for x in p] == ["0", "1"]
    assert [x.cores for x in p] == [(0,), (1,)]
    for x in p:
        assert x.device == "cpu"
        assert x.env["VLLM_TARGET_DEVICE"] == "cpu"
        assert x.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
        assert "CUDA_VISIBLE_DEVICES" not in x.env
        assert x.pinning == "cores " + x.env["VLLM_CPU_OMP_THREADS_BIND"]


def test_one_rank_cpu_replica_starts_fast_pinned_by_openmp():
    p = plan([ReplicaSpec(model="m", device="cpu")] * 2, cpu_inv(4))
    for x, places in zip(p, ("{0,1}", "{2,3}")):
        assert has_seq(x.argv, ["--distributed-executor-backend", "uni"])
        assert x.env["NBKIT_FORK_ENGINE"] == "1" and x.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        assert (x.env["OMP_PLACES"], x.env["OMP_PROC_BIND"], x.env["OMP_NUM_THREADS"]) == (places, "true", "2")


def test_each_node_of_a_multi_node_dp_group_starts_fast():
    head, headless = plan(data_parallel_specs("m", dp_size=2, nodes=2, address="127.0.0.1", device="cpu"), cpu_inv(2))
    for x in (head, headless):  # one local rank each: the engine core forked, the model inside it
        assert has_seq(x.argv, ["--distributed-executor-backend", "uni"]) and x.env["NBKIT_FORK_ENGINE"] == "1"
    # the head serves HTTP for both ranks from one API server (vLLM's default starts one per rank)
    assert has_seq(head.argv, ["--api-server-count", "1"]) and "--api-server-count" not in headless.argv


def test_a_dp_group_keeps_an_api_server_count_it_was_given():
    (p,) = plan([ReplicaSpec(model="m", device="cpu", dp_size=2, extra_args=("--api-server-count", "2"))], cpu_inv(2))
    assert p.argv.count("--api-server-count") == 1 and has_seq(p.argv, ["--api-server-count", "2"])
    (p,) = plan([ReplicaSpec(model="m", device="cpu", dp_size=2, fast_start=False)], cpu_inv(2))
    assert "--api-server-count" not in p.argv


@pytest.mark.parametrize("spec", [dict(tp_size=2), dict(dp_size=2), dict(extra_args=("--distributed-executor-backend", "mp"))])
def test_several_ranks_fork_their_processes_but_keep_vllms_executor_and_pinning(spec):
    (p,) = plan([ReplicaSpec(**{"model": "m", "device": "cpu", **spec})], cpu_inv(2))
    assert p.env["NBKIT_FORK_ENGINE"] == "1"  # engine cores and workers forked; vLLM still pins each worker
    assert "OMP_PLACES" not in p.env and "VLLM_ENABLE_V1_MULTIPROCESSING" not in p.env
    assert p.argv.count("--distributed-executor-backend") == (1 if "extra_args" in spec else 0)


@pytest.mark.parametrize("spec", [dict(fast_start=False), dict(fast_start=False, tp_size=2),
                                  dict(engine="sim", model="tiny")])
def test_without_fast_start_vllm_cpu_keeps_its_default_processes(spec):
    (p,) = plan([ReplicaSpec(**{"model": "m", "device": "cpu", **spec})], cpu_inv(2))
    assert "NBKIT_FORK_ENGINE" not in p.env and "OMP_PLACES" not in p.env
    assert "--distributed-executor-backend" not in p.argv


def test_kv_cache_gib_sets_kvcache_space():
    (p,) = plan([ReplicaSpec(model="m", device="cpu", kv_cache_gib=4)], cpu_inv(2))
    assert p.env["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_cpu_tp2_on_two_cores():
    (p,) = plan([ReplicaSpec(model="m", device="cpu", tp_size=2)], cpu_inv(2))
    assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert has_seq(p.argv, ["--tensor-parallel-size", "2"])
    assert p.tp_size == 2


def test_four_cores_two_replicas_get_ranges():
    p = plan([ReplicaSpec(model="m", device="cpu")] * 2, cpu_inv(4))
    assert [x.env["VLLM_CPU_OMP_THREADS_BIND"] for x in p] == ["0-1", "2-3"]
    assert [x.cores for x in p] == [(0, 1), (2, 3)]


def test_auto_device_without_gpus_is_cpu():
    (p,) = plan([ReplicaSpec(model="m")], cpu_inv(2))
    assert p.device == "cpu"
    assert p.env["VLLM_TARGET_DEVICE"] == "cpu"


@pytest.mark.parametrize("cores, ranks, expected", [
    ([0, 1], 2, "0|1"),
    ([0, 1, 2, 3], 2, "0-1|2-3"),
    ([4, 5, 6], 1, "4-6"),
    ([0], 1, "0"),
    ([3, 1, 2, 0], 1, "0-3"),
    ([0, 1, 2, 5], 1, "0-2,5"),
    ([0, 2, 4, 6], 2, "0,2|4,6"),
    ([0, 1, 2, 3, 4, 5, 6, 7], 4, "0-1|2-3|4-5|6-7"),
])
def test_cpu_bind(cores, ranks, expected):
    assert cpu_bind(cores, ranks) == expected


def test_cpu_bind_too_few_cores():
    with pytest.raises(ValueError):
        cpu_bind([0], 2)


def test_explicit_cores_are_honoured():
    p = plan([ReplicaSpec(model="m", device="cpu", cores=(2, 3)),
              ReplicaSpec(model="m", device="cpu")], cpu_inv(4))
    assert p[0].cores == (2, 3)
    assert p[0].env["VLLM_CPU_OMP_THREADS_BIND"] == "2-3"
    # the automatic replica gets what is left
    assert p[1].cores == (0, 1)
    assert p[1].env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_cpu_dp2_group():
    (p,) = plan([ReplicaSpec(model="m", device="cpu", dp_size=2)], cpu_inv(2))
    assert has_seq(p.argv, ["--data-parallel-size", "2"])
    assert "--data-parallel-size-local" not in p.argv
    assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert p.dp_ranks == (0, 1)
    assert p.http_ranks == (0, 1)


def test_user_env_overrides_and_extends():
    (p,) = plan([ReplicaSpec(model="m", device="cpu", env={"FOO": "bar", "VLLM_CPU_KVCACHE_SPACE": "7"})],
                cpu_inv(1))
    assert p.env["FOO"] == "bar"
    assert p.env["VLLM_CPU_KVCACHE_SPACE"] == "7"


# --------------------------------------------------------------------------- argv


def test_argv_is_a_list_of_strings_starting_with_entry():
    (p,) = plan([ReplicaSpec(model="org/model name; rm -rf /", device="cpu")], cpu_inv(1),
                python="/opt/py/bin/python")
    assert isinstance(p.argv, tuple)
    assert all(isinstance(a, str) for a in p.argv)
    assert list(p.argv[:5]) == ["/opt/py/bin/python", "-m", "nbkit.cluster.vllm_entry", "serve",
                                "org/model name; rm -rf /"]


def test_argv_default_python_is_sys_executable():
    (p,) = plan([ReplicaSpec(model="m", device="cpu")], cpu_inv(1))
    assert p.argv[0] == sys.executable


def test_argv_host_and_port():
    (p,) = plan([ReplicaSpec(model="m", device="cpu", port=9123)], cpu_inv(1))
    assert has_seq(p.argv, ["--host", "127.0.0.1", "--port", "9123"])
    assert p.port == 9123
    assert p.host == "127.0.0.1"
    assert p.url == "http://127.0.0.1:9123"


def test_auto_port_starts_at_port_start():
    p = plan([ReplicaSpec(model="m", device="cpu")] * 2, cpu_inv(2), port_start=9000)
    assert [x.port for x in p] == [9000, 9001]
    assert flag_value(p[1].argv, "--port") == "9001"


def test_cpu_defaults_dtype_and_eager():
    (p,) = plan([ReplicaSpec(model="m", device="cpu")], cpu_inv(1))
    assert flag_value(p.argv, "--dtype") == "bfloat16"
    assert p.argv.count("--enforce-eager") == 1


def test_gpu_has_no_cpu_defaults():
    (p,) = plan([ReplicaSpec(model="m")], gpu_inv(1))
    assert "--dtype" not in p.argv
    assert "--enforce-eager" not in p.argv


@pytest.mark.parametrize("extra", [("--dtype", "float32"), ("--dtype=float32",)])
def test_user_dtype_wins(extra):
    (p,) = plan([ReplicaSpec(model="m", device="cpu", extra_args=extra)], cpu_inv(1))
    assert "bfloat16" not in p.argv
    assert [a for a in p.argv if a.startswith("--dtype")] == [extra[0]]
    assert tuple(p.argv[-len(extra):]) == extra
    assert "--enforce-eager" in p.argv


def test_extra_args_verbatim_at_end_in_order():
    extra = ("--max-num-seqs", "8", "--seed=3", "--disable-log-requests", "a b")
    (p,) = plan([ReplicaSpec(model="m", device="cpu", extra_args=extra)], cpu_inv(1))
    assert tuple(p.argv[-len(extra):]) == extra


def test_max_model_len_flag_unless_given():
    (p,) = plan([ReplicaSpec(model="m", device="cpu", max_model_len=512)], cpu_inv(1))
    assert flag_value(p.argv, "--max-model-len") == "512"
    (p,) = plan([ReplicaSpec(model="m", device="cpu", max_model_len=512,
                             extra_args=("--max-model-len=256",))], cpu_inv(1))
    assert "--max-model-len" not in p.argv
    assert p.argv[-1] == "--max-model-len=256"


# --------------------------------------------------------------------------- GPU pinning


def test_four_tp2_replicas_on_eight_gpus():
    p = plan([ReplicaSpec(model="m", tp_size=2)] * 4, gpu_inv(8))
    assert [x.env["CUDA_VISIBLE_DEVICES"] for x in p] == ["0,1", "2,3", "4,5", "6,7"]
    assert [x.devices for x in p] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    for x in p:
        assert x.device == "gpu"
        assert has_seq(x.argv, ["--tensor-parallel-size", "2"])
        assert "--gpu-memory-utilization" not in x.argv
        assert "VLLM_CPU_OMP_THREADS_BIND" not in x.env
        assert "VLLM_TARGET_DEVICE" not in x.env
    assert p[3].pinning == "gpu 6,7"


def test_eight_tp1_replicas_one_gpu_each():
    p = plan([ReplicaSpec(model="m")] * 8, gpu_inv(8))
    assert [x.env["CUDA_VISIBLE_DEVICES"] for x in p] == [str(i) for i in range(8)]
    for x in p:
        assert "--gpu-memory-utilization" not in x.argv
        assert x.gpu_memory_utilization is None


def test_three_replicas_share_one_gpu():
    p = plan([ReplicaSpec(model="m", devices=(0,))] * 3, gpu_inv(8))
    for x in p:
        assert x.env["CUDA_VISIBLE_DEVICES"] == "0"
        assert x.gpu_memory_utilization == pytest.approx(0.3067)
        assert x.gpu_memory_utilization == round(0.92 / 3, 4)
        assert flag_value(x.argv, "--gpu-memory-utilization") == "0.3067"


def test_more_single_gpu_replicas_than_gpus_round_robin():
    p = plan([ReplicaSpec(model="m")] * 4, gpu_inv(2))
    assert [x.devices for x in p] == [(0,), (1,), (0,), (1,)]
    assert all(x.gpu_memory_utilization == pytest.approx(0.46) for x in p)


def test_explicit_gpu_memory_utilization_respected():
    p = plan([ReplicaSpec(model="m", devices=(0,), gpu_memory_utilization=0.3),
              ReplicaSpec(model="m", devices=(0,), gpu_memory_utilization=0.6)], gpu_inv(8))
    assert [x.gpu_memory_utilization for x in p] == [0.3, 0.6]
    assert flag_value(p[0].argv, "--gpu-memory-utilization") == "0.3"
    assert flag_value(p[1].argv, "--gpu-memory-utilization") == "0.6"
    (single,) = plan([ReplicaSpec(model="m", gpu_memory_utilization=0.5)], gpu_inv(8))
    assert flag_value(single.argv, "--gpu-memory-utilization") == "0.5"


def test_gpu_memory_utilization_in_extra_args_not_duplicated():
    p = plan([ReplicaSpec(model="m", devices=(0,), extra_args=("--gpu-memory-utilization=0.2",))] * 2,
             gpu_inv(1))
    for x in p:
        assert "--gpu-memory-utilization" not in x.argv
        assert x.argv[-1] == "--gpu-memory-utilization=0.2"


def test_auto_device_prefers_gpu():
    (p,) = plan([ReplicaSpec(model="m")], gpu_inv(8))
    assert p.device == "gpu"
    assert p.env["CUDA_VISIBLE_DEVICES"] == "0"


def test_cpu_and_gpu_replicas_mixed():
    p = plan([ReplicaSpec(model="m", device="cpu"), ReplicaSpec(model="m", device="gpu")], gpu_inv(2, cores=4))
    assert p[0].device == "cpu" and p[0].cores == (0, 1, 2, 3)
    assert p[1].device == "gpu" and p[1].devices == (0,)


def test_device_gpu_without_gpus_is_an_error():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", device="gpu")], cpu_inv(2))
    assert e.value.field == "replicas[0].device"
    assert "device" in str(e.value)
    assert "'gpu'" in str(e.value)


def test_explicit_devices():
    (p,) = plan([ReplicaSpec(model="m", tp_size=2, devices=(5, 3))], gpu_inv(8))
    assert p.devices == (5, 3)
    assert p.env["CUDA_VISIBLE_DEVICES"] == "5,3"


# --------------------------------------------------------------------------- validation errors


def assert_spec_error(exc_info, field, value_text):
    err = exc_info.value
    assert isinstance(err, SpecError)
    assert isinstance(err, ValueError)
    assert err.field == field
    msg = str(err)
    assert field in msg
    assert value_text in msg
    return msg


def test_spec_error_is_value_error():
    assert issubclass(SpecError, ValueError)
    e = SpecError("replicas[1].cores", [7], "boom")
    assert str(e) == "replicas[1].cores=[7]: boom"
    assert (e.field, e.value) == ("replicas[1].cores", [7])


def test_core_not_in_affinity():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", device="cpu", cores=(0,)),
              ReplicaSpec(model="m", device="cpu", cores=(9,))], cpu_inv(4))
    assert_spec_error(e, "replicas[1].cores", "[9]")


def test_overlapping_cores():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", device="cpu", cores=(0, 1)),
              ReplicaSpec(model="m", device="cpu", cores=(1, 2))], cpu_inv(4))
    msg = assert_spec_error(e, "replicas[1].cores", "[1, 2]")
    assert "core 1" in msg


def test_explicit_cores_fewer_than_ranks():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", device="cpu", tp_size=2, cores=(0,))], cpu_inv(4))
    assert_spec_error(e, "replicas[0].cores", "[0]")


def test_too_many_cpu_replicas_for_cores():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", device="cpu")] * 3, cpu_inv(2))
    assert_spec_error(e, "replicas[2].tp_size", "1")


def test_cpu_tp_too_big_for_cores():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", device="cpu", tp_size=4)], cpu_inv(2))
    assert_spec_error(e, "replicas[0].tp_size", "4")


def test_tp_group_overlapping_another_replica_gpu():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", tp_size=2, devices=(0, 1)),
              ReplicaSpec(model="m", devices=(1,))], gpu_inv(8))
    msg = assert_spec_error(e, "replicas[0].devices", "[0, 1]")
    assert "GPU 1" in msg


def test_two_tp_groups_overlapping():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", tp_size=2, devices=(0, 1)),
              ReplicaSpec(model="m", tp_size=2, devices=(1, 2))], gpu_inv(8))
    assert e.value.field.endswith(".devices")


def test_gpu_index_does_not_exist():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m"), ReplicaSpec(model="m", devices=(8,))], gpu_inv(8))
    msg = assert_spec_error(e, "replicas[1].devices", "[8]")
    assert "does not exist" in msg


def test_explicit_devices_count_must_match_tp():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", tp_size=2, devices=(0,))], gpu_inv(8))
    assert_spec_error(e, "replicas[0].devices", "[0]")


def test_too_many_gpus_needed():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", tp_size=2)] * 5, gpu_inv(8))
    msg = assert_spec_error(e, "replicas[4].tp_size", "2")
    assert "10" in msg


def test_memory_split_below_floor():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", devices=(0,))] * 20, gpu_inv(1))
    msg = assert_spec_error(e, "replicas[0].gpu_memory_utilization", "0.046")
    assert "0.05" in msg


def test_auto_memory_split_below_floor():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m")] * 20, gpu_inv(1))
    assert e.value.field.endswith(".gpu_memory_utilization")
    assert e.value.value == pytest.approx(0.046)


def test_explicit_utilisations_on_shared_gpu_exceed_total():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", devices=(0,), gpu_memory_utilization=0.5),
              ReplicaSpec(model="m", devices=(0,), gpu_memory_utilization=0.5)], gpu_inv(8))
    assert_spec_error(e, "replicas[1].gpu_memory_utilization", "0.5")


def test_explicit_utilisations_on_shared_gpu_at_limit_ok():
    p = plan([ReplicaSpec(model="m", devices=(0,), gpu_memory_utilization=0.45),
              ReplicaSpec(model="m", devices=(0,), gpu_memory_utilization=0.5)], gpu_inv(8))
    assert [x.gpu_memory_utilization for x in p] == [0.45, 0.5]


def test_explicit_port_in_use():
    busy = {9100}
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", device="cpu", port=9200),
              ReplicaSpec(model="m", device="cpu", port=9100)], cpu_inv(2),
             port_free=lambda h, p: p not in busy)
    msg = assert_spec_error(e, "replicas[1].port", "9100")
    assert "in use" in msg


def test_same_explicit_port_twice():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", device="cpu", port=9100),
              ReplicaSpec(model="m", device="cpu", port=9100)], cpu_inv(2))
    assert_spec_error(e, "replicas[1].port", "9100")


def test_auto_ports_skip_busy_and_explicit_ports():
    busy = {8100, 8103}
    asked = []

    def port_free(host, port):
        asked.append((host, port))
        return port not in busy

    p = plan([ReplicaSpec(model="m", device="cpu"),
              ReplicaSpec(model="m", device="cpu", port=8101),
              ReplicaSpec(model="m", device="cpu"),
              ReplicaSpec(model="m", device="cpu")], cpu_inv(4), port_free=port_free)
    assert [x.port for x in p] == [8102, 8101, 8104, 8105]
    assert len({x.port for x in p}) == 4
    assert all(h == "127.0.0.1" for h, _ in asked)


def test_auto_ports_skip_dp_rpc_port():
    p = plan([ReplicaSpec(model="m", device="cpu", dp_size=2, dp_rpc_port=8100),
              ReplicaSpec(model="m", device="cpu")], cpu_inv(4))
    assert [x.port for x in p] == [8101, 8102]


def test_unknown_device_kind():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", device="tpu")], gpu_inv(8))
    assert_spec_error(e, "replicas[0].device", "'tpu'")


def test_missing_local_model_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model=missing, device="cpu")], cpu_inv(1), check_models=True)
    assert_spec_error(e, "replicas[0].model", missing)


def test_model_folder_without_config(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model=str(folder), device="cpu")], cpu_inv(1), check_models=True)
    msg = assert_spec_error(e, "replicas[0].model", str(folder))
    assert "config.json" in msg


def test_valid_local_model_plans_offline(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (p,) = plan([ReplicaSpec(model=str(folder), device="cpu")], cpu_inv(1), check_models=True)
    assert p.argv[4] == str(folder)
    assert p.env["HF_HUB_OFFLINE"] == "1"


def test_hub_id_passes_model_check():
    (p,) = plan([ReplicaSpec(model="Qwen/Qwen2.5-0.5B-Instruct", device="cpu")], cpu_inv(1), check_models=True)
    assert "HF_HUB_OFFLINE" not in p.env


def test_bad_hub_id_fails_model_check():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="not a model id!", device="cpu")], cpu_inv(1), check_models=True)
    assert e.value.field == "replicas[0].model"


def test_cpu_memory_too_small():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", device="cpu", kv_cache_gib=20)] * 4, cpu_inv(4, memory_gib=32.0))
    msg = assert_spec_error(e, "replicas[3].kv_cache_gib", "20")
    assert "92" in msg  # 4 x (20 + 3) GiB needed


def test_cpu_memory_enough():
    p = plan([ReplicaSpec(model="m", device="cpu", kv_cache_gib=4)] * 2, cpu_inv(2, memory_gib=14.0))
    assert len(p) == 2


def test_empty_spec_list():
    with pytest.raises(SpecError) as e:
        plan([], cpu_inv(2))
    assert e.value.field == "replicas"
    assert "replicas" in str(e.value)


# --------------------------------------------------------------------------- pydantic validation


@pytest.mark.parametrize("kwargs, field", [
    ({"tp_size": 0}, "tp_size"),
    ({"dp_size": 0}, "dp_size"),
    ({"port": 70000}, "port"),
    ({"port": 0}, "port"),
    ({"cores": (-1,)}, "cores"),
    ({"cores": (0, 0)}, "cores"),
    ({"cores": ()}, "cores"),
    ({"devices": (1, 1)}, "devices"),
    ({"tensor_parallel": 2}, "tensor_parallel"),
    ({"devices": (0,), "cores": (0,)}, "cores"),
    ({"devices": (0,), "cores": (0,)}, "devices"),
    ({"dp_size": 2, "dp_start_rank": 1, "dp_size_local": 1, "headless": True}, "dp_address"),
    ({"kv_cache_gib": 0}, "kv_cache_gib"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"dp_size": 2, "dp_size_local": 3}, "dp_size_local"),
])
def test_spec_validation(kwargs, field):
    with pytest.raises(pydantic.ValidationError) as e:
        ReplicaSpec(model="m", **kwargs)
    assert isinstance(e.value, ValueError)
    assert field in str(e.value)


def test_empty_model_rejected():
    with pytest.raises(pydantic.ValidationError) as e:
        ReplicaSpec(model="  ")
    assert "model" in str(e.value)


def test_spec_is_frozen():
    s = ReplicaSpec(model="m")
    with pytest.raises(pydantic.ValidationError):
        s.tp_size = 2  # type: ignore[misc]


def test_spec_workers():
    s = ReplicaSpec(model="m", tp_size=2, dp_size=4, dp_size_local=2)
    assert s.ranks_local == 2
    assert s.workers == 4


# --------------------------------------------------------------------------- data parallel


def dp_specs(**common):
    return data_parallel_specs("m", dp_size=4, nodes=2, address="10.0.0.1", rpc_port=13345, **common)


def test_data_parallel_specs_argv():
    head, node1 = dp_specs()
    assert not head.headless and node1.headless
    p = plan([head, node1], gpu_inv(8))
    h, n = p
    assert has_seq(h.argv, ["--data-parallel-size", "4", "--data-parallel-size-local", "2",
                            "--data-parallel-address", "10.0.0.1", "--data-parallel-rpc-port", "13345"])
    assert "--headless" not in h.argv
    assert "--data-parallel-start-rank" not in h.argv
    assert "--port" in h.argv
    assert has_seq(n.argv, ["--data-parallel-size", "4"])
    assert has_seq(n.argv, ["--data-parallel-size-local", "2"])
    assert has_seq(n.argv, ["--data-parallel-start-rank", "2"])
    assert "--headless" in n.argv
    assert "--port" not in n.argv
    assert "--host" not in n.argv
    assert h.dp_ranks == (0, 1) and n.dp_ranks == (2, 3)
    assert h.http_ranks == (0, 1, 2, 3)
    assert n.http_ranks == ()
    # a remote head address: no loopback override of VLLM_HOST_IP
    assert "VLLM_HOST_IP" not in h.env


def test_data_parallel_on_eight_gpus():
    h, n = plan(dp_specs(), gpu_inv(8))
    assert h.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert n.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert h.gpu_memory_utilization is None and n.gpu_memory_utilization is None


def test_data_parallel_on_four_cpu_cores():
    h, n = plan(dp_specs(device="cpu"), cpu_inv(4))
    assert h.env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert n.env["VLLM_CPU_OMP_THREADS_BIND"] == "2|3"
    assert h.device == n.device == "cpu"
    assert h.http_ranks == (0, 1, 2, 3)
    assert n.http_ranks == ()


def test_data_parallel_local_sets_host_ip():
    specs = data_parallel_specs("m", dp_size=2, nodes=2)
    h, n = plan(specs, cpu_inv(2))
    assert h.env["VLLM_HOST_IP"] == "127.0.0.1"
    assert n.env["VLLM_HOST_IP"] == "127.0.0.1"


def test_data_parallel_specs_uneven_split():
    with pytest.raises(SpecError) as e:
        data_parallel_specs("m", dp_size=3, nodes=2)
    assert e.value.field == "nodes"


# --------------------------------------------------------------------------- LaunchPlan


def test_same_process():
    specs = [ReplicaSpec(model="m", device="cpu")] * 2
    a = plan(specs, cpu_inv(4))
    b = plan(specs, cpu_inv(4))
    assert a[0].same_process(b[0]) and a[1].same_process(b[1])
    assert a == b
    c = plan([ReplicaSpec(model="m", device="cpu", cores=(2, 3)),
              ReplicaSpec(model="m", device="cpu", cores=(0, 1))], cpu_inv(4))
    assert c[0].port == a[0].port
    assert not a[0].same_process(c[0])
    assert not a[1].same_process(c[1])


def test_same_process_gpu_pinning_change():
    a = plan([ReplicaSpec(model="m")], gpu_inv(8))[0]
    b = plan([ReplicaSpec(model="m", devices=(3,))], gpu_inv(8))[0]
    assert a.argv == b.argv
    assert not a.same_process(b)
    assert a.same_process(plan([ReplicaSpec(model="m", devices=(0,))], gpu_inv(8))[0])


def test_launch_plan_names():
    p = plan([ReplicaSpec(model="m", device="cpu", name="alpha"), ReplicaSpec(model="m", device="cpu")], cpu_inv(2))
    assert [x.name for x in p] == ["alpha", "replica1"]
    assert [x.index for x in p] == [0, 1]
    assert isinstance(p[0], LaunchPlan)
    assert p[0].spec.name == "alpha"


# --------------------------------------------------------------------------- no network


def test_planning_does_not_touch_network(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise AssertionError("plan_replicas opened a socket")

    monkeypatch.setattr(socket, "socket", boom)
    monkeypatch.setattr(socket, "create_connection", boom)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    p = plan_replicas([ReplicaSpec(model=str(folder), device="cpu"), ReplicaSpec(model="org/name", device="cpu")],
                      cpu_inv(2), port_free=free, check_models=True)
    assert [x.port for x in p] == [8100, 8101]
    g = plan_replicas(dp_specs() + [ReplicaSpec(model="m", tp_size=2)], gpu_inv(8), port_free=free,
                      check_models=False)
    assert len(g) == 3


def test_explicit_port_colliding_with_dp_rpc_port():
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(model="m", device="cpu", dp_size=2, dp_rpc_port=9100),
              ReplicaSpec(model="m", device="cpu", port=9100)], cpu_inv(4))
    assert e.value.field == "replicas[1].port"


def test_unset_share_takes_what_explicit_shares_leave_on_a_gpu():
    inv = Inventory(cores=tuple(range(8)), gpus=(GPU(0, "H100", 80.0),), memory_gib=256)
    plans = plan_replicas([ReplicaSpec(model="m", devices=(0,), gpu_memory_utilization=0.5),
                           ReplicaSpec(model="m", devices=(0,))], inv, port_free=lambda h, p: True,
                          check_models=False)
    assert plans[1].gpu_memory_utilization == 0.45
    assert "0.45" in plans[1].argv


def test_gpu_ids_on_a_cpu_replica_are_refused():
    with pytest.raises(SpecError, match=r"replicas\[0\]\.devices"):
        plan_replicas([ReplicaSpec(model="m", devices=(0,))], Inventory(cores=(0, 1), memory_gib=24),
                      port_free=lambda h, p: True, check_models=False)


def test_replicas_sharing_a_gpu_start_one_after_another(tmp_path):
    from nbkit import Cluster
    inv = Inventory(cores=(0, 1), gpus=(GPU(0, "H100", 80.0), GPU(1, "H100", 80.0)), memory_gib=64)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    c = Cluster([ReplicaSpec(model=str(model), devices=(0,))] * 3 + [ReplicaSpec(model=str(model), devices=(1,))],
                inventory=inv, run_dir=tmp_path)
    assert c._waves(range(4)) == [[0, 3], [1], [2]]
    # scaling a GPU-sharing cluster keeps sharing that GPU
    assert [a for a, _, _ in c.scale_plan(5)] == ["start", "start", "start", "start", "start"]
    specs, plans, _ = c._scale_target(5)
    assert plans[4].devices == (1,)


# --------------------------------------------------------------------------- simulated replicas


def test_sim_replicas_take_no_cores_and_run_the_sim_server():
    # 40 simulated replicas on a 2-core machine: nothing is pinned, each is nbkit.sim.server
    specs = [ReplicaSpec(model="meta-llama/Llama-3.1-8B", engine="sim", sim_hardware="H100", tp_size=2)] * 40
    plans = plan(specs, cpu_inv(2))
    assert len(plans) == 40 and len({p.port for p in plans}) == 40
    p = plans[0]
    assert p.device == "sim" and p.pinning == "sim H100" and p.cores == () and p.devices == ()
    assert list(p.argv[1:5]) == ["-m", "nbkit.sim.server", "serve", "meta-llama/Llama-3.1-8B"]
    assert flag_value(p.argv, "--hardware") == "H100"
    assert flag_value(p.argv, "--tensor-parallel-size") == "2"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in p.env and "CUDA_VISIBLE_DEVICES" not in p.env
    # mixed with a real CPU replica, the real one still gets its core
    mixed = plan([ReplicaSpec(model="/m", cores=(1,)), ReplicaSpec(model="tiny", engine="sim")], cpu_inv(2))
    assert mixed[0].env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and mixed[1].device == "sim"


@pytest.mark.parametrize("kw, field", [
    ({"model": "no/such-model-anywhere"}, "replicas[0].model"),
    ({"model": "tiny", "sim_hardware": "TPU-v9"}, "replicas[0].sim_hardware"),
    ({"model": "tiny", "cores": (0,)}, "replicas[0].cores"),
])
def test_sim_replica_errors_name_the_field(kw, field):
    with pytest.raises(SpecError) as e:
        plan([ReplicaSpec(engine="sim", **kw)], cpu_inv(2), check_models=True)
    assert str(e.value).startswith(field)


def test_engine_must_be_vllm_or_sim():
    with pytest.raises(pydantic.ValidationError, match="engine"):
        ReplicaSpec(model="/m", engine="tgi")


@pytest.mark.parametrize("env, cores", [
    ({"GOMP_CPU_AFFINITY": "0"}, [0]), ({"GOMP_CPU_AFFINITY": "2 3"}, [2, 3]), ({"GOMP_CPU_AFFINITY": "4-6"}, [4, 5, 6]),
    ({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[1,3]"}, [1, 3]), ({"OMP_PLACES": "{5,7}"}, [5, 7]),
    ({}, []), ({"OMP_PLACES": "cores"}, []),
])
def test_a_forked_worker_finds_the_cores_vllm_set_aside_for_it(env, cores):
    # vLLM's multiprocessing executor names a worker's cores in the OpenMP variables of its runtime
    from nbkit.cluster.vllm_entry import omp_cores
    assert omp_cores(env) == cores
