"""Where the benchmark sends requests: a URL, nbkit's in-kernel client, or a fake for dry runs.

    UrlTarget("http://127.0.0.1:8000")          # any OpenAI-compatible server: vLLM, nbkit's endpoint, a peer router
    ClientTarget(cluster.client("least_load"))  # nbkit's RoutedClient, in this process
    FakeTarget(ttft_s=0.01, itl_s=0.002)        # no server: for tests and dry runs
    as_target(obj)                              # any of: str URL, Endpoint, RoutedClient, Cluster, Target

Every target streams (``"stream": true, "stream_options": {"include_usage": true}``) and times
the stream the same way: TTFT at the first chunk with ``choices``, an ITL per later chunk, E2E at
the last one, token counts from the final usage chunk. Through nbkit's endpoint the replica comes
from the ``X-nbkit-rank`` response header; through the in-kernel client from its
:class:`~nbkit.routing.router.RequestRecord` (with the router's queue wait); elsewhere it is unknown.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

#: request params every benchmark request carries unless overridden (as vllm bench serve: exact lengths)
DEFAULT_PARAMS = {"ignore_eos": True, "temperature": 0.0}

_RANK_RE = re.compile(r"replica(\d+)")


@dataclass
class Call:
    """One request to send."""

    prompt: Any = None                     # completions: text or token ids
    messages: list[dict] | None = None     # chat
    max_tokens: int = 16
    input_toks: int = 0                    # expected prompt tokens (the server's usage wins)
    session_id: str | None = None
    keep_text: bool = False
    tenant: str | None = None              # who sends it (bench.mix): X-nbkit-tenant / tenant=
    priority: str | int | None = None      # X-nbkit-priority / priority=
    api_key: str | None = None             # the tenant's key: Authorization: Bearer

    def who_headers(self) -> dict[str, str]:
        """The headers that tell nbkit's endpoint who sends this (a key wins over a tenant name)."""
        h = {}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        elif self.tenant:
            h["x-nbkit-tenant"] = self.tenant
        if self.priority is not None:
            h["x-nbkit-priority"] = str(self.priority)
        return h


@dataclass
class Reply:
    """What came back, timed."""

    outcome: str = "ok"
    error: str = ""
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    text: str = ""
    input_toks: int | None = None
    output_toks: int | None = None
    rank: str = ""
    instance_id: int = -1
    queue_wait_s: float | None = None
    policy: str | None = None


@dataclass(frozen=True)
class ReplicaRef:
    """A replica whose ``/metrics`` the benchmark reads before and after (prefix cache, tokens)."""

    replica: int
    url: str
    name: str = ""
    dp_rank: int | None = None


class StreamClock:
    """Times one stream: call :meth:`chunk` for every chunk that carries ``choices``."""

    def __init__(self):
        self.start = time.perf_counter()
        self.ttft: float | None = None
        self.itl: list[float] = []
        self.last: float | None = None

    def chunk(self) -> None:
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itl.append(now - self.last)
        self.last = now

    def fill(self, r: Reply) -> Reply:
        r.ttft_s, r.itl_s = self.ttft, self.itl
        r.e2e_s = (self.last if self.last is not None else time.perf_counter()) - self.start
        return r


def _choice_text(obj: dict, chat: bool) -> str:
    ch = obj["choices"][0] if obj.get("choices") else {}
    if chat:
        return (ch.get("delta") or {}).get("content") or ""
    return ch.get("text") or ""


def instance_of(rank: str, rank_map: dict[str, int] | None = None) -> int:
    if not rank:
        return -1
    if rank_map and rank in rank_map:
        return int(rank_map[rank])
    m = _RANK_RE.search(rank)
    return int(m.group(1)) if m else -1


class Target:
    """Base class: ``send`` one :class:`Call`, get a :class:`Reply`; ``open``/``close`` around a run."""

    label: str = ""
    api: str = "completions"

    @property
    def policy(self) -> str:
        return getattr(self, "_policy", "") or ""

    def replicas(self) -> list[ReplicaRef] | None:
        """The replicas behind this target, when known (for metrics)."""
        return None

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, call: Call) -> Reply:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {"target": type(self).__name__, "label": self.label, "policy": self.policy, "api": self.api}


class UrlTarget(Target):
    """An OpenAI-compatible server at ``url`` (``/v1/completions`` or, with ``api="chat"``,
    ``/v1/chat/completions``). ``model`` defaults to the first of ``GET /v1/models``.

    ``policy`` only labels the rows (a peer router's policy, say). ``rank_map`` maps rank names
    (``X-nbkit-rank``) to replica indices when they are not ``replicaN``. Uses aiohttp when it is
    installed (lighter on CPU, as vllm bench serve), else httpx; one pool without a connection
    limit, so the concurrency is the benchmark's.
    """

    def __init__(self, url: str, *, model: str | None = None, api: str = "completions", policy: str = "",
                 label: str | None = None, headers: dict | None = None, params: dict | None = None,
                 timeout_s: float = 600.0, rank_map: dict[str, int] | None = None,
                 replicas: list | None = None, http: str = "auto"):
        if api not in ("completions", "chat"):
            raise ValueError(f"api={api!r}: choose 'completions' or 'chat'")
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.model = model
        self.api = api
        self._policy = policy
        self.label = label or url
        self.headers = dict(headers or {})
        self.params = {**DEFAULT_PARAMS, **(params or {})}
        self.timeout_s = timeout_s
        self.rank_map = rank_map
        self._replicas = replicas
        self.http = http
        self._session = None
        self._kind = None
        self.model_root: str | None = None  # /v1/models' "root" (vLLM: the model path)

    def replicas(self) -> list[ReplicaRef] | None:
        return _replica_refs(self._replicas) if self._replicas else None

    async def open(self) -> None:
        kind = self.http
        aiohttp = None
        if kind in ("auto", "aiohttp"):
            try:
                import aiohttp
                kind = "aiohttp"
            except ImportError:
                if kind == "aiohttp":
                    raise
                kind = "httpx"
        self._kind = kind
        if aiohttp is not None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, connect=10), read_bufsize=1 << 18)
        else:
            import httpx
            self._session = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=10.0),
                                              limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024))
        if self.model is None:
            models = await self._get_json("/v1/models")
            data = (models or {}).get("data") or []
            if not data:
                raise RuntimeError(f"{self.url}/v1/models lists no model; give model=")
            self.model = data[0]["id"]
            self.model_root = data[0].get("root")

    async def _get_json(self, path: str):
        if self._kind == "aiohttp":
            async with self._session.get(self.url + path) as r:
                if r.status != 200:
                    raise RuntimeError(f"GET {self.url}{path}: HTTP {r.status}: {(await r.text())[:300]}")
                return await r.json(content_type=None)
        r = await self._session.get(self.url + path)
        if r.status_code != 200:
            raise RuntimeError(f"GET {self.url}{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    async def close(self) -> None:
        if self._session is not None:
            if self._kind == "aiohttp":
                await self._session.close()
            else:
                await self._session.aclose()
            self._session = None

    def _body(self, call: Call) -> tuple[str, dict]:
        body = {"model": self.model, "max_tokens": call.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, **self.params}
        if self.api == "chat":
            body["messages"] = call.messages if call.messages is not None else [
                {"role": "user", "content": call.prompt}]
            return "/v1/chat/completions", body
        body["prompt"] = list(call.prompt) if isinstance(call.prompt, tuple) else call.prompt
        return "/v1/completions", body

    async def send(self, call: Call) -> Reply:
        path, body = self._body(call)
        headers = {"content-type": "application/json", **self.headers, **call.who_headers()}
        if call.session_id is not None:
            headers["x-session-id"] = str(call.session_id)
        data = json.dumps(body)
        chat = self.api == "chat"
        reply = Reply()
        clock = StreamClock()
        parts: list[str] = []

        def on_line(line: bytes) -> bool:
            line = line.strip()
            if not line.startswith(b"data:"):
                return True
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return False
            obj = json.loads(payload)
            if obj.get("choices"):
                clock.chunk()
                if call.keep_text:
                    parts.append(_choice_text(obj, chat))
            elif obj.get("usage"):
                u = obj["usage"]
                reply.output_toks = u.get("completion_tokens")
                reply.input_toks = u.get("prompt_tokens")
            if obj.get("error"):
                reply.outcome, reply.error = "error", str(obj["error"])[:500]
            return True

        try:
            if self._kind == "aiohttp":
                async with self._session.post(self.url + path, data=data, headers=headers) as r:
                    reply.rank = r.headers.get("x-nbkit-rank", "")
                    if r.status != 200:
                        reply.outcome, reply.error = f"http_{r.status}", (await r.text())[:500]
                    else:
                        async for line in r.content:
                            if not on_line(line):
                                break
            else:
                async with self._session.stream("POST", self.url + path, content=data, headers=headers) as r:
                    reply.rank = r.headers.get("x-nbkit-rank", "")
                    if r.status_code != 200:
                        reply.outcome = f"http_{r.status_code}"
                        reply.error = (await r.aread()).decode(errors="replace")[:500]
                    else:
                        async for line in r.aiter_lines():
                            if not on_line(line.encode()):
                                break
        except asyncio.TimeoutError as e:
            reply.outcome, reply.error = "timeout", repr(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the row says what went wrong
            reply.outcome, reply.error = "error", repr(e)
        _finish(reply, clock, parts)
        reply.instance_id = instance_of(reply.rank, self.rank_map)
        return reply


def _finish(reply: Reply, clock: StreamClock, parts: list[str]) -> None:
    """Fill a streamed reply's times, output count and text once its stream is over."""
    clock.fill(reply)
    if reply.outcome == "ok" and clock.ttft is None:
        reply.outcome, reply.error = "error", "the stream ended without a token"
    if reply.output_toks is None:
        reply.output_toks = 1 + len(clock.itl) if clock.ttft is not None else 0
    reply.text = "".join(parts)


# -- in-kernel client -------------------------------------------------------------------------------
#: set per request by ClientTarget.send; the router's created-record listener appends to it
_CAPTURE: contextvars.ContextVar[list | None] = contextvars.ContextVar("nbkit_bench_capture", default=None)


class ClientTarget(Target):
    """nbkit's :class:`~nbkit.routing.client.RoutedClient`, in this process (``close_client`` closes it after
    the run). Rank, replica and router queue wait come from the request's RequestRecord."""

    def __init__(self, client, *, api: str = "completions", label: str | None = None, params: dict | None = None,
                 close_client: bool = False):
        if api not in ("completions", "chat"):
            raise ValueError(f"api={api!r}: choose 'completions' or 'chat'")
        self.client = client
        self.api = api
        self.params = {**DEFAULT_PARAMS, **(params or {})}
        self.close_client = close_client
        self.label = label or f"client:{self.policy}"
        self._remove_listener = None

    @property
    def policy(self) -> str:
        return getattr(self.client.router.policy, "name", "") or ""

    def replicas(self) -> list[ReplicaRef] | None:
        return [ReplicaRef(s.rank.replica, s.rank.url, s.key, s.rank.dp_rank) for s in self.client.router.states]

    async def open(self) -> None:
        await self.client.__aenter__()  # starts its router (scraper, health checks) on nbkit's loop
        def capture(rec) -> None:  # on the sending task's context: its holder gets the record
            holder = _CAPTURE.get()
            if holder is not None:
                holder.append(rec)

        self._remove_listener = self.client.router.add_listener(capture, when="created")

    async def close(self) -> None:
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self.close_client:
            await self.client.aclose()

    async def send(self, call: Call) -> Reply:
        from nbkit.routing.client import RoutedClientError

        holder: list = []
        token = _CAPTURE.set(holder)
        reply = Reply()
        clock = StreamClock()
        parts: list[str] = []
        chat = self.api == "chat"
        nbkit_info: dict = {}
        try:
            kw = dict(self.params, max_tokens=call.max_tokens, session=call.session_id)
            if call.tenant is not None:
                kw["tenant"] = call.tenant
            if call.priority is not None:
                kw["priority"] = call.priority
            if chat:
                msgs = call.messages if call.messages is not None else [{"role": "user", "content": call.prompt}]
                stream = self.client.stream_chat(msgs, **kw)
            else:
                prompt = list(call.prompt) if isinstance(call.prompt, tuple) else call.prompt
                stream = self.client.stream_complete(prompt, **kw)
            async for obj in stream:
                if obj.get("nbkit"):
                    nbkit_info.update(obj["nbkit"])
                if obj.get("choices"):
                    clock.chunk()
                    if call.keep_text:
                        parts.append(_choice_text(obj, chat))
                elif obj.get("usage"):
                    reply.output_toks = obj["usage"].get("completion_tokens")
                    reply.input_toks = obj["usage"].get("prompt_tokens")
        except RoutedClientError as e:
            reply.outcome, reply.error = f"http_{e.status_code}", str(e)[:500]
        except asyncio.TimeoutError as e:
            reply.outcome, reply.error = "timeout", repr(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            reply.outcome, reply.error = "error", repr(e)
        finally:
            _CAPTURE.reset(token)
        _finish(reply, clock, parts)
        rec = next((r for r in reversed(holder) if getattr(r, "rank", "")), holder[-1] if holder else None)
        if rec is not None:
            reply.rank, reply.instance_id = rec.rank, rec.replica
            reply.queue_wait_s, reply.policy = rec.queue_wait_s, rec.policy
        elif nbkit_info.get("rank"):
            reply.rank = nbkit_info["rank"]
            reply.instance_id = instance_of(reply.rank, {s.key: s.rank.replica for s in self.client.router.states})
        return reply


# -- a fake, for tests and dry runs -----------------------------------------------------------------
class FakeTarget(Target):
    """No server: every request "streams" ``output_toks`` tokens, ``ttft_s`` then ``itl_s`` apart,
    from fake replicas picked round robin. ``max_in_flight`` records the most requests at once;
    ``fail_every=k`` fails every k-th request."""

    def __init__(self, ttft_s: float = 0.002, itl_s: float = 0.0, *, replicas: int = 2, policy: str = "fake",
                 label: str = "fake", fail_every: int = 0, api: str = "completions"):
        self.ttft_s, self.itl_s, self.n = ttft_s, itl_s, replicas
        self._policy, self.label, self.fail_every, self.api = policy, label, fail_every, api
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: list[Call] = []

    async def send(self, call: Call) -> Reply:
        k = len(self.calls)
        self.calls.append(call)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            clock = StreamClock()
            r = Reply(rank=f"replica{k % self.n}", instance_id=k % self.n, queue_wait_s=0.0)
            if self.fail_every and (k + 1) % self.fail_every == 0:
                await asyncio.sleep(self.ttft_s)
                r.outcome, r.error, r.output_toks = "http_500", "fake failure", 0
                return clock.fill(r)
            await asyncio.sleep(self.ttft_s)
            clock.chunk()
            for _ in range(max(0, call.max_tokens - 1)):
                await asyncio.sleep(self.itl_s)
                clock.chunk()
            r.output_toks, r.input_toks = call.max_tokens, call.input_toks
            r.text = " ok" * call.max_tokens if call.keep_text else ""
            return clock.fill(r)
        finally:
            self.in_flight -= 1


# -- conversion -------------------------------------------------------------------------------------
def _replica_refs(replicas) -> list[ReplicaRef]:
    out = []
    for i, r in enumerate(replicas):
        if isinstance(r, ReplicaRef):
            out.append(r)
        elif isinstance(r, str):
            out.append(ReplicaRef(i, r.rstrip("/")))
        else:  # a Rank
            out.append(ReplicaRef(r.replica, r.url, r.name, r.dp_rank))
    return out


def as_target(obj, *, policy=None, api: str = "completions", model: str | None = None, label: str | None = None,
              params: dict | None = None, timeout_s: float = 600.0, replicas=None, client_options: dict | None = None):
    """A :class:`Target` for ``obj``: a URL string, an nbkit Endpoint (its URL, ranks and policy),
    a RoutedClient, a Cluster (a RoutedClient with ``policy`` over it, closed after the run) or a
    Target."""
    if isinstance(obj, Target):
        return obj
    if isinstance(obj, str):
        return UrlTarget(obj, model=model, api=api, policy=policy or "", label=label, params=params,
                         timeout_s=timeout_s, replicas=replicas)
    from nbkit.routing.client import RoutedClient
    from nbkit.routing.endpoint import Endpoint
    if isinstance(obj, Endpoint):
        states = obj.router.states
        return UrlTarget(obj.url, model=model or obj.default_model, api=api,
                         policy=policy or getattr(obj.router.policy, "name", ""), label=label or f"endpoint:{obj.port}",
                         params=params, timeout_s=timeout_s, rank_map={s.key: s.rank.replica for s in states},
                         replicas=replicas or [s.rank for s in states])
    if isinstance(obj, RoutedClient):
        if policy is not None:
            obj.policy = policy  # applied on nbkit's loop before the first request
        return ClientTarget(obj, api=api, label=label or (f"client:{_policy_name(policy)}" if policy else None),
                            params=params)
    if hasattr(obj, "ranks") and hasattr(obj, "client"):  # a Cluster
        client = obj.client(policy or "least_load", timeout=timeout_s, **(client_options or {}))
        return ClientTarget(client, api=api, label=label, params=params, close_client=True)
    raise TypeError(f"target={obj!r}: give a URL, an Endpoint, a RoutedClient, a Cluster or a nbkit.bench Target")


def _policy_name(p) -> str:
    if isinstance(p, str):
        return p
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__
