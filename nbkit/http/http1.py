"""A lean HTTP/1.1 client for forwarding: pooled keep-alive connections, httptools' parser.

The router sends one small request per call to a handful of replicas it knows, always with a body
length, and reads a response that is either whole or an SSE stream. For that, a general client
spends most of its time on things a router does not use (URL objects, cookie and redirect
handling, per-request trace hooks, multidict headers built twice). This one writes the request in
one ``write`` and feeds the response to ``httptools.HttpResponseParser`` (the C parser uvicorn
uses), which also undoes chunked framing. Driven as the forwarder drives it, it takes about half
of aiohttp's CPU per exchange and a tenth to a thirtieth of httpx's (``benchmarks/transports.py``;
``benchmarks/router_overhead.py`` measures what that makes of the endpoint)::

    pool = Http1Pool(timeout=600, connect_timeout=10)
    resp = await pool.request("POST", "http://127.0.0.1:8001/v1/completions",
                              content=b'{"prompt": "hi"}', headers={"content-type": "application/json"})
    resp.status_code, resp.headers["content-type"]
    body = await resp.aread()                # or: async for chunk in resp.aiter_bytes(): ...
    await resp.aclose()                      # unread: drops the connection, so the server aborts
    await pool.aclose()

What it does: keep-alive connections pooled per (scheme, host, port), newest reused first, ones
idle longer than ``keepalive_s`` closed; an optional cap on exchanges in flight
(``max_connections``, waiting FIFO); a connect timeout and a read timeout (longest silence while
waiting for bytes); TLS for ``https://``; back-pressure on streams (reading pauses while more than
1 MiB of an unread streamed body is buffered; a body read whole with ``aread`` is not paused); gzip/deflate bodies decoded, although it asks for ``identity``;
interim 1xx responses skipped. What it does not: redirects, cookies, proxies, HTTP/2, request
bodies other than bytes. Errors are :class:`Http1Error` subclasses; header names or values
containing CR/LF and characters outside latin-1 raise ValueError before anything is sent.
"""

from __future__ import annotations

import asyncio
import collections
import ssl as _ssl
import time
import zlib
from typing import AsyncIterator, Mapping

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["Http1Pool", "Http1Response", "Http1Error", "ConnectError", "ConnectTimeout", "ReadTimeout",
           "ServerDisconnected", "RemoteProtocolError"]

#: request headers this client sets itself (any given by the caller are dropped)
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                          "accept-encoding", "expect", "te", "upgrade", "proxy-connection"})
_PAUSE_AT = 1 << 20        # bytes of unread body at which reading pauses
_RESUME_AT = 1 << 18


class Http1Error(Exception):
    """The exchange failed in transit."""


class ConnectError(Http1Error):
    """The connection could not be opened (refused, unreachable)."""


class ConnectTimeout(ConnectError):
    """The connection was not open within ``connect_timeout``."""


class ReadTimeout(Http1Error):
    """No byte of the response arrived for ``timeout`` seconds."""


class ServerDisconnected(Http1Error):
    """The server closed the connection before the response was complete."""


class RemoteProtocolError(Http1Error):
    """The server's bytes are not a valid HTTP/1.1 response."""


class Http1Response:
    """A response whose head has arrived; the body is read with :meth:`aread` or :meth:`aiter_bytes`."""

    __slots__ = ("status_code", "headers", "_conn", "_chunks", "_buffered", "_done", "_exc", "_waiter",
                 "_decoder", "_slot", "_whole", "_loop")

    def __init__(self, conn: "_Connection", status: int, raw_headers: list[tuple[bytes, bytes]]):
        self.status_code = status
        self.headers = CIMultiDictProxy(CIMultiDict(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers))
        self._conn: _Connection | None = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._whole = False  # aread(): the caller wants all of it, so back-pressure does not apply
        self._done = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._slot = conn.slot
        conn.slot = None
        self._loop = conn.pool._loop  # its pool's loop: asyncio.get_running_loop() costs a getpid() call
        enc = self.headers.get("content-encoding", "identity").strip().lower()
        if enc in ("identity", ""):
            self._decoder = None
        elif enc in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(47)  # gzip or zlib header, detected
        else:
            raise RemoteProtocolError(f"content-encoding {enc!r} was not asked for and cannot be decoded")

    # -- fed by the connection -------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        if self._decoder is not None:
            data = self._decoder.decompress(data)
            if not data:
                return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _PAUSE_AT and self._conn is not None and not self._whole:
            self._conn.pause()
        self._wake()

    def _end(self, exc: BaseException | None = None) -> None:
        if self._done:
            return
        if exc is None and self._decoder is not None:
            tail = self._decoder.flush()
            if tail:
                self._chunks.append(tail)
        self._done, self._exc, self._conn = True, exc, None
        self._free_slot()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _free_slot(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()

    # -- read by the caller ----------------------------------------------------------------------
    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked framing and gzip undone)."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered < _RESUME_AT and self._conn is not None:
                    self._conn.resume()
                yield chunk
            elif self._done:
                if self._exc is not None:
                    raise self._exc
                return
            else:
                await self._wait()

    async def aread(self) -> bytes:
        """The whole body (held in memory anyway: reading is not paused for it)."""
        self._whole = True
        if self._conn is not None:
            self._conn.resume()  # a body over the pause threshold may have stopped the reading already
        while not self._done:
            await self._wait()
        if self._exc is not None:
            raise self._exc
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    async def aclose(self) -> None:
        """Done with it: a body not read to the end closes the connection (the server sees the
        client go away, which is how vLLM learns to abort a request)."""
        if not self._done:
            conn = self._conn
            self._end(ServerDisconnected("response closed before its end"))
            if conn is not None:
                conn.drop()
        self._chunks.clear()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self, pool: "Http1Pool", key: tuple):
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.slot = None                       # the pool's semaphore, released when the exchange ends
        self._head: asyncio.Future | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._resp: Http1Response | None = None
        self._head_only = False
        self._interim = False
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = 0.0
        self._last = 0.0

    # -- exchange --------------------------------------------------------------------------------
    def start(self, data: bytes, head_only: bool, timeout: float | None) -> asyncio.Future:
        if self.transport.is_closing():  # the server closed it while it sat in the pool (a killed replica)
            raise ServerDisconnected("the server closed the connection before the request was sent")
        loop = self.pool._loop
        self._head = loop.create_future()
        self._raw_headers, self._resp, self._head_only, self._interim = [], None, head_only, False
        if timeout:
            self._timeout, self._last = timeout, loop.time()
            self._timer = loop.call_later(timeout, self._check_timeout)
        self.transport.write(data)
        return self._head

    def _check_timeout(self) -> None:
        loop = self.pool._loop
        idle = loop.time() - self._last
        if idle < self._timeout:
            self._timer = loop.call_later(self._timeout - idle, self._check_timeout)
            return
        self._timer = None
        self._fail(ReadTimeout(f"no response bytes for {self._timeout:g} s"))
        self.drop()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, exc: BaseException) -> None:
        self._stop_timer()
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(exc)
        resp, self._resp = self._resp, None
        if resp is not None:
            resp._end(exc)
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.release()

    def drop(self) -> None:
        """Close without reuse."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._last = self.pool._loop.time()
        if self._head is None and self._resp is None:
            self._fail(RemoteProtocolError("bytes from the server between responses"))
            self.drop()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            cause = e.__context__       # a callback's own error (e.g. an unknown content-encoding)
            self._fail(cause if isinstance(cause, Http1Error) else RemoteProtocolError(f"invalid response: {e}"))
            self.drop()

    def eof_received(self):
        return False                   # close our side too

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool._forget(self)
        resp = self._resp
        if resp is not None and self._head is None and self._unframed():
            self._stop_timer()         # a body delimited by the connection's end: complete
            self._resp = None
            resp._end()
            return
        if self._head is not None or resp is not None:
            self._fail(ServerDisconnected(f"server closed the connection{': ' + repr(exc) if exc else ''}"))

    def _unframed(self) -> bool:
        h = self._resp.headers
        return "content-length" not in h and "chunked" not in h.get("transfer-encoding", "").lower()

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._interim, self._raw_headers = True, []   # 100 Continue, 103 Early Hints: skip
            return
        resp = self._resp = Http1Response(self, status, self._raw_headers)
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(resp)
        if self._head_only:            # a HEAD response has no body whatever its length says
            self._stop_timer()
            self._resp = None
            resp._end()
            self.drop()

    def on_body(self, body: bytes) -> None:
        if self._resp is not None:
            self._resp._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._stop_timer()
        resp, self._resp = self._resp, None
        keep = self.parser.should_keep_alive() and not self.closed
        if resp is not None:
            resp._end()
        if keep:
            self.pool._park(self)
        else:
            self.drop()


class Http1Pool:
    """Keep-alive HTTP/1.1 connections to any number of servers, on the loop that first uses it."""

    def __init__(self, *, timeout: float | None = 600.0, connect_timeout: float = 10.0,
                 max_connections: int | None = None, keepalive_s: float = 4.0, ssl: _ssl.SSLContext | None = None):
        """``keepalive_s``: a pooled connection idle this long is closed rather than reused
        (uvicorn, vLLM's server, closes its side after 5 s)."""
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections={max_connections!r}: must be >= 1 or None")
        self.timeout, self.connect_timeout, self.keepalive_s = timeout, connect_timeout, keepalive_s
        self.max_connections, self._ssl = max_connections, ssl
        self._idle: dict[tuple, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._targets: dict[str, tuple] = {}
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def _target(self, url: str) -> tuple[tuple, str, str]:
        """``url`` -> ((scheme, host, port), host header, request target); the part before the path is cached."""
        i = url.find("/", url.find("://") + 3)
        base, target = (url, "/") if i < 0 else (url[:i], url[i:])
        hit = self._targets.get(base)
        if hit is None:
            from urllib.parse import urlsplit
            u = urlsplit(base)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"url={url!r}: expected http:// or https://host[:port]/path")
            port = u.port or (443 if u.scheme == "https" else 80)
            host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
            hit = self._targets[base] = ((u.scheme, u.hostname, port), f"{host}:{port}")
        return hit[0], hit[1], target

    def _encode(self, method: str, target: str, host: str, content: bytes | None,
                headers: Mapping[str, str] | None) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\nhost: {host}\r\n"]
        n = 0
        if headers:
            for k, v in headers.items():
                if k.lower() not in _OWN_HEADERS:
                    lines.append(f"{k}: {v}\r\n")
                    n += 1
        extra = "".join(lines[1:])
        if extra.count("\n") != n or extra.count("\r") != n or "\n" in target or " " in target:
            bad = next((k for k, v in (headers or {}).items() if any(c in f"{k}{v}" for c in "\r\n")), "request target")
            raise ValueError(f"header {bad!r}: CR or LF in a header name or value (or a space in the path)")
        if content is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"content-length: {len(content or b'')}\r\n")
        lines.append("accept-encoding: identity\r\n\r\n")
        head = "".join(lines).encode("latin-1")  # UnicodeEncodeError is a ValueError
        return head + content if content else head

    async def _connect(self, key: tuple) -> _Connection:
        scheme, host, port = key
        ssl = (self._ssl or True) if scheme == "https" else None
        try:
            _, conn = await asyncio.wait_for(
                self._loop.create_connection(lambda: _Connection(self, key), host, port, ssl=ssl),
                self.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"{host}:{port}: not connected within {self.connect_timeout:g} s") from None
        except OSError as e:
            raise ConnectError(f"{host}:{port}: {e}") from e
        self._all.add(conn)
        return conn

    def _take(self, key: tuple) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing() and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.drop()
        return None

    def _park(self, conn: _Connection) -> None:
        if self.closed:
            conn.drop()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def request(self, method: str, url: str, *, content: bytes | None = None,
                      headers: Mapping[str, str] | None = None, timeout: float | None = None) -> Http1Response:
        """Send and wait for the response's head. ``timeout``: longest wait for the next byte
        (None: the pool's)."""
        if self.closed:
            raise RuntimeError("Http1Pool is closed")
        running = asyncio.get_running_loop()
        if self._loop is not running:
            if self._loop is not None:
                raise RuntimeError("Http1Pool used from another event loop than the one it started on "
                                   "(make one pool per loop)")
            self._loop = running
            if self.max_connections is not None:
                self._slots = asyncio.Semaphore(self.max_connections)
        key, host, target = self._target(url)
        method = method.upper()
        data = self._encode(method, target, host, content, headers)
        slot = self._slots
        if slot is not None:
            await slot.acquire()
        conn = None
        try:
            conn = self._take(key) or await self._connect(key)
            conn.slot = slot
            slot = None                # the connection (then the response) releases it
            return await conn.start(data, method == "HEAD", self.timeout if timeout is None else timeout)
        except BaseException:
            if slot is not None:
                slot.release()
            if conn is not None:       # cancelled or failed while waiting: the connection is unusable
                conn._fail(ServerDisconnected("exchange abandoned"))
                conn.drop()
            raise

    async def aclose(self) -> None:
        """Close every connection."""
        self.closed = True
        for conn in list(self._all):
            conn.drop()
        self._all.clear()
        self._idle.clear()

    def abandon(self) -> None:
        """Forget every connection (their loop has closed, and the sockets with it)."""
        self.closed = True
        self._all.clear()
        self._idle.clear()
