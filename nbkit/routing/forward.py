"""One routed HTTP exchange, shared by the in-kernel client and the endpoint.

:class:`Forwarder` asks the router for a rank, sends the request there, and retries on another
rank on connection errors, 5xx or 429 *before the first byte reaches the caller*: a non-streamed
response is read whole before it is handed over, and for a stream the first chunk is read before
the stream is handed over. After that, the caller owns an :class:`Upstream` whose ``aiter()``
yields raw bytes, keeps the lease's token accounting up to date, and releases the lease in a
``finally`` (end, error, or the caller closing the stream — which closes the connection, and
vLLM then aborts the request).
"""

from __future__ import annotations

import asyncio
import logging
import json
from dataclasses import dataclass
from typing import AsyncIterator, Mapping

from nbkit.policies import RequestInfo
from nbkit.routing.router import Lease, Router
from nbkit.routing.state import RequestRecord
from nbkit.http.transport import DEFAULT_TRANSPORT, Transport, make_transport

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                        "transfer-encoding", "upgrade", "host", "content-length"})


def sse_events(chunk: bytes) -> int:
    """Data events in a raw SSE chunk, not counting ``[DONE]`` (each is about one token in vLLM)."""
    n = chunk.count(b"data:")
    if n and b"[DONE]" in chunk:
        n -= 1
    return n


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

    def raw_headers(self, content_length: int) -> list[tuple[bytes, bytes]]:
        """:meth:`headers` as ASGI wants them, with the length of the body read whole."""
        h = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self._passed_headers()]
        h.append((b"content-length", str(content_length).encode()))
        h.append((b"x-nbkit-rank", self.lease.rank.name.encode("latin-1")))
        return h

    async def aiter(self) -> AsyncIterator[bytes]:
        """The stream's raw bytes; releases the lease however the iteration ends."""
        outcome, error = "ok", ""
        try:
            if self.first:
                self._account(self.first)
                yield self.first
            async for chunk in self._it:
                self._account(chunk)
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except self._errors as e:
            outcome, error = "error", repr(e)
            raise
        finally:
            if self.status_code >= 400 and outcome == "ok":
                outcome = f"http_{self.status_code}"
            await self.response.aclose()
            self.lease.release(outcome, error)

    def _account(self, chunk: bytes) -> None:
        n = sse_events(chunk)
        if n:
            self.lease.token(n)

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
    """Send requests through a :class:`Router` with retries before the first byte."""

    def __init__(self, router: Router, transport: "Transport | str" = DEFAULT_TRANSPORT, *, retries: int = 2):
        """``transport``: a :class:`~nbkit.http.transport.Transport`, ``"http1"`` (default), ``"aiohttp"``, ``"httpx"`` or an
        httpx.AsyncClient (see :func:`nbkit.http.transport.make_transport`)."""
        if retries < 0:
            raise ValueError(f"retries={retries!r}: must be >= 0")
        self.router, self.transport, self.retries = router, make_transport(transport), retries

    async def open(self, method: str, path: str, *, content: bytes | None = None,
                   headers: Mapping[str, str] | None = None, info: RequestInfo | None = None, rank=None,
                   stream: bool = False, timeout: float | None = None,
                   roles: frozenset[str] | None = None) -> Upstream:
        info = info or RequestInfo(prompt_tokens=0, max_tokens=0)
        record = self.router.new_record(path, info)
        tried: set[str] = set()
        attempt = 0
        passed = {k: v for k, v in (headers or {}).items() if k.lower() not in HOP_BY_HOP}
        while True:
            lease = await self.router.acquire(info, rank=rank, exclude=tried, record=record, roles=roles)
            record.attempts = attempt + 1
            hdrs = dict(passed)
            hdrs.update(lease.rank.headers)  # (name, value) pairs, e.g. X-data-parallel-rank
            pool = [st for st in self.router.states if roles is None or getattr(st.rank, "role", "both") in roles]
            elsewhere = rank is None and len(tried) + 1 < len(pool)  # another rank is left to try
            # 5xx/429 are retried on another rank only; a transport error before the first byte
            # (refused, reset keep-alive connection, ...) also on the same rank when none is left
            can_retry = attempt < self.retries and elsewhere
            can_retry_transport = attempt < self.retries
            resp = None
            try:
                resp = await self.transport.send(method, lease.rank.url + path, content=content, headers=hdrs,
                                                 timeout=timeout)
                if resp.status_code in RETRY_STATUS:
                    if can_retry:
                        raise _Retry(f"HTTP {resp.status_code}")
                    self.router.report_failure(lease.state)
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
                if resp is not None:
                    await resp.aclose()
                self.router.report_failure(lease.state)
                if not (can_retry if isinstance(e, _Retry) else can_retry_transport):
                    lease.release("error", repr(e))
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
                if resp is not None:
                    await resp.aclose()
                lease.release("cancelled" if isinstance(e, asyncio.CancelledError) else "error", repr(e))
                raise


class _Retry(Exception):
    pass
