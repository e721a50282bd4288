"""Tenants in the simulator: the live router's admission on simulated time, so "what happens to
tenant A's p99 when B starts a batch job" is answered before it happens::

    from nbkit.sim import Simulator
    sim = Simulator("cluster.json", policy="least_load", tenants="tenants.toml",
                    max_per_rank=8, interactive_headroom=1)
    res = sim.run(trace)           # trace lines carry "tenant" (and optionally "priority")
    print(res.format_summary())    # ... and a table per tenant: sent, ok, 429, TTFT p50/p99, tok/s

The pieces are the router's own: :class:`~nbkit.policies.tenants.Tenants` (weights, priorities,
limits), :class:`~nbkit.policies.tenants.RateLimiter` (token buckets; over a limit the request is
answered ``http_429`` on arrival, as the endpoint does), :class:`~nbkit.policies.slots.Slots`
(``max_per_rank``, ``max_concurrency``, ``interactive_headroom``) and the
:class:`~nbkit.policies.tenants.FairQueue` (priority first, then weighted fair share on tokens
across tenants, FIFO within one). A request that finds no instance with a free slot waits in the
queue; every finished request frees its slot and the queue is served in its order, each granted
request routed by the policy among the instances with room. A slot is held from routing to the
request's last token, as the router's lease is.

A trace's tenant that the configuration does not name is an error (the trusted client's 400);
without a configuration every request is the default tenant's (one FIFO queue, no limits) but
keeps its trace tenant's name in the records, so a FIFO baseline is reported per tenant too.
"""

from __future__ import annotations

from typing import Any

from nbkit.policies.slots import Slots, request_cost
from nbkit.policies.tenants import FairQueue, RateLimiter, Tenant, as_tenants, parse_priority

__all__ = ["SimAdmission"]


class SimAdmission:
    """One run's admission state (see the module doc); the simulator owns it."""

    def __init__(self, tenants: Any = None, *, max_per_rank: int | None = None, max_concurrency: int | None = None,
                 interactive_headroom: int = 0):
        self.tenants = as_tenants(tenants)
        self.configured = tenants is not None
        self.slots = Slots(max_per_rank, max_concurrency, interactive_headroom)
        self.reset()

    def reset(self) -> None:
        """A new run: full buckets, nobody queued or holding a slot."""
        self.limiter = RateLimiter(self.tenants, clock=lambda: 0.0)   # simulated time comes with each check
        self.queue = FairQueue()
        self.held: dict[int, int] = {}      # instance index -> requests holding a slot there
        self.in_flight = 0

    def classify(self, tenant: str | None, priority: Any, where: str) -> tuple[Tenant, str, int]:
        """The request's limits, its name in the records and its priority. ``where`` names the
        request in errors."""
        t = self.tenants.get(tenant) if tenant else self.tenants.default
        if t is None:
            if self.configured:
                raise ValueError(f"{where}: tenant={tenant!r}: no such tenant (configured: "
                                 f"{', '.join(self.tenants.names) or 'none'})")
            t = self.tenants.default
        name = t.name if self.configured or not tenant else tenant
        prio = t.priority if priority is None else parse_priority(priority, where=f"{where}: priority")
        return t, name, prio

    def charge(self, tenant: Tenant, prompt: int, output: int, now: float) -> bool:
        """Take the request from its tenant's buckets at simulated ``now``; False: throttled (429)."""
        if tenant.requests_per_minute is None and tenant.tokens_per_minute is None:
            return True
        return self.limiter.check(tenant, request_cost(prompt, output), now=now) is None

    def has_room(self, index: int, priority: int) -> bool:
        return self.slots.rank_room(self.held.get(index, 0), priority)

    def total_room(self, priority: int) -> bool:
        return self.slots.total_room(self.in_flight, priority)

    def hold(self, index: int) -> None:
        self.held[index] = self.held.get(index, 0) + 1
        self.in_flight += 1

    def release(self, index: int) -> None:
        self.held[index] -= 1
        self.in_flight -= 1

    def wait(self, job: Any, tenant: Tenant, priority: int, prompt: int, output: int) -> None:
        self.queue.push(job, tenant=tenant.name, weight=tenant.weight, priority=priority,
                        cost=request_cost(prompt, output))
