"""One routed HTTP exchange, shared by the in-kernel client and the endpoint.

:class:`Forwarder` asks the router for a rank, sends the request there, and retries on another
rank on connection errors, 5xx or 429 *before the first byte reaches the caller*: a non-streamed
response is read whole before it is handed over (so a replica that dies while generating it
costs a resend elsewhere, within the request's deadline ``timeout``), and for a stream the first
chunk is read before the stream is handed over. A failed or timed-out exchange closes its
connection first, so the replica aborts the request before it is sent anywhere else: nothing is
generated twice on purpose. After that, the caller owns an :class:`Upstream` whose ``aiter()``
yields raw bytes, keeps the lease's token accounting up to date, and releases the lease in a
``finally`` (end, error, or the caller closing the stream — which closes the connection, and
vLLM then aborts the request).

Stream migration: a streamed ``/v1/completions`` or ``/v1/chat/completions`` request (given as
``body=``) is sent with vLLM's ``return_token_ids`` (stripped again from what the caller sees,
:mod:`nbkit.routing.migrate`). If its replica dies after the first token, the stream continues on
another rank (prompt + generated token ids, remaining ``max_tokens``; chat: a continued
assistant message), at most ``migration_limit`` times; the caller sees one stream with one id and
consistent usage, and ``record.migrations`` says how often it moved. A stream that cannot
continue ends with an SSE error event in OpenAI's shape, never a hang or a dropped connection::

    fwd = Forwarder(router, migration_limit=3)
    up = await fwd.open("POST", "/v1/completions", content=raw, body=parsed, stream=True, info=info)
    async for chunk in up.aiter(): ...
"""

from __future__ import annotations

import asyncio
import logging
import json
import time
from dataclasses import dataclass
from typing import AsyncIterator, Mapping

from nbkit.policies import RequestInfo
from nbkit.routing import migrate
from nbkit.routing.router import Lease, Router
from nbkit.routing.state import RequestRecord
from nbkit.http.transport import DEFAULT_TRANSPORT, Transport, make_transport

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                        "transfer-encoding", "upgrade", "host", "content-length"})


def sse_events(chunk: bytes) -> int:
    """Data events in a raw SSE chunk, not counting ``[DONE]`` nor usage-only events (``"choices":
    []``, the last with ``include_usage``): each of the others is about one token in vLLM."""
    n = chunk.count(b"data:")
    if n and b"[DONE]" in chunk:
        n -= 1
    if n and b'"choices":' in chunk:
        n -= chunk.count(b'"choices":[]') + chunk.count(b'"choices": []')
    return max(0, n)


@dataclass
class Upstream:
    """A response that has started: status, headers, and the body (whole or as a stream)."""

    lease: Lease
    response: object              # httpx.Response or transport.AiohttpResponse
    stream: bool
    body: bytes = b""
    first: bytes = b""
    _it: AsyncIterator[bytes] | None = None
    _errors: tuple = ()
    data: object = None           # a whole JSON body, parsed once by finish() (None: not JSON)
    migration: "migrate.StreamState | None" = None   # a stream that may continue elsewhere
    forwarder: "Forwarder | None" = None
    path: str = ""
    headers_in: Mapping[str, str] | None = None
    timeout: float | None = None

    @property
    def status_code(self) -> int:
        return self.response.status_code

    @property
    def record(self) -> RequestRecord:
        return self.lease.record

    def _passed_headers(self):
        """The response headers that go on to the caller (no hop-by-hop, no content-encoding:
        the body is passed on decoded)."""
        for k, v in self.response.headers.items():
            lk = k.lower()
            if lk not in HOP_BY_HOP and lk != "content-encoding":
                yield k, v

    def headers(self) -> dict[str, str]:
        h = dict(self._passed_headers())
        h["x-nbkit-rank"] = self.lease.rank.name
        return h

    def raw_headers(self, content_length: int | None = None) -> list[tuple[bytes, bytes]]:
        """:meth:`headers` as ASGI wants them, with the length of a body read whole (None: a
        stream, sent chunked)."""
        h = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self._passed_headers()]
        if content_length is not None:
            h.append((b"content-length", str(content_length).encode()))
        h.append((b"x-nbkit-rank", self.lease.rank.name.encode("latin-1")))
        return h

    async def aiter(self) -> AsyncIterator[bytes]:
        """The stream's raw bytes; releases the lease however the iteration ends. A replica that
        breaks the stream is continued elsewhere (see the module docstring) or the stream ends with
        an SSE error event; the caller closing it aborts the request on the replica."""
        outcome, error = "ok", ""
        state = self.migration
        first = self.first
        try:
            while True:
                try:
                    if first:
                        out = self._pass(first, state)
                        first = b""
                        if out:
                            yield out
                    async for chunk in self._it:
                        out = self._pass(chunk, state)
                        if out:
                            yield out
                    if state is None or state.done:
                        break
                    # ended without [DONE]: the replica's own error event (withheld), or cut short
                    broken = StreamBroken(state.error or "the response ended before [DONE]")
                except self._errors as e:
                    broken = e
                # the replica broke the stream: count it towards its breaker, continue elsewhere if we can
                self.lease.router.report_failure(self.lease.state)
                if state is not None and state.done:
                    break
                if state is not None and state.finished:  # every token arrived; only the tail is missing
                    yield state.closing("")
                    break
                body = None
                if state is not None and not state.finished and self.forwarder is not None \
                        and state.migrations < self.forwarder.migration_limit:
                    body = state.continuation()
                moved = body is not None and await self.forwarder.resume(self, body, broken)
                first = self.first if moved else b""
                if not moved:
                    why = f"the stream broke on {self.lease.rank.name} after {self.record.tokens_out} tokens: {broken!r}"
                    log.warning("forward: request %d: %s; it cannot continue", self.record.id, why)
                    outcome, error = "error", repr(broken)
                    yield (state.closing(why) if state is not None else migrate.error_event(why))
                    break
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            if self.status_code >= 400 and outcome == "ok":
                outcome = f"http_{self.status_code}"
            if state is not None and state.exact:
                self.record.tokens_out = state.tokens  # counted from the token ids, across migrations
            await self.response.aclose()
            self.lease.release(outcome, error)

    async def abandon(self) -> None:
        """Give up a stream that was not (or not fully) iterated: close the replica's connection
        (vLLM aborts the request) and release the lease as cancelled. Nothing to do once
        :meth:`aiter` has ended, however it ended."""
        if not self.lease.released:
            await self.response.aclose()
            self.lease.release("cancelled")

    def _pass(self, chunk: bytes, state: "migrate.StreamState | None") -> bytes:
        """Count one raw chunk's tokens and return what the client gets of it. A stream that may
        move is parsed by its state anyway, which counts the token ids exactly; the others (and
        one whose chunks stopped carrying ids) are counted by their SSE events."""
        if state is None:
            n = sse_events(chunk)
            out = chunk
        else:
            before = state.tokens
            out = state.feed(chunk)
            n = state.tokens - before if state.exact else sse_events(chunk)
        if n:
            self.lease.token(n)
        return out

    def finish(self) -> None:
        """For a body read whole: take the token counts from ``usage`` and release (done by open())."""
        outcome = "ok" if self.status_code < 400 else f"http_{self.status_code}"
        try:
            self.data = json.loads(self.body)
            usage = self.data.get("usage") or {}
            if usage.get("prompt_tokens") is not None:
                self.record.tokens_in = usage["prompt_tokens"]
            if usage.get("completion_tokens") is not None:
                self.record.tokens_out = usage["completion_tokens"]
        except (ValueError, AttributeError):
            pass
        if self.record.ttft_s is None and self.status_code < 400:
            self.lease.first_token()
        self.lease.release(outcome)


class Forwarder:
    """Send requests through a :class:`Router` with retries before the first byte, and streams
    that continue on another rank when theirs dies (see the module docstring)."""

    def __init__(self, router: Router, transport: "Transport | str" = DEFAULT_TRANSPORT, *, retries: int = 2,
                 migration_limit: int = 3, tracing=None):
        """``transport``: a :class:`~nbkit.http.transport.Transport`, ``"http1"`` (default), ``"aiohttp"``, ``"httpx"`` or an
        httpx.AsyncClient (see :func:`nbkit.http.transport.make_transport`). ``migration_limit``:
        how often one stream may move to another rank (0: never; then streams pass untouched).
        ``tracing``: a :class:`~nbkit.routing.tracing.Tracing` that gets a span per request and
        per attempt (the attempt's ``traceparent`` goes to the replica)."""
        if retries < 0:
            raise ValueError(f"retries={retries!r}: must be >= 0")
        if isinstance(migration_limit, bool) or not isinstance(migration_limit, int) or migration_limit < 0:
            raise ValueError(f"migration_limit={migration_limit!r}: must be a whole number >= 0")
        self.router, self.transport, self.retries = router, make_transport(transport), retries
        self.migration_limit = migration_limit
        self.tracing = tracing

    async def open(self, method: str, path: str, *, content: bytes | None = None,
                   headers: Mapping[str, str] | None = None, info: RequestInfo | None = None, rank=None,
                   stream: bool = False, timeout: float | None = None,
                   roles: frozenset[str] | None = None, body: dict | None = None) -> Upstream:
        """Route and send one request. ``body``: the parsed JSON of ``content``, when the caller has
        it (a stream given its body can migrate). ``timeout``: the request's deadline, in seconds,
        over all attempts (also the longest silence of the replica)."""
        info = info or RequestInfo(prompt_tokens=0, max_tokens=0)
        record = self.router.new_record(path, info)
        self.router.admit(info, record)  # the tenant's rate limits: Throttled (429) over one
        if self.tracing is not None:
            self.tracing.begin(self.router, record, headers)
        state = None
        sent = body
        tok = self.router.tokenizer
        if tok is not None and info.token_ids is not None and body is not None and method == "POST":
            sent = tok.token_prompt(path, body, info.token_ids) or body  # tokenized once, here
        if body is not None and method == "POST":
            sent = self.router.admission.body_priority(sent, info)  # vLLM's own priority scheduling
        if stream and body is not None and self.migration_limit and rank is None and method == "POST":
            prepared = migrate.prepare(path.split("?", 1)[0], sent)
            if prepared is not None:
                sent, state = prepared
        if sent is not body:
            content = json.dumps(sent).encode()
        deadline = time.monotonic() + timeout if timeout else None
        passed = {k: v for k, v in (headers or {}).items() if k.lower() not in HOP_BY_HOP}
        up = await self._send(method, path, content, passed, info, record, rank=rank, stream=stream, roles=roles,
                              deadline=deadline)
        if up.stream and state is not None:
            up.migration, up.forwarder, up.path, up.headers_in = state, self, path, passed
            up.timeout = timeout
        return up

    async def _send(self, method: str, path: str, content: bytes | None, passed: dict, info: RequestInfo,
                    record: RequestRecord, *, rank=None, stream: bool, roles=None, deadline: float | None,
                    tried: set[str] | None = None, backdate: float = 0.0, keep_open: bool = False) -> Upstream:
        """The attempts of one exchange. ``keep_open``: the continuation of a migrating stream,
        whose times count from ``backdate`` seconds ago; any error status fails it, and a failure
        leaves the record open for the caller."""
        tried = set() if tried is None else tried
        attempt = 0
        while True:
            lease = await self.router.acquire(info, rank=rank, exclude=tried, record=record, roles=roles)
            if backdate:
                lease.backdate(backdate)
            if attempt or keep_open:
                record.attempts += 1
            hdrs = dict(passed)
            hdrs.update(lease.rank.headers)  # (name, value) pairs, e.g. X-data-parallel-rank
            span = None
            if self.tracing is not None:  # this attempt's traceparent: vLLM's spans join under it
                span, carrier = self.tracing.attempt(record, lease.rank.name, lease.rank.url + path)
                hdrs.update(carrier)
            pool = [st for st in self.router.states if roles is None or getattr(st.rank, "role", "both") in roles]
            elsewhere = rank is None and len(tried) + 1 < len(pool)  # another rank is left to try
            left = None if deadline is None else deadline - time.monotonic()
            in_time = left is None or left > 0.5
            # 5xx/429 are retried on another rank only; a transport error before the first byte
            # (refused, reset keep-alive connection, a replica that died, ...) also on the same rank
            # when none is left
            can_retry = attempt < self.retries and elsewhere and in_time
            can_retry_transport = attempt < self.retries and in_time
            resp = None
            try:
                resp = await self.transport.send(method, lease.rank.url + path, content=content, headers=hdrs,
                                                 timeout=left)
                if resp.status_code in RETRY_STATUS or (keep_open and resp.status_code >= 400):
                    if can_retry or keep_open:
                        raise _Retry(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
                    self.router.report_failure(lease.state)
                if span is not None:
                    self.tracing.attempt_done(span, status=resp.status_code)
                up = Upstream(lease, resp, stream, _errors=self.transport.errors)
                if stream and resp.status_code < 400:
                    up._it = resp.aiter_bytes()  # decoded: the content-encoding header is not passed on
                    try:
                        up.first = await up._it.__anext__()
                    except StopAsyncIteration:
                        up.first = b""
                else:
                    up.stream = False
                    up.body = await resp.aread()
                    await resp.aclose()
                    up.finish()
                return up
            except (*self.transport.errors, _Retry) as e:
                if span is not None and span.is_recording():
                    self.tracing.attempt_done(span, error=e)
                if resp is not None:
                    await resp.aclose()  # closes the connection unless the body was read: the replica aborts
                self.router.report_failure(lease.state)
                if not (can_retry if isinstance(e, _Retry) else can_retry_transport):
                    lease.release("retry" if keep_open else "error", repr(e))
                    raise
                lease.release("retry", repr(e))
                self.router.count("retries")
                log.info("forward: request %d failed on %s before its first byte (%s); retry %d %s",
                         record.id, lease.rank.name, e, attempt + 1,
                         "on another rank" if elsewhere else "on the same rank")
                if elsewhere:
                    tried.add(lease.rank.name)
                else:
                    await asyncio.sleep(0.05 * (attempt + 1))  # same rank again: give it a moment
                attempt += 1
            except BaseException as e:
                if span is not None and span.is_recording():
                    self.tracing.attempt_done(span, error=e)
                if resp is not None:
                    await resp.aclose()
                lease.release("retry" if keep_open else "cancelled" if isinstance(e, asyncio.CancelledError)
                              else "error", repr(e))
                raise

    async def resume(self, up: Upstream, body: dict, broken: BaseException) -> bool:
        """Move the broken stream ``up`` to another rank with the continuation ``body``; True when
        its first bytes are in (``up`` then reads from there)."""
        state, record, old = up.migration, up.record, up.lease
        gone = old.rank.name
        elapsed = time.perf_counter() - old.started
        await up.response.aclose()
        deadline = None if up.timeout is None else time.monotonic() + max(1.0, up.timeout - elapsed)
        try:
            nxt = await self._send("POST", up.path, json.dumps(body).encode(), dict(up.headers_in or {}), old.info,
                                   record, stream=True, deadline=deadline, tried={gone}, backdate=elapsed,
                                   keep_open=True)
        except Exception as e:  # noqa: BLE001 - no rank could take it: the stream ends with an error event
            log.warning("forward: request %d broke on %s after %d tokens (%r); no rank could continue it: %r",
                        record.id, gone, state.tokens, broken, e)
            return False
        old.release("retry", repr(broken))  # the record stays open: the request goes on over there
        record.migrations += 1
        self.router.count("migrations")
        state.resumed()  # counts the migration
        log.warning("forward: request %d broke on %s after %d tokens (%r); continued on %s (migration %d)",
                    record.id, gone, state.tokens, broken, nxt.lease.rank.name, state.migrations)
        up.lease, up.response, up._it, up.first = nxt.lease, nxt.response, nxt._it, nxt.first
        return True


class _Retry(Exception):
    pass


class StreamBroken(Exception):
    """A stream ended without its ``[DONE]`` (the replica sent an error event, or stopped short)."""
