"""What the cluster simulator's policy sees of a group of engines: one
:class:`~nbkit.policies.RankLoad` per engine, read from its exact state, and the decision made on
them::

    view = LoadView(engines, policy)         # the entry instances, or the decode ones
    cands = view(now)                        # RankLoads as of `now` (planned runs synced)
    choice = view.select(cands, info)        # policy.select(cands, info), the same choice

``RankLoad.index`` is the engine's position in the config, ``key`` its name; ``in_flight``,
pending prefill/decode tokens (as the live router accounts them), ``running``, ``waiting`` and
``kv_cache_usage`` are the engine's, ``stale`` is False.

A policy object gets the same RankLoads at every decision, refreshed in place for the engines whose
state changed since the last one (``Engine.dirty``; at 64 instances most are unchanged between two
arrivals). A custom function gets fresh ones: it may keep them. Where the policy's choice is the
candidate of least cost, each from its own RankLoad (``policy.cost_of()``: least load, least
outstanding), the view keeps the costs too, computes them only for the RankLoads it refreshed, and
asks ``policy.select_by_cost``: a decision then costs O(changed engines) policy calls, not
O(engines). Candidates filtered from the view (autoscaling, admission) or a request naming a LoRA
adapter go to ``policy.select`` as they are.
"""

from __future__ import annotations

from typing import Sequence

from nbkit.policies import Choice, CustomPolicy, Policy, RankLoad, RequestInfo
from nbkit.sim.engine import Engine
from nbkit.sim.runs import STEPS

__all__ = ["LoadView", "rank_loads"]


def rank_loads(engines: Sequence[Engine]) -> list[RankLoad]:
    """New RankLoads of ``engines`` (their state as it is: sync planned runs first)."""
    return [RankLoad(e.key, e.index, e.in_flight, e.pend_prefill, e.pend_dec_other + e.A - e.D * e.g,
                     len(e.running), len(e.waiting),
                     (e.num_blocks - e.free_plain - len(e.evictable)) / e.num_blocks, False)
            for e in engines]


class LoadView:
    """The RankLoads of ``engines`` for ``policy`` (see the module doc). Calling it with the time
    gives them as of that time; :meth:`select` decides on them."""

    def __init__(self, engines: Sequence[Engine], policy: Policy):
        self.engines = list(engines)
        self.policy = policy
        self.fresh = isinstance(policy, CustomPolicy)
        self.cost = None if self.fresh else policy.cost_of()
        self.view = [RankLoad(e.key, e.index, stale=False) for e in self.engines]
        self.costs: list[float] = [0.0] * len(self.view)
        for e in self.engines:
            e.dirty = True

    def __call__(self, now: float) -> list[RankLoad]:
        engines = self.engines
        if self.fresh:
            for e in engines:
                if e.next_sync <= now:
                    e.sync(now)
            return rank_loads(engines)
        view, costs, cost = self.view, self.costs, self.cost
        for k in [k for k, e in enumerate(engines) if e.dirty or e.next_sync <= now]:
            e = engines[k]
            if e.next_sync <= now:
                e.sync(now)
            d = e.dirty
            if d:
                e.dirty = False
                r = view[k]
                if d != STEPS:          # (STEPS: only planned steps ran since)
                    r.in_flight = e.in_flight
                    r.pending_prefill_tokens = e.pend_prefill
                    r.running = len(e.running)
                    r.waiting = len(e.waiting)
                r.pending_decode_tokens = e.pend_dec_other + e.A - e.D * e.g
                nb = e.num_blocks
                r.kv_cache_usage = (nb - e.free_plain - len(e.evictable)) / nb
                if cost is not None:
                    costs[k] = cost(r)
        return view

    def select(self, cands: Sequence[RankLoad], info: RequestInfo) -> Choice:
        """``policy.select(cands, info)``: by the kept costs where ``cands`` is the whole view."""
        if cands is self.view and self.cost is not None and cands and not info.lora:
            return self.policy.select_by_cost(cands, self.costs, info)
        return self.policy.select(cands, info)
