"""The command line: argument handling and bad input, without launching anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nbkit import cli


def test_passthrough_flags_after_double_dash():
    own, rest = cli._split_passthrough(["serve", "m", "-n", "2", "--", "--max-num-seqs", "8", "--enable-prefix-caching"])
    assert own == ["serve", "m", "-n", "2"]
    assert rest == ["--max-num-seqs", "8", "--enable-prefix-caching"]
    args = cli.build_parser().parse_args(own)
    assert (args.cmd, args.model, args.num_instances, args.tp, args.device) == ("serve", "m", 2, 1, "auto")


@pytest.mark.parametrize("argv, needle", [
    (["serve", "/no/such/model", "-n", "1"], "model='/no/such/model'"),
    (["serve", "-n", "0"], "n=0"),
    (["serve", "-n", "9", "--device", "cpu"], "tp_size"),
    (["serve", "--tp", "0"], "tp_size"),
    (["serve", "-n", "2", "--policy", "fastest"], "unknown routing policy 'fastest'"),
    (["serve", "-n", "2", "--policy", "prefix_affinity:affinity_wieght=0.5"], "affinity_wieght"),
])
def test_serve_rejects_bad_input_before_launching(argv, needle, capsys, monkeypatch, tiny_model_path):
    monkeypatch.setenv("NBKIT_CACHE", str(__import__("pathlib").Path(tiny_model_path).parent))
    launched = []
    monkeypatch.setattr("nbkit.cluster.process.ReplicaProcess.spawn", lambda self: launched.append(self))
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err
    assert launched == []


def test_unknown_device_is_refused_by_argparse():
    r = subprocess.run([sys.executable, "-m", "nbkit", "serve", "--device", "tpu"], capture_output=True, text=True)
    assert r.returncode == 2 and "tpu" in r.stderr


@pytest.mark.processes
def test_tiny_model_command_builds_once(tmp_path):
    target = tmp_path / "tiny"
    r = subprocess.run([sys.executable, "-m", "nbkit", "tiny-model", str(target)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(target)
    assert (target / "config.json").exists() and (target / "tokenizer.json").exists()
    mtime = (target / "config.json").stat().st_mtime
    r = subprocess.run([sys.executable, "-m", "nbkit", "tiny-model", str(target)], capture_output=True, text=True)
    assert r.returncode == 0 and (target / "config.json").stat().st_mtime == mtime  # reused, not rebuilt


def test_sim_subcommand_reaches_the_simulator(tmp_path, capsys):
    from nbkit.cli import main
    from nbkit.traces import read_trace
    out = tmp_path / "calib.jsonl"
    assert main(["sim", "calibration-trace", "--output", str(out), "--bursts", "1,2", "--repeats", "1",
                 "--singles", "0"]) == 0
    assert len(read_trace(out)) == 3
    assert main(["sim", "--cluster-config", str(tmp_path / "missing.json"), "--dataset", str(out)]) == 2
    assert "missing.json" in capsys.readouterr().err
