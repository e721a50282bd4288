"""One OpenAI-compatible endpoint over the replicas, on the same router as :class:`RoutedClient`.

    ep = Endpoint(cluster, port=8000, policy="least_load")    # or: cluster.endpoint(port=8000)
    ep.start()                                                 # serves on nbkit's loop thread
    # any OpenAI client: OpenAI(base_url=ep.url + "/v1", api_key="EMPTY")
    ep.stop()

Every path is forwarded (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/tokenize``, ``/pooling``, ...); SSE streams pass through chunk by chunk; a body without
``model`` gets the cluster's model; the caller's
``Authorization`` header goes to the replica. Its own routes: ``GET /health`` (200 while at
least one replica is healthy, else 503 with Retry-After) and ``GET /metrics`` (Prometheus,
``nbkit_`` prefix: requests, retries, picks per rank, queue wait, in-flight per rank, healthy
ranks, restarts, stream migrations, shed requests). A header ``X-nbkit-rank: <index or name>``
pins a request to a rank. Binds 127.0.0.1 unless told otherwise.

Faults: a replica that dies is out of routing at once (its Cluster says so); requests it held
are sent again elsewhere (non-streamed) or continued elsewhere (streams, see
:mod:`nbkit.routing.forward`); a stream that cannot continue ends with an SSE error event. With
no healthy rank, or when the admission queue sheds (``max_queue``, ``queue_timeout``), the answer
is OpenAI's error object with 503/429 and ``Retry-After``. A client that goes away before its
answer aborts the request on the replica (its connection there is closed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response, StreamingResponse

from nbkit import loop
from nbkit.routing.forward import Forwarder
from nbkit.routing.router import NoHealthyRank, Overloaded, Router
from nbkit.routing.state import RequestRecord
from nbkit.http.transport import ALL_ERRORS, DEFAULT_TRANSPORT, check_transport, make_transport

log = logging.getLogger(__name__)

ROUTED_POST = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/pooling",
               "/classify", "/score", "/rerank", "/v1/rerank", "/v1/score")


PROXIED_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH"})


def _error(status: int, message: str, kind: str, *, retry_after: float | None = None) -> JSONResponse:
    """OpenAI's error object (``{"error": {"message", "type", "param", "code"}}``)."""
    headers = {"retry-after": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status, headers=headers)


class Endpoint:
    """An HTTP server (uvicorn + starlette) in front of a Router."""

    def __init__(self, target, *, host: str = "127.0.0.1", port: int = 8000, policy="least_load",
                 router: Router | None = None, retries: int = 2, max_per_rank: int | None = None,
                 max_concurrency: int | None = None, timeout: float = 600.0, seed: int | None = None,
                 log_level: str = "warning", pd: bool | None = None, transport=DEFAULT_TRANSPORT,
                 max_connections: int | None = None, kv_index=None, tokenizer=None, max_queue: int | None = None,
                 queue_timeout: float | None = None, migration_limit: int = 3):
        if not 0 < port < 65536:
            raise ValueError(f"port={port!r}: must be in 1..65535")
        self.target = target
        self.default_model = getattr(target, "model", None)
        ranks = list(target.ranks) if hasattr(target, "ranks") else list(target)
        self.router = router or Router(ranks, policy, max_per_rank=max_per_rank, max_concurrency=max_concurrency,
                                       seed=seed, kv_index=kv_index, tokenizer=tokenizer, max_queue=max_queue,
                                       queue_timeout=queue_timeout)
        if isinstance(migration_limit, bool) or not isinstance(migration_limit, int) or migration_limit < 0:
            raise ValueError(f"migration_limit={migration_limit!r}: must be a whole number >= 0")
        self.migration_limit = migration_limit
        self.host, self.port, self.retries, self.log_level = host, port, retries, log_level
        from nbkit.routing.pd_forward import pd_connector
        self.pd_connector = pd_connector(target) if pd is not False else None
        if pd and self.pd_connector is None:
            raise ValueError("pd=True: the target has no prefill and decode ranks (see nbkit.cluster.pd.pd_specs)")
        check_transport(transport)
        self.timeout, self._transport_spec, self.max_connections = float(timeout), transport, max_connections
        self.registry = CollectorRegistry()
        self._m_requests = Counter("nbkit_requests", "Requests through the endpoint", ["path", "outcome"],
                                   registry=self.registry)
        self._m_picks = Counter("nbkit_picks", "Requests dispatched per rank", ["rank"], registry=self.registry)
        self._m_retries = Gauge("nbkit_retries_total", "Retries on another rank before the first byte",
                                registry=self.registry)
        self._m_queue = Histogram("nbkit_queue_wait_seconds", "Time waiting for admission", registry=self.registry,
                                  buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
        self._m_ttft = Histogram("nbkit_time_to_first_token_seconds", "TTFT seen by the endpoint",
                                 registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self._m_inflight = Gauge("nbkit_in_flight", "In-flight requests per rank", ["rank"], registry=self.registry)
        self._m_healthy = Gauge("nbkit_healthy_ranks", "Ranks that may be routed to (alive, health checks pass)",
                                registry=self.registry)
        self._m_restarts = Gauge("nbkit_restarts_total", "Replica restarts by the cluster's supervisor",
                                 registry=self.registry)
        self._m_migrations = Gauge("nbkit_migrations_total", "Streams continued on another rank after theirs broke",
                                   registry=self.registry)
        self._m_shed = Gauge("nbkit_shed_total", "Requests the admission queue shed (429/503)", registry=self.registry)
        self._m_kv_events = Gauge("nbkit_kv_events_total", "KV-cache events applied to the router's index",
                                  ["rank"], registry=self.registry)
        self._m_kv_blocks = Gauge("nbkit_kv_index_blocks", "KV-cache blocks the index holds", ["rank"],
                                  registry=self.registry)
        self._m_kv_gaps = Gauge("nbkit_kv_sequence_gaps_total", "KV-event batches missed (sequence gaps)", ["rank"],
                                registry=self.registry)
        self._m_kv_warm = Gauge("nbkit_kv_index_warm", "1 while the rank's index is trusted (0: cold)", ["rank"],
                                registry=self.registry)
        self._m_kv_fallbacks = Gauge("nbkit_kv_fallbacks_total", "Decisions a policy made by its fallback",
                                     registry=self.registry)
        self._m_kv_matched = Histogram("nbkit_kv_matched_tokens", "Prompt tokens cached on the chosen rank",
                                       registry=self.registry, buckets=(0, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192))
        self._requests_by: dict = {}  # labelled children, looked up once (labels() costs per call)
        self._picks_by: dict = {}
        self.router.listeners.append(self._observe)
        self._server = None
        self._task: asyncio.Task | None = None
        self._http = None
        self._fwd: Forwarder | None = None

    async def app(self, scope, receive, send) -> None:
        """The ASGI app: ``/health`` and ``/metrics`` here, every other path to a replica.

        A bare ASGI callable on purpose: a framework's router, request object and middleware
        stack would cost about as much CPU per request as the forwarding itself. Streams go out
        through starlette's StreamingResponse (it watches for the client going away)."""
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        try:
            if method == "GET" and path == "/health":
                response = await self._health()
            elif method == "GET" and path == "/metrics":
                response = await self._metrics()
            elif method in PROXIED_METHODS:
                response = await self._proxy(scope, receive)
                if type(response) is tuple:  # (status, headers, body): the common, non-streamed case
                    status, headers, body = response
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
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

    def _observe(self, rec: RequestRecord) -> None:
        key = (rec.path, rec.outcome)
        c = self._requests_by.get(key)
        if c is None:
            c = self._requests_by[key] = self._m_requests.labels(rec.path, rec.outcome)
        c.inc()
        if rec.rank:
            c = self._picks_by.get(rec.rank)
            if c is None:
                c = self._picks_by[rec.rank] = self._m_picks.labels(rec.rank)
            c.inc()
        self._m_queue.observe(rec.queue_wait_s)
        if rec.rank and self.router.policy.uses_kv_index:
            self._m_kv_matched.observe(rec.cached_tokens)
        if rec.ttft_s is not None and rec.outcome == "ok":
            self._m_ttft.observe(rec.ttft_s)

    # -- handlers --------------------------------------------------------------------------------
    async def _health(self) -> Response:
        healthy = self.router.healthy_ranks
        return JSONResponse({"healthy": healthy, "ranks": len(self.router.states)},
                            status_code=200 if healthy else 503, headers=None if healthy else {"retry-after": "5"})

    async def _metrics(self) -> Response:
        self._m_retries.set(self.router.counters["retries"])
        for s in self.router.states:
            self._m_inflight.labels(s.key).set(s.in_flight)
        self._m_healthy.set(len(self.router.healthy_ranks))
        self._m_restarts.set(getattr(self.target, "restarts", 0))
        self._m_migrations.set(self.router.counters["migrations"])
        self._m_shed.set(self.router.counters["shed"])
        self._m_kv_fallbacks.set(self.router.fallbacks)
        if self.router.kv_index is not None:
            for rank, snap in self.router.kv_index.snapshot().items():
                self._m_kv_events.labels(rank).set(snap["events"])
                self._m_kv_blocks.labels(rank).set(snap["blocks"])
                self._m_kv_gaps.labels(rank).set(snap["gaps"])
                self._m_kv_warm.labels(rank).set(1 if snap["warm"] else 0)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

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
        info = self.router.describe(parsed, headers)
        stream = bool(parsed and parsed.get("stream"))
        opening = asyncio.ensure_future(self._fwd.open(method, full_path, content=body or None, headers=headers,
                                                       info=info, rank=rank, stream=stream, timeout=self.timeout,
                                                       body=parsed))
        # a client that goes away before its answer: the request is cancelled, which closes its
        # connection to the replica, and vLLM aborts it
        watch = asyncio.ensure_future(receive())
        try:
            while True:
                await asyncio.wait((opening, watch), return_when=asyncio.FIRST_COMPLETED)
                if opening.done() or watch.result().get("type") == "http.disconnect":
                    break
                watch = asyncio.ensure_future(receive())  # not a disconnect: keep listening
        finally:
            if not opening.done():
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)
            watch.cancel()
        if opening.cancelled():
            return _error(499, "client went away", "ClientClosedRequest")
        try:
            up = opening.result()
        except (NoHealthyRank, Overloaded) as e:
            log.info("endpoint: %s %s -> %d: %s", method, path, e.status, e)
            return _error(e.status, str(e), "ServiceUnavailable" if e.status == 503 else "TooManyRequests",
                          retry_after=e.retry_after)
        except ValueError as e:
            return _error(400, str(e), "BadRequest")
        except ALL_ERRORS as e:
            log.warning("endpoint: no replica could serve %s %s: %r", method, path, e)
            return _error(503, f"no replica could serve the request: {e!r}", "ServiceUnavailable", retry_after=1)
        if up.stream:
            return StreamingResponse(up.aiter(), status_code=up.status_code, headers=up.headers())
        return up.status_code, up.raw_headers(len(up.body)), up.body

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
        self._fwd = Forwarder(self.router, self._http, retries=self.retries, migration_limit=self.migration_limit)
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
