"""One OpenAI-compatible endpoint over the replicas, on the same router as :class:`RoutedClient`.

    ep = Endpoint(cluster, port=8000, policy="least_load")    # or: cluster.endpoint(port=8000)
    ep.start()                                                 # serves on nbkit's loop thread
    # any OpenAI client: OpenAI(base_url=ep.url + "/v1", api_key="EMPTY")
    ep.stop()

Every path is forwarded (``/v1/completions``, ``/v1/chat/completions``, ``/tokenize``,
``/pooling``, ...); SSE streams pass through chunk by chunk; a body without ``model`` gets the
cluster's model; the caller's ``Authorization`` header goes to the replica. Its own routes:
``GET /health`` (200 while at least one replica is healthy, else 503 with Retry-After),
``GET /v1/models`` (every rank's models, each id once) and ``GET /metrics`` (Prometheus through
prometheus_client's ASGI app, gzip and OpenMetrics included; the metrics are read from the router
when scraped, see :mod:`nbkit.routing.prom`). A header ``X-nbkit-rank: <index or name>`` pins a
request to a rank (an unknown one: 400). Binds 127.0.0.1 unless told otherwise.

Faults: a replica that dies is out of routing at once (its Cluster says so); requests it held
are sent again elsewhere (non-streamed) or continued elsewhere (streams, see
:mod:`nbkit.routing.forward`); a stream that cannot continue ends with an SSE error event. With
no healthy rank, or when the admission queue sheds (``max_queue``, ``queue_timeout``), the answer
is OpenAI's error object with 503/429 and ``Retry-After``; a body that is not JSON gets 400, a
replica that does not answer within ``timeout`` 504, all in that shape. A client that goes away
before its answer aborts the request on the replica (its connection there is closed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
from prometheus_client import make_asgi_app
from starlette.responses import JSONResponse, Response

from nbkit import loop
from nbkit.policies import NoCandidateError
from nbkit.routing.forward import HOP_BY_HOP, Forwarder
from nbkit.routing.admission import TenantError, schedules_by_priority
from nbkit.routing.prom import EndpointMetrics
from nbkit.routing.router import Router
from nbkit.routing.tracing import make_tracing
from nbkit.http.http1 import ConnectTimeout, ReadTimeout
from nbkit.http.transport import ALL_ERRORS, DEFAULT_TRANSPORT, check_transport, make_transport

log = logging.getLogger(__name__)

ROUTED_POST = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/pooling",
               "/classify", "/score", "/rerank", "/v1/rerank", "/v1/score")


PROXIED_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH"})
#: what a timed-out exchange with a replica raises (any transport): the endpoint answers 504
TIMEOUTS = (asyncio.TimeoutError, TimeoutError, httpx.TimeoutException, ReadTimeout, ConnectTimeout)


def _error(status: int, message: str, kind: str, *, retry_after: float | None = None,
           param: str | None = None) -> JSONResponse:
    """OpenAI's error object (``{"error": {"message", "type", "param", "code"}}``): every answer that
    nbkit itself makes up (a replica's own errors pass through as they are)."""
    headers = {"retry-after": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


class _Stream:
    """A streamed answer on its way: the replica's response and the client's disconnect watch."""

    __slots__ = ("upstream", "watch")

    def __init__(self, upstream, watch: asyncio.Future):
        self.upstream, self.watch = upstream, watch


def _header(scope, name: bytes) -> bytes | None:
    """A request header's value (ASGI gives names in lower case)."""
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


class Endpoint:
    """An HTTP server (uvicorn + starlette) in front of a Router."""

    def __init__(self, target, *, host: str = "127.0.0.1", port: int = 8000, policy="least_load",
                 router: Router | None = None, retries: int = 2, max_per_rank: int | None = None,
                 max_concurrency: int | None = None, timeout: float = 600.0, seed: int | None = None,
                 log_level: str = "warning", pd: bool | None = None, transport=DEFAULT_TRANSPORT,
                 max_connections: int | None = None, kv_index=None, tokenizer=None, max_queue: int | None = None,
                 queue_timeout: float | None = None, migration_limit: int = 3, tracing=None, tenants=None,
                 vllm_priority: bool | None = None, interactive_headroom: int = 0, loras=None):
        if not 0 < port < 65536:
            raise ValueError(f"port={port!r}: must be in 1..65535")
        self.target = target
        self.default_model = getattr(target, "model", None)
        ranks = list(target.ranks) if hasattr(target, "ranks") else list(target)
        self.router = router or Router(ranks, policy, max_per_rank=max_per_rank, max_concurrency=max_concurrency,
                                       seed=seed, kv_index=kv_index, tokenizer=tokenizer, max_queue=max_queue,
                                       queue_timeout=queue_timeout, tenants=tenants,
                                       interactive_headroom=interactive_headroom, loras=loras,
                                       vllm_priority=schedules_by_priority(target) if vllm_priority is None
                                       else vllm_priority)
        if isinstance(migration_limit, bool) or not isinstance(migration_limit, int) or migration_limit < 0:
            raise ValueError(f"migration_limit={migration_limit!r}: must be a whole number >= 0")
        self.migration_limit = migration_limit
        self.tracing = make_tracing(tracing)  # OpenTelemetry spans per request (nbkit.routing.tracing)
        self.host, self.port, self.retries, self.log_level = host, port, retries, log_level
        from nbkit.routing.pd_forward import pd_connector
        self.pd_connector = pd_connector(target) if pd is not False else None
        if pd and self.pd_connector is None:
            raise ValueError("pd=True: the target has no prefill and decode ranks (see nbkit.cluster.pd.pd_specs)")
        check_transport(transport)
        self.timeout, self._transport_spec, self.max_connections = float(timeout), transport, max_connections
        self.metrics = EndpointMetrics(self.router, target)
        self.registry = self.metrics.registry
        self._metrics_app = make_asgi_app(self.registry)
        self.router.listeners.append(self.metrics.observe)
        self._server = None
        self._task: asyncio.Task | None = None
        self._http = None
        self._fwd: Forwarder | None = None

    async def app(self, scope, receive, send) -> None:
        """The ASGI app: ``/health`` and ``/metrics`` here, every other path to a replica.

        A bare ASGI callable on purpose: a framework's router, request object and middleware
        stack would cost about as much CPU per request as the forwarding itself. Streams go out
        chunk by chunk through :meth:`_relay`."""
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        try:
            if method == "GET" and path == "/health":
                response = await self._health()
            elif method == "GET" and path == "/metrics":
                await self._metrics_app(scope, receive, send)  # prometheus_client's: gzip, OpenMetrics
                return
            elif method == "GET" and path == "/v1/models" and not _header(scope, b"x-nbkit-rank"):
                response = await self._models(scope)
            elif method in PROXIED_METHODS:
                response = await self._proxy(scope, receive)
                if type(response) is tuple:  # (status, headers, body): the common, non-streamed case
                    status, headers, body = response
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    return
                if type(response) is _Stream:
                    await self._relay(response, send)
                    return
            else:
                response = _error(405, f"method {method} not allowed", "MethodNotAllowed")
        except Exception as e:  # noqa: BLE001 - answer 500 like a framework would, and say why
            log.exception("endpoint: %s %s failed inside nbkit", method, path)
            response = _error(500, f"nbkit endpoint: {e!r}", "InternalError")
        await response(scope, receive, send)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- handlers --------------------------------------------------------------------------------
    async def _health(self) -> Response:
        healthy = self.router.healthy_ranks
        return JSONResponse({"healthy": healthy, "ranks": len(self.router.states)},
                            status_code=200 if healthy else 503, headers=None if healthy else {"retry-after": "5"})

    async def _proxy(self, scope, receive):
        """Forward one request; returns ``(status, headers, body)`` or a streaming/error Response."""
        path = scope["path"]
        query = scope.get("query_string")
        full_path = path + "?" + query.decode("latin-1") if query else path
        method = scope["method"]
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _error(499, "client went away", "ClientClosedRequest")
            body += message.get("body", b"")
            more = message.get("more_body", False)
        # the Forwarder drops hop-by-hop headers; ASGI gives names in lower case
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        rank = headers.get("x-nbkit-rank")
        if rank is not None and rank.isdigit():
            rank = int(rank)
        parsed = None
        if method == "POST" and body and path in ROUTED_POST:
            try:
                parsed = json.loads(body)
            except ValueError:
                return _error(400, "request body is not valid JSON", "BadRequest")
        if isinstance(parsed, dict) and not parsed.get("model") and self.default_model:
            parsed["model"] = self.default_model  # so curl users may leave "model" out
            body = json.dumps(parsed).encode()
        if not isinstance(parsed, dict):
            parsed = None
        try:
            info = self.router.describe(parsed, headers)
        except TenantError as e:  # an unknown API key (401), tenant or priority (400), LoRA adapter (404)
            log.info("endpoint: %s %s -> %d: %s", method, path, e.status, e)
            return _error(e.status, str(e), getattr(e, "kind", None) or (
                "AuthenticationError" if e.status == 401 else "BadRequest"), param=e.param)
        stream = bool(parsed and parsed.get("stream"))
        opening = asyncio.ensure_future(self._fwd.open(method, full_path, content=body or None, headers=headers,
                                                       info=info, rank=rank, stream=stream, timeout=self.timeout,
                                                       body=parsed))
        # a client that goes away before its answer: the request is cancelled, which closes its
        # connection to the replica, and vLLM aborts it
        watch = asyncio.ensure_future(receive())
        keep_watch = False
        try:
            while True:
                await asyncio.wait((opening, watch), return_when=asyncio.FIRST_COMPLETED)
                if opening.done() or watch.result().get("type") == "http.disconnect":
                    break
                watch = asyncio.ensure_future(receive())  # not a disconnect: keep listening
            keep_watch = opening.done() and not opening.cancelled() and opening.exception() is None \
                and opening.result().stream  # the relay watches for the client going away from here on
            if keep_watch and watch.done() and watch.result().get("type") != "http.disconnect":
                watch = asyncio.ensure_future(receive())
        finally:
            if not opening.done():
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)
            if not keep_watch:
                watch.cancel()
        if opening.cancelled():
            return _error(499, "client went away", "ClientClosedRequest")
        try:
            up = opening.result()
        except NoCandidateError as e:  # no healthy rank (503), shed (429 or 503), the router closed (503)
            status = getattr(e, "status", 503)
            log.info("endpoint: %s %s -> %d: %s", method, path, status, e)
            return _error(status, str(e), "ServiceUnavailable" if status == 503 else "TooManyRequests",
                          retry_after=getattr(e, "retry_after", 1.0))
        except ValueError as e:  # e.g. X-nbkit-rank names no rank
            return _error(400, str(e), "BadRequest", param="x-nbkit-rank" if rank is not None else None)
        except TIMEOUTS as e:
            log.warning("endpoint: %s %s timed out: %r", method, path, e)
            return _error(504, f"no replica answered in time (timeout={self.timeout:g} s): {e!r}", "GatewayTimeout")
        except ALL_ERRORS as e:
            log.warning("endpoint: no replica could serve %s %s: %r", method, path, e)
            return _error(503, f"no replica could serve the request: {e!r}", "ServiceUnavailable", retry_after=1)
        if up.stream:
            return _Stream(up, watch)
        return up.status_code, up.raw_headers(len(up.body)), up.body

    async def _relay(self, stream: "_Stream", send) -> None:
        """Pass a stream to the client chunk by chunk, as it comes. The client going away (its
        ``receive()`` gives ``http.disconnect``) cancels the relay: the upstream iteration closes
        the replica's connection, vLLM aborts the request, and the lease is released as cancelled.

        This is starlette's StreamingResponse without its task group and cancel scope per
        request, which cost about a tenth of the endpoint's CPU per streamed request: the
        disconnect watch is the ``receive()`` future that :meth:`_proxy` already holds."""
        up, watch = stream.upstream, stream.watch
        task = asyncio.current_task()
        relaying = gone = False

        def on_watch(f: asyncio.Future) -> None:
            nonlocal gone
            if relaying and not f.cancelled() and f.exception() is None \
                    and f.result().get("type") == "http.disconnect":
                gone = True
                task.cancel()

        watch.add_done_callback(on_watch)
        chunks = up.aiter()
        try:
            relaying = True
            await send({"type": "http.response.start", "status": up.status_code, "headers": up.raw_headers()})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            relaying = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # our own cancel: the client is gone, there is nobody to tell
            log.debug("endpoint: request %d: the client went away mid-stream", up.record.id)
        finally:
            relaying = False
            watch.cancel()
            await chunks.aclose()  # a no-op after a full iteration; else closes the replica's stream
            await up.abandon()     # the iteration never started (cancelled before it): the same

    async def _models(self, scope) -> Response:
        """``GET /v1/models``: the models of every rank that is not down, each id once (the first
        rank's answer with the merged ``data``). No rank answers: the first replica error as it
        came, or 503."""
        query = scope.get("query_string")
        path = "/v1/models" + ("?" + query.decode("latin-1") if query else "")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k.decode("latin-1") not in HOP_BY_HOP}
        by_url: dict = {}
        for s in self.router.states:
            if not s.down:
                by_url.setdefault(s.rank.url, s.rank)  # data-parallel ranks share a server
        transport = self._fwd.transport

        async def one(rank):
            try:
                resp = await transport.send("GET", rank.url + path, headers={**headers, **dict(rank.headers)},
                                            timeout=min(self.timeout, 10.0))
                try:
                    return resp, await resp.aread()
                finally:
                    await resp.aclose()
            except ALL_ERRORS as e:
                return e, b""

        merged, seen, base, failed = [], set(), None, None
        for resp, raw in await asyncio.gather(*(one(r) for r in by_url.values())):
            if isinstance(resp, BaseException):
                continue
            if resp.status_code >= 400:
                failed = failed or (resp, raw)
                continue
            try:
                data = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(data, dict) or not isinstance(data.get("data"), list):
                continue
            base = base or data
            for m in data["data"]:
                key = m.get("id") if isinstance(m, dict) else json.dumps(m)
                if key not in seen:
                    seen.add(key)
                    merged.append(m)
        if base is not None:
            self.metrics.count_request(path, "ok")
            return JSONResponse({**base, "data": merged})
        if failed is not None:
            resp, raw = failed
            self.metrics.count_request(path, f"http_{resp.status_code}")
            passed = {k: v for k, v in resp.headers.items()
                      if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"}
            return Response(raw, status_code=resp.status_code, headers=passed)
        self.metrics.count_request(path, "error")
        why = "every rank is down" if not by_url else "no rank answered"
        return _error(503, f"no replica could list its models: {why}", "ServiceUnavailable", retry_after=1)

    # -- lifecycle -------------------------------------------------------------------------------
    @loop.on_loop
    async def astart(self) -> "Endpoint":
        """Listen on ``host:port`` and serve (on nbkit's loop); already serving: nothing to do."""
        import uvicorn

        if self._task is not None:
            return self  # e.g. `with cluster.endpoint(...) as ep:`
        from nbkit.http.ports import port_is_free
        if not port_is_free(self.host, self.port):
            raise ValueError(f"port={self.port!r}: already in use on {self.host}")
        adopt = getattr(self.target, "add_router", None)
        if adopt is not None:
            adopt(self.router)  # the cluster tells it about faults and scaling (again, after a stop)
        self._http = make_transport(self._transport_spec, timeout=self.timeout, max_connections=self.max_connections)
        self._fwd = Forwarder(self.router, self._http, retries=self.retries, migration_limit=self.migration_limit,
                              tracing=self.tracing)
        if self.pd_connector:
            from nbkit.routing.pd_forward import PDForwarder
            self._fwd = PDForwarder(self._fwd, self.pd_connector)
        await self.router.start()
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level=self.log_level,
                                access_log=False, lifespan="off", loop="none", timeout_graceful_shutdown=5,
                                proxy_headers=False, server_header=False, date_header=False, interface="asgi3")
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # not ours: the kernel/script owns signals
        self._task = asyncio.ensure_future(self._server.serve())
        t = time.monotonic()
        while not self._server.started:
            if self._task.done():
                exc = self._task.exception()
                self._task = None
                raise RuntimeError(f"endpoint could not listen on {self.host}:{self.port}: {exc!r}")
            if time.monotonic() - t > 30:
                raise RuntimeError(f"endpoint did not start on {self.host}:{self.port} within 30 s")
            await asyncio.sleep(0.02)
        log.info("endpoint: serving %s over %d ranks (policy %s)", self.url, len(self.router.states),
                 self.router.policy.name)
        return self

    start = loop.blocking(astart)

    @loop.on_loop
    async def astop(self) -> None:
        """Stop serving and close the router and the connections. Safe to call twice."""
        was_serving = self._task is not None
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except (asyncio.TimeoutError, Exception):
                self._task.cancel()
        self._task = self._server = None
        forget = getattr(self.target, "remove_router", None)
        if forget is not None:
            forget(self.router)
        await self.router.aclose()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if was_serving:
            log.info("endpoint: %s stopped", self.url)

    stop = loop.blocking(astop)

    def __enter__(self) -> "Endpoint":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def records_frame(self):
        import pandas as pd
        from dataclasses import asdict
        return pd.DataFrame([asdict(r) for r in self.router.records])
