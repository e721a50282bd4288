"""Faults on simulated replicas (real processes, real sockets, no vLLM): a replica SIGKILLed or
frozen is out of routing at once, restarted on its port and pinning, routed to again; requests it
held are answered elsewhere; streams it was generating continue on the other replica with the
exact token count; with nothing left to serve the endpoint answers 503 with Retry-After.
(tests/test_faults_cpu.py does the same through `nbkit serve` on real vLLM replicas.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from conftest import free_port, metric, wait_for
from nbkit import Cluster
from nbkit.routing.client import RoutedClientError


pytestmark = pytest.mark.processes  # simulated replicas / kernels: `make test`, not `make test-fast`


def sim_cluster(tmp_path, **kw) -> Cluster:
    """Two simulated replicas of the tiny model on the cpu profile (about 50 tokens/s a stream)."""
    kw.setdefault("stop_grace", 2.0)
    return Cluster.replicas(n=2, engine="sim", port_start=free_port(8760), run_dir=tmp_path / "run", **kw)


def kill(cluster: Cluster, i: int, sig=signal.SIGKILL) -> int:
    pid = cluster.process(i).pid
    os.killpg(pid, sig)
    return pid


def healthy(ep_url: str) -> list[str]:
    return httpx.get(ep_url + "/health", timeout=10).json()["healthy"]


def test_killed_replica_is_out_at_once_requests_answered_and_it_comes_back(tmp_path):
    events = []
    c = sim_cluster(tmp_path)
    c.start(timeout=120)
    try:
        c.add_fault_listener(lambda e, i, d: events.append((e, i)))
        ep = c.endpoint(port=free_port(8790), policy="round_robin")
        url, port1, pin1 = ep.url, c.plans[1].port, c.plans[1].pinning

        async def load(n: int):
            async with httpx.AsyncClient(base_url=url, timeout=60) as h:
                async def one(k):
                    return await h.post("/v1/completions", json={"prompt": f"request {k} " * 8, "max_tokens": 60,
                                                                 "ignore_eos": True})
                tasks = [asyncio.ensure_future(one(k)) for k in range(n)]
                t = time.monotonic()            # kill while replica1 holds some of them (poll, never assume)
                while ep.router.states[1].in_flight < 2:
                    assert time.monotonic() - t < 20, "replica1 never got a request"
                    await asyncio.sleep(0.01)
                old = kill(c, 1)
                t = time.monotonic()
                while "replica1" in healthy(url):   # (sync probe: fine, the load runs on the server side)
                    assert time.monotonic() - t < 1.5, "a dead replica stayed in routing"
                    await asyncio.sleep(0.05)
                out = await asyncio.gather(*tasks)
                return old, time.monotonic() - t, out

        old_pid, _, answers = asyncio.run(load(24))
        assert [r.status_code for r in answers] == [200] * 24, [r.text[:200] for r in answers if r.status_code != 200]
        assert all(r.json()["usage"]["completion_tokens"] == 60 for r in answers)
        frame = ep.records_frame()
        assert (frame["attempts"] > 1).any(), "no request was in flight on the killed replica"
        assert set(frame["outcome"]) == {"ok"}
        # the endpoint kept serving: replica0 alone
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30).status_code == 200
        assert c.state(1) in ("restarting", "starting", "healthy")
        wait_for(lambda: c.state(1) == "healthy" and "replica1" in healthy(url), 60, "replica1 back in routing")
        assert c.process(1).pid != old_pid
        assert (c.plans[1].port, c.plans[1].pinning) == (port1, pin1)
        assert c.restarts_of(1) == 1 and c.restarts == 1
        assert c.status_frame(probe=False)["restarts"].tolist() == [0, 1]
        assert metric(url, "nbkit_restarts_total") == 1.0
        assert metric(url, "nbkit_healthy_ranks") == 2.0
        r = httpx.post(url + "/v1/completions", json={"prompt": "y", "max_tokens": 2}, headers={"x-nbkit-rank": "1"},
                       timeout=30)
        assert r.status_code == 200 and r.headers["x-nbkit-rank"] == "replica1"
        ranks = {httpx.post(url + "/v1/completions", json={"prompt": "z", "max_tokens": 2}, timeout=30)
                 .headers["x-nbkit-rank"] for _ in range(4)}
        assert ranks == {"replica0", "replica1"}  # round robin reaches it again
        assert events == [("exited", 1), ("restarted", 1)]
        ep.stop()
    finally:
        c.stop()
    assert not c.running


def _stream(url: str, body: dict, kill_after: int, cluster: Cluster):
    """POST a stream to the endpoint; SIGKILL the replica serving it after ``kill_after`` events.
    Returns (the rank it started on, the parsed events)."""
    events, rank = [], None
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200
        rank = r.headers["x-nbkit-rank"]
        buf = b""
        for chunk in r.iter_bytes():
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                data = ev.decode().removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
                if len(events) == kill_after:
                    kill(cluster, int(rank.removeprefix("replica")))
    return rank, events


def test_streams_continue_on_the_other_replica_with_the_exact_token_count(tmp_path):
    c = sim_cluster(tmp_path)
    c.start(timeout=120)
    try:
        ep = c.endpoint(port=free_port(8790), policy="round_robin")
        body = {"prompt": "Tell me a long story. " * 4, "max_tokens": 120, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        first, events = _stream(ep.url + "/v1/completions", body, 20, c)
        assert events[-1] == "[DONE]"
        chunks = [e for e in events[:-1] if e.get("choices")]
        usage = events[-2]["usage"]
        assert usage["completion_tokens"] == 120 and usage["total_tokens"] == usage["prompt_tokens"] + 120
        assert len({e["id"] for e in events[:-1]}) == 1          # one stream, one id
        assert all("token_ids" not in ch["choices"][0] or ch["choices"][0]["token_ids"] is None for ch in chunks)
        rec = ep.router.records[-1]
        assert (rec.outcome, rec.migrations, rec.tokens_out) == ("ok", 1, 120)
        assert metric(ep.url, "nbkit_migrations_total") == 1.0

        # chat: the other replica continues the assistant message
        wait_for(lambda: len(healthy(ep.url)) == 2, 60, "both replicas back")
        chat = {"messages": [{"role": "user", "content": "Write a poem about routers."}], "max_tokens": 80,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        _, events = _stream(ep.url + "/v1/chat/completions", chat, 15, c)
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 80
        roles = [e for e in events[:-1] if e.get("choices") and e["choices"][0]["delta"].get("role")]
        assert len(roles) == 1 and len({e["id"] for e in events[:-1]}) == 1
        assert ep.router.records[-1].migrations == 1
        ep.stop()
    finally:
        c.stop()


def test_a_stream_that_cannot_continue_ends_with_an_error_event(tmp_path):
    c = sim_cluster(tmp_path, restart="never")
    c.start(timeout=120)
    try:
        ep = c.endpoint(port=free_port(8790), policy="round_robin", migration_limit=0)
        body = {"prompt": "Once upon a time " * 4, "max_tokens": 100, "ignore_eos": True, "stream": True}
        _, events = _stream(ep.url + "/v1/completions", body, 10, c)
        err = [e for e in events if isinstance(e, dict) and "error" in e]
        assert len(err) == 1 and err[0]["error"]["code"] == 503 and "broke" in err[0]["error"]["message"]
        assert events[-1] == "[DONE]"
        assert ep.router.records[-1].outcome == "error"
        # restart="never": it stays failed, the endpoint serves on the other one
        wait_for(lambda: c.state(0 if ep.router.records[-1].rank == "replica0" else 1) == "failed", 5, "failed state")
        r = httpx.post(ep.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        # the in-kernel client raises on a broken stream rather than ending it quietly
        client = c.client("round_robin", migration_limit=0)
        survivor = int(r.headers["x-nbkit-rank"].removeprefix("replica"))

        async def broken():
            got = 0
            async for _ in client.stream_complete("again " * 4, max_tokens=100, ignore_eos=True):
                got += 1
                if got == 5:
                    kill(c, survivor)
            return got

        with pytest.raises(RoutedClientError, match="broke"):
            asyncio.run(broken())
        client.close()
        # nothing left to serve: 503 with Retry-After, in OpenAI's error shape
        wait_for(lambda: healthy(ep.url) == [], 5, "no healthy rank")
        h = httpx.get(ep.url + "/health", timeout=10)
        assert h.status_code == 503 and int(h.headers["retry-after"]) >= 1
        r = httpx.post(ep.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert "no healthy rank" in r.json()["error"]["message"]
        ep.stop()
    finally:
        c.stop()


def test_frozen_replica_is_killed_and_restarted_and_a_crash_loop_is_given_up(tmp_path):
    events = []
    c = sim_cluster(tmp_path, unresponsive_after=3.0, max_restarts=1)
    c.start(timeout=120)
    try:
        c.add_fault_listener(lambda e, i, d: events.append((e, i, d)))
        client = c.client("round_robin")
        frozen = c.process(0).pid
        os.killpg(frozen, signal.SIGSTOP)  # alive, but answers nothing
        wait_for(lambda: c.state(0) == "restarting", 15, "the frozen replica to be taken out")
        assert "did not answer /health" in events[0][2]
        out = asyncio.run(client.complete("still served", max_tokens=3))
        assert out["nbkit"]["rank"] == "replica1"
        wait_for(lambda: c.state(0) == "healthy", 60, "replica0 restarted")
        assert c.process(0).pid != frozen and c.restarts_of(0) == 1
        # a second death within the window: max_restarts=1 -> it stays failed, with its log tail
        kill(c, 0)
        wait_for(lambda: c.state(0) == "failed", 10, "given up")
        assert [e[0] for e in events] == ["exited", "restarted", "exited", "failed"]
        assert "max_restarts=1" in events[-1][2]
        assert c.state(1) == "healthy"
        out = asyncio.run(client.complete("served by the survivor", max_tokens=3))
        assert out["nbkit"]["rank"] == "replica1"
        # the user takes it in hand: restart() brings it back and it is routed again
        c.restart(0)
        assert c.state(0) == "healthy"
        assert asyncio.run(client.complete("hi", max_tokens=2, rank=0))["nbkit"]["rank"] == "replica0"
        client.close()
    finally:
        c.stop()
