"""Which rank holds which LoRA adapter, and the mechanism that loads one where a request is sent.

The decision (which rank a LoRA request goes to, and whether to load the adapter on another) is
the policy's (:mod:`nbkit.policies.lora`); this module keeps the table it reads and does the
loading. A :class:`~nbkit.cluster.cluster.Cluster` whose replicas serve LoRA has one
(``cluster.lora``), shared by all its clients and endpoints::

    cluster = Cluster.replicas(n=2, lora_modules={"sql": sql_path})  # both replicas start with "sql"
    cluster.start()
    cluster.lora.table()                        # {'replica0': ['sql'], 'replica1': ['sql']}
    cluster.lora.load("chat", chat_path, rank=1)   # POST /v1/load_lora_adapter on replica1
    cluster.lora.register("code", code_path)    # known, loaded on demand where the policy sends it
    cluster.lora.refresh()                      # re-read every replica's GET /v1/models
    client = cluster.client("least_load")       # model="chat" -> replica1 (it holds "chat")

Per rank the table is an LRU of at most ``max_loras`` adapters (the replica's ``--max-loras``):
the adapters vLLM keeps resident there. A request whose adapter is not resident on the rank its
policy chose waits for the load (``POST /v1/load_lora_adapter``, once per replica and adapter, the
concurrent requests of the same adapter share it); an adapter vLLM has registered already (it
dropped out of the LRU only) needs no new request, vLLM reloads its weights at first use. A
request naming neither the base model nor an adapter the table knows gets
:class:`UnknownAdapter` (the endpoint's 404 in OpenAI's shape); a load that fails,
:class:`AdapterLoadError` (503).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Sequence

from nbkit import loop
from nbkit.policies import NoCandidateError, RequestInfo
from nbkit.routing.admission import TenantError

log = logging.getLogger(__name__)

LOAD_PATH, UNLOAD_PATH = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
#: seconds one load (or unload, or /v1/models read) may take
LOAD_TIMEOUT_S = 120.0


class UnknownAdapter(TenantError):
    """A request's ``model`` is neither the served model nor a LoRA adapter any rank can get (404)."""

    kind = "NotFoundError"

    def __init__(self, message: str):
        super().__init__(404, message, "model")


class AdapterLoadError(NoCandidateError):
    """Loading a LoRA adapter on the rank chosen for a request failed (503)."""

    status, retry_after = 503, 1.0


def load_request(name: str, path: str) -> tuple[str, str, dict]:
    """The request that loads adapter ``name`` from ``path`` on a running vLLM replica (it needs
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, which nbkit sets on LoRA replicas).

        >>> load_request("chat", "/adapters/chat")
        ('POST', '/v1/load_lora_adapter', {'lora_name': 'chat', 'lora_path': '/adapters/chat'})
    """
    return "POST", LOAD_PATH, {"lora_name": name, "lora_path": str(path)}


def unload_request(name: str) -> tuple[str, str, dict]:
    """The request that unloads adapter ``name`` from a running replica."""
    return "POST", UNLOAD_PATH, {"lora_name": name}


def adapters_listed(models: Mapping | None) -> dict[str, str]:
    """The adapters in a ``GET /v1/models`` answer: ``{id: root}`` of the entries with a ``parent``
    (vLLM lists the base model with ``parent: null`` and each adapter under its base).

        >>> adapters_listed({"data": [{"id": "base", "parent": None}, {"id": "sql", "root": "/a", "parent": "base"}]})
        {'sql': '/a'}
    """
    out = {}
    for m in (models or {}).get("data") or ():
        if isinstance(m, dict) and m.get("parent") and m.get("id"):
            out[str(m["id"])] = str(m.get("root") or "")
    return out


#: what a layout gives per rank: (rank, max adapters it holds, {adapter: path} it starts with)
Layout = Callable[[], Sequence[tuple[object, int, Mapping[str, str]]]]


class Adapters:
    """The LoRA table of a set of ranks, and the loads (see the module docstring).

    ``layout()`` returns, for every current rank (an object with ``name`` and ``url``, e.g. a
    :class:`~nbkit.routing.rank.Rank`), how many adapters it holds at once and the adapters it
    started with; it is read again whenever the ranks change (a scale). ``base_names``: the names
    under which the base model is served (requests naming one use no adapter)."""

    def __init__(self, layout: Layout, base_names: Iterable[str], *, transport=None,
                 timeout: float = LOAD_TIMEOUT_S):
        self._layout = layout
        self.base_names = frozenset(str(n) for n in base_names if n)
        self.timeout = timeout
        self._transport_spec, self._transport = transport, None
        self._lock = threading.RLock()
        self.known: dict[str, str] = {}                     # adapter -> path (to load it anywhere)
        self._held: dict[str, OrderedDict] = {}             # rank name -> LRU of resident adapters
        self._cap: dict[str, int] = {}
        self._registered: dict[str, set[str]] = {}          # url -> adapters vLLM has registered
        self._url: dict[str, str] = {}                      # rank name -> url
        self._loads: dict[tuple[str, str], asyncio.Task] = {}
        self.loads = 0                                      # adapter loads made (runtime)
        self._sync()

    # -- the table ----------------------------------------------------------------------------
    def _sync(self) -> None:
        """Follow the layout: new ranks start with their configured adapters; gone ranks are dropped."""
        with self._lock:
            rows = list(self._layout())
            names = set()
            for rank, cap, static in rows:
                name, url = rank.name, rank.url
                names.add(name)
                for a, p in static.items():
                    self.known.setdefault(a, str(p))
                if name not in self._held or self._url.get(name) != url:
                    self._held[name] = OrderedDict((a, None) for a in static)
                    self._registered.setdefault(url, set()).update(static)
                self._cap[name], self._url[name] = max(1, int(cap)), url
            for gone in set(self._held) - names:
                self._held.pop(gone, None)

    def reset(self, ranks: Iterable) -> None:
        """``ranks`` (objects with ``name``/``url``) restarted: they hold their configured adapters
        only (the runtime loads died with the process)."""
        with self._lock:
            for r in ranks:
                self._held.pop(r.name, None)
                self._registered.pop(r.url, None)
            self._sync()

    def table(self) -> dict[str, list[str]]:
        """``{rank: [adapters resident there, least recently used first]}``."""
        with self._lock:
            self._sync()
            return {k: list(v) for k, v in self._held.items()}

    def holders(self, name: str) -> list[str]:
        """The ranks where adapter ``name`` is resident."""
        with self._lock:
            return [k for k, v in self._held.items() if name in v]

    def register(self, name: str, path: str) -> None:
        """Make adapter ``name`` known (a request for it is then routed and it is loaded where the
        policy sends it) without loading it anywhere yet."""
        if not name or not isinstance(name, str) or name in self.base_names:
            raise ValueError(f"name={name!r}: an adapter needs a name that is not the base model's")
        if not path or not isinstance(path, str):
            raise ValueError(f"path={path!r}: expected the adapter's folder")
        with self._lock:
            self.known[name] = path

    def lora_of(self, body: Mapping | None) -> str | None:
        """The adapter a request body names (its ``model``, when that is not the base model)."""
        name = (body or {}).get("model") if isinstance(body, Mapping) else None
        return str(name) if name and str(name) not in self.base_names else None

    def classify(self, info: RequestInfo, body: Mapping | None) -> RequestInfo:
        """Set ``info.lora`` from the body; an adapter nobody knows raises :class:`UnknownAdapter`."""
        name = self.lora_of(body)
        info.lora = name
        if name is not None and name not in self.known and not self.holders(name):
            known = ", ".join(sorted(self.known)) or "none"
            raise UnknownAdapter(f"The model `{name}` does not exist: it is not the served model "
                                 f"({', '.join(sorted(self.base_names))}) nor a LoRA adapter this cluster "
                                 f"knows (known adapters: {known}; load one with cluster.lora.load)")
        return info

    def annotate(self, views: Sequence) -> None:
        """Give each :class:`~nbkit.policies.RankLoad` the adapters resident on its rank (``loras``)."""
        with self._lock:
            for v in views:
                held = self._held.get(v.key)
                v.loras = frozenset(held) if held is not None else frozenset()

    def _touch(self, rank: str, name: str) -> list[str]:
        """``name`` is (about to be) resident on ``rank``: most recent in its LRU; returns what
        dropped out of it."""
        lru = self._held.setdefault(rank, OrderedDict())
        lru[name] = None
        lru.move_to_end(name)
        out = []
        while len(lru) > self._cap.get(rank, 1):
            out.append(lru.popitem(last=False)[0])
        return out

    # -- the mechanism --------------------------------------------------------------------------
    async def ensure(self, lease) -> None:
        """Before ``lease``'s request is sent: its adapter resident on its rank, loading it first
        where it is not (the lease is released and :class:`AdapterLoadError` raised if that fails)."""
        name = lease.info.lora
        if name is None:
            return
        rank = lease.rank
        with self._lock:
            self._sync()
            evicted = self._touch(rank.name, name)
            need = name not in self._registered.get(rank.url, ())
        if evicted:
            log.info("lora: %s no longer keeps %s resident (max_loras=%d)", rank.name, ", ".join(evicted),
                     self._cap.get(rank.name, 1))
        if not need:
            return
        try:
            await loop.wrap(self._load_once(rank, name))
        except asyncio.CancelledError:
            lease.release("cancelled")
            raise
        except Exception as e:  # noqa: BLE001 - the request fails, saying why
            lease.release("error", repr(e))
            raise

    async def _load_once(self, rank, name: str) -> None:
        """On nbkit's loop: one load of ``name`` per replica, shared by the requests that wait for it."""
        key = (rank.url, name)
        task = self._loads.get(key)
        if task is None:
            task = self._loads[key] = asyncio.ensure_future(self._post_load(rank, name, self.known.get(name)))
            task.add_done_callback(lambda _t: self._loads.pop(key, None))
        await asyncio.shield(task)

    async def _post_load(self, rank, name: str, path: str | None) -> None:
        if path is None:
            self._forget(rank, name)
            raise AdapterLoadError(f"lora {name}: {rank.name} does not hold it and its path is unknown "
                                   f"(cluster.lora.register({name!r}, path))")
        method, route, body = load_request(name, path)
        log.info("lora: loading %s on %s (%s)", name, rank.name, path)
        try:
            status, text = await self._call(method, rank.url + route, body, getattr(rank, "headers", ()))
        except Exception as e:  # noqa: BLE001
            self._forget(rank, name)
            raise AdapterLoadError(f"lora {name}: loading it on {rank.name} failed: {e!r}") from e
        if status >= 400 and "already been loaded" not in text:
            self._forget(rank, name)
            raise AdapterLoadError(f"lora {name}: loading it on {rank.name} failed: HTTP {status}: {text[:300]}")
        with self._lock:
            self._registered.setdefault(rank.url, set()).add(name)
            self.loads += 1

    def _forget(self, rank, name: str) -> None:
        with self._lock:
            lru = self._held.get(rank.name)
            if lru is not None:
                lru.pop(name, None)

    async def _call(self, method: str, url: str, body: dict | None, headers=()) -> tuple[int, str]:
        if self._transport is None:
            from nbkit.http.transport import DEFAULT_TRANSPORT, make_transport
            self._transport = make_transport(self._transport_spec or DEFAULT_TRANSPORT)
        hdrs = {"content-type": "application/json", **dict(headers)}
        resp = await self._transport.send(method, url, content=json.dumps(body).encode() if body is not None else None,
                                          headers=hdrs, timeout=self.timeout)
        try:
            return resp.status_code, (await resp.aread()).decode(errors="replace")
        finally:
            await resp.aclose()

    def _rank(self, rank):
        """A rank of the layout by index, name or rank object."""
        rows = [r for r, _, _ in self._layout()]
        if isinstance(rank, int) and not isinstance(rank, bool):
            if not 0 <= rank < len(rows):
                raise ValueError(f"rank={rank!r}: out of range 0..{len(rows) - 1}")
            return rows[rank]
        key = getattr(rank, "name", rank)
        for r in rows:
            if r.name == key:
                return r
        raise ValueError(f"rank={rank!r}: no such rank (have {[r.name for r in rows]})")

    @loop.on_loop
    async def aload(self, name: str, path: str | None = None, *, rank=0) -> None:
        """Load adapter ``name`` (from ``path``, or the path it is known by) on ``rank`` (an index or a
        name) now; the router then prefers that rank for it. Raises :class:`AdapterLoadError`."""
        if path is not None:
            self.register(name, path)
        r = self._rank(rank)
        with self._lock:
            self._sync()
            self._touch(r.name, name)
            self._registered.get(r.url, set()).discard(name)  # asked for: load it, even if vLLM had it
        await self._load_once(r, name)

    load = loop.blocking(aload)

    @loop.on_loop
    async def aunload(self, name: str, *, rank=0) -> None:
        """Unload adapter ``name`` from ``rank`` (POST /v1/unload_lora_adapter); it stays known, so a
        later request for it loads it again where its policy sends it."""
        r = self._rank(rank)
        method, route, body = unload_request(name)
        status, text = await self._call(method, r.url + route, body, getattr(r, "headers", ()))
        if status >= 400:
            raise AdapterLoadError(f"lora {name}: unloading it from {r.name} failed: HTTP {status}: {text[:300]}")
        with self._lock:
            for k, url in self._url.items():
                if url == r.url:  # the data-parallel ranks of one server share its adapters
                    self._held.get(k, {}).pop(name, None)
            self._registered.get(r.url, set()).discard(name)
        log.info("lora: unloaded %s from %s", name, r.name)

    unload = loop.blocking(aunload)

    @loop.on_loop
    async def arefresh(self) -> dict[str, list[str]]:
        """Read every rank's ``GET /v1/models`` and take the adapters it lists as what it holds
        (a rank that does not answer keeps its entry). Returns :meth:`table`."""
        rows = [r for r, _, _ in self._layout()]

        async def one(r):
            try:
                status, text = await self._call("GET", r.url + "/v1/models", None, getattr(r, "headers", ()))
                return r, adapters_listed(json.loads(text)) if status < 400 else None
            except Exception:  # noqa: BLE001 - not answering: keep what we know
                return r, None

        for r, listed in await asyncio.gather(*(one(r) for r in rows)):
            if listed is None:
                continue
            with self._lock:
                for a, p in listed.items():
                    self.known.setdefault(a, p)
                lru = self._held.setdefault(r.name, OrderedDict())
                for a in [a for a in lru if a not in listed]:
                    lru.pop(a)
                for a in listed:
                    if a not in lru:
                        self._touch(r.name, a)
                self._registered[r.url] = set(listed)
        return self.table()

    refresh = loop.blocking(arefresh)

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    def __repr__(self) -> str:
        return f"Adapters({self.table()!r})"
