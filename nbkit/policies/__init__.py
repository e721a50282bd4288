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

from nbkit.policies.base import (DEFAULT_KV_WEIGHT, DEFAULT_TOKENS_PER_WAITING, Choice, NoCandidateError, Policy,
                                 PolicySpec, RankLoad, RequestInfo, available_policies, get_policy, load_score,
                                 register)
from nbkit.policies.simple import CustomPolicy, LeastOutstandingPolicy, RandomPolicy, RoundRobinPolicy
from nbkit.policies.load import LeastLoadPolicy, PowerOfTwoPolicy
from nbkit.policies.prefix import PrefixAffinityPolicy
from nbkit.policies.session import SessionPolicy
from nbkit.policies.kv import KVAwarePolicy

__all__ = [
    "RankLoad", "RequestInfo", "Choice", "Policy", "NoCandidateError", "register", "get_policy",
    "available_policies", "load_score", "PolicySpec", "RoundRobinPolicy", "RandomPolicy",
    "LeastOutstandingPolicy", "LeastLoadPolicy", "PowerOfTwoPolicy", "PrefixAffinityPolicy",
    "SessionPolicy", "CustomPolicy", "KVAwarePolicy", "DEFAULT_TOKENS_PER_WAITING", "DEFAULT_KV_WEIGHT",
]
