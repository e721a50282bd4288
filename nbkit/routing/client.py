"""RoutedClient: one async client over all replicas of a Cluster, routed by a policy.

    from nbkit import Cluster, RoutedClient
    cluster = Cluster.replicas(n=2); cluster.start()
    client = RoutedClient(cluster, policy="least_load", max_per_rank=32)

    out = await client.complete("Hello", max_tokens=16)              # in a notebook cell
    out = await client.chat([{"role": "user", "content": "Hi"}], rank=1)
    async for chunk in client.stream_chat([{"role": "user", "content": "Hi"}]):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")
    client.sync.complete("Hello")                                     # blocking, for scripts
    client.policy = "prefix_affinity"                                 # switch live
    client.records_frame()                                            # one row per request

Servers nbkit did not start (any OpenAI-compatible ones, e.g. ``vllm serve`` on other hosts): give
their URLs, comma-separated or as a list, with or without ``/v1``; the model is read from the first
server's ``/v1/models`` when not given::

    client = RoutedClient("http://10.0.0.5:8000/v1,http://10.0.0.6:8000/v1", policy="least_load")
    client = RoutedClient(["http://10.0.0.5:8000", "http://10.0.0.6:8000"], model="my-model")

Where the HTTP runs. The router (its accounting, queue, scraper and health checks) lives on
nbkit's loop thread (:mod:`nbkit.loop`) and is shared by every caller:

- awaited from a Jupyter kernel's cell, a request crosses to nbkit's loop and back (about
  0.1 ms) and streams are bridged chunk by chunk: ipykernel stops running its loop between cells,
  which would strand connections, and an abandoned stream's clean-up, left on the kernel's loop;
- awaited from any other loop (``asyncio.run`` in a script, a load generator, a web server),
  the request runs on that loop with its own connection pool, and only the router is shared;
- ``client.sync.*`` (blocking, for scripts and other threads) runs on nbkit's loop.

``hop=True`` / ``hop=False`` overrides the first two choices.

Closing a stream early (``break``, ``aclose()``, cancelling the task) closes the connection to
the replica and vLLM aborts the request there.

``local=True`` keeps everything, the scraper too, on the first loop that uses the client (and
only that one; no ``.sync``, no nbkit thread)::

    async def main():
        async with RoutedClient(cluster, local=True) as client:
            await asyncio.gather(*(client.complete("Hi") for _ in range(100)))
    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import json
import sys
import threading
import weakref
from typing import Any, AsyncIterator, Sequence
from urllib.parse import urlsplit

from nbkit import loop
from nbkit.routing.forward import Forwarder
from nbkit.routing.rank import Rank
from nbkit.routing.admission import schedules_by_priority
from nbkit.routing.router import Router
from nbkit.routing.state import RequestRecord
from nbkit.routing.tracing import make_tracing
from nbkit.http.transport import DEFAULT_TRANSPORT, Transport, check_transport, make_transport


class RoutedClientError(RuntimeError):
    """A replica answered with an error status; ``status_code`` and ``body`` tell which."""

    def __init__(self, status_code: int, body: str, rank: str):
        self.status_code, self.body, self.rank = status_code, body, rank
        super().__init__(f"HTTP {status_code} from {rank}: {body[:500]}")


def worker_urls(urls) -> list[str]:
    """Base URLs of servers: ``"http://a:8000/v1,http://b:8001"`` or a list of such strings (each may
    hold commas too) -> ``["http://a:8000", "http://b:8001"]``. Raises ValueError naming a bad value.

    A URL is ``http(s)://host[:port]`` with nothing after it but ``/`` or ``/v1`` (a path prefix,
    as behind a proxy, is kept: ``http://gw/team-a/v1`` -> ``http://gw/team-a``)."""
    items = [urls] if isinstance(urls, str) else list(urls) if isinstance(urls, (list, tuple)) else None
    if items is None:
        raise ValueError(f"worker URLs {urls!r}: give a string of comma-separated URLs or a list of them")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"worker URL {item!r}: not a string")
        for raw in (u.strip() for u in item.split(",")):
            if raw:
                out.append(_base_url(raw))
    if not out:
        raise ValueError(f"worker URLs {urls!r}: no URL given")
    dup = sorted({u for u in out if out.count(u) > 1})
    if dup:
        raise ValueError(f"worker URL {dup[0]!r} given twice")
    return out


def _base_url(raw: str) -> str:
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"worker URL {raw!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"worker URL {raw!r}: expected http://host:port or https://host[:port] (optionally /v1)")
    if parts.query or parts.fragment or parts.username:
        raise ValueError(f"worker URL {raw!r}: no user, query or fragment, just http://host:port[/v1]")
    if port == 0:
        raise ValueError(f"worker URL {raw!r}: port 0 is not a server's port")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{parts.scheme}://{parts.netloc}{path}"


def ranks_from_urls(urls, name_prefix: str = "server") -> list[Rank]:
    """One :class:`Rank` per server URL (see :func:`worker_urls`): ``server0``, ``server1``, ..."""
    return [Rank(i, 0, u, f"{name_prefix}{i}") for i, u in enumerate(worker_urls(urls))]


def _is_urls(target) -> bool:
    return isinstance(target, str) or (isinstance(target, (list, tuple)) and bool(target)
                                       and all(isinstance(t, str) for t in target))


async def discover_model(transport: Transport, urls: Sequence[str], timeout: float = 5.0) -> str | None:
    """The first model id listed by ``GET /v1/models`` of the first server in ``urls`` that answers
    (``None`` if none does)."""
    for url in dict.fromkeys(urls):
        try:
            r = await transport.send("GET", url + "/v1/models", timeout=timeout)
            try:
                status, raw = r.status_code, await r.aread()
            finally:
                await r.aclose()
            data = json.loads(raw).get("data") if status == 200 else None
        except (*transport.errors, asyncio.TimeoutError, TimeoutError, ValueError, AttributeError):
            continue
        if isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("id"):
            return str(data[0]["id"])
    return None


def _ranks_of(target) -> list:
    return list(target.ranks) if hasattr(target, "ranks") else list(target)


def _in_kernel_thread() -> bool:
    """True on a Jupyter kernel's main thread (whose loop ipykernel pauses between cells)."""
    return "ipykernel" in sys.modules and threading.current_thread() is threading.main_thread()


_clients: "weakref.WeakSet[RoutedClient]" = weakref.WeakSet()


@atexit.register
def _forget_dead_loops() -> None:
    for c in list(_clients):
        c._drop_closed_loops()


class RoutedClient:
    """Completions, chat and streaming over the replicas of ``target``: a Cluster, a list of Ranks, or
    server URLs (``"http://a:8000/v1,http://b:8001/v1"`` or a list of URL strings)."""

    def __init__(self, target, policy="least_load", *, model: str | None = None, max_per_rank: int | None = None,
                 max_concurrency: int | None = None, retries: int = 2, timeout: float = 600.0,
                 api_key: str | None = None, seed: int | None = None, pd: bool | None = None,
                 transport=DEFAULT_TRANSPORT, max_connections: int | None = None, local: bool = False,
                 hop: bool | None = None, migration_limit: int = 3, tracing=None, **router_options):
        if local and hop:
            raise ValueError("hop=True: a local=True client never leaves its own loop")
        if _is_urls(target):
            target = ranks_from_urls(target)  # servers nbkit did not start
        self.target = target
        self.local = bool(local)
        self.hop = hop
        self._home = None  # local=True: the loop the client lives on
        self.model = model or getattr(target, "model", None)
        self.api_key = api_key
        self.timeout = float(timeout)
        self._transport_spec, self.max_connections = transport, max_connections
        check_transport(transport)
        router_options.setdefault("vllm_priority", schedules_by_priority(target))
        self.router = Router(_ranks_of(target), policy, max_per_rank=max_per_rank, max_concurrency=max_concurrency,
                             seed=seed, **router_options)
        self.retries = retries
        if isinstance(migration_limit, bool) or not isinstance(migration_limit, int) or migration_limit < 0:
            raise ValueError(f"migration_limit={migration_limit!r}: must be a whole number >= 0")
        self.migration_limit = migration_limit
        self.tracing = make_tracing(tracing)  # OpenTelemetry spans per request (nbkit.routing.tracing)
        from nbkit.routing.pd_forward import pd_connector
        self.pd_connector = pd_connector(target) if pd is not False else None
        if pd and self.pd_connector is None:
            raise ValueError("pd=True: the target has no prefill and decode ranks (see nbkit.cluster.pd.pd_specs)")
        # one connection pool (and the Forwarder over it) per loop that sends
        self._pools: dict[asyncio.AbstractEventLoop, tuple[Forwarder, Transport]] = {}
        self._started = False
        self.sync = _Sync(self)
        _clients.add(self)

    # -- configuration -----------------------------------------------------------------------------
    @property
    def policy(self):
        return self.router.policy

    @policy.setter
    def policy(self, spec) -> None:
        self.router.policy = spec  # the router swaps it under its lock

    @property
    def records(self) -> list[RequestRecord]:
        return list(self.router.records)

    def records_frame(self):
        """The request records as a pandas DataFrame (one row per request)."""
        import pandas as pd
        from dataclasses import asdict
        return pd.DataFrame([asdict(r) for r in self.router.records])

    def refresh_ranks(self) -> None:
        """Pick up the target Cluster's current ranks (after ``cluster.scale``)."""
        self.router.set_ranks(_ranks_of(self.target))  # under the router's lock

    # -- lifecycle ---------------------------------------------------------------------------------
    def _hop(self) -> bool:
        """Whether a call from the running loop crosses to nbkit's loop (see the module docstring)."""
        if self.local or loop.in_loop_thread():
            return False
        return _in_kernel_thread() if self.hop is None else bool(self.hop)

    def _on(self, coro):
        """Run ``coro`` where this call runs: on the caller's loop, or across on nbkit's."""
        if self._hop():
            return loop.wrap(coro)
        if self.local:
            running = asyncio.get_running_loop()
            if self._home is not None and self._home is not running and not self._home.is_closed():
                coro.close()
                raise RuntimeError("RoutedClient(local=True) is bound to the event loop that first used it; "
                                   "use one client per loop, or local=False")
        return coro

    def _at_router(self, coro):
        """Await ``coro`` on the loop the router's tasks live on (nbkit's, or local=True the home loop)."""
        return coro if self.local else loop.wrap(coro)

    async def _ensure(self):
        """The Forwarder of the running loop (made on first use); starts the router once."""
        running = asyncio.get_running_loop()
        pool = self._pools.get(running)
        if pool is not None:
            return pool[0]
        if not self._started:
            if self.local:
                self._home = running
            await self._at_router(self.router.start())
            self._started = True
        pool = self._pools.get(running)  # another first call on this loop may have made it
        if pool is None:
            self._drop_closed_loops()
            transport = make_transport(self._transport_spec, timeout=self.timeout, max_connections=self.max_connections)
            fwd = Forwarder(self.router, transport, retries=self.retries, migration_limit=self.migration_limit,
                            tracing=self.tracing)
            if self.pd_connector:
                from nbkit.routing.pd_forward import PDForwarder
                fwd = PDForwarder(fwd, self.pd_connector)
            pool = self._pools[running] = (fwd, transport)
        return pool[0]

    def _drop_closed_loops(self) -> None:
        """Forget the connection pools of loops that have closed (``asyncio.run`` returned)."""
        for lp, (_, transport) in list(self._pools.items()):
            if lp.is_closed():
                self._pools.pop(lp, None)
                transport.abandon()

    async def _aclose(self) -> None:
        """Close the router (on its loop) and every connection pool (each on its own loop)."""
        forget = getattr(self.target, "remove_router", None)
        if forget is not None:
            forget(self.router)  # a closed client's router no longer follows the cluster
        running = asyncio.get_running_loop()
        if self._started:
            await self._at_router(self.router.aclose())
        self._started = False
        for lp, (_, t) in list(self._pools.items()):
            self._pools.pop(lp, None)
            if lp is running:
                await t.aclose()
            elif lp.is_closed():
                t.abandon()
            elif not self.local and lp is loop.get_loop():
                await loop.wrap(t.aclose())
            else:  # a loop on another thread: close it there, without waiting
                asyncio.run_coroutine_threadsafe(t.aclose(), lp)

    async def aclose(self) -> None:
        await self._on(self._aclose())

    def close(self) -> None:
        if self.local:
            raise RuntimeError("RoutedClient(local=True): use `await client.aclose()` (or `async with`)")
        loop.run(self._aclose())

    async def __aenter__(self) -> "RoutedClient":
        await self._on(self._ensure())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __enter__(self) -> "RoutedClient":
        self._no_sync()
        loop.run(self._ensure())
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _no_sync(self) -> None:
        if self.local:
            raise RuntimeError("RoutedClient(local=True) has no blocking forms: await it on its loop")

    # -- requests ----------------------------------------------------------------------------------
    def _headers(self, extra: dict | None) -> dict[str, str]:
        h = {"content-type": "application/json"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        h.update(extra or {})
        return h

    def _body(self, body: dict) -> dict:
        if "model" not in body or body["model"] is None:
            if not self.model:
                raise ValueError("model: give model= to RoutedClient or to the call (no server listed one "
                                 "at /v1/models)")
            body["model"] = self.model
        return body

    async def _open(self, path: str, body: dict, rank, session, headers, stream: bool):
        """Send ``body`` through the router; raise RoutedClientError on an error status."""
        if getattr(self.target, "running", True) is False:
            raise RuntimeError("cluster not started: call cluster.start() (or `with cluster:`) before sending requests")
        fwd = await self._ensure()
        if body.get("model") is None and not self.model:
            transport = getattr(fwd, "transport", None) or fwd.fwd.transport  # a PDForwarder wraps one
            self.model = await discover_model(transport, [r.url for r in _ranks_of(self.target)])
        body = self._body(body)
        hdrs = self._headers(headers)
        if session is not None:
            hdrs["x-session-id"] = str(session)
        # tenant= and priority= are nbkit's (the router's admission queue; vLLM's priority only where
        # the replicas schedule by it): headers, not body fields
        for key, header in (("tenant", "x-nbkit-tenant"), ("priority", "x-nbkit-priority")):
            value = body.pop(key, None)
            if value is not None:
                hdrs[header] = str(value)
        info = self.router.describe(body, hdrs, trusted=True)
        up = await fwd.open("POST", path, content=json.dumps(body).encode(), headers=hdrs,
                            info=info, rank=rank, stream=stream, body=body, timeout=self.timeout)
        if up.status_code >= 400:
            raise RoutedClientError(up.status_code, up.body.decode(errors="replace"), up.lease.rank.name)
        return up

    async def _request(self, path: str, body: dict, rank, session, headers) -> dict:
        up = await self._open(path, body, rank, session, headers, stream=False)
        out = up.data if isinstance(up.data, dict) else json.loads(up.body)
        out.setdefault("nbkit", {}).update(rank=up.lease.rank.name, request_id=up.record.id)
        return out

    async def _stream(self, path: str, body: dict, rank, session, headers) -> AsyncIterator[dict]:
        body = dict(body, stream=True)
        body.setdefault("stream_options", {"include_usage": True})  # exact token counts in the record
        up = await self._open(path, body, rank, session, headers, stream=True)
        buf = b""
        agen = up.aiter()
        try:
            async for chunk in agen:
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.splitlines():
                        if line.startswith(b"data:"):
                            data = line[5:].strip()
                            if data == b"[DONE]":
                                continue  # let the upstream end by itself, so the record says "ok"
                            obj = json.loads(data)
                            if isinstance(obj.get("error"), dict):  # the stream broke and could not continue
                                err = obj["error"]
                                raise RoutedClientError(int(err.get("code") or 503), err.get("message", ""),
                                                        up.lease.rank.name)
                            if obj.get("usage") and obj["usage"].get("completion_tokens") is not None:
                                up.record.tokens_out = obj["usage"]["completion_tokens"]
                            yield obj
        finally:
            await agen.aclose()

    async def complete(self, prompt, *, max_tokens: int = 16, rank=None, session=None, model: str | None = None,
                       headers: dict | None = None, **params: Any) -> dict:
        """POST /v1/completions through the router. ``rank=`` pins a rank (index or name)."""
        body = dict(params, prompt=prompt, max_tokens=max_tokens, model=model)
        return await self._on(self._request("/v1/completions", body, rank, session, headers))

    async def chat(self, messages: Sequence[dict], *, max_tokens: int = 64, rank=None, session=None,
                   model: str | None = None, headers: dict | None = None, **params: Any) -> dict:
        """POST /v1/chat/completions through the router."""
        body = dict(params, messages=list(messages), max_tokens=max_tokens, model=model)
        return await self._on(self._request("/v1/chat/completions", body, rank, session, headers))

    def stream_complete(self, prompt, *, max_tokens: int = 16, rank=None, session=None, model: str | None = None,
                        headers: dict | None = None, **params: Any) -> AsyncIterator[dict]:
        """Stream /v1/completions: an async iterator of parsed SSE chunks."""
        body = dict(params, prompt=prompt, max_tokens=max_tokens, model=model)
        return self._streamer(self._stream("/v1/completions", body, rank, session, headers))

    def stream_chat(self, messages: Sequence[dict], *, max_tokens: int = 64, rank=None, session=None,
                    model: str | None = None, headers: dict | None = None, **params: Any) -> AsyncIterator[dict]:
        """Stream /v1/chat/completions: an async iterator of parsed SSE chunks."""
        body = dict(params, messages=list(messages), max_tokens=max_tokens, model=model)
        return self._streamer(self._stream("/v1/chat/completions", body, rank, session, headers))

    def _streamer(self, agen):
        return _bridge(agen) if self._hop() else agen


class _Bridge:
    """An async iterator on the caller's loop over an async generator running on nbkit's loop."""

    def __init__(self, agen):
        self._agen = agen

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await loop.wrap(self._agen.__anext__())
        except StopAsyncIteration:
            raise
        except asyncio.CancelledError:
            # The cancel reaches the generator on nbkit's loop asynchronously: close it there
            # once its current step has unwound (it then releases its lease and connection).
            loop.submit(_close_when_idle(self._agen))
            raise

    async def aclose(self) -> None:
        await loop.wrap(_close_when_idle(self._agen))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


async def _close_when_idle(agen, tries: int = 200) -> None:
    for _ in range(tries):
        try:
            await agen.aclose()
            return
        except RuntimeError as e:  # "aclose(): asynchronous generator is already running"
            if "already running" not in str(e):
                raise
            await asyncio.sleep(0.01)


def _bridge(agen) -> _Bridge:
    return _Bridge(agen)


class _Sync:
    """Blocking forms of the client's calls, with the same arguments and defaults:
    ``client.sync.complete(...)``, ``client.sync.chat(...)``, and the streams
    ``client.sync.stream_complete(...)`` / ``client.sync.stream_chat(...)`` as plain iterators."""

    CALLS = ("complete", "chat")
    STREAMS = ("stream_complete", "stream_chat")

    def __init__(self, client: RoutedClient):
        self._c = client

    def __dir__(self):
        return [*self.CALLS, *self.STREAMS]

    def __getattr__(self, name: str):
        if name not in self.CALLS and name not in self.STREAMS:
            raise AttributeError(f"client.sync has no {name!r}; it has {', '.join(dir(self))}")
        self._c._no_sync()
        method = getattr(self._c, name)
        if name in self.CALLS:
            def call(*args, **kw):
                return loop.run(method(*args, **kw))  # the body runs on nbkit's loop, no hop inside
        else:
            def call(*args, **kw):
                agen = loop.run_in_loop_thread(lambda: method(*args, **kw))  # made there: no bridge
                return _iterate(agen)
        call.__name__ = call.__qualname__ = name
        call.__doc__ = f"Blocking :meth:`RoutedClient.{name}` (same arguments and defaults)."
        call.__signature__ = inspect.signature(method)
        return call


def _iterate(agen):
    """A plain iterator over an async generator that lives on nbkit's loop; closing it early (or
    leaving the ``for``) aborts the request."""
    try:
        while True:
            try:
                yield loop.run(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run(agen.aclose())
