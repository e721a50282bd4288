"""Several tenants' workloads as one: who sends what, how often, at which priority.

    from nbkit import bench
    w = bench.mix({
        "alice": {"workload": bench.synthetic(60, input_len=64, output_len=16), "rate": 1.0,
                  "priority": "interactive", "api_key": "key-alice"},
        "bob":   {"workload": bench.synthetic(600, input_len=256, output_len=64), "rate": 8.0,
                  "priority": "batch"},
    })
    res = bench.run(endpoint.url, w)         # each request carries its tenant (and key, priority)
    res.by_tenant()["alice"]["ttft_s"]["p99"]; print(res.report())   # a table per tenant

Every item of a part gets the part's tenant (and ``priority``, if given). A request carries it as
nbkit's endpoint reads it: the part's ``api_key`` as ``Authorization: Bearer`` (where the
endpoint's tenants have keys), else ``X-nbkit-tenant``; ``X-nbkit-priority`` where a priority is
given; through the in-kernel client (a Cluster target) as ``tenant=``/``priority=``. Rows record
the tenant (``RequestResult.tenant``).

Arrivals: with a ``rate`` (req/s) for every part, each part is its own Poisson process (seeded;
``arrival="constant"`` for even gaps) and the items are merged by time into one timestamped
workload, sent at those times (``bench.run`` without ``request_rate``). Without rates the parts'
items are interleaved in proportion to their sizes (seeded, each part's order kept) and sent on
the run's own arrival process. A part whose workload already has timestamps (a trace) keeps them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from nbkit.bench.arrivals import make_arrivals
from nbkit.bench.workloads import Workload

__all__ = ["mix"]

_KEYS = {"workload", "rate", "priority", "api_key"}


def _part(name: str, spec: Any) -> dict[str, Any]:
    if isinstance(spec, Workload):
        spec = {"workload": spec}
    if not isinstance(spec, Mapping):
        raise TypeError(f"mix: tenant {name!r}: expected a Workload or a dict with 'workload', got {type(spec).__name__}")
    extra = sorted(set(spec) - _KEYS)
    if extra:
        raise ValueError(f"mix: tenant {name!r}: unknown key(s) {', '.join(extra)} (expected {', '.join(sorted(_KEYS))})")
    if not isinstance(spec.get("workload"), Workload):
        raise TypeError(f"mix: tenant {name!r}: 'workload' must be a Workload")
    rate = spec.get("rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
        raise ValueError(f"mix: tenant {name!r}: rate={rate!r} must be > 0 requests/s")
    prio = spec.get("priority")
    if prio is not None:
        from nbkit.policies.tenants import parse_priority
        parse_priority(prio, where=f"mix: tenant {name!r}: priority")
    key = spec.get("api_key")
    if key is not None and (not isinstance(key, str) or not key):
        raise ValueError(f"mix: tenant {name!r}: api_key must be a non-empty string")
    return dict(spec)


def mix(parts: Mapping[str, Any], *, seed: int = 0, arrival: str = "poisson", name: str | None = None) -> Workload:
    """One :class:`~nbkit.bench.workloads.Workload` of several tenants' (see the module doc).
    ``parts``: ``{tenant: Workload}`` or ``{tenant: {"workload": w, "rate": req/s, "priority": p,
    "api_key": k}}``. Errors name the tenant and the key."""
    if not parts:
        raise ValueError("mix: no tenants given")
    specs = {}
    for tenant, spec in parts.items():
        if not isinstance(tenant, str) or not tenant:
            raise ValueError(f"mix: tenant names must be non-empty strings, got {tenant!r}")
        specs[tenant] = _part(tenant, spec)
    timed = {t: s.get("rate") is not None or s["workload"].has_timestamps for t, s in specs.items()}
    if len(set(timed.values())) > 1:
        untimed = sorted(t for t, v in timed.items() if not v)
        raise ValueError(f"mix: give every tenant a rate (or none): {', '.join(untimed)} have none")
    tagged: dict[str, list] = {}
    for k, (tenant, s) in enumerate(specs.items()):
        w: Workload = s["workload"]
        items = list(w.items)
        times = None
        if s.get("rate") is not None:
            times = make_arrivals(float(s["rate"]), kind=arrival).times(len(items), seed + k, items)
        tagged[tenant] = [dataclasses.replace(it, tenant=tenant, priority=s.get("priority", it.priority),
                                              **({} if times is None else {"arrival_s": float(times[i])}))
                          for i, it in enumerate(items)]
    if all(timed.values()):
        merged = sorted((it for items in tagged.values() for it in items), key=lambda it: it.arrival_s)
    else:   # interleave in proportion, each part in its order
        labels = np.repeat(np.arange(len(tagged)), [len(v) for v in tagged.values()])
        np.random.default_rng(seed).shuffle(labels)
        its = [iter(v) for v in tagged.values()]
        merged = [next(its[j]) for j in labels]
    params = {"seed": seed, "arrival": arrival,
              "tenants": {t: {"workload": s["workload"].name, "items": len(s["workload"]),
                              **{k: s[k] for k in ("rate", "priority") if s.get(k) is not None}}
                          for t, s in specs.items()}}
    tokenizers = {s["workload"].tokenizer for s in specs.values()}
    return Workload(name or "mix:" + "+".join(specs), merged, tokenizers.pop() if len(tokenizers) == 1 else None,
                    params, {t: s["api_key"] for t, s in specs.items() if s.get("api_key")})
