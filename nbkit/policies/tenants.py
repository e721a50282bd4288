"""Multi-tenant admission: who sent a request (:class:`Tenants`), whether they are over their rate
limits (:class:`RateLimiter`), and in which order waiting requests are admitted (:class:`FairQueue`).

Pure and mechanism-free (stdlib only, no I/O except :meth:`Tenants.load`), so the router's admission
queue and the simulator share it::

    >>> from nbkit.policies.tenants import FairQueue, RateLimiter, Tenants
    >>> tenants = Tenants.from_dict({"tenants": {
    ...     "alice": {"api_key": "key-alice", "weight": 3, "requests_per_minute": 600},
    ...     "bob": {"api_key": "key-bob", "priority": "batch", "tokens_per_minute": 100000}}})
    >>> who = tenants.identify({"Authorization": "Bearer key-bob"}, {"user": "end-user-17"})
    >>> who.tenant.name, who.source, who.error
    ('bob', 'api_key', None)
    >>> tenants.identify({"X-nbkit-tenant": "bob"}).error      # keys are configured: one is needed
    (401, 'missing API key: send "Authorization: Bearer <key>"')
    >>> tenants.priority_of(who.tenant, {"X-nbkit-priority": "interactive"}, None)   # clamped
    10
    >>> limiter = RateLimiter(tenants)
    >>> limiter.check(who.tenant, tokens=1200) is None                               # admitted
    True
    >>> queue = FairQueue()
    >>> queue.push("b1", tenant="bob", weight=1, priority=10, cost=500)
    >>> queue.push("a1", tenant="alice", weight=3, priority=0, cost=500)
    >>> list(queue), queue.pop(), len(queue)
    (['a1', 'b1'], 'a1', 1)

Priorities follow vLLM: a lower value is served earlier (``"interactive"`` = 0, ``"batch"`` = 10).
"""

from __future__ import annotations

import bisect
import hmac
import logging
import math
import threading
import time
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

logger = logging.getLogger(__name__)

#: Priority names; any integer is accepted too (lower = served first).
PRIORITIES = {"interactive": 0, "batch": 10}
#: Name of the tenant that requests naming none are charged to.
DEFAULT_TENANT = "default"
TENANT_HEADER = "X-nbkit-tenant"
PRIORITY_HEADER = "X-nbkit-priority"
_FIELDS = ("api_key", "weight", "priority", "requests_per_minute", "tokens_per_minute")
_LIMITS = ("requests_per_minute", "tokens_per_minute")


def parse_priority(value: Any, *, where: str = "priority") -> int:
    """``"interactive"`` -> 0, ``"batch"`` -> 10, an int (or a string holding one) as is.

    Anything else (bools and floats included) raises ``ValueError`` naming ``where`` and the value."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in PRIORITIES:
        return PRIORITIES[text]
    if text and text.lstrip("+-").isdecimal():
        return int(text)
    names = ", ".join(f"{k} ({v})" for k, v in PRIORITIES.items())
    raise ValueError(f"{where}: bad priority {value!r}; expected an integer or one of: {names}")


def _positive(where: str, value: Any, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: must be > 0, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------ tenants


@dataclass(frozen=True)
class Tenant:
    """One tenant. Fields are validated (``ValueError`` naming tenant and field); ``priority`` may
    be given as a name and is stored as an int, numbers are stored as floats."""

    name: str
    api_key: str | None = None
    weight: float = 1.0                          # fair-share weight, > 0
    priority: int = 0                            # lower = served first
    requests_per_minute: float | None = None     # > 0, or None: no limit
    tokens_per_minute: float | None = None       # > 0, or None: no limit

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"tenants.{name!r}: a tenant name must be a non-empty string "
                             "without surrounding whitespace")
        where = DEFAULT_TENANT if name == DEFAULT_TENANT else f"tenants.{name}"
        key = self.api_key                           # messages never echo a key
        if key is not None and (not isinstance(key, str) or not key or any(map(str.isspace, key))):
            raise ValueError(f"{where}.api_key: must be a non-empty string without whitespace")
        set_ = object.__setattr__
        set_(self, "weight", _positive(f"{where}.weight", self.weight, optional=False))
        set_(self, "priority", parse_priority(self.priority, where=f"{where}.priority"))
        for limit in _LIMITS:
            set_(self, limit, _positive(f"{where}.{limit}", getattr(self, limit), optional=True))


@dataclass(frozen=True)
class Identity:
    """What :meth:`Tenants.identify` found: a tenant and how (``"api_key"``, ``"header"``,
    ``"user"``, ``"default"``), or ``error`` = ``(http_status, message)`` and no tenant."""

    tenant: Tenant | None
    source: str
    error: tuple[int, str] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _tenant_from_table(where: str, name: str, table: Any) -> Tenant:
    if not isinstance(table, Mapping):
        raise ValueError(f"{where}: must be a table, got {type(table).__name__}")
    for key in table:
        if key not in _FIELDS:
            raise ValueError(f"{where}.{key}: unknown key; expected one of: {', '.join(_FIELDS)}")
    return Tenant(name, **table)


class Tenants:
    """The tenant registry: configured tenants plus the default tenant (for requests naming none).

    ``names``, ``__iter__`` and ``__len__`` cover the configured tenants only; :meth:`get` also
    returns the default tenant by its name. The name ``"default"`` is reserved for it: configure
    it with a top-level ``[default]`` table (or ``default=``), not as ``[tenants.default]``."""

    def __init__(self, tenants: Iterable[Tenant] = (), *, default: Tenant | None = None) -> None:
        self._default = default if default is not None else Tenant(DEFAULT_TENANT)
        self._tenants: dict[str, Tenant] = {}
        keyed: dict[str, str] = {}                 # api_key -> where it was configured
        pairs = [(t, f"tenants.{t.name}") for t in tenants] + [(self._default, DEFAULT_TENANT)]
        for t, where in pairs:
            if where != DEFAULT_TENANT:
                if t.name == self._default.name:
                    raise ValueError(f"{where}: the name is reserved for the default tenant; "
                                     "configure it as a top-level [default] table")
                if t.name in self._tenants:
                    raise ValueError(f"{where}: duplicate tenant name")
                self._tenants[t.name] = t
            if t.api_key is not None and t.api_key in keyed:     # the message must not echo it
                raise ValueError(f"{where}.api_key: same api_key as {keyed[t.api_key]}")
            keyed[t.api_key] = where
        self._keyed = [t for t in [*self._tenants.values(), self._default] if t.api_key is not None]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tenants:
        """From ``{"tenants": {name: table}, "default": table}`` (the TOML file's shape; both keys
        optional) or directly ``{name: table}`` (where a ``"default"`` key is the default table)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"tenant config: must be a table, got {type(d).__name__}")
        if "tenants" in d:
            for key in set(d) - {"tenants", "default"}:
                raise ValueError(f"{key}: unknown top-level key; expected 'tenants', 'default'")
            tables = d["tenants"]
            if not isinstance(tables, Mapping):
                raise ValueError(f"tenants: must be a table, got {type(tables).__name__}")
        else:
            tables = {k: v for k, v in d.items() if k != "default"}
        default = d.get("default")
        tenants = [_tenant_from_table(f"tenants.{name}", name, t) for name, t in tables.items()]
        return cls(tenants, default=None if default is None
                   else _tenant_from_table(DEFAULT_TENANT, DEFAULT_TENANT, default))

    @classmethod
    def load(cls, path: str | Any) -> Tenants:
        """Read a TOML file (see the module docs); errors are ``ValueError`` prefixed with the path."""
        try:
            with open(path, "rb") as f:
                return cls.from_dict(tomllib.load(f))
        except ValueError as e:                    # tomllib.TOMLDecodeError is a ValueError too
            raise ValueError(f"{path}: {e}") from e

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tenants)

    @property
    def default(self) -> Tenant:
        return self._default

    @property
    def requires_key(self) -> bool:
        """True when any tenant has an api_key: then every request needs a known key."""
        return bool(self._keyed)

    def get(self, name: str) -> Tenant | None:
        if name == self._default.name:
            return self._default
        return self._tenants.get(name)

    def __iter__(self) -> Iterator[Tenant]:
        return iter(list(self._tenants.values()))

    def __len__(self) -> int:
        return len(self._tenants)

    def _by_key(self, key: str) -> Tenant | None:
        found = None
        for t in self._keyed:                      # constant time per key: no early exit
            if hmac.compare_digest(t.api_key.encode(), key.encode()):
                found = t
        return found

    def identify(self, headers: Mapping[str, str] | None,
                 body: Mapping[str, Any] | None = None) -> Identity:
        """Which tenant sent a request. In order: ``Authorization: Bearer KEY`` (mandatory when
        :attr:`requires_key`, and then it alone decides: ``X-nbkit-tenant`` cannot override it;
        ignored when no tenant has a key); ``X-nbkit-tenant`` (unknown name: 400); the body's
        OpenAI ``user`` field if it names a tenant (else ignored: clients use it for end users);
        the default tenant. Header names are case-insensitive."""
        h = {str(k).lower(): v for k, v in (headers or {}).items()}
        named = (h.get(TENANT_HEADER.lower()) or "").strip()
        if self._keyed:
            scheme, _, key = (h.get("authorization") or "").strip().partition(" ")
            key = key.strip()
            if scheme.lower() != "bearer" or not key:
                return Identity(None, "api_key",
                                (401, 'missing API key: send "Authorization: Bearer <key>"'))
            tenant = self._by_key(key)
            if tenant is None:
                return Identity(None, "api_key", (401, "unknown API key"))
            if named and named != tenant.name:
                logger.debug("%s %r ignored: the API key belongs to tenant %r",
                             TENANT_HEADER, named, tenant.name)
            return Identity(tenant, "api_key")
        if named:
            tenant = self.get(named)
            if tenant is None:
                return Identity(None, "header", (400, f"unknown tenant {named!r} ({TENANT_HEADER}); "
                                                      f"configured: {', '.join(self._tenants) or '(none)'}"))
            return Identity(tenant, "header")
        user = body.get("user") if isinstance(body, Mapping) else None
        if isinstance(user, str) and user in self._tenants:
            return Identity(self._tenants[user], "user")
        return Identity(self._default, "default")

    def priority_of(self, tenant: Tenant | None, headers: Mapping[str, str] | None,
                    body: Mapping[str, Any] | None = None) -> int:
        """The request's priority: header ``X-nbkit-priority`` (name or int), else the body's
        ``priority`` field (vLLM's), else the tenant's. A request may ask to be *less* urgent than
        its tenant but never more: the result is ``max(requested, tenant.priority)``. A bad value
        raises ``ValueError`` naming the header or field. (``None`` tenant: the default tenant.)"""
        tenant = tenant or self._default
        h = {str(k).lower(): v for k, v in (headers or {}).items()}
        raw = h.get(PRIORITY_HEADER.lower())
        if raw is not None and str(raw).strip():
            requested = parse_priority(raw, where=PRIORITY_HEADER)
        elif isinstance(body, Mapping) and body.get("priority") is not None:
            requested = parse_priority(body["priority"], where="body field 'priority'")
        else:
            return tenant.priority
        return max(requested, tenant.priority)


# -------------------------------------------------------------------------------- rate limits


def as_tenants(spec) -> Tenants:
    """A :class:`Tenants` from a Tenants, a mapping (the TOML shape), a TOML file path, or None."""
    if spec is None:
        return Tenants()
    if isinstance(spec, Tenants):
        return spec
    if isinstance(spec, Mapping):
        return Tenants.from_dict(spec)
    return Tenants.load(spec)


class TokenBucket:
    """A token bucket holding up to ``burst`` tokens (default: ``rate_per_minute``, a minute's
    worth), starting full and refilling continuously at ``rate_per_minute / 60`` per second.

    :meth:`try_take` returns 0.0 when it took ``amount``, else the seconds until ``amount`` would be
    there (taking nothing). An amount above the capacity could never fit, which would lock the
    caller out for good; instead it is allowed whenever the bucket is full, and empties it."""

    def __init__(self, rate_per_minute: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_minute = _positive("rate_per_minute", rate_per_minute, optional=False)
        self.capacity = _positive("burst", rate_per_minute if burst is None else burst, optional=False)
        self._per_s = self.rate_per_minute / 60.0
        self._clock = clock
        self._tokens = self.capacity
        self._stamp = clock()

    def _refill(self, now: float | None) -> None:
        now = self._clock() if now is None else now
        if now > self._stamp:                     # a clock running backwards refills nothing
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self._per_s)
            self._stamp = now

    def _wait(self, amount: float) -> float:
        need = min(amount, self.capacity)          # over capacity: wait until full
        missing = need - self._tokens
        return 0.0 if missing <= 1e-9 * max(1.0, need) else missing / self._per_s

    def _take(self, amount: float) -> None:
        self._tokens = max(0.0, self._tokens - amount)

    def try_take(self, amount: float = 1.0, now: float | None = None) -> float:
        self._refill(now)
        wait = self._wait(amount)
        if wait == 0.0:
            self._take(amount)
        return wait

    def available(self, now: float | None = None) -> float:
        self._refill(now)
        return self._tokens


@dataclass(frozen=True)
class Throttle:
    """A refusal from :meth:`RateLimiter.check`: which limit, and when to retry (seconds, >= 1 ms,
    rounded up to the millisecond; a ``Retry-After`` header wants ``math.ceil`` of it)."""

    tenant: Tenant
    limit: str                # "requests_per_minute" | "tokens_per_minute"
    retry_after_s: float

    @property
    def message(self) -> str:
        return (f"tenant {self.tenant.name!r} is over its {self.limit} "
                f"({getattr(self.tenant, self.limit):g}); retry in {self.retry_after_s:.3f} s")


def _counter() -> dict[str, int]:
    return {"admitted": 0, "throttled": 0, **{f"throttled_{limit}": 0 for limit in _LIMITS}}


class RateLimiter:
    """Per-tenant ``requests_per_minute`` and ``tokens_per_minute`` buckets (only for the limits a
    tenant has). Thread-safe. Buckets are keyed by tenant name and rebuilt (full) if the tenant
    passed to :meth:`check` has different limits than the one they were made for."""

    def __init__(self, tenants: Tenants | Iterable[Tenant] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[tuple, dict[str, TokenBucket]]] = {}
        self._counters: dict[str, dict[str, int]] = {}
        known = [*tenants, tenants.default] if isinstance(tenants, Tenants) else list(tenants)
        for t in known:
            self._buckets_for(t)
            self._counters[t.name] = _counter()

    def _buckets_for(self, tenant: Tenant) -> dict[str, TokenBucket]:
        limits = tuple(getattr(tenant, limit) for limit in _LIMITS)
        have = self._buckets.get(tenant.name)
        if have is None or have[0] != limits:
            buckets = {lim: TokenBucket(rate, clock=self._clock)
                       for lim, rate in zip(_LIMITS, limits) if rate is not None}
            have = self._buckets[tenant.name] = (limits, buckets)
        return have[1]

    def check(self, tenant: Tenant, tokens: float, now: float | None = None) -> Throttle | None:
        """Take 1 request and ``tokens`` tokens from ``tenant``'s buckets, both or neither.
        Returns None when admitted, else a :class:`Throttle` for the limit that frees up last."""
        now = self._clock() if now is None else now
        amounts = {"requests_per_minute": 1.0, "tokens_per_minute": max(0.0, float(tokens))}
        with self._lock:
            buckets = self._buckets_for(tenant)
            counts = self._counters.setdefault(tenant.name, _counter())
            waits = []
            for limit, bucket in buckets.items():
                bucket._refill(now)
                waits.append((bucket._wait(amounts[limit]), limit))
            wait, limit = max(waits, default=(0.0, ""))
            if wait > 0.0:
                counts["throttled"] += 1
                counts[f"throttled_{limit}"] += 1
                retry = max(0.001, math.ceil(wait * 1000.0 - 1e-6) / 1000.0)
                logger.debug("tenant %r throttled by %s (%s tokens): retry in %.3f s",
                             tenant.name, limit, tokens, retry)
                return Throttle(tenant, limit, retry)
            for limit, bucket in buckets.items():
                bucket._take(amounts[limit])
            counts["admitted"] += 1
            return None

    @property
    def counters(self) -> dict[str, dict[str, int]]:
        """``{tenant: {"admitted", "throttled", "throttled_requests_per_minute",
        "throttled_tokens_per_minute"}}`` (a copy)."""
        with self._lock:
            return {name: dict(c) for name, c in self._counters.items()}


# ------------------------------------------------------------------------------ fair queueing


class _Entry:
    __slots__ = ("item", "tenant", "priority", "start", "finish", "cost", "key")


class _Level:
    """One priority level's virtual clock and each tenant's last finish tag there."""
    __slots__ = ("vtime", "last_finish", "count")

    def __init__(self) -> None:
        self.vtime, self.last_finish, self.count = 0.0, {}, 0


class FairQueue:
    """Waiting requests in service order: lowest ``priority`` first, then weighted fair queuing.

    Within a priority level, start-time fair queuing tags (SFQ): the level keeps a virtual clock
    ``V``; a pushed item gets ``start = max(V, last_finish[tenant])`` and
    ``finish = start + cost / weight``, and items are served by ``(finish, push order)``. Granting
    an item (:meth:`pop`, :meth:`take`) advances ``V`` to its start tag (never backwards). So
    backlogged tenants are served in proportion to their weights however many items each pushes,
    each tenant's items stay FIFO, and a tenant that was idle restarts at ``V``: it gets its share
    from when it comes back, no credit for the idle time. When a level empties, its state is
    dropped (all tenants are idle, nobody is owed anything). :meth:`remove` (a cancelled waiter)
    does not advance ``V``; removing a tenant's newest item gives its tag space back, removing an
    older one leaves a gap (that tenant's later items keep their tags).

    Items are opaque and may be unhashable: the queue keys them by ``id()`` and holds a reference.
    Pushing an item that is already queued raises ``ValueError``.
    """

    def __init__(self) -> None:
        self._order: list[tuple[int, float, int, _Entry]] = []    # sorted; seq makes keys unique
        self._by_id: dict[int, _Entry] = {}
        self._levels: dict[int, _Level] = {}
        self._seq = 0

    def push(self, item: Any, *, tenant: str, weight: float, priority: int, cost: float) -> None:
        """Queue ``item``; ``cost``: its tokens (prompt + expected output), at least 1 is charged."""
        if id(item) in self._by_id:
            raise ValueError("item is already queued")
        weight = _positive("weight", weight, optional=False)
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost):
            raise ValueError(f"cost: must be a finite number, got {cost!r}")
        priority = parse_priority(priority)
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = _Level()
        e = _Entry()
        e.item, e.tenant, e.priority, e.cost = item, tenant, priority, max(float(cost), 1.0)
        e.start = max(level.vtime, level.last_finish.get(tenant, level.vtime))
        e.finish = level.last_finish[tenant] = e.start + e.cost / weight
        e.key = (priority, e.finish, self._seq)
        self._seq += 1
        level.count += 1
        self._by_id[id(item)] = e
        bisect.insort(self._order, (*e.key, e))

    def _detach(self, e: _Entry, granted: bool) -> None:
        i = bisect.bisect_left(self._order, e.key)     # a 3-tuple sorts just before its 4-tuple
        assert self._order[i][3] is e
        del self._order[i]
        del self._by_id[id(e.item)]
        level = self._levels[e.priority]
        level.count -= 1
        if level.count == 0:
            del self._levels[e.priority]
        elif granted:
            level.vtime = max(level.vtime, e.start)
        elif level.last_finish.get(e.tenant) == e.finish:
            level.last_finish[e.tenant] = e.start

    def _front(self) -> _Entry:
        if not self._order:
            raise IndexError("the FairQueue is empty")
        return self._order[0][3]

    def pop(self) -> Any:
        """Remove and return the next item to serve (``IndexError`` when empty)."""
        e = self._front()
        self._detach(e, granted=True)
        return e.item

    def peek(self) -> Any:
        """The next item to serve, left queued (``IndexError`` when empty)."""
        return self._front().item

    def take(self, item: Any) -> None:
        """Grant ``item`` out of order (advances ``V`` like :meth:`pop`); ``KeyError`` if not queued."""
        e = self._by_id.get(id(item))
        if e is None:
            raise KeyError("item is not queued")
        self._detach(e, granted=True)

    def remove(self, item: Any) -> bool:
        """Drop a cancelled item without granting it; False if it was not queued."""
        e = self._by_id.get(id(item))
        if e is None:
            return False
        self._detach(e, granted=False)
        return True

    def clear(self) -> None:
        self._order.clear()
        self._by_id.clear()
        self._levels.clear()

    def __iter__(self) -> Iterator[Any]:
        """Items in service order, read lazily (log n a step): the caller may take/remove/push
        meanwhile; items removed or taken since the iteration began are skipped, items pushed
        since are not seen."""
        limit, order = self._seq, self._order
        i = 0
        while i < len(order):
            e = order[i][3]
            if e.key[2] < limit:        # pushed before the iteration began
                yield e.item
            p, f, seq = e.key           # go on after it, wherever the list moved meanwhile (log n a step)
            i = bisect.bisect_right(order, (p, f, seq + 0.5))

    def __len__(self) -> int:
        return len(self._order)

    def __bool__(self) -> bool:
        return bool(self._order)

    def stats(self) -> dict[str, dict[str, float]]:
        """``{tenant: {"queued": n, "queued_cost": tokens}}`` over the items waiting."""
        out: dict[str, dict[str, float]] = {}
        for *_, e in self._order:
            s = out.setdefault(e.tenant, {"queued": 0, "queued_cost": 0.0})
            s["queued"] += 1
            s["queued_cost"] += e.cost
        return out
