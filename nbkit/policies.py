"""Routing policies: given what is known about each rank, pick the one that gets a request.

A policy is a small, pure-Python object: no I/O, no asyncio, and deterministic given its seed, so
the live router and a discrete-event simulator run the very same code::

    >>> from nbkit.policies import RankLoad, RequestInfo, get_policy
    >>> ranks = [RankLoad("replica0", 0, in_flight=3, pending_decode_tokens=40, stale=False),
    ...          RankLoad("replica1", 1, in_flight=1, pending_decode_tokens=900, stale=False)]
    >>> policy = get_policy("least_load", seed=0)          # or "LOAD"; see available_policies()
    >>> choice = policy.select(ranks, RequestInfo(prompt_tokens=120, max_tokens=64))
    >>> choice.key, choice.reason
    ('replica0', 'least_load: load 40 vs 900 (min of 2)')
    >>> policy.on_dispatch(choice, RequestInfo(prompt_tokens=120, max_tokens=64))   # after sending

``select`` raises :class:`NoCandidateError` on an empty list and drops unhealthy ranks whenever at
least one healthy rank is left. Ties always break at random through the policy's own
``random.Random(seed)``.

Policies (``available_policies()``; ``get_policy`` also takes the aliases ``LOAD``, ``RR``,
``RAND``, is case-insensitive and accepts ``-`` for ``_``):

- ``round_robin`` (``RR``): the next rank by ``index`` after the last one chosen, wrapping; a rank
  filtered out is simply skipped.
- ``random`` (``RAND``): uniform.
- ``least_outstanding``: fewest ``in_flight``.
- ``least_load`` (``LOAD``): minimum :func:`load_score`.
- ``power_of_two``: two distinct ranks sampled at random, the lower :func:`load_score` wins.
- ``prefix_affinity``: :func:`load_score` minus the prompt tokens probably cached on the rank.
- ``session``: sticky sessions by consistent hashing of ``RequestInfo.session``.
- ``custom``: wraps a plain function (:class:`CustomPolicy`).

The load score
--------------
``load_score`` estimates, in tokens, the work queued on a rank::

    load = pending_prefill_tokens + pending_decode_tokens                 # local accounting, always
         + tokens_per_waiting * max(0, running + waiting - ours)          # scrape, only if not stale
         + kv_weight * kv_cache_usage ** 2                                # scrape, only if not stale

The first line is what this router sent and has not seen finish. The second counts requests the
replica reports beyond our own (work from other clients, which we cannot size) at
``tokens_per_waiting`` tokens each (default 256); ``ours = max(in_flight, in_flight_seen)``, where
``in_flight_seen`` is the most requests this router had there since the scrape before the one
read: vLLM's gauges describe its last step, so requests that have finished since still count in
them, and comparing with the current ``in_flight`` alone would charge them as phantom foreign load. The third (``kv_weight`` default 512, usage
clamped to 0..1) grows quadratically so nearly full KV caches, which preempt, are avoided while
half-full ones barely count. A stale scrape contributes nothing.

Cache affinity without a cliff
------------------------------
``prefix_affinity`` splits ``RequestInfo.prefix`` into ``block_chars``-character blocks
(default 64), chain-hashes them with BLAKE2b, and remembers, per rank, the block hashes of the
requests it dispatched there (an LRU of at most ``max_blocks_per_rank`` = 4096 hashes). For each
candidate it takes ``cost = load_score - affinity_weight * matched_chars / chars_per_token``
where ``matched_chars`` covers the leading blocks found in that rank's index (``affinity_weight``
default 1), and picks the lowest cost; the router then charges the rank only the uncached part of
the prompt. A rank holding the prefix wins until its extra load exceeds the tokens it would not
have to prefill, then loses; there is no threshold.

Your own policy
---------------
A function that gets the (healthy) candidates and the request and returns a ``RankLoad.index``,
a ``RankLoad`` or a :class:`Choice`::

    >>> def shortest_queue(candidates, request):
    ...     return min(candidates, key=lambda r: r.waiting)
    >>> get_policy(shortest_queue).select(ranks, RequestInfo()).key
    'replica0'

or a subclass that overrides ``_select`` (register it to make it available by name)::

    >>> from nbkit.policies import Choice, Policy, register
    >>> @register("first")
    ... class First(Policy):
    ...     def _select(self, candidates, request):
    ...         r = min(candidates, key=lambda r: r.index)
    ...         return Choice(r.index, r.key, "first: lowest index")
    >>> get_policy("first").select(ranks, RequestInfo()).key
    'replica0'

Policies are not thread-safe: one router (one event loop) or one simulator owns each instance.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence, Union

__all__ = [
    "RankLoad", "RequestInfo", "Choice", "Policy", "NoCandidateError", "register", "get_policy",
    "available_policies", "load_score", "RoundRobinPolicy", "RandomPolicy",
    "LeastOutstandingPolicy", "LeastLoadPolicy", "PowerOfTwoPolicy", "PrefixAffinityPolicy",
    "SessionPolicy", "CustomPolicy", "DEFAULT_TOKENS_PER_WAITING", "DEFAULT_KV_WEIGHT",
]

#: Tokens charged per request the replica reports beyond our own in-flight count.
DEFAULT_TOKENS_PER_WAITING = 256.0
#: Weight of the KV-pressure term ``kv_weight * kv_cache_usage**2``.
DEFAULT_KV_WEIGHT = 512.0

_EPS = 1e-9


# --------------------------------------------------------------------------------------- data


@dataclass
class RankLoad:
    """What a policy knows about one candidate rank at decision time."""

    key: str                          # stable rank name, e.g. "replica0" or "replica0/dp1"
    index: int                        # position in the router's rank list
    in_flight: int = 0                # requests dispatched here and not finished (local accounting)
    pending_prefill_tokens: int = 0   # prompt tokens of in-flight requests without a first token yet
    pending_decode_tokens: int = 0    # tokens still to generate over in-flight requests
    running: float = 0.0              # last scrape of vllm:num_requests_running
    waiting: float = 0.0              # last scrape of vllm:num_requests_waiting
    kv_cache_usage: float = 0.0       # last scrape, 0..1
    stale: bool = True                # True if the scrape is missing or older than 2 intervals
    healthy: bool = True
    in_flight_seen: int = 0           # peak in_flight over the window the last scrape describes


@dataclass
class RequestInfo:
    """What a policy knows about the request being routed."""

    prompt_tokens: int = 0            # estimate of the prompt's tokens
    max_tokens: int = 16
    prefix: str | None = None         # prompt text (or rendered chat messages) for cache affinity
    session: str | None = None        # sticky-session key


@dataclass(frozen=True)
class Choice:
    """A policy's decision: the chosen ``RankLoad.index``, its key, and why.

    ``cached_tokens``: how many of the prompt's tokens the policy expects the rank to have in its
    prefix cache; the router counts only the rest as pending prefill work on that rank.
    """

    index: int
    key: str
    reason: str
    cached_tokens: float = 0.0


class NoCandidateError(RuntimeError):
    """``select`` was given no candidate rank at all."""


def load_score(r: RankLoad, tokens_per_waiting: float = DEFAULT_TOKENS_PER_WAITING, *,
               kv_weight: float = DEFAULT_KV_WEIGHT) -> float:
    """Estimated queued work on rank ``r``, in tokens (lower is better)::

        pending_prefill_tokens + pending_decode_tokens
        + (not stale) * tokens_per_waiting * max(0, running + waiting - max(in_flight, in_flight_seen))
        + (not stale) * kv_weight * clamp(kv_cache_usage, 0, 1) ** 2

    Local accounting always counts. The scrape terms count only when ``r.stale`` is false: the
    requests the replica reports beyond our own (``in_flight``, or ``in_flight_seen`` when the
    scrape may still count requests finished since) come from other clients and are
    charged ``tokens_per_waiting`` each; the quadratic KV term keeps requests off nearly full
    caches.

        >>> load_score(RankLoad("r", 0, in_flight=1, pending_decode_tokens=100,
        ...                     running=3, kv_cache_usage=0.5, stale=False))
        740.0
    """
    score = float(r.pending_prefill_tokens + r.pending_decode_tokens)
    if not r.stale:
        foreign = r.running + r.waiting - max(r.in_flight, r.in_flight_seen)
        if foreign > 0:
            score += tokens_per_waiting * foreign
        kv = min(max(float(r.kv_cache_usage), 0.0), 1.0)
        score += kv_weight * kv * kv
    return score


def _fmt(x: float) -> str:
    """12 for 12.0, 12.5 for 12.5: short numbers for reasons."""
    return str(int(round(x))) if abs(x - round(x)) < 0.05 else f"{x:.1f}"


# ------------------------------------------------------------------------------------- policy

_REGISTRY: dict[str, type["Policy"]] = {}
_ALIASES = {"load": "least_load", "rr": "round_robin", "rand": "random"}


class Policy:
    """Base class. Subclasses override :meth:`_select` (and the hooks if they keep state).

    Options are declared in the class attribute ``defaults``; ``__init__`` accepts exactly those
    as keywords (a misspelt option raises ``TypeError``) and sets them as attributes.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: Whether decisions read the scraped signals (running, waiting, KV usage). A router scrapes
    #: every 250 ms only for policies that do; the others are served by local accounting alone.
    uses_scrape: ClassVar[bool] = True

    def __init__(self, seed: int | None = None, **options: Any):
        self.seed = seed
        self.rng = random.Random(seed)
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise TypeError(f"{type(self).__name__}: unknown option(s) {', '.join(unknown)} "
                            f"(accepted: seed, {known})")
        for k, v in {**self.defaults, **options}.items():
            setattr(self, k, v)

    def select(self, candidates: Sequence[RankLoad], request: RequestInfo) -> Choice:
        """Choose one of ``candidates`` for ``request``.

        Raises :class:`NoCandidateError` if ``candidates`` is empty. Unhealthy ranks are dropped
        when at least one healthy rank remains (if none is healthy, all are considered)."""
        if not candidates:
            raise NoCandidateError("no candidate rank to route to")
        healthy = [c for c in candidates if c.healthy]
        return self._select(healthy or list(candidates), request)

    def _select(self, candidates: Sequence[RankLoad], request: RequestInfo) -> Choice:
        raise NotImplementedError(f"{type(self).__name__} must override _select")

    def on_dispatch(self, choice: Choice, request: RequestInfo) -> None:
        """Called after the router has sent ``request`` to ``choice``. Default: nothing."""

    def on_ranks_changed(self, keys: Sequence[str]) -> None:
        """Called with the full list of rank keys when ranks are added or removed."""

    def __repr__(self) -> str:
        opts = "".join(f", {k}={getattr(self, k)!r}" for k in self.defaults)
        return f"{type(self).__name__}(seed={self.seed!r}{opts})"

    # helpers for subclasses

    def _pick_min(self, candidates: Sequence[RankLoad], cost: Callable[[RankLoad], float]
                  ) -> tuple[RankLoad, float, list[float]]:
        """The candidate with the lowest ``cost`` (ties at random), its cost, and all costs."""
        costs = [cost(c) for c in candidates]
        best = min(costs)
        tied = [c for c, s in zip(candidates, costs) if s <= best + _EPS]
        pick = tied[0] if len(tied) == 1 else self.rng.choice(tied)
        return pick, best, costs

    @staticmethod
    def _versus(best: float, costs: list[float], label: str = "load") -> str:
        """'load 12 vs 340 (min of 2)': the winner against the runner-up."""
        rest = sorted(costs)[1:]
        n = len(costs)
        if not rest:
            return f"{label} {_fmt(best)} (only candidate)"
        ties = sum(1 for s in costs if s <= best + _EPS)
        tie = f", tie of {ties}" if ties > 1 else ""
        return f"{label} {_fmt(best)} vs {_fmt(rest[0])} (min of {n}{tie})"


def register(name: str) -> Callable[[type[Policy]], type[Policy]]:
    """Class decorator: make a :class:`Policy` subclass available to :func:`get_policy` by
    ``name`` (case-insensitive) and set ``cls.name``. Registering a name again replaces it (so a
    notebook cell can be re-run)."""
    norm = _normalize(name)
    if not norm:
        raise ValueError("policy name must not be empty")

    def deco(cls: type[Policy]) -> type[Policy]:
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise TypeError(f"@register({name!r}) needs a Policy subclass, got {cls!r}")
        cls.name = norm
        _REGISTRY[norm] = cls
        return cls

    return deco


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def available_policies() -> list[str]:
    """Registered policy names, sorted."""
    return sorted(_REGISTRY)


PolicySpec = Union[str, Policy, type[Policy],
                   Callable[[Sequence[RankLoad], RequestInfo], Union[int, RankLoad, Choice]]]


def _parse_options(name: str, text: str) -> dict[str, Any]:
    """``"a=1,b=0.5,c=x"`` -> ``{"a": 1, "b": 0.5, "c": "x"}`` (for ``get_policy("name:...")``)."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"routing policy {name + ':' + text!r}: expected name:option=value,... "
                             f"(got {item!r})")
        value = value.strip()
        for conv in (int, float):
            try:
                out[key.strip()] = conv(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def get_policy(spec: PolicySpec, **options: Any) -> Policy:
    """A :class:`Policy` from a name, an instance, a class or a plain function.

    - ``str``: a registered name, case-insensitive, or an alias (``LOAD`` -> least_load,
      ``RR`` -> round_robin, ``RAND`` -> random); ``options`` (``seed`` included) go to the
      constructor. ``"custom"`` needs the function as ``fn=``. Unknown names raise ``ValueError``
      listing the known ones. Options may also ride in the string, for command lines and
      configs: ``"prefix_affinity:affinity_weight=0.5,max_blocks_per_rank=2048"`` (numbers are parsed;
      an unknown option raises ``ValueError`` naming it).
    - a ``Policy`` instance is returned as is (``options`` must then be empty).
    - a ``Policy`` subclass is instantiated with ``options``.
    - any other callable becomes ``CustomPolicy(spec, **options)``.
    """
    if isinstance(spec, Policy):
        if options:
            raise TypeError(f"get_policy: options {sorted(options)} cannot be applied to an "
                            f"existing policy instance {spec!r}")
        return spec
    if isinstance(spec, type) and issubclass(spec, Policy):
        return spec(**options)
    from_text = False
    if isinstance(spec, str) and ":" in spec:
        spec, text = spec.split(":", 1)
        options, from_text = {**_parse_options(spec, text), **options}, True
    if isinstance(spec, str):
        norm = _normalize(spec)
        norm = _ALIASES.get(norm, norm)
        cls = _REGISTRY.get(norm)
        if cls is None:
            aliases = ", ".join(f"{a.upper()}={t}" for a, t in sorted(_ALIASES.items()))
            raise ValueError(f"unknown routing policy {spec!r}; known: "
                             f"{', '.join(available_policies())} (aliases {aliases})")
        if issubclass(cls, CustomPolicy) and options.get("fn") is None:
            raise ValueError("policy 'custom' needs a callable: get_policy(fn) or "
                             "get_policy('custom', fn=fn), fn(candidates, request) -> "
                             "index | RankLoad | Choice")
        try:
            return cls(**options)
        except TypeError as e:  # an option the policy does not take (Policy.__init__ names it)
            if not from_text:
                raise
            raise ValueError(f"routing policy {spec!r}: {e}") from None  # a bad value, like a bad name
    if callable(spec):
        return CustomPolicy(spec, **options)
    raise TypeError(f"get_policy: expected a name, a Policy, a Policy subclass or a callable, "
                    f"got {type(spec).__name__}")


# ----------------------------------------------------------------------------------- policies


@register("round_robin")
class RoundRobinPolicy(Policy):
    """The candidate with the smallest ``index`` greater than the last one chosen, wrapping
    around. Ranks filtered out are skipped without disturbing the order of the others."""

    uses_scrape = False

    def __init__(self, seed: int | None = None, **options: Any):
        super().__init__(seed, **options)
        self.last_index: int | None = None

    def _select(self, candidates, request):
        ordered = sorted(candidates, key=lambda c: c.index)
        pick = ordered[0]
        if self.last_index is not None:
            for c in ordered:
                if c.index > self.last_index:
                    pick = c
                    break
        last, self.last_index = self.last_index, pick.index
        after = "first" if last is None else f"next after index {last}"
        return Choice(pick.index, pick.key,
                      f"round_robin: {after} -> index {pick.index} ({len(ordered)} candidates)")


@register("random")
class RandomPolicy(Policy):
    """Uniformly at random."""

    uses_scrape = False

    def _select(self, candidates, request):
        pick = self.rng.choice(list(candidates))
        return Choice(pick.index, pick.key, f"random: 1 of {len(candidates)}")


@register("least_outstanding")
class LeastOutstandingPolicy(Policy):
    """Fewest ``in_flight`` requests (local accounting only); ties at random."""

    uses_scrape = False

    def _select(self, candidates, request):
        pick, best, costs = self._pick_min(candidates, lambda c: c.in_flight)
        return Choice(pick.index, pick.key,
                      "least_outstanding: " + self._versus(best, costs, "in_flight"))


class _LoadAware(Policy):
    """Options and scoring shared by the policies built on :func:`load_score`."""

    defaults: ClassVar[dict[str, Any]] = {
        "tokens_per_waiting": DEFAULT_TOKENS_PER_WAITING, "kv_weight": DEFAULT_KV_WEIGHT}

    def score(self, r: RankLoad) -> float:
        return load_score(r, self.tokens_per_waiting, kv_weight=self.kv_weight)

    def _least_load(self, candidates, prefix: str = "least_load") -> Choice:
        pick, best, costs = self._pick_min(candidates, self.score)
        return Choice(pick.index, pick.key, f"{prefix}: " + self._versus(best, costs))


@register("least_load")
class LeastLoadPolicy(_LoadAware):
    """Minimum :func:`load_score`; ties at random. Options: ``tokens_per_waiting``,
    ``kv_weight``."""

    def _select(self, candidates, request):
        return self._least_load(candidates)


@register("power_of_two")
class PowerOfTwoPolicy(_LoadAware):
    """Two distinct candidates sampled at random; the lower :func:`load_score` wins (ties at
    random). One candidate is taken as is."""

    def _select(self, candidates, request):
        if len(candidates) == 1:
            c = candidates[0]
            return Choice(c.index, c.key, f"power_of_two: only candidate, load {_fmt(self.score(c))}")
        a, b = self.rng.sample(list(candidates), 2)
        sa, sb = self.score(a), self.score(b)
        if abs(sa - sb) <= _EPS:
            pick, other = (a, b) if self.rng.random() < 0.5 else (b, a)
            tie = ", tie"
        else:
            pick, other = (a, b) if sa < sb else (b, a)
            tie = ""
        return Choice(pick.index, pick.key,
                      f"power_of_two: {pick.key} load {_fmt(self.score(pick))} vs "
                      f"{other.key} load {_fmt(self.score(other))}{tie}")


@register("prefix_affinity")
class PrefixAffinityPolicy(_LoadAware):
    """Cache-aware: ``cost = load_score - affinity_weight * cached_tokens``; lowest cost wins.

    The choice carries ``cached_tokens``, so the router charges the rank only the uncached part of
    the prompt as pending prefill: requests queued behind a shared prefix do not make its rank
    look busier than the prefill work they will really cause.

    ``affinity_weight`` (default 1): a cached token is worth the prefill token it saves, so a rank
    keeps a prefix until its extra queued work exceeds the prefix. Larger weights hold prefixes
    harder (fewer copies of each prefix across the ranks' KV caches) at the cost of balance: in
    ``benchmarks/compare_routers.py``'s shared-prefix workload (8 prefixes of 1024 tokens that
    do not all fit on one replica) weight 1 gave p99 TTFT 490/630 ms in two rounds, weight 2
    1002/1203, 0.5 1020/1478, with 97 % prefix-cache hits for all three.

    ``cached_tokens`` is the length, in characters divided by ``chars_per_token``, of the leading
    full ``block_chars`` blocks of ``request.prefix`` that this policy has dispatched to the rank
    before (a per-rank LRU of at most ``max_blocks_per_rank`` chained BLAKE2b block hashes,
    filled by :meth:`on_dispatch`). A prefix shorter than one block, or none, gives plain
    least-load routing. ``on_ranks_changed`` forgets ranks that are gone.
    """

    defaults: ClassVar[dict[str, Any]] = {
        **_LoadAware.defaults, "block_chars": 64, "max_blocks_per_rank": 4096,
        "chars_per_token": 4.0, "affinity_weight": 1.0}

    def __init__(self, seed: int | None = None, **options: Any):
        super().__init__(seed, **options)
        if int(self.block_chars) < 1 or int(self.max_blocks_per_rank) < 1:
            raise ValueError("block_chars and max_blocks_per_rank must be >= 1")
        if self.chars_per_token <= 0:
            raise ValueError("chars_per_token must be > 0")
        self.block_chars = int(self.block_chars)
        self.max_blocks_per_rank = int(self.max_blocks_per_rank)
        self.index: dict[str, OrderedDict[bytes, None]] = {}
        self._memo: tuple[str, list[bytes]] | None = None

    def block_hashes(self, prefix: str | None) -> list[bytes]:
        """Chained BLAKE2b hashes of the full ``block_chars`` blocks of ``prefix``."""
        if not prefix:
            return []
        if self._memo is not None and self._memo[0] == prefix:
            return self._memo[1]
        out: list[bytes] = []
        h = b""
        n = self.block_chars
        for i in range(0, len(prefix) - n + 1, n):
            h = hashlib.blake2b(h + prefix[i:i + n].encode("utf-8", "surrogatepass"),
                                digest_size=16).digest()
            out.append(h)
        self._memo = (prefix, out)
        return out

    def matched_blocks(self, key: str, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of ``hashes`` are in rank ``key``'s index."""
        idx = self.index.get(key)
        if not idx:
            return 0
        n = 0
        for h in hashes:
            if h not in idx:
                break
            n += 1
        return n

    def cached_tokens(self, blocks: int) -> float:
        return blocks * self.block_chars / self.chars_per_token

    def _select(self, candidates, request):
        hashes = self.block_hashes(request.prefix)
        if not hashes:
            return self._least_load(candidates, "prefix_affinity: no prefix blocks; least_load")
        matched = {c.key: self.matched_blocks(c.key, hashes) for c in candidates}

        def cost(c):
            return self.score(c) - self.affinity_weight * self.cached_tokens(matched[c.key])

        pick, best, costs = self._pick_min(candidates, cost)
        m = matched[pick.key]
        load = _fmt(self.score(pick))
        rest = sorted(costs)[1:]
        vs = f", cost {_fmt(best)} vs {_fmt(rest[0])} (min of {len(costs)})" if rest else ""
        if m:
            head = f"{m} blocks (~{_fmt(self.cached_tokens(m))} tokens) cached on {pick.key}"
        else:
            head = f"no cached blocks on {pick.key}"
        return Choice(pick.index, pick.key, f"prefix_affinity: {head}, load {load}{vs}",
                      cached_tokens=min(self.cached_tokens(m), float(request.prompt_tokens)))

    def on_dispatch(self, choice, request):
        hashes = self.block_hashes(request.prefix)
        if not hashes:
            return
        idx = self.index.setdefault(choice.key, OrderedDict())
        # Newest last; the leading blocks (shared by most requests) are touched last so the LRU
        # evicts deep tails before the heads that prefix matching starts from.
        for h in reversed(hashes):
            if h in idx:
                idx.move_to_end(h)
            else:
                idx[h] = None
        while len(idx) > self.max_blocks_per_rank:
            idx.popitem(last=False)

    def on_ranks_changed(self, keys):
        live = set(keys)
        for k in [k for k in self.index if k not in live]:
            del self.index[k]


def _ring_pos(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big")


@register("session")
class SessionPolicy(_LoadAware):
    """Sticky sessions by consistent hashing.

    Each rank key owns ``vnodes`` (default 64) points on a BLAKE2b ring; a session goes to the
    first point clockwise of its own hash whose rank is among the candidates. An unhealthy or
    removed rank therefore only moves the sessions it held, and a new rank takes about 1/N of
    them. The ring holds the keys given to ``on_ranks_changed`` plus any candidate key seen
    since. Requests without a session key are routed by least load.
    """

    defaults: ClassVar[dict[str, Any]] = {**_LoadAware.defaults, "vnodes": 64}

    def __init__(self, seed: int | None = None, **options: Any):
        super().__init__(seed, **options)
        if int(self.vnodes) < 1:
            raise ValueError("vnodes must be >= 1")
        self.vnodes = int(self.vnodes)
        self._keys: set[str] = set()
        self._positions: list[int] = []
        self._owners: list[str] = []

    def _rebuild(self) -> None:
        ring = sorted((_ring_pos(f"{k}#{i}"), k) for k in self._keys for i in range(self.vnodes))
        self._positions = [p for p, _ in ring]
        self._owners = [k for _, k in ring]

    def on_ranks_changed(self, keys):
        self._keys = set(keys)
        self._rebuild()

    def home(self, session: str, keys: Sequence[str] | None = None) -> str | None:
        """The rank key ``session`` maps to among ``keys`` (default: every key on the ring)."""
        if not self._positions:
            return None
        allowed = None if keys is None else set(keys)
        n = len(self._positions)
        start = bisect.bisect_right(self._positions, _ring_pos(session))
        for j in range(n):
            owner = self._owners[(start + j) % n]
            if allowed is None or owner in allowed:
                return owner
        return None

    def _select(self, candidates, request):
        if request.session is None:
            return self._least_load(candidates, "session: no session key; least_load")
        new = {c.key for c in candidates} - self._keys
        if new:
            self._keys |= new
            self._rebuild()
        by_key = {c.key: c for c in candidates}
        key = self.home(request.session, list(by_key))
        pick = by_key[key]  # a candidate key is always on the ring
        primary = self.home(request.session)
        moved = f" (home {primary} unavailable)" if primary != key else ""
        return Choice(pick.index, pick.key, f"session {request.session} -> {key}{moved}")


@register("custom")
class CustomPolicy(Policy):
    """Wraps ``fn(candidates, request)`` returning a ``RankLoad.index`` among the candidates, a
    ``RankLoad`` or a :class:`Choice`. ``fn`` gets the candidates after unhealthy ones are
    filtered; returning something that is not a candidate raises ``ValueError``."""

    def __init__(self, fn: Callable[[Sequence[RankLoad], RequestInfo], Any] | None = None,
                 seed: int | None = None, **options: Any):
        if fn is None or not callable(fn):
            raise TypeError(f"CustomPolicy needs a callable, got {fn!r}")
        super().__init__(seed, **options)
        self.fn = fn
        self.fn_name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) \
            or type(fn).__name__

    def _select(self, candidates, request):
        out = self.fn(candidates, request)
        by_index = {c.index: c for c in candidates}
        if isinstance(out, Choice):
            if out.index not in by_index:
                raise ValueError(f"custom policy {self.fn_name} chose index {out.index}, not "
                                 f"among candidates {sorted(by_index)}")
            return out
        if isinstance(out, RankLoad):
            if by_index.get(out.index) is None or by_index[out.index].key != out.key:
                raise ValueError(f"custom policy {self.fn_name} returned {out.key!r} "
                                 f"(index {out.index}), not a candidate")
            pick = by_index[out.index]
        elif isinstance(out, int) and not isinstance(out, bool):
            if out not in by_index:
                raise ValueError(f"custom policy {self.fn_name} returned index {out}, not among "
                                 f"candidates' indexes {sorted(by_index)}")
            pick = by_index[out]
        else:
            raise TypeError(f"custom policy {self.fn_name} returned {out!r}; expected an index, "
                            f"a RankLoad or a Choice")
        return Choice(pick.index, pick.key, f"custom: {self.fn_name} -> {pick.key}")

    def __repr__(self) -> str:
        return f"CustomPolicy({self.fn_name}, seed={self.seed!r})"
