"""What the router keeps: one :class:`RequestRecord` per request (where it went, why, how it went)
and one :class:`RankState` per rank (nbkit's own accounting plus the last scrape), which policies
see through its :class:`~nbkit.policies.RankLoad` view."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from nbkit.policies import RankLoad
from nbkit.routing.metrics import EngineMetrics


@dataclass
class RequestRecord:
    """One request's story: where it went, why, and how it went."""

    id: int
    path: str
    policy: str
    rank: str = ""
    replica: int = -1
    dp_rank: int = 0
    reason: str = ""
    arrival: float = 0.0          # time.time() at arrival
    queue_wait_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    outcome: str = "pending"      # ok | error | cancelled | shed | http_<status>
    attempts: int = 1
    migrations: int = 0           # times a broken stream was continued on another rank
    error: str = ""
    prefill_rank: str = ""        # prefill/decode split: where the prompt was prefilled
    prefill_s: float | None = None  # ... and how long that took
    cached_tokens: int = 0        # prompt tokens the policy expected the rank to hold cached (kv_aware: exact)
    tenant: str = "default"       # who sent it (the endpoint's tenants; see nbkit.routing.admission)
    priority: int = 0


@dataclass
class RankState:
    """Mechanism-side state of one rank (the policy sees a :class:`RankLoad` view of it)."""

    rank: object                  # nbkit.routing.rank.Rank
    index: int
    in_flight: int = 0
    pending_prefill_tokens: int = 0
    pending_decode_tokens: int = 0
    scraped: EngineMetrics | None = None
    healthy: bool = True
    added_at: float = field(default_factory=time.monotonic)
    failures: int = 0
    open_until: float = 0.0
    picks: int = 0
    inflight_peak: int = 0        # max in_flight since the last scrape was sent
    inflight_seen: int = 0        # ... frozen when that scrape answered (see load_score)
    scrape_error: str = ""        # why the last scrape failed ("" after a good one)
    down: str = ""                # why the rank is known dead (its process exited); "" while it may serve

    @property
    def key(self) -> str:
        return self.rank.name

    def view(self, stale_after: float, now: float) -> RankLoad:
        m = self.scraped
        stale = m is None or now - m.scraped_at > stale_after
        return RankLoad(
            key=self.key, index=self.index, in_flight=self.in_flight, in_flight_seen=self.inflight_seen,
            pending_prefill_tokens=self.pending_prefill_tokens, pending_decode_tokens=self.pending_decode_tokens,
            running=m.running if m else 0.0, waiting=m.waiting if m else 0.0,
            kv_cache_usage=m.kv_cache_usage if m else 0.0, stale=stale,
            healthy=self.healthy and not self.down and time.monotonic() >= self.open_until,
        )
