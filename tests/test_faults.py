"""Fault handling of the routing mechanism, in process (no sockets to replicas, no vLLM): ranks
marked down leave routing at once, every candidate down -> NoHealthyRank (the endpoint's 503 +
Retry-After), the admission queue sheds beyond max_queue (429) or queue_timeout (503), a stream
that breaks migrates to another rank as one stream, and a client that goes away aborts upstream.
The same on real processes: tests/test_supervision.py (simulated replicas), tests/test_serve.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from test_router import Body, Fake, assert_clean, ep_client, make_endpoint, post, ranks, run, setup, until
from nbkit.policies import RequestInfo
from nbkit.routing.client import RoutedClient
from nbkit.routing.forward import Forwarder
from nbkit.routing.router import NoHealthyRank, Overloaded, Router


def test_a_rank_marked_down_gets_nothing_even_in_its_startup_grace_and_comes_back():
    fake, router, fwd = setup(2, "round_robin", startup_grace=60.0)

    async def main():
        router.mark_down(1, "exited with code -9")
        assert router.healthy_ranks == ["replica0"]
        for _ in range(4):
            up = await post(fwd)
            assert up.lease.rank.name == "replica0"
        await router.check_health_once()  # a health check does not bring a down rank back
        assert router.healthy_ranks == ["replica0"]
        router.mark_down(0, "stopped")
        with pytest.raises(NoHealthyRank, match="replica0 stopped; replica1 exited"):
            await post(fwd)
        with pytest.raises(NoHealthyRank, match="replica1 is down"):
            await post(fwd, rank=1)
        router.mark_up(1)
        assert (await post(fwd)).lease.rank.name == "replica1"

    run(main())
    assert [s.host for s in fake.seen if s.path == "/v1/completions"] == ["r0"] * 4 + ["r1"]
    assert_clean(router)
    assert [r.outcome for r in router.records][-3:] == ["error", "error", "ok"]


def test_queued_requests_are_re_placed_or_fail_when_their_ranks_go_down():
    fake, router, fwd = setup(2, "round_robin", max_per_rank=1)
    gate = asyncio.Event()

    async def held(request):
        await gate.wait()
        return httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    fake.on["r0"] = fake.on["r1"] = held

    async def main():
        busy = [asyncio.ensure_future(post(fwd)) for _ in range(2)]  # one on each rank
        await until(lambda: router.in_flight == 2)
        waiting = asyncio.ensure_future(router.acquire(RequestInfo(prompt_tokens=1, max_tokens=1)))
        await until(lambda: router.queued == 1)
        router.mark_down(0, "exited")
        router.mark_down(1, "exited")
        with pytest.raises(NoHealthyRank):
            await waiting  # nothing can take it any more: it does not wait forever
        gate.set()
        await asyncio.gather(*busy)

    run(main())
    assert router.queued == 0


def test_admission_queue_sheds_beyond_its_depth_and_its_wait():
    info = RequestInfo(prompt_tokens=1, max_tokens=1)

    async def main():
        router = Router(ranks(1), "round_robin", max_per_rank=1, max_queue=1, queue_timeout=0.3)
        held = await router.acquire(info)
        queued = asyncio.ensure_future(router.acquire(info))
        await until(lambda: router.queued == 1)
        with pytest.raises(Overloaded) as full:
            await router.acquire(info)
        assert full.value.status == 429 and full.value.retry_after >= 1 and "max_queue=1" in str(full.value)
        with pytest.raises(Overloaded) as late:
            await queued
        assert late.value.status == 503 and "queue_timeout=0.3" in str(late.value)
        assert router.queued == 0 and router.counters["shed"] == 2
        # a request that gets room within queue_timeout is served, not shed
        queued = asyncio.ensure_future(router.acquire(info))
        await until(lambda: router.queued == 1)
        held.release()
        (await queued).release()
        return router

    router = run(main())
    assert [r.outcome for r in router.records] == ["shed", "shed", "ok", "ok"]
    assert_clean(router)


@pytest.mark.parametrize("kw, match", [(dict(max_queue=-1), "max_queue=-1"), (dict(max_queue=1.5), "max_queue=1.5"),
                                       (dict(queue_timeout=0), "queue_timeout=0"),
                                       (dict(max_per_rank=0), "max_per_rank=0")])
def test_bad_admission_options_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        Router(ranks(1), **kw)


def test_endpoint_answers_shed_and_no_healthy_rank_in_openai_shape_with_retry_after():
    fake, ep = make_endpoint(2, max_per_rank=1, max_queue=0)
    gate = asyncio.Event()

    async def held(request):
        await gate.wait()
        return httpx.Response(200, json={"choices": [], "usage": {}})

    fake.on["r0"] = fake.on["r1"] = held

    async def main():
        async with await ep_client(ep) as c:
            busy = [asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "x", "model": "m"}))
                    for _ in range(2)]
            await until(lambda: ep.router.in_flight == 2)
            r = await c.post("/v1/completions", json={"prompt": "x", "model": "m"})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert r.json()["error"]["code"] == 429
            gate.set()
            await asyncio.gather(*busy)
            ep.router.mark_down(0, "exited")
            ep.router.mark_down(1, "exited")
            r = await c.post("/v1/completions", json={"prompt": "x", "model": "m"})
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert r.json()["error"]["type"] == "ServiceUnavailable"
            h = await c.get("/health")
            assert h.status_code == 503 and h.headers["retry-after"] and h.json()["healthy"] == []
            m = (await c.get("/metrics")).text
            assert "nbkit_shed_total 1.0" in m and "nbkit_healthy_ranks 0.0" in m

    run(main())


def _chunk(i: int, ids: list[int], finish=None, prompt=None) -> bytes:
    choice = {"index": 0, "text": f"t{i}", "logprobs": None, "finish_reason": finish, "stop_reason": None,
              "prompt_token_ids": prompt, "token_ids": ids}
    return b"data: " + json.dumps({"id": f"cmpl-{i // 100}", "object": "text_completion", "created": 1,
                                   "model": "m", "choices": [choice]}, separators=(",", ":")).encode() + b"\n\n"


def _usage(prompt: int, completion: int, rid: int) -> bytes:
    return b"data: " + json.dumps({"id": f"cmpl-{rid}", "object": "text_completion", "created": 1, "model": "m",
                                   "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                            "total_tokens": prompt + completion}}).encode() + b"\n\n"


def test_a_broken_stream_continues_on_another_rank_as_one_stream():
    """r0 streams 3 of 6 tokens and dies; r1 gets prompt ids + the 3 generated ids and 3 tokens to
    go, and the caller reads one stream: one id, 6 tokens, usage 4 + 6, no token ids it did not ask for."""
    fake, router, fwd = setup(2, "round_robin")
    first = [_chunk(0, [11], prompt=[1, 2, 3, 4]), _chunk(1, [12]), _chunk(2, [13])]
    fake.on["r0"] = lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"},
                                                   stream=Body(first, error=httpx.ReadError("connection reset")))
    sent = []

    def second(request):
        sent.append(json.loads(request.content))
        rest = [_chunk(100, [14], prompt=[1, 2, 3, 4, 11, 12, 13]), _chunk(101, [15]), _chunk(102, [16], "length"),
                _usage(7, 3, 1), b"data: [DONE]\n\n"]
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Body(rest))

    fake.on["r1"] = second
    body = {"model": "m", "prompt": "four token prompt", "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}

    async def main():
        up = await fwd.open("POST", "/v1/completions", content=json.dumps(body).encode(), body=body, stream=True,
                            info=RequestInfo(prompt_tokens=4, max_tokens=6))
        out = b""
        async for chunk in up.aiter():
            out += chunk
        return out

    out = run(main())
    events = [e.removeprefix(b"data: ") for e in out.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    data = [json.loads(e) for e in events[:-1]]
    assert {d["id"] for d in data} == {"cmpl-0"}
    assert [d["choices"][0]["text"] for d in data if d["choices"]] == ["t0", "t1", "t2", "t100", "t101", "t102"]
    assert all(d["choices"][0]["token_ids"] is None for d in data if d["choices"])
    assert data[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    assert sent[0]["prompt"] == [1, 2, 3, 4, 11, 12, 13] and sent[0]["max_tokens"] == 3
    rec = router.records[-1]
    assert (rec.outcome, rec.migrations, rec.tokens_out, rec.rank, rec.attempts) == ("ok", 1, 6, "replica1", 2)
    assert router.counters["migrations"] == 1 and router.states[0].failures == 1
    assert_clean(router)


def test_a_client_that_goes_away_closes_the_upstream_connection():
    """The endpoint cancels a request whose client disconnected: the exchange with the replica is
    dropped (vLLM aborts a request whose connection closes), and the record says cancelled."""
    fake, ep = make_endpoint(1)
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(request):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return httpx.Response(200, json={})

    fake.on["r0"] = slow

    async def main():
        disconnect = asyncio.Event()
        sent = []

        async def receive():
            if not sent:
                sent.append(1)
                return {"type": "http.request", "body": json.dumps({"prompt": "x", "model": "m"}).encode(),
                        "more_body": False}
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
        task = asyncio.ensure_future(ep.app(scope, receive, send))
        await started.wait()
        disconnect.set()
        await asyncio.wait_for(task, 5)
        await asyncio.wait_for(cancelled.wait(), 5)

    run(main())
    assert [r.outcome for r in ep.router.records] == ["cancelled"]
    assert_clean(ep.router)


def test_a_client_that_goes_away_mid_stream_closes_the_upstream_stream():
    """A streaming client that disconnects after its first tokens: the endpoint stops relaying,
    closes the replica's stream (vLLM aborts it), says nothing more to the client, and the record
    says cancelled with the tokens it got; a second stream on the same endpoint is unaffected."""
    fake, ep = make_endpoint(1)
    gate = asyncio.Event()
    event = b'data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n'
    bodies = []

    async def streamed(request):
        body = Body([event] * 3 + [b"data: [DONE]\n\n"], gate=gate if not bodies else None)
        bodies.append(body)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)

    fake.on["r0"] = streamed

    async def one(disconnect_after_first: bool):
        gone = asyncio.Event()
        messages, first = [], asyncio.Event()
        request = [{"type": "http.request", "body": json.dumps(
            {"prompt": "x", "model": "m", "stream": True, "max_tokens": 3}).encode(), "more_body": False}]

        async def receive():
            if request:
                return request.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            messages.append(message)
            if message.get("body"):
                first.set()

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
        task = asyncio.ensure_future(ep.app(scope, receive, send))
        if disconnect_after_first:
            await asyncio.wait_for(first.wait(), 5)
            gone.set()
        await asyncio.wait_for(task, 5)
        return messages

    async def main():
        cut = await one(True)
        assert cut[0]["type"] == "http.response.start" and cut[0]["status"] == 200
        assert [m["body"] for m in cut[1:]] == [event]  # nothing after the client left, no final chunk
        whole = await one(False)
        assert b"".join(m.get("body", b"") for m in whole[1:]).count(b"data:") == 4
        assert whole[-1] == {"type": "http.response.body", "body": b"", "more_body": False}

    run(main())
    assert bodies[0].closed and bodies[0].sent == 1  # the replica's stream was closed after one event
    assert [r.outcome for r in ep.router.records] == ["cancelled", "ok"]
    assert [r.tokens_out for r in ep.router.records] == [1, 3]
    assert_clean(ep.router)


def test_client_over_a_cluster_that_was_never_started_says_so():
    class NotStarted:
        running = False
        model = "m"
        ranks = ranks(1)

    c = RoutedClient(NotStarted())
    with pytest.raises(RuntimeError, match="cluster not started"):
        asyncio.run(c.complete("hi"))
    c.close()


def test_forwarder_and_client_check_migration_limit():
    with pytest.raises(ValueError, match="migration_limit=-1"):
        Forwarder(Router(ranks(1)), Fake().client(), migration_limit=-1)
    with pytest.raises(ValueError, match="migration_limit=True"):
        RoutedClient(ranks(1), migration_limit=True)
