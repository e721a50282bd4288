"""The policy contract: what a policy sees (:class:`RankLoad`, :class:`RequestInfo`), what it
returns (:class:`Choice`), the :class:`Policy` base class, the registry and :func:`get_policy`.

See :mod:`nbkit.policies` for how to use and write policies."""

from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence, Union


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
    loras: frozenset[str] | None = None  # LoRA adapters resident on the rank (None: not known)


@dataclass
class RequestInfo:
    """What a policy knows about the request being routed."""

    prompt_tokens: int = 0            # estimate of the prompt's tokens
    max_tokens: int = 16
    prefix: str | None = None         # prompt text (or rendered chat messages) for cache affinity
    session: str | None = None        # sticky-session key
    token_ids: Sequence[int] | None = None  # the prompt as the engine tokenizes it (exact cache lookups)
    lora: str | None = None           # the LoRA adapter the request names (part of a block's identity)
    tenant: str = "default"           # who sent it (nbkit.policies.tenants)
    priority: int = 0                 # lower is more urgent (vLLM's convention): "interactive" 0, "batch" 10


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
    fallback: str = ""                # why a policy could not decide as designed ("" when it could)


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
    if not r.stale:     # (max/min spelt out: this runs for every candidate of every decision)
        ours, seen = r.in_flight, r.in_flight_seen
        foreign = r.running + r.waiting - (seen if seen > ours else ours)
        if foreign > 0:
            score += tokens_per_waiting * foreign
        kv = float(r.kv_cache_usage)
        kv = 0.0 if kv < 0.0 else 1.0 if kv > 1.0 else kv
        score += kv_weight * kv * kv
    return score


def _fmt(x: float) -> str:
    """12 for 12.0, 12.5 for 12.5: short numbers for reasons."""
    r = round(x)
    return str(int(r)) if abs(x - r) < 0.05 else f"{x:.1f}"


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
    #: Whether decisions read the exact KV-cache index (:mod:`nbkit.policies.kv_index`): its owner
    #: (the router, the simulator) then sets ``policy.kv_index`` and fills ``RequestInfo.token_ids``.
    uses_kv_index: ClassVar[bool] = False
    kv_index: Any = None

    def __init__(self, seed: int | None = None, **options: Any):
        from nbkit.policies.lora import LORA_OPTIONS  # every policy's LoRA affinity (nbkit.policies.lora)
        self.seed = seed
        self.rng = random.Random(seed)
        defaults = {**LORA_OPTIONS, **self.defaults}
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise TypeError(f"{type(self).__name__}: unknown option(s) {', '.join(unknown)} "
                            f"(accepted: seed, {known}; every policy: {', '.join(LORA_OPTIONS)})")
        for k, v in {**defaults, **{k: _checked_option(type(self).__name__, k, v, defaults[k])
                                    for k, v in options.items()}}.items():
            setattr(self, k, v)

    def select(self, candidates: Sequence[RankLoad], request: RequestInfo) -> Choice:
        """Choose one of ``candidates`` for ``request``.

        Raises :class:`NoCandidateError` if ``candidates`` is empty. Unhealthy ranks are dropped
        when at least one healthy rank remains (if none is healthy, all are considered)."""
        if not candidates:
            raise NoCandidateError("no candidate rank to route to")
        healthy = [c for c in candidates if c.healthy] or list(candidates)
        if request.lora:  # LoRA affinity: the ranks holding the adapter first (nbkit.policies.lora)
            from nbkit.policies.lora import applies, lora_select
            if applies(self, healthy, request):
                return lora_select(self, healthy, request)
        return self._select(healthy, request)

    def _select(self, candidates: Sequence[RankLoad], request: RequestInfo) -> Choice:
        raise NotImplementedError(f"{type(self).__name__} must override _select")

    def cost_of(self) -> Callable[[RankLoad], float] | None:
        """The cost this policy's choice is the least of, where that is all its choice is: the
        healthy candidate of least ``cost(rank)`` (ties at random), each cost from that candidate's
        RankLoad alone. A caller that keeps the costs of the ranks whose RankLoad did not change
        since the last decision (the simulator's load view, :mod:`nbkit.sim.load_view`) then calls
        :meth:`select_by_cost` instead of :meth:`select`::

            cost = policy.cost_of()                      # None: call select()
            costs = [cost(c) for c in candidates]        # kept up to date rank by rank
            choice = policy.select_by_cost(candidates, costs, request)   # == policy.select(...)

        Default: None. A subclass that overrides :meth:`select` or ``_select`` gets None too."""
        return None

    def select_by_cost(self, candidates: Sequence[RankLoad], costs: Sequence[float],
                       request: RequestInfo) -> Choice:
        """:meth:`select` given ``costs[k] == self.cost_of()(candidates[k])``, for a policy whose
        :meth:`cost_of` is not None, every candidate healthy and a request that names no LoRA
        adapter (for the others call :meth:`select`): the same choice, reason and random draws."""
        raise NotImplementedError(f"{type(self).__name__} has no cost_of(): call select()")

    def _plain(self, cls: type["Policy"]) -> bool:
        """Whether this policy selects as ``cls`` does (no subclass overrides the selection)."""
        t = type(self)
        return t.select is Policy.select and t._select is cls._select

    def on_dispatch(self, choice: Choice, request: RequestInfo) -> None:
        """Called after the router has sent ``request`` to ``choice``. Default: nothing."""

    def on_ranks_changed(self, keys: Sequence[str]) -> None:
        """Called with the full list of rank keys when ranks are added or removed."""

    def on_release(self, choice: Choice, request: RequestInfo) -> None:
        """Called when the request dispatched by ``choice`` is finished (any outcome). Default: nothing."""

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

    def _least_of(self, candidates: Sequence[RankLoad], costs: Sequence[float], label: str = "load"
                  ) -> tuple[RankLoad, str]:
        """The candidate of least cost (ties at random, drawn as :meth:`_pick_min` draws) and the
        text for it: ``'load 12 vs 340 (min of 2)'``, the winner against the runner-up."""
        best = min(costs)
        n = len(costs)
        if n == 1:
            return candidates[0], f"{label} {_fmt(best)} (only candidate)"
        i = costs.index(best)
        rest = list(costs)
        rest[i] = math.inf
        second = min(rest)                  # the runner-up: sorted(costs)[1]
        if second > best + _EPS:
            return candidates[i], f"{label} {_fmt(best)} vs {_fmt(second)} (min of {n})"
        tied = [c for c, s in zip(candidates, costs) if s <= best + _EPS]
        pick = self.rng.choice(tied)
        return pick, f"{label} {_fmt(best)} vs {_fmt(second)} (min of {n}, tie of {len(tied)})"


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


def _checked_option(policy: str, key: str, value: Any, default: Any) -> Any:
    """``value`` for option ``key``, checked against the kind of its default: numbers (weights,
    sizes, counts) must be finite and >= 0, whole where the default is whole; flags must be bool.
    A bad value raises ``ValueError`` naming the option, when the policy is made, not on the first
    routed request."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{policy}: option {key}={value!r} {why} (default {default!r})")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad("must be a number")
        if not math.isfinite(value) or value < 0:
            raise bad("must be a finite number >= 0")
        if isinstance(default, int):
            if value != int(value):
                raise bad("must be a whole number")
            return int(value)
        return float(value)
    return value


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
        if issubclass(cls, _REGISTRY["custom"]) and options.get("fn") is None:
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
        return _REGISTRY["custom"](spec, **options)  # nbkit.policies.simple.CustomPolicy
    raise TypeError(f"get_policy: expected a name, a Policy, a Policy subclass or a callable, "
                    f"got {type(spec).__name__}")
