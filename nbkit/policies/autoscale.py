"""SLO autoscaling, the decision part: how many replicas, given what the requests measured.

Like the routing policies, an :class:`Autoscaler` is pure Python (no I/O, no clock of its own), so
the simulator and a live cluster run the same object: the owner feeds it each finished request's
TTFT and, every ``interval_s``, the fleet's state, and acts on the :class:`ScaleDecision` it
returns (start a replica; drain one, then stop it)::

    >>> from nbkit.policies.autoscale import Autoscaler, AutoscaleSpec
    >>> spec = AutoscaleSpec.parse("min=1,max=4,ttft_p90_ms=500")
    >>> scaler = Autoscaler(spec)
    >>> for k in range(20):
    ...     scaler.observe(t=10.0 + k * 0.1, ttft_s=0.9)        # every request misses the SLO
    >>> d = scaler.decide(t=12.0, ready=1, starting=0, waiting=6)
    >>> d.direction, d.desired, d.reason
    ('up', 2, 'ttft p90 900 ms >= 400 ms (0.8 x the 500 ms SLO) over 20 requests in 30 s; 6 waiting')

Rules (all thresholds are fields of :class:`AutoscaleSpec`):

- **up** when the SLO is at risk: the TTFT percentile over the last ``window_s`` seconds is
  at or above ``up_at`` x the target (with at least ``min_samples`` requests), or requests wait
  and their number grew by ``queue_growth`` per second or more since the last decision. By as many
  replicas as it takes to serve what comes in (requests finished per second, plus the queue's
  growth, plus the backlog cleared within a window) at ``up_at`` of a replica's *capacity* (the
  most requests per second one finished while requests waited; before any such reading, what
  each finishes now), at least one, at most ``max_step``. Replicas still starting count as there
  (no overshoot); without a capacity reading nothing is added while one starts. Not within
  ``up_cooldown_s`` of the last scale-up, never above ``max_replicas``.
- **down** by one when load allows: nothing waits, the percentile is below ``down_at`` x the
  target (or no request finished in the window), the finish rate is not rising (5 %) since the
  last decision, and it fits in one replica less at ``scale_in_util`` of the capacity; for
  ``down_cooldown_s`` since the last change of either kind (hysteresis: ``down_at`` < ``up_at``),
  never below ``min_replicas``. The owner drains the replica (no new requests; in-flight ones
  finish) before stopping it.
- otherwise **hold**. Every decision carries its reason; ``history`` keeps the ups and downs.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Literal

Direction = Literal["up", "down", "hold"]


_ALIASES = {"min": "min_replicas", "max": "max_replicas", "ttft_ms": "ttft_p90_ms", "cold_start": "cold_start_s"}


class AutoscaleSpecError(ValueError):
    """An autoscale option with a bad name or value; the message names it."""


@dataclass(frozen=True)
class AutoscaleSpec:
    """What the autoscaler holds to, and how eagerly (times in seconds of the owner's clock)."""

    min_replicas: int = 1
    max_replicas: int = 4
    ttft_p90_ms: float = 500.0    # the SLO: this percentile of TTFT at most this many ms
    percentile: float = 90.0
    window_s: float = 30.0        # TTFTs of requests finished this long ago at most
    interval_s: float = 5.0       # how often the owner asks for a decision
    up_at: float = 0.8            # at risk from this fraction of the target
    down_at: float = 0.3          # calm below this fraction
    queue_growth: float = 1.0     # waiting requests per second of growth that is at risk by itself
    min_samples: int = 10
    max_step: int = 4             # replicas added at once at most (the step follows the queue's growth)
    scale_in_util: float = 0.6    # scale down only if the others then run below this share of capacity
    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 120.0
    cold_start_s: float = 60.0    # simulator: a new replica serves this long after it is started

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> AutoscaleSpecError:
            return AutoscaleSpecError(f"autoscale {name}={getattr(self, name)!r}: {why}")
        if self.min_replicas < 1:
            raise bad("min_replicas", "must be >= 1")
        if self.max_replicas < self.min_replicas:
            raise bad("max_replicas", f"must be >= min_replicas ({self.min_replicas})")
        for name in ("ttft_p90_ms", "window_s", "interval_s", "up_at", "queue_growth"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        if not 0 < self.percentile <= 100:
            raise bad("percentile", "must be in (0, 100]")
        if not 0 <= self.down_at < self.up_at:
            raise bad("down_at", f"must be >= 0 and below up_at ({self.up_at})")
        for name in ("up_cooldown_s", "down_cooldown_s", "cold_start_s"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.min_samples < 1:
            raise bad("min_samples", "must be >= 1")
        if self.max_step < 1:
            raise bad("max_step", "must be >= 1")
        if not 0 < self.scale_in_util < self.up_at:
            raise bad("scale_in_util", f"must be > 0 and below up_at ({self.up_at})")

    @classmethod
    def parse(cls, text: str) -> "AutoscaleSpec":
        """``"min=1,max=4,ttft_p90_ms=500"`` (any field; ``min``, ``max``, ``ttft_ms`` and
        ``cold_start`` are short for the long names).

        >>> AutoscaleSpec.parse("min=2,max=8,ttft_p90_ms=300,cold_start=90").cold_start_s
        90.0
        >>> try:
        ...     AutoscaleSpec.parse("max=4,speed=9")
        ... except AutoscaleSpecError as e:
        ...     print(str(e)[:43])
        autoscale option 'speed': unknown (known: c
        """
        types = {f.name: f.type for f in fields(cls)}
        kw: dict = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            key, eq, value = part.partition("=")
            key = _ALIASES.get(key.strip(), key.strip())
            if key not in types:
                raise AutoscaleSpecError(f"autoscale option {key!r}: unknown (known: {', '.join(sorted(types))})")
            if not eq:
                raise AutoscaleSpecError(f"autoscale option {key!r}: needs a value ({key}=...)")
            try:
                kw[key] = int(value) if types[key] in ("int", int) else float(value)
            except ValueError:
                raise AutoscaleSpecError(f"autoscale option {key}={value.strip()!r}: not a number") from None
        return cls(**kw)

    @classmethod
    def argument(cls, text: str) -> "AutoscaleSpec":
        """:meth:`parse` as an argparse ``type=`` (a bad option becomes argparse's own error)::

            ap.add_argument("--autoscale", type=AutoscaleSpec.argument)
        """
        import argparse
        try:
            return cls.parse(text)
        except AutoscaleSpecError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    @property
    def target_s(self) -> float:
        return self.ttft_p90_ms / 1000.0


@dataclass(frozen=True)
class ScaleDecision:
    """One decision: at ``t``, from ``current`` (ready + starting) to ``desired`` replicas, and why."""

    t: float
    direction: Direction
    current: int
    desired: int
    reason: str
    ttft_s: float | None = None   # the window's TTFT percentile (None: too few requests)
    samples: int = 0
    waiting: int = 0


@dataclass
class Autoscaler:
    """The control rules of :mod:`nbkit.policies.autoscale` over a sliding window of TTFTs."""

    spec: AutoscaleSpec = field(default_factory=AutoscaleSpec)
    history: list[ScaleDecision] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque()
        self._last_up = -math.inf
        self._last_change = -math.inf
        self._last_t: float | None = None
        self._last_waiting = 0
        self._last_rate: float | None = None
        self.capacity: float | None = None   # requests/s one replica finished while requests waited

    def observe(self, t: float, ttft_s: float) -> None:
        """A request finished (or got its first token) at ``t`` after waiting ``ttft_s`` for it."""
        self._samples.append((t, ttft_s))

    def window(self, t: float) -> list[float]:
        """The TTFTs observed in the last ``window_s`` seconds before ``t``, sorted."""
        cut = t - self.spec.window_s
        while self._samples and self._samples[0][0] < cut:
            self._samples.popleft()
        return sorted(v for _, v in self._samples)

    def _pct(self, values: list[float]) -> float:
        k = max(0, min(len(values) - 1, math.ceil(self.spec.percentile / 100 * len(values)) - 1))
        return values[k]

    def decide(self, t: float, ready: int, starting: int = 0, waiting: int = 0) -> ScaleDecision:
        """What to do at ``t`` with ``ready`` replicas serving, ``starting`` on their way and
        ``waiting`` requests queued (on the replicas or in front of them)."""
        s = self.spec
        cur = ready + starting
        vals = self.window(t)
        p = self._pct(vals) if len(vals) >= s.min_samples else None
        dt = None if self._last_t is None else t - self._last_t
        growth = (waiting - self._last_waiting) / dt if dt else 0.0
        self._last_t, self._last_waiting = t, waiting
        ms = lambda x: f"{x * 1000:.0f} ms"  # noqa: E731
        seen = (f"ttft p{s.percentile:g} {ms(p)}" if p is not None else f"{len(vals)} request(s), too few for a p{s.percentile:g}")
        where = f"over {len(vals)} requests in {s.window_s:g} s" if p is not None else f"in {s.window_s:g} s"
        rate = len(vals) / s.window_s                     # requests finished per second, all replicas
        if waiting > 0 and ready and len(vals) >= s.min_samples:   # saturated: what a replica can do
            self.capacity = max(self.capacity or 0.0, rate / ready)
        risk_ttft = p is not None and p >= s.up_at * s.target_s
        risk_queue = waiting > 0 and growth >= s.queue_growth

        def out(direction: Direction, desired: int, reason: str) -> ScaleDecision:
            d = ScaleDecision(t, direction, cur, desired, reason, p, len(vals), waiting)
            if direction != "hold":
                self.history.append(d)
            return d

        if risk_ttft or risk_queue:
            why = (f"{seen} >= {ms(s.up_at * s.target_s)} ({s.up_at:g} x the {ms(s.target_s)} SLO) {where}"
                   if risk_ttft else f"{seen} {where}, queue grew {growth:.1f}/s to {waiting}")
            if risk_ttft:
                why += f"; {waiting} waiting"
            if cur >= s.max_replicas:
                return out("hold", cur, f"{why}; at max_replicas {s.max_replicas}")
            # what comes in (finishing + piling up, the backlog cleared within a window) over what a
            # replica does at up_at of its capacity: the replicas it takes, those starting counted
            need = rate + max(growth, 0.0) + waiting / s.window_s
            per = self.capacity or rate / max(ready, 1)
            want = math.ceil(need / (s.up_at * per)) if per > 0 else cur + 1
            if starting and (self.capacity is None or want <= cur):
                return out("hold", cur, f"{why}; {starting} replica(s) still starting")
            if t - self._last_up < s.up_cooldown_s:
                return out("hold", cur, f"{why}; scale-up cooldown ({t - self._last_up:.0f} of {s.up_cooldown_s:g} s)")
            step = max(1, min(s.max_step, want - cur))
            if step > 1:
                why += f"; +{step}: {need:.1f} req/s to serve at {per:.1f}/s a replica"
            self._last_up = self._last_change = t
            return out("up", min(s.max_replicas, cur + step), why)
        rising = self._last_rate is not None and rate > 1.05 * self._last_rate
        self._last_rate = rate
        fits = self.capacity is None or rate <= s.scale_in_util * self.capacity * (ready - 1)
        calm = waiting == 0 and (p is None or p < s.down_at * s.target_s) and fits and not rising
        if calm and cur > s.min_replicas and not starting:
            why = (f"{seen} < {ms(s.down_at * s.target_s)} ({s.down_at:g} x the SLO) {where}, nothing waiting"
                   if p is not None else f"{seen} {where}, nothing waiting")
            if t - self._last_change < s.down_cooldown_s:
                return out("hold", cur, f"{why}; cooldown ({t - self._last_change:.0f} of {s.down_cooldown_s:g} s)")
            self._last_change = t
            return out("down", cur - 1, why)
        if waiting == 0 and rising and cur > s.min_replicas:
            return out("hold", cur, f"{seen} {where}, load rising ({self._last_rate:.1f} req/s finished): no scale-down")
        if waiting == 0 and not fits and cur > s.min_replicas:
            return out("hold", cur, f"{seen} {where}, {rate:.1f} req/s would not fit in {ready - 1} replica(s) "
                                    f"at {self.capacity:.1f} req/s each")
        return out("hold", cur, f"{seen} {where}, {waiting} waiting: within the SLO band")


__all__ = ["Autoscaler", "AutoscaleSpec", "AutoscaleSpecError", "ScaleDecision"]
