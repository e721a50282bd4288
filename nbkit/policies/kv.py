"""``kv_aware``: route on what each rank really caches, from vLLM's own KV-cache events.

Expected cost per rank, lowest wins::

    cost = load_score(rank) + prefill_weight * (prompt tokens - tokens the rank holds cached)

where the cached tokens are the exact prefix match of the prompt's token ids against the rank's
blocks in the :class:`~nbkit.policies.kv_index.KVIndex` (fed by ``BlockStored`` / ``BlockRemoved``
events), extended by the blocks of requests already dispatched there and not finished yet (their
prefill stores them in a moment). The queued work in ``load_score`` counts those requests'
uncached prefill, so a burst on one prefix spreads once its rank is busier than a second copy of
the prefix would cost. The choice carries the matched tokens, so the router charges the rank only
the uncached part as pending prefill, and its reason names the match per rank::

    kv_aware: replica0 896/1010 cached, cost 114 < replica1 0/1010 cached, cost 1010

When the index cannot be trusted for a candidate (no events from it, a sequence gap, a router
without a tokenizer so no token ids), the decision is made by ``prefix_affinity`` instead and
says so: the reason starts ``kv_aware -> prefix_affinity (...)`` and ``Choice.fallback`` names the
cause (the router logs it and counts it in ``/metrics``).

Options: ``prefill_weight`` (1.0: an uncached prompt token costs one queued token),
``tokens_per_waiting``, ``kv_weight`` (as ``least_load``), ``pending_blocks`` (1: count in-flight
requests' blocks as cached), ``max_pending`` (requests remembered per rank).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

from nbkit.policies.base import Choice, RankLoad, RequestInfo, _fmt, register
from nbkit.policies.kv_index import block_keys
from nbkit.policies.load import _LoadAware
from nbkit.policies.prefix import PrefixAffinityPolicy


@register("kv_aware")
class KVAwarePolicy(_LoadAware):
    """See the module docstring."""

    uses_kv_index = True
    defaults: ClassVar[dict[str, Any]] = {**_LoadAware.defaults, "prefill_weight": 1.0, "pending_blocks": 1,
                                          "max_pending": 4096}

    def __init__(self, seed: int | None = None, **options: Any):
        super().__init__(seed, **options)
        if self.prefill_weight < 0:
            raise ValueError("prefill_weight must be >= 0")
        self.max_pending = int(self.max_pending)
        if self.max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.fallback_policy = PrefixAffinityPolicy(seed, tokens_per_waiting=self.tokens_per_waiting,
                                                    kv_weight=self.kv_weight)
        # rank key -> in-flight request id -> its block keys (at that rank's block size)
        self.pending: dict[str, OrderedDict[int, list[bytes]]] = {}
        # (token ids, lora, block size, keys): the list itself, compared by identity; an id() alone
        # would be reused by the next prompt's list once this one is freed
        self._memo: tuple[list[int], str | None, int, list[bytes]] | None = None

    # -- the decision ------------------------------------------------------------------------------
    def _why_not(self, candidates, request: RequestInfo) -> str:
        if self.kv_index is None:
            return "no KV-event index"
        if request.token_ids is None:
            return "no token ids (the router has no tokenizer for this model)"
        cold = []
        for c in candidates:
            r = self.kv_index.ranks.get(c.key)
            if r is None or r.cold:
                cold.append(f"{c.key} {r.cold if r is not None else 'no events yet'}")
        return "; ".join(cold)

    def keys(self, request: RequestInfo, block_size: int) -> list[bytes]:
        """The prompt's block keys at ``block_size`` (memoized for the request being routed)."""
        ids = request.token_ids
        memo = self._memo
        if memo is not None and memo[0] is ids and memo[1] == request.lora and memo[2] == block_size:
            return memo[3]
        keys = block_keys(ids, block_size, request.lora)
        self._memo = (ids, request.lora, block_size, keys)
        return keys

    def cached(self, c: RankLoad, request: RequestInfo) -> int:
        """Tokens of the prompt rank ``c`` holds, or will once its in-flight requests have prefilled."""
        size = self.kv_index.block_size(c.key)
        keys = self.keys(request, size)
        exact = self.kv_index.match(c.key, request.token_ids, request.lora, keys=keys) // size
        best = exact
        if self.pending_blocks and best < len(keys):
            for other in self.pending.get(c.key, {}).values():
                n = 0
                for a, b in zip(keys, other):
                    if a != b:
                        break
                    n += 1
                best = max(best, n)
        return best * size

    def _select(self, candidates, request):
        why = self._why_not(candidates, request)
        if why:
            pick = self.fallback_policy._select(candidates, request)
            return Choice(pick.index, pick.key, f"kv_aware -> prefix_affinity ({why}): {pick.reason}",
                          cached_tokens=pick.cached_tokens, fallback=why)
        prompt = len(request.token_ids)
        rows = []
        for c in candidates:
            hit = min(self.cached(c, request), prompt)
            cost = self.score(c) + self.prefill_weight * (prompt - hit)
            rows.append((cost, c, hit))
        best = min(r[0] for r in rows)
        ties = [r for r in rows if r[0] - best <= 1e-9]
        cost, pick, hit = ties[0] if len(ties) == 1 else self.rng.choice(ties)
        others = " | ".join(f"{c.key} {h}/{prompt} cached, cost {_fmt(k)}" for k, c, h in rows if c is not pick)
        reason = f"kv_aware: {pick.key} {hit}/{prompt} cached, cost {_fmt(cost)}" + (f" < {others}" if others else "")
        return Choice(pick.index, pick.key, reason, cached_tokens=hit)

    # -- bookkeeping -------------------------------------------------------------------------------
    def on_dispatch(self, choice: Choice, request: RequestInfo) -> None:
        self.fallback_policy.on_dispatch(choice, request)
        if not self.pending_blocks or request.token_ids is None or self.kv_index is None:
            return
        per = self.pending.setdefault(choice.key, OrderedDict())
        per[id(request)] = self.keys(request, self.kv_index.block_size(choice.key))
        while len(per) > self.max_pending:
            per.popitem(last=False)

    def on_release(self, choice: Choice, request: RequestInfo) -> None:
        per = self.pending.get(choice.key)
        if per is not None:
            per.pop(id(request), None)

    def on_ranks_changed(self, keys):
        self.fallback_policy.on_ranks_changed(keys)
        live = set(keys)
        for k in [k for k in self.pending if k not in live]:
            del self.pending[k]
