"""A run's figures per tenant, the same for the load generator's rows and the simulator's: who
sent how many, how many were answered, throttled (HTTP 429) or failed, their TTFT and end-to-end
percentiles, queue wait and output tokens per second over the whole run.

    >>> from nbkit.records import RequestResult
    >>> rows = [RequestResult(str(k), arrival_s=k, ttft_s=0.1 * (k + 1), e2e_s=1.0, output_toks=10,
    ...                       tenant="a" if k % 2 else "b") for k in range(4)]
    >>> rows.append(RequestResult("4", arrival_s=4, outcome="http_429", tenant="b"))
    >>> t = tenant_summaries(rows, duration_s=5.0)
    >>> t["a"]["completed"], t["b"]["throttled"], t["b"]["output_throughput"]
    (2, 1, 4.0)
    >>> print(format_tenants(t).splitlines()[1].split()[:4])
    ['a', '2', '2', '0']

This module imports nothing of nbkit but :mod:`nbkit.records`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from nbkit.records import DEFAULT_PERCENTILES, RequestResult, Summarizer

__all__ = ["TenantSummaries", "tenant_summaries", "format_tenants"]


def _row(s: Mapping[str, Any], throttled: int) -> dict[str, Any]:
    return {"requests": s["requests"], "completed": s["completed"], "throttled": throttled,
            "failed": s["failed"] - throttled, "output_toks": s["output_toks"],
            "output_throughput": s["output_throughput"], "ttft_s": s["ttft_s"], "e2e_s": s["e2e_s"],
            "queue_wait_s": s.get("queue_wait_s")}


class TenantSummaries:
    """One :class:`~nbkit.records.Summarizer` per tenant, fed rows as they finish (any order);
    :meth:`summary` gives :func:`tenant_summaries`' figures. Rows with no tenant are left out."""

    def __init__(self, percentiles: Sequence[float] = DEFAULT_PERCENTILES):
        self.percentiles = tuple(percentiles)
        self._acc: dict[str, Summarizer] = {}
        self._throttled: dict[str, int] = {}

    def add(self, r: RequestResult) -> None:
        if not r.tenant:
            return
        acc = self._acc.get(r.tenant)
        if acc is None:
            acc = self._acc[r.tenant] = Summarizer(percentiles=self.percentiles)
            self._throttled[r.tenant] = 0
        acc.add(r, itl=False)
        if r.outcome == "http_429":
            self._throttled[r.tenant] += 1

    def __bool__(self) -> bool:
        return bool(self._acc)

    def summary(self, duration_s: float) -> dict[str, dict[str, Any]]:
        """Per tenant (sorted by name), throughputs over ``duration_s`` (the whole run's)."""
        return {t: _row(self._acc[t].summary(duration_s), self._throttled[t]) for t in sorted(self._acc)}


def tenant_summaries(rows: Iterable[RequestResult], duration_s: float,
                     percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, dict[str, Any]]:
    """``{tenant: {"requests", "completed", "throttled", "failed", "output_toks",
    "output_throughput", "ttft_s": {...}, "e2e_s": {...}, "queue_wait_s"}}`` over the rows that
    name a tenant ({} if none does); throughputs over ``duration_s``."""
    acc = TenantSummaries(percentiles)
    for r in rows:
        acc.add(r)
    return acc.summary(duration_s)


def format_tenants(t: Mapping[str, Mapping[str, Any]]) -> str:
    """A table of :func:`tenant_summaries` (times in ms)."""
    def ms(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.0f}"
    lines = [f"{'tenant':<12}{'sent':>6}{'ok':>6}{'429':>6}{'fail':>6}{'TTFT p50':>10}{'TTFT p99':>10}"
             f"{'E2E p99':>10}{'out tok/s':>11}"]
    for name, r in t.items():
        lines.append(f"{name:<12}{r['requests']:>6}{r['completed']:>6}{r['throttled']:>6}{r['failed']:>6}"
                     f"{ms(r['ttft_s'].get('median')):>10}{ms(r['ttft_s'].get('p99')):>10}"
                     f"{ms(r['e2e_s'].get('p99')):>10}{r['output_throughput']:>11.1f}")
    return "\n".join(lines)
