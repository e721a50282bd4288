"""`nbkit serve` speaks `vllm serve` and `nbkit bench` speaks `vllm bench serve`: argv -> specs,
plans and endpoint options (pure, nothing launched), the help and version, a serve of simulated
replicas with vLLM's flags end to end, and a bench with vllm bench's spellings against one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from conftest import alive, free_ports, kill_tree, tree
from nbkit import cli
from nbkit.cluster.spec import GPU, Inventory

GPUS4 = Inventory(cores=tuple(range(8)), gpus=tuple(GPU(i, "H100", 80.0) for i in range(4)), memory_gib=256)
CPU2 = Inventory(cores=(0, 1), memory_gib=24)


def setup(argv: list[str], inventory=GPUS4):
    args, vllm_args = cli.parse_args(["serve", *argv])
    return args, vllm_args, cli.serve_setup(args, vllm_args, inventory=inventory)


def plans(s, model="m"):
    return s.plans(model, port_free=lambda h, p: True, check_models=False)


def flag_value(argv, flag):
    argv = list(argv)
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


# ---------------------------------------------------------------------------------- splitting argv
@pytest.mark.parametrize("argv, own, rest", [
    (["m", "-n", "2", "--max-num-seqs", "8", "--enable-prefix-caching"], ["m", "-n", "2"],
     ["--max-num-seqs", "8", "--enable-prefix-caching"]),
    (["--enable-prefix-caching", "m", "-tp", "2"], ["m", "-tp", "2"], ["--enable-prefix-caching"]),
    (["--max-num-seqs", "8", "m"], ["m"], ["--max-num-seqs", "8"]),         # a value, then the model
    (["--max-num-seqs", "8"], [], ["--max-num-seqs", "8"]),                 # a number is never the model
    (["m", "--kv-transfer-config", '{"kv_role":"kv_both"}', "-n", "2"], ["m", "-n", "2"],
     ["--kv-transfer-config", '{"kv_role":"kv_both"}']),
    (["m", "--served-model-name=x", "--port=9000", "-O3"], ["m", "--port=9000"], ["--served-model-name=x", "-O3"]),
    (["--model", "m", "--swap-space", "4", "-dp", "2"], ["--model", "m", "-dp", "2"], ["--swap-space", "4"]),
    (["m", "--seed", "-1"], ["m"], ["--seed", "-1"]),
])
def test_unknown_flags_and_their_values_go_to_vllm(argv, own, rest):
    assert cli.split_serve_args(argv) == (own, rest)


def test_everything_after_double_dash_still_goes_verbatim():
    args, vllm_args = cli.parse_args(["serve", "m", "--max-num-seqs", "4", "--", "--port", "1", "-n"])
    assert args.model == "m" and args.port == 8000 and args.num_instances == 1
    assert vllm_args == ["--max-num-seqs", "4", "--port", "1", "-n"]


def test_abbreviations_are_not_taken_for_nbkit_flags():
    # --max-num might abbreviate nothing of ours; --port-s must not become --port-start
    args, vllm_args = cli.parse_args(["serve", "m", "--port-s", "9"])
    assert args.port_start is None and vllm_args == ["--port-s", "9"]


# -------------------------------------------------------------------- the seed's vllm serve flags
def test_the_multi_instance_seed_flag_set_maps_to_specs_plans_and_the_endpoint():
    _, vllm_args, s = setup(["m", "--num-instances", "2", "-tp", "1", "--max-model-len", "1024", "--dtype",
                             "bfloat16", "--enforce-eager", "--cuda-devices", "2,3", "--max-batch-size", "32",
                             "--port", "9000", "--port-start", "9100", "--enable-request-affinity",
                             "--enable-prefix-caching"])
    assert vllm_args == ["--enable-prefix-caching"]
    assert s.policy == "session" and s.endpoint_options["max_per_rank"] == 32
    ps = plans(s)
    assert [p.port for p in ps] == [9100, 9101]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in ps] == ["2", "3"]  # only the GPUs given
    for p in ps:
        assert flag_value(p.argv, "--max-num-seqs") == "32"
        assert flag_value(p.argv, "--max-model-len") == "1024"
        assert flag_value(p.argv, "--dtype") == "bfloat16"
        assert p.argv.count("--enforce-eager") == 1 and "--enable-prefix-caching" in p.argv
        assert "--gpu-memory-utilization" not in p.argv  # one per GPU: vLLM's own default


def test_instances_sharing_a_gpu_get_092_over_n_unless_given():
    _, _, s = setup(["m", "-n", "3", "--cuda-devices", "0"])
    assert [flag_value(p.argv, "--gpu-memory-utilization") for p in plans(s)] == ["0.3067"] * 3
    assert {p.env["CUDA_VISIBLE_DEVICES"] for p in plans(s)} == {"0"}
    _, _, s = setup(["m", "-n", "3", "--cuda-devices", "0", "--gpu-memory-utilization", "0.25"])
    assert [flag_value(p.argv, "--gpu-memory-utilization") for p in plans(s)] == ["0.25"] * 3
    _, _, s = setup(["m", "-n", "4", "--cuda-devices", "0,1"])  # 2 per GPU, round robin
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans(s)] == ["0", "1", "0", "1"]
    assert {flag_value(p.argv, "--gpu-memory-utilization") for p in plans(s)} == {"0.46"}


def test_tensor_and_data_parallel_spellings():
    for tp in (["-tp", "2"], ["--tensor-parallel-size", "2"], ["--tp", "2"], ["--tensor-parallel-size=2"]):
        _, _, s = setup(["m", "-n", "2", *tp])
        assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans(s)] == ["0,1", "2,3"]
        assert all(flag_value(p.argv, "--tensor-parallel-size") == "2" for p in plans(s))
    _, _, s = setup(["m", "-dp", "2", "-tp", "2"])
    (p,) = plans(s)
    assert p.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and flag_value(p.argv, "--data-parallel-size") == "2"
    assert p.http_ranks == (0, 1)


def test_cpu_defaults_are_not_doubled_and_the_single_instance_serves_on_port():
    _, _, s = setup(["m", "--dtype", "float32", "--enforce-eager", "--max-batch-size", "8", "--port", "8123"],
                    inventory=CPU2)
    (p,) = plans(s)
    assert p.port == 8123 and flag_value(p.argv, "--dtype") == "float32" and p.argv.count("--enforce-eager") == 1
    assert flag_value(p.argv, "--max-num-seqs") == "8"


def test_max_per_rank_overrides_the_routers_share_of_max_batch_size():
    _, _, s = setup(["m", "-n", "2", "--max-batch-size", "16", "--max-per-rank", "4"])
    assert s.endpoint_options["max_per_rank"] == 4
    assert all(flag_value(p.argv, "--max-num-seqs") == "16" for p in plans(s))


@pytest.mark.parametrize("argv, needle", [
    (["m", "--cuda-devices", "0,7"], "GPU [7] is not visible"),
    (["m", "--cuda-devices", "0", "--device", "cpu"], "--cuda-devices places GPU replicas"),
    (["m", "--max-batch-size", "8", "--max-num-seqs", "4"], "give one of them"),
    (["m", "--model", "other"], "two models"),
])
def test_conflicting_flags_are_refused_naming_them(argv, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        setup(argv)


def test_autoscale_routes_on_port_even_with_one_instance_and_checks_its_range():
    _, _, s = setup(["m", "--port", "8123", "--autoscale", "min=1,max=2,ttft_p90_ms=300"], inventory=CPU2)
    (p,) = plans(s)
    assert p.port != 8123                      # the endpoint takes --port: replicas come and go behind it
    with pytest.raises(ValueError, match=re.escape("--autoscale: -n 3 is outside min=1..max=2")):
        setup(["m", "-n", "3", "--autoscale", "max=2"])


@pytest.mark.parametrize("argv", [["--gpu-memory-utilization", "1.5"], ["--cuda-devices", "a,b"],
                                  ["--max-batch-size", "0"], ["--port", "70000"], ["--autoscale", "max=2,speed=1"]])
def test_bad_values_fail_in_argparse(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["serve", "m", *argv])
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def test_bad_input_with_vllm_flags_fails_before_launching(capsys, monkeypatch):
    launched = []
    monkeypatch.setattr("nbkit.cluster.process.ReplicaProcess.spawn", lambda self: launched.append(self))
    assert cli.main(["serve", "/no/such/model", "-n", "2", "--enable-prefix-caching", "--max-num-seqs", "4"]) == 2
    assert "model='/no/such/model'" in capsys.readouterr().err and launched == []


def test_help_shows_every_option_with_its_default_and_version_prints(capsys):
    parser = cli.serve_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # the help wraps at the terminal's width
    for needle in ("-tp N, --tensor-parallel-size N", "--max-batch-size N", "--cuda-devices IDS",
                   "(default: 8000)", "default kv_aware", "(default: 600.0)", "vLLM's own flags"):
        assert needle in out, needle
    assert "(default: None)" not in out and "(default: False)" not in out
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and re.match(r"nbkit \d+\.\d+", capsys.readouterr().out)


# ---------------------------------------------------------------------- a serve of sim replicas
def test_serve_with_vllm_flags_starts_two_sim_replicas_with_progress(tmp_path):
    port, p0 = free_ports(2, 8740)
    out_path = tmp_path / "serve.out"
    proc = subprocess.Popen([sys.executable, "-m", "nbkit", "serve", "tiny", "--engine", "sim", "-n", "2",
                             "--port", str(port), "--port-start", str(p0), "--max-batch-size", "4",
                             "--max-model-len", "2048", "--enable-request-affinity", "--enable-prefix-caching"],
                            stdout=open(out_path, "w"), stderr=subprocess.STDOUT, text=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while f"endpoint http://127.0.0.1:{port}" not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.3)
        out = out_path.read_text()
        assert "nbkit: replica0 launched" in out and "nbkit: replica1 healthy in" in out  # progress, one line a stage
        assert "policy session" in out
        pids = [p for p in tree(proc.pid) if p != proc.pid]
        cmdlines = [" ".join(psutil.Process(p).cmdline()) for p in alive(pids)]
        servers = [c for c in cmdlines if "nbkit.sim.server" in c]
        assert len(servers) == 2, cmdlines
        assert all("--max-num-seqs 4" in c and "--max-model-len 2048" in c and "--enable-prefix-caching" in c
                   for c in servers), servers
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 2, "user": "u1"})
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_tree(alive(pids))


# ----------------------------------------------------------------------------------- nbkit bench
def bench_args(argv):
    args, _ = cli.parse_args(["bench", *argv])
    return args


def test_bench_takes_vllm_bench_serve_spellings(tmp_path):
    args = bench_args(["--base-url", "http://h:8000", "--dataset-name", "random", "--random-input-len", "32",
                       "--random-output-len", "8", "--random-range-ratio", "0.5", "--max-concurrency", "4",
                       "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path), "--result-filename",
                       "r.json", "--endpoint", "/v1/chat/completions", "--num-prompts", "5"])
    assert (args.url, args.workload, args.input_len, args.output_len, args.range_ratio, args.concurrency) == (
        "http://h:8000", "synthetic", 32, 8, 0.5, 4)
    assert args.no_progress and args.api == "chat"
    from nbkit.bench.cli import result_paths, run_kwargs
    result_paths(args)
    assert args.output == str(tmp_path / "r.csv") and args.summary == str(tmp_path / "r-summary.csv")
    assert args.summary_json == str(tmp_path / "r-summary.json")
    assert run_kwargs(args)["concurrency"] == 4 and run_kwargs(args)["progress"] is False
    assert bench_args(["--url", "u", "--dataset-name", "prefix_repetition"]).workload == "shared-prefix"
    assert bench_args(["--url", "u", "--dataset-name", "sharegpt", "--dataset-path", "x.json"]).dataset == "x.json"


def test_bench_workload_path_is_read_as_a_trace(tmp_path, tiny_model_path):
    from nbkit.bench.cli import build_workload, resolve_workload
    from nbkit.traces import TraceRequest, write_trace
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [TraceRequest(16, 4, 0), TraceRequest(24, 2, 500_000_000)])
    args = bench_args(["--url", "u", "--workload", str(trace)])
    resolve_workload(args)
    assert (args.workload, args.dataset) == ("trace", str(trace))
    wl = build_workload(args, tiny_model_path)
    assert [it.output_toks for it in wl.items] == [4, 2] and wl.items[1].arrival_s == pytest.approx(0.5)
    with pytest.raises(SystemExit):
        bench_args(["--url", "u", "--workload", str(tmp_path / "missing.jsonl")])


def test_bench_with_vllm_spellings_against_a_sim_replica_saves_results(tmp_path, capsys):
    from nbkit import Cluster
    c = Cluster.replicas("tiny", n=1, engine="sim", run_dir=tmp_path / "run", kv_events=False,
                         port_start=free_ports(1, 8750)[0])
    c.start(timeout=120, progress=False)
    try:
        rc = cli.main(["bench", "--base-url", c.urls[0], "--model", "tiny", "--dataset-name", "random",
                       "--random-input-len", "16", "--random-output-len", "4", "--num-prompts", "6",
                       "--max-concurrency", "2", "--disable-tqdm", "--save-result", "--result-dir",
                       str(tmp_path / "res"), "--result-filename", "run.csv"])
    finally:
        c.stop()
    assert rc == 0, capsys.readouterr()
    rows = (tmp_path / "res" / "run.csv").read_text().splitlines()
    assert len(rows) == 7
    summary = json.loads((tmp_path / "res" / "run-summary.json").read_text())
    assert len(summary) == 1 and os.path.exists(tmp_path / "res" / "run-summary.csv")


# ------------------------------------------------------------------- real vLLM (the slow tier)
@pytest.mark.vllm
def test_serve_with_the_seed_flag_set_starts_two_vllm_replicas(tiny_model_path, tmp_path):
    port, p0 = free_ports(2, 8760)
    out_path = tmp_path / "serve.out"
    proc = subprocess.Popen([sys.executable, "-m", "nbkit", "serve", tiny_model_path, "--num-instances", "2",
                             "--device", "cpu", "--max-model-len", "1024", "--dtype", "bfloat16", "--enforce-eager",
                             "--max-batch-size", "8", "--port", str(port), "--port-start", str(p0),
                             "--enable-request-affinity", "--enable-prefix-caching"],
                            stdout=open(out_path, "w"), stderr=subprocess.STDOUT, text=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 400
        while f"endpoint http://127.0.0.1:{port}" not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(1)
        out = out_path.read_text()
        for stage in ("launched", "loading weights", "KV cache", "healthy in"):
            assert f"nbkit: replica1 {stage}" in out, (stage, out)
        pids = [p for p in tree(proc.pid) if p != proc.pid]
        cmdlines = [" ".join(psutil.Process(p).cmdline()) for p in alive(pids)]
        servers = [c for c in cmdlines if "nbkit.cluster.vllm_entry" in c and "--port" in c]
        assert len(servers) >= 2, cmdlines
        assert all("--max-num-seqs 8" in c and "--max-model-len 1024" in c and "--enable-prefix-caching" in c
                   and c.count("--enforce-eager") == 1 for c in servers), servers
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120, json={
            "model": tiny_model_path, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True, "user": "u1"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_tree(alive(pids))


@pytest.mark.vllm
def test_serve_reports_vllms_own_error_for_a_bad_flag_before_the_endpoint_starts(tiny_model_path):
    port, p0 = free_ports(2, 8770)
    r = subprocess.run([sys.executable, "-m", "nbkit", "serve", tiny_model_path, "-n", "2", "--device", "cpu",
                        "--port", str(port), "--port-start", str(p0), "--no-such-vllm-flag", "3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "exited with code" in r.stderr and "no-such-vllm-flag" in r.stderr
    last = [ln for ln in r.stderr.splitlines() if ln.startswith("nbkit: replica")]
    assert last and "no-such-vllm-flag" in last[-1], r.stderr  # vLLM's complaint, last and on its own line
    assert "endpoint" not in r.stdout
