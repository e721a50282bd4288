"""Arrival processes: when each workload item is sent.

    from nbkit.bench.arrivals import Poisson, Constant, Bursts, TraceTimes, ClosedLoop
    Poisson(rate=8.0)                      # open loop, exponential gaps (burstiness=1); gamma gaps otherwise
    Poisson(rate=8.0, max_concurrency=32)  # ... but at most 32 requests in flight (others wait to be sent)
    Constant(rate=8.0)                     # one every 1/rate s
    Bursts(size=16, interval_s=2.0)        # 16 at once every 2 s
    TraceTimes(time_scale=0.5)             # the workload's own timestamps (traces), twice as fast
    ClosedLoop(concurrency=16)             # 16 users: the next item starts when one finishes

Open-loop processes give item k its send time ``times(n, seed)[k]`` (seconds after the start,
non-decreasing, the first at 0); the same seed gives the same times. ``Poisson`` with
``burstiness`` b draws gamma gaps of shape b and mean 1/rate, as ``vllm bench serve
--burstiness`` does (b=1 is Poisson; b<1 burstier, b>1 more regular). A rate of ``inf`` sends
everything at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class Arrivals:
    """Base: ``closed`` tells a closed loop; open loops implement :meth:`times`."""

    closed = False
    max_concurrency: int | None = None

    def times(self, n: int, seed: int | None = 0, items=None) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        from dataclasses import asdict
        return {"arrivals": type(self).__name__, **asdict(self)}


def _check_cap(c) -> None:
    if c is not None and (not isinstance(c, int) or c < 1):
        raise ValueError(f"max_concurrency={c!r}: must be a positive integer or None")


@dataclass
class Poisson(Arrivals):
    rate: float
    burstiness: float = 1.0
    max_concurrency: int | None = None

    def __post_init__(self):
        if not self.rate > 0:
            raise ValueError(f"rate={self.rate!r}: must be > 0 requests/s (inf: all at once)")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness={self.burstiness!r}: must be > 0")
        _check_cap(self.max_concurrency)

    def times(self, n: int, seed: int | None = 0, items=None) -> np.ndarray:
        if n <= 0:
            return np.zeros(0)
        if math.isinf(self.rate):
            return np.zeros(n)
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(self.burstiness, 1.0 / (self.rate * self.burstiness), size=n - 1)
        return np.concatenate([[0.0], np.cumsum(gaps)])


@dataclass
class Constant(Arrivals):
    rate: float
    max_concurrency: int | None = None

    def __post_init__(self):
        if not self.rate > 0:
            raise ValueError(f"rate={self.rate!r}: must be > 0 requests/s")
        _check_cap(self.max_concurrency)

    def times(self, n: int, seed: int | None = 0, items=None) -> np.ndarray:
        if math.isinf(self.rate):
            return np.zeros(max(n, 0))
        return np.arange(max(n, 0)) / self.rate


@dataclass
class Bursts(Arrivals):
    size: int
    interval_s: float
    max_concurrency: int | None = None

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size={self.size!r}: must be a positive integer")
        if not self.interval_s >= 0:
            raise ValueError(f"interval_s={self.interval_s!r}: must be >= 0")
        _check_cap(self.max_concurrency)

    @property
    def rate(self) -> float:
        return self.size / self.interval_s if self.interval_s else math.inf

    def times(self, n: int, seed: int | None = 0, items=None) -> np.ndarray:
        return (np.arange(max(n, 0)) // self.size) * float(self.interval_s)


@dataclass
class TraceTimes(Arrivals):
    """The items' own ``arrival_s`` (trace timestamps), times ``time_scale``."""

    time_scale: float = 1.0
    max_concurrency: int | None = None

    def __post_init__(self):
        if not self.time_scale >= 0:
            raise ValueError(f"time_scale={self.time_scale!r}: must be >= 0")
        _check_cap(self.max_concurrency)

    def times(self, n: int, seed: int | None = 0, items=None) -> np.ndarray:
        if items is None:
            raise ValueError("TraceTimes needs the workload's items")
        items = list(items)[:n]
        missing = [k for k, it in enumerate(items) if it.arrival_s is None]
        if missing:
            raise ValueError(f"TraceTimes: item {missing[0]} has no arrival_s (not a trace workload); "
                             "use Poisson/Constant/ClosedLoop")
        t = np.array([it.arrival_s for it in items], dtype=float) * self.time_scale
        return t - t.min() if t.size else t


@dataclass
class ClosedLoop(Arrivals):
    """``concurrency`` workers; each sends its next item as soon as its previous one finished."""

    concurrency: int

    closed = True

    def __post_init__(self):
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency!r}: must be a positive integer")

    @property
    def max_concurrency(self) -> int:  # type: ignore[override]
        return self.concurrency


def make_arrivals(request_rate: float | None = None, concurrency: int | None = None, *, kind: str = "poisson",
                  burstiness: float = 1.0, burst_size: int | None = None, workload=None) -> Arrivals:
    """The arrival process of the usual knobs (``vllm bench serve`` style):

    - ``request_rate`` given: open loop of ``kind`` (poisson, constant, burst) at that rate,
      ``concurrency`` (if given) caps the requests in flight;
    - only ``concurrency``: closed loop with that many workers;
    - neither: the workload's timestamps if it has them (a trace), else everything at once.
    """
    if request_rate is not None and not request_rate > 0:
        raise ValueError(f"request_rate={request_rate!r}: must be > 0 (inf: all at once)")
    if request_rate is None:
        if concurrency is not None:
            return ClosedLoop(int(concurrency))
        if workload is not None and getattr(workload, "has_timestamps", False):
            return TraceTimes()
        return Poisson(math.inf)
    kind = kind.lower()
    if kind == "poisson":
        return Poisson(float(request_rate), burstiness=burstiness, max_concurrency=concurrency)
    if kind == "constant":
        return Constant(float(request_rate), max_concurrency=concurrency)
    if kind in ("burst", "bursts"):
        size = int(burst_size or 8)
        return Bursts(size, size / float(request_rate) if not math.isinf(request_rate) else 0.0,
                      max_concurrency=concurrency)
    if kind == "trace":
        return TraceTimes(max_concurrency=concurrency)
    raise ValueError(f"arrivals={kind!r}: choose poisson, constant, burst or trace")
