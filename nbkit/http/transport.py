"""HTTP transports for forwarding: ``http1`` (the default), aiohttp or httpx.

The forwarder only needs "send a request, get a response whose body can be read whole or as a
stream, and close it"; all three give the same small response interface (the one of
``httpx.Response``: ``status_code``, ``headers``, ``aiter_bytes()``, ``aread()``, ``aclose()``)::

    t = make_transport("http1", timeout=600)            # or "aiohttp", "httpx", an httpx.AsyncClient
    resp = await t.send("POST", url, content=b"{...}", headers={"content-type": "application/json"})
    async for chunk in resp.aiter_bytes(): ...          # or: body = await resp.aread()
    await resp.aclose()                                   # unread stream: closes the connection
    await t.aclose()

``t.errors`` is the tuple of exceptions that mean "the exchange failed in transit" (refused,
reset, timed out): the forwarder retries those before the first byte.

Why three: CPU per request is what a router in Python can spend. ``http1`` (:mod:`nbkit.http.http1`:
pooled connections and httptools' parser, nothing else) costs about half of aiohttp's CPU per
exchange and a tenth to a thirtieth of httpx's, as the forwarder drives them (see
``benchmarks/transports.py``; its effect on the endpoint:
``benchmarks/router_overhead.py``). aiohttp is there for what http1 leaves out (redirects,
proxies, cookies, other content encodings); httpx is what the unit tests'
``httpx.MockTransport`` stand-ins plug into. All keep connections alive and pooled;
``max_connections`` caps the exchanges in flight (None: no cap).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Mapping

import httpx

from nbkit.http.http1 import Http1Error, Http1Pool

__all__ = ["Transport", "Http1Transport", "HttpxTransport", "AiohttpTransport", "DEFAULT_TRANSPORT", "make_transport", "check_transport", "TRANSPORTS", "ALL_ERRORS"]

TRANSPORTS = ("http1", "aiohttp", "httpx")
#: what RoutedClient, Endpoint, Forwarder and the router's probes use unless told otherwise
DEFAULT_TRANSPORT = "http1"


def _aiohttp_errors() -> tuple[type[BaseException], ...]:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp comes with vllm
        return ()
    return (aiohttp.ClientError,)


#: Every exception either transport raises for a failed exchange (for callers that catch them all).
ALL_ERRORS: tuple[type[BaseException], ...] = (httpx.HTTPError, asyncio.TimeoutError, Http1Error,
                                               *_aiohttp_errors())


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


class Http1Transport(Transport):
    """:class:`nbkit.http.http1.Http1Pool` underneath (its responses already have the interface)."""

    name = "http1"
    errors = (Http1Error,)

    def __init__(self, *, timeout: float = 600.0, connect_timeout: float = 10.0,
                 max_connections: int | None = None):
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.pool = Http1Pool(timeout=timeout, connect_timeout=connect_timeout, max_connections=max_connections)

    async def send(self, method, url, *, content=None, headers=None, timeout=None):
        return await self.pool.request(method, url, content=content, headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self.pool.aclose()

    def abandon(self) -> None:
        self.pool.abandon()


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
                 max_connections: int | None = None, keepalive_s: float = 4.0):
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


def make_transport(spec: str | Transport | httpx.AsyncClient = DEFAULT_TRANSPORT, *, timeout: float = 600.0,
                   connect_timeout: float = 10.0, max_connections: int | None = None) -> Transport:
    """``"http1"`` | ``"aiohttp"`` | ``"httpx"`` | a Transport | an httpx.AsyncClient (used as is,
    not closed by us)."""
    if isinstance(spec, Transport):
        return spec
    if isinstance(spec, httpx.AsyncClient):
        return HttpxTransport(spec)
    if spec == "http1":
        return Http1Transport(timeout=timeout, connect_timeout=connect_timeout, max_connections=max_connections)
    if spec == "aiohttp":
        return AiohttpTransport(timeout=timeout, connect_timeout=connect_timeout, max_connections=max_connections)
    check_transport(spec)
    return HttpxTransport(timeout=timeout, connect_timeout=connect_timeout, max_connections=max_connections)
