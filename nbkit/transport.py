"""HTTP transports for forwarding: aiohttp (the default, cheaper per request) or httpx.

The forwarder only needs "send a request, get a response whose body can be read whole or as a
stream, and close it"; both transports give the same small response interface (the one of
``httpx.Response``: ``status_code``, ``headers``, ``aiter_bytes()``, ``aread()``, ``aclose()``)::

    t = make_transport("aiohttp", timeout=600)          # or "httpx", or an httpx.AsyncClient
    resp = await t.send("POST", url, content=b"{...}", headers={"content-type": "application/json"})
    async for chunk in resp.aiter_bytes(): ...          # or: body = await resp.aread()
    await resp.aclose()                                   # unread stream: closes the connection
    await t.aclose()

``t.errors`` is the tuple of exceptions that mean "the exchange failed in transit" (refused,
reset, timed out): the forwarder retries those before the first byte.

Why two: per request, aiohttp costs about a quarter of httpx's CPU time (see
``benchmarks/router_overhead.py``), which is what a router in Python can spend; httpx stays
available (``transport="httpx"``) and is what the unit tests' ``httpx.MockTransport`` stand-ins
plug into. Both keep connections alive and pooled; ``max_connections`` caps the pool (None: no cap).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Mapping

import httpx

__all__ = ["Transport", "HttpxTransport", "AiohttpTransport", "make_transport", "check_transport", "TRANSPORTS", "ALL_ERRORS"]

TRANSPORTS = ("aiohttp", "httpx")


def _aiohttp_errors() -> tuple[type[BaseException], ...]:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp comes with vllm
        return ()
    return (aiohttp.ClientError,)


#: Every exception either transport raises for a failed exchange (for callers that catch them all).
ALL_ERRORS: tuple[type[BaseException], ...] = (httpx.HTTPError, asyncio.TimeoutError, *_aiohttp_errors())


class Transport:
    """Interface: ``send`` (response headers read, body not yet), ``aclose``, ``errors``."""

    name = "?"
    errors: tuple[type[BaseException], ...] = ()

    async def send(self, method: str, url: str, *, content: bytes | None = None,
                   headers: Mapping[str, str] | None = None, timeout: float | None = None):
        raise NotImplementedError

    async def aclose(self) -> None:
        pass

    def abandon(self) -> None:
        """Forget the pool without closing it: its event loop has closed, and its sockets with it."""


def _no_cookies():
    """A cookie jar that keeps nothing: a router must not store one replica's Set-Cookie and send
    it with other callers' requests (the callers' own Cookie headers pass through)."""
    from http.cookiejar import CookieJar, DefaultCookiePolicy
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


class HttpxTransport(Transport):
    """httpx.AsyncClient underneath (give one, e.g. with a MockTransport, or let it make one)."""

    name = "httpx"
    errors = (httpx.TransportError,)

    def __init__(self, client: httpx.AsyncClient | None = None, *, timeout: float = 600.0,
                 connect_timeout: float = 10.0, max_connections: int | None = None):
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._own = client is None
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout), cookies=_no_cookies(),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections or 512))

    async def send(self, method, url, *, content=None, headers=None, timeout=None) -> httpx.Response:
        t = httpx.Timeout(timeout, connect=self.connect_timeout) if timeout is not None else self.client.timeout
        req = self.client.build_request(method, url, content=content, headers=headers, timeout=t)
        return await self.client.send(req, stream=True)

    async def aclose(self) -> None:
        if self._own:
            await self.client.aclose()


class AiohttpResponse:
    """An aiohttp response behind httpx.Response's names (the subset the forwarder uses)."""

    __slots__ = ("_r",)

    def __init__(self, resp):
        self._r = resp

    @property
    def status_code(self) -> int:
        return self._r.status

    @property
    def headers(self):
        return self._r.headers

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        async for chunk in self._r.content.iter_any():
            yield chunk

    async def aread(self) -> bytes:
        return await self._r.read()

    async def aclose(self) -> None:
        r = self._r
        if r.content.at_eof():
            r.release()          # read to the end: the connection goes back to the pool
        else:
            r.close()            # unread (a stream the caller closed): drop it, the server aborts


class AiohttpTransport(Transport):
    """aiohttp.ClientSession underneath, made lazily on the loop that first sends."""

    name = "aiohttp"
    errors = (*_aiohttp_errors(), asyncio.TimeoutError)

    def __init__(self, *, timeout: float = 600.0, connect_timeout: float = 10.0,
                 max_connections: int | None = None, keepalive_s: float = 30.0):
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.max_connections, self.keepalive_s = max_connections, keepalive_s
        self._session = None
        self._timeouts: dict[float, object] = {}

    def _timeout(self, read: float | None):
        import aiohttp
        read = self.timeout if read is None else read
        t = self._timeouts.get(read)
        if t is None:
            t = self._timeouts[read] = aiohttp.ClientTimeout(total=None, connect=self.connect_timeout,
                                                             sock_read=read)
        return t

    def _ensure(self):
        if self._session is None or self._session.closed:
            import aiohttp
            connector = aiohttp.TCPConnector(limit=self.max_connections or 0, limit_per_host=0,
                                             keepalive_timeout=self.keepalive_s, use_dns_cache=True)
            # no cookie jar: a router must not keep one replica's Set-Cookie and send it with
            # other callers' requests (and the jar's per-request filtering costs CPU)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout(None),
                                                  auto_decompress=True, trust_env=False,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def send(self, method, url, *, content=None, headers=None, timeout=None) -> AiohttpResponse:
        resp = await self._ensure().request(method, url, data=content, headers=headers,
                                            timeout=self._timeout(timeout), allow_redirects=False)
        return AiohttpResponse(resp)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def abandon(self) -> None:
        # mark it closed, so aiohttp does not warn about an unclosed session at exit
        if self._session is not None and not self._session.connector.closed:
            self._session.connector._close()  # sync part of close(); with the loop closed it only sets the flag
        self._session = None


def check_transport(spec) -> None:
    """Raise ValueError naming ``transport`` unless ``spec`` is something make_transport takes."""
    if isinstance(spec, (Transport, httpx.AsyncClient)) or (isinstance(spec, str) and spec in TRANSPORTS):
        return
    raise ValueError(f"transport={spec!r}: expected one of {', '.join(TRANSPORTS)}, a Transport or an httpx.AsyncClient")


def make_transport(spec: str | Transport | httpx.AsyncClient = "aiohttp", *, timeout: float = 600.0,
                   connect_timeout: float = 10.0, max_connections: int | None = None) -> Transport:
    """``"aiohttp"`` | ``"httpx"`` | a Transport | an httpx.AsyncClient (used as is, not closed by us)."""
    if isinstance(spec, Transport):
        return spec
    if isinstance(spec, httpx.AsyncClient):
        return HttpxTransport(spec)
    if spec == "aiohttp":
        return AiohttpTransport(timeout=timeout, connect_timeout=connect_timeout, max_connections=max_connections)
    check_transport(spec)
    return HttpxTransport(timeout=timeout, connect_timeout=connect_timeout, max_connections=max_connections)
