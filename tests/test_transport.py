"""The three HTTP transports of the forwarder against real local servers (aiohttp.web on 127.0.0.1):
whole bodies, SSE streams, early close that reaches the server, failover on refused connections,
the connection-pool cap, and a clear error for a bad ``transport=``."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from nbkit.routing.client import RoutedClient
from nbkit.routing.rank import Rank
from nbkit.routing.endpoint import Endpoint
from nbkit.routing.forward import Forwarder
from nbkit.policies import RequestInfo
from nbkit.routing.router import Router
from nbkit.http.transport import AiohttpTransport, Http1Transport, HttpxTransport, make_transport



def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

TRANSPORT_NAMES = ["http1", "aiohttp", "httpx"]


def run(coro, timeout: float = 20.0):
    async def main():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(main())


class Backend:
    """A tiny OpenAI-ish server: /v1/completions whole or streamed, with hooks to observe it."""

    def __init__(self, name: str, n_chunks: int = 3, chunk_delay: float = 0.0):
        self.name, self.n_chunks, self.chunk_delay = name, n_chunks, chunk_delay
        self.requests = 0
        self.active = 0
        self.max_active = 0
        self.disconnected = asyncio.Event()
        self.peers: set = set()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.peers.add(request.transport.get_extra_info("peername"))
        try:
            body = await request.json()
            if not body.get("stream"):
                await asyncio.sleep(self.chunk_delay)
                return web.json_response({"backend": self.name, "echo": body,
                                          "usage": {"prompt_tokens": 7, "completion_tokens": 2}})
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            try:
                for i in range(self.n_chunks):
                    data = {"choices": [{"index": 0, "text": f"t{i}"}], "backend": self.name}
                    await resp.write(f"data: {json.dumps(data)}\n\n".encode())
                    await asyncio.sleep(self.chunk_delay)
                await resp.write(b"data: [DONE]\n\n")
            except (ConnectionResetError, asyncio.CancelledError):
                self.disconnected.set()
                raise
            await resp.write_eof()
            return resp
        finally:
            self.active -= 1

    async def __aenter__(self):
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc):
        await self._runner.cleanup()


def ranks_for(*urls: str) -> list[Rank]:
    return [Rank(replica=i, dp_rank=0, url=u, name=f"replica{i}") for i, u in enumerate(urls)]


POST = {"content-type": "application/json"}


@pytest.mark.parametrize("transport", TRANSPORT_NAMES)
def test_whole_body_and_stream(transport):
    async def main():
        async with Backend("b0") as b:
            router = Router(ranks_for(b.url), "round_robin")
            fwd = Forwarder(router, transport)
            try:
                up = await fwd.open("POST", "/v1/completions", content=json.dumps({"prompt": "hi"}).encode(),
                                    headers=POST, info=RequestInfo(prompt_tokens=1, max_tokens=2))
                assert up.status_code == 200 and not up.stream
                assert json.loads(up.body)["echo"] == {"prompt": "hi"}
                assert up.headers()["x-nbkit-rank"] == "replica0"
                assert up.record.outcome == "ok" and up.record.tokens_out == 2 and up.record.tokens_in == 7

                up = await fwd.open("POST", "/v1/completions", content=json.dumps({"stream": True}).encode(),
                                    headers=POST, info=RequestInfo(prompt_tokens=1, max_tokens=3), stream=True)
                assert up.stream
                raw = b"".join([c async for c in up.aiter()])
                assert raw.count(b"data:") == 4 and raw.endswith(b"data: [DONE]\n\n")
                assert up.record.outcome == "ok" and up.record.tokens_out == 3
                assert router.in_flight == 0
            finally:
                await fwd.transport.aclose()
                await router.aclose()
            assert len(b.peers) == 1  # the connection was kept alive and reused

    run(main())


@pytest.mark.parametrize("transport", TRANSPORT_NAMES)
def test_a_replicas_cookie_is_not_replayed_to_it_with_other_requests(transport):
    """A router is shared by many callers: a Set-Cookie from a replica must not be kept and sent
    with later requests; a caller's own Cookie header still passes through."""
    seen = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("cookie"))
        resp = web.json_response({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        resp.set_cookie("sticky", "abc")
        return resp

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        router = Router(ranks_for(f"http://127.0.0.1:{port}"), "round_robin")
        fwd = Forwarder(router, transport)
        try:
            for extra in ({}, {}, {"cookie": "mine=1"}):
                up = await fwd.open("POST", "/v1/completions", content=b"{}", headers={**POST, **extra},
                                    info=RequestInfo(prompt_tokens=1, max_tokens=1))
                assert up.status_code == 200
                passed = {k.lower(): v for k, v in up.headers().items()}
                assert "sticky=abc" in passed.get("set-cookie", "")  # passed back to its caller
        finally:
            await fwd.transport.aclose()
            await router.aclose()
            await runner.cleanup()

    run(main())
    assert seen == [None, None, "mine=1"]


@pytest.mark.parametrize("transport", TRANSPORT_NAMES)
def test_closing_a_stream_early_reaches_the_server(transport):
    async def main():
        async with Backend("b0", n_chunks=200, chunk_delay=0.02) as b:
            router = Router(ranks_for(b.url), "round_robin")
            fwd = Forwarder(router, transport)
            try:
                up = await fwd.open("POST", "/v1/completions", content=b'{"stream": true}', headers=POST,
                                    info=RequestInfo(prompt_tokens=1, max_tokens=200), stream=True)
                agen = up.aiter()
                await agen.__anext__()
                await agen.__anext__()
                await agen.aclose()
                assert up.record.outcome == "cancelled" and router.in_flight == 0
                await asyncio.wait_for(b.disconnected.wait(), 5)  # the server saw the connection go
            finally:
                await fwd.transport.aclose()
                await router.aclose()

    run(main())


@pytest.mark.parametrize("transport", TRANSPORT_NAMES)
def test_refused_connection_fails_over_and_all_refused_raises(transport):
    async def main():
        dead = f"http://127.0.0.1:{free_port()}"
        async with Backend("b1") as b:
            router = Router(ranks_for(dead, b.url), "round_robin")
            fwd = Forwarder(router, transport, retries=2)
            try:
                up = await fwd.open("POST", "/v1/completions", content=b"{}", headers=POST, rank=None,
                                    info=RequestInfo(prompt_tokens=1, max_tokens=1))
                assert json.loads(up.body)["backend"] == "b1"
                assert up.record.attempts == 2 and up.record.rank == "replica1"
                assert router.counters["retries"] == 1
            finally:
                await fwd.transport.aclose()
                await router.aclose()
        router = Router(ranks_for(dead), "round_robin")
        fwd = Forwarder(router, transport, retries=1)
        try:
            with pytest.raises(fwd.transport.errors):
                await fwd.open("POST", "/v1/completions", content=b"{}", headers=POST)
            assert router.in_flight == 0 and router.records[-1].outcome == "error"
        finally:
            await fwd.transport.aclose()
            await router.aclose()

    run(main())


@pytest.mark.parametrize("transport_cls", [Http1Transport, AiohttpTransport, HttpxTransport])
def test_max_connections_caps_concurrent_upstream_requests(transport_cls):
    async def main():
        async with Backend("b0", chunk_delay=0.1) as b:
            router = Router(ranks_for(b.url), "round_robin")
            fwd = Forwarder(router, transport_cls(max_connections=2))
            try:
                ups = await asyncio.gather(*(fwd.open("POST", "/v1/completions", content=b"{}", headers=POST)
                                             for _ in range(6)))
                assert all(u.status_code == 200 for u in ups)
                assert b.requests == 6 and b.max_active == 2
            finally:
                await fwd.transport.aclose()
                await router.aclose()

    run(main())


def test_bad_transport_is_refused_by_name():
    rk = ranks_for("http://127.0.0.1:1")
    for make in (lambda: RoutedClient(rk, model="m", transport="curl"),
                 lambda: Endpoint(rk, port=8000, transport="curl"),
                 lambda: make_transport("curl")):
        with pytest.raises(ValueError, match="transport='curl'"):
            make()


def test_local_client_runs_on_the_callers_loop_and_only_there():
    async def main():
        async with Backend("b0") as b0, Backend("b1") as b1:
            c = RoutedClient(ranks_for(b0.url, b1.url), "round_robin", model="m", local=True)
            async with c:
                outs = await asyncio.gather(*(c.complete("hi", max_tokens=1) for _ in range(4)))
                assert sorted(o["backend"] for o in outs) == ["b0", "b0", "b1", "b1"]
                chunks = [ch async for ch in c.stream_complete("hi", max_tokens=3)]
                assert [ch["choices"][0]["text"] for ch in chunks] == ["t0", "t1", "t2"]
                # nothing ran on nbkit's loop thread: the router's tasks live on this loop
                assert all(t.get_loop() is asyncio.get_running_loop() for t in c.router._tasks)
                with pytest.raises(RuntimeError, match="no blocking forms"):
                    c.sync.complete("hi")
            assert c.router.in_flight == 0 and len(c.records) == 5

    run(main())

    # a second live loop may not use a local client
    async def two_loops():
        c = RoutedClient(ranks_for("http://127.0.0.1:1"), model="m", local=True)
        await c._on(c._ensure())
        other = asyncio.new_event_loop()
        try:
            import threading
            err = {}

            def in_thread():
                async def go():
                    try:
                        await c.complete("x")
                    except RuntimeError as e:
                        err["e"] = e
                other.run_until_complete(go())
            t = threading.Thread(target=in_thread)
            t.start()
            t.join(10)
            assert "bound to the event loop" in str(err.get("e"))
        finally:
            other.close()
            await c.aclose()

    run(two_loops())


def test_endpoint_served_by_uvicorn_forwards_over_the_default_transport():
    """The real server path (uvicorn on a port, nbkit's loop thread), not an in-process ASGI call."""
    import httpx

    async def backends():
        async with Backend("b0") as b0, Backend("b1") as b1:
            ep = Endpoint(ranks_for(b0.url, b1.url), port=free_port(), policy="round_robin")
            await ep.astart()
            try:
                async with httpx.AsyncClient(base_url=ep.url, timeout=10) as http:
                    assert (await http.get("/health")).status_code == 200
                    picks = []
                    for _ in range(4):
                        r = await http.post("/v1/completions", json={"prompt": "hi", "model": "m"})
                        assert r.status_code == 200, r.text
                        picks.append((r.json()["backend"], r.headers["x-nbkit-rank"]))
                    assert sorted(picks) == [("b0", "replica0")] * 2 + [("b1", "replica1")] * 2
                    async with http.stream("POST", "/v1/completions",
                                           json={"prompt": "hi", "model": "m", "stream": True}) as r:
                        raw = b"".join([c async for c in r.aiter_bytes()])
                    assert raw.count(b"data:") == 4
                    assert (await http.request("OPTIONS", "/v1/completions")).status_code == 405
                    metrics = (await http.get("/metrics")).text
                    assert 'nbkit_picks_total{rank="replica0"} 3.0' in metrics
            finally:
                await ep.astop()

    run(backends(), timeout=40)
