"""LoRA affinity, an option of every policy: a request for an adapter goes to a rank that holds it,
unless those are all busier than another rank by more than ``lora_margin`` (or none holds it);
then the policy picks among the others and the adapter is loaded there first (the loading is the
router's or the simulator's business: :mod:`nbkit.routing.lora`, :mod:`nbkit.sim.lora`)::

    >>> from nbkit.policies import RankLoad, RequestInfo, get_policy
    >>> ranks = [RankLoad("r0", 0, pending_decode_tokens=900, loras=frozenset({"sql"})),
    ...          RankLoad("r1", 1, pending_decode_tokens=100, loras=frozenset())]
    >>> get_policy("least_load").select(ranks, RequestInfo(lora="sql")).reason
    'least_load: load 900 (only candidate); lora sql: held by r0'
    >>> get_policy("least_load:lora_margin=500").select(ranks, RequestInfo(lora="sql")).reason
    'least_load: load 100 (only candidate); lora sql: load on r1 (holders busier: load 900 > 100 + margin 500)'

The options (every policy takes them, ``get_policy("power_of_two:lora_margin=256")``):
``lora_margin`` (tokens of :func:`~nbkit.policies.load_score`, default 1024: about what loading an
adapter costs, in work a rank could do meanwhile) and ``lora_affinity`` (default true; false: the
policy ignores where adapters are, and they are loaded wherever it sends a request). It applies
only where the ranks' adapters are known (``RankLoad.loras`` is not None: a router with a LoRA
table, a simulator whose instances serve LoRA); elsewhere a policy decides as before.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from nbkit.policies.base import (DEFAULT_KV_WEIGHT, DEFAULT_TOKENS_PER_WAITING, Choice, RankLoad, RequestInfo,
                                 _fmt, load_score)

#: the options every policy takes for LoRA requests, and their defaults
LORA_OPTIONS = {"lora_margin": 1024.0, "lora_affinity": True}


def applies(policy, candidates: Sequence[RankLoad], request: RequestInfo) -> bool:
    """Whether LoRA affinity decides ``request``: it names an adapter, the policy has affinity on,
    and the candidates' adapters are known."""
    return bool(request.lora) and getattr(policy, "lora_affinity", True) and \
        any(c.loras is not None for c in candidates)


def lora_select(policy, candidates: Sequence[RankLoad], request: RequestInfo) -> Choice:
    """``policy``'s choice for a LoRA request (see the module docstring): among the holders of
    its adapter, or among the other ranks when the holders are busier by more than the margin
    (or there are none). The reason says which and why."""
    name = request.lora
    holders = [c for c in candidates if c.loras is not None and name in c.loras]
    others = [c for c in candidates if c.loras is None or name not in c.loras]
    if not holders:
        choice = policy._select(others, request)
        return _note(choice, f"lora {name}: load on {choice.key} (no rank holds it)")
    if others:
        tpw = getattr(policy, "tokens_per_waiting", DEFAULT_TOKENS_PER_WAITING)
        kvw = getattr(policy, "kv_weight", DEFAULT_KV_WEIGHT)
        held = min(load_score(c, tpw, kv_weight=kvw) for c in holders)
        free = min(load_score(c, tpw, kv_weight=kvw) for c in others)
        margin = policy.lora_margin
        if held > free + margin:
            choice = policy._select(others, request)
            return _note(choice, f"lora {name}: load on {choice.key} (holders busier: load {_fmt(held)} > "
                                 f"{_fmt(free)} + margin {_fmt(margin)})")
    choice = policy._select(holders, request)
    more = f" (1 of {len(holders)} holders)" if len(holders) > 1 else ""
    return _note(choice, f"lora {name}: held by {choice.key}{more}")


def _note(choice: Choice, note: str) -> Choice:
    return dataclasses.replace(choice, reason=f"{choice.reason}; {note}" if choice.reason else note)
