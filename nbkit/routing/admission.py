"""Tenant admission in the router: who sent a request, how urgent it is, whether it is over its
tenant's rate limits, and the per-tenant counts ``/metrics`` and the panel show. The rules
themselves (identification order, token buckets, weighted fair queuing) live in
:mod:`nbkit.policies.tenants`, shared with the simulator; this is the router's use of them::

    adm = Admission(Tenants.load("tenants.toml"))
    info = adm.classify(info, headers, body)          # TenantError (401/400) for a bad key or name
    adm.charge(info, record)                          # Throttled (429 + Retry-After) over a limit
    adm.started(info); adm.ended(info, "ok")          # in-flight and outcome counts per tenant
    adm.snapshot()                                    # {tenant: {in_flight, requests, throttled, ...}}

Without a tenant config every request is the ``default`` tenant's: priorities still order the
admission queue (``X-nbkit-priority: batch`` yields to interactive requests), nothing is limited.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import Mapping

from nbkit.policies import RequestInfo
from nbkit.policies.slots import request_cost
from nbkit.policies.tenants import DEFAULT_TENANT, RateLimiter, Tenant, Tenants, as_tenants, parse_priority
from nbkit.routing.lease import Overloaded

log = logging.getLogger(__name__)


class TenantError(ValueError):
    """A request whose tenant cannot be accepted: ``status`` 401 (missing or unknown API key) or
    400 (an unknown tenant or a bad priority); ``param`` names the header or field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class Throttled(Overloaded):
    """A tenant over its requests- or tokens-per-minute limit: 429 with ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float, tenant: str, limit: str):
        super().__init__(message, 429, retry_after)
        self.tenant, self.limit = tenant, limit


def _counts() -> dict[str, int]:
    return {"in_flight": 0, "requests": 0, "ok": 0, "failed": 0, "throttled": 0, "tokens": 0}


class Admission:
    """The router's tenant admission (see the module docstring). ``tenants``: a
    :class:`~nbkit.policies.tenants.Tenants`, a mapping in its TOML shape, a path to a TOML file, or
    None (everyone is the default tenant). ``vllm_priority``: also set vLLM's own ``priority``
    field on forwarded requests (replicas run with ``--scheduling-policy priority``)."""

    def __init__(self, tenants=None, *, vllm_priority: bool = False):
        self.tenants = as_tenants(tenants)
        self.configured = tenants is not None
        self.limiter = RateLimiter(self.tenants)
        self.vllm_priority = bool(vllm_priority)
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}

    # -- per request -------------------------------------------------------------------------------
    def tenant(self, name: str) -> Tenant:
        return self.tenants.get(name) or self.tenants.default

    def weight(self, name: str) -> float:
        return self.tenant(name).weight

    def classify(self, info: RequestInfo, headers: Mapping[str, str] | None, body: Mapping | None, *,
                 trusted: bool = False) -> RequestInfo:
        """``info`` with its tenant and priority. ``trusted`` (the in-kernel client): the tenant is
        taken by name from ``X-nbkit-tenant`` without an API key. Without a tenant configuration
        every request is the default tenant's (a name sent is ignored; a priority still counts).
        Raises :class:`TenantError`."""
        if not self.configured:         # no tenants: everyone is the default tenant, names ignored
            tenant = self.tenants.default
        elif trusted:
            name = next((v for k, v in (headers or {}).items() if k.lower() == "x-nbkit-tenant"), None)
            tenant = self.tenants.get(name) if name else self.tenants.default
            if tenant is None:
                raise TenantError(400, f"tenant={name!r}: no such tenant (configured: "
                                       f"{', '.join(self.tenants.names) or 'none'})", "tenant")
        else:
            who = self.tenants.identify(headers, body)
            if who.error is not None:
                status, message = who.error
                raise TenantError(status, message, "authorization" if status == 401 else "x-nbkit-tenant")
            tenant = who.tenant
        try:
            priority = self.tenants.priority_of(tenant, headers, body)
        except ValueError as e:
            raise TenantError(400, str(e), "x-nbkit-priority") from None
        if tenant.name == info.tenant and priority == info.priority:
            return info
        return dataclasses.replace(info, tenant=tenant.name, priority=priority)

    def charge(self, info: RequestInfo, record) -> None:
        """Take the request (and its prompt + max tokens) from its tenant's buckets, or raise
        :class:`Throttled`. Called once per request, before its first attempt."""
        tenant = self.tenant(info.tenant)
        tokens = request_cost(info.prompt_tokens, info.max_tokens)
        record.tenant = tenant.name
        with self._lock:
            c = self._counts.setdefault(tenant.name, _counts())
            c["requests"] += 1
        if tenant.requests_per_minute is None and tenant.tokens_per_minute is None:
            return
        t = self.limiter.check(tenant, tokens)
        if t is None:
            return
        with self._lock:
            self._counts[tenant.name]["throttled"] += 1
        retry = max(1, math.ceil(t.retry_after_s))
        log.info("admission: tenant %s over its %s (retry after %d s)", tenant.name, t.limit, retry)
        raise Throttled(f"tenant {tenant.name!r} is over its {t.limit} limit; retry after {retry} s",
                        float(retry), tenant.name, t.limit)

    def started(self, info: RequestInfo) -> None:
        with self._lock:
            self._counts.setdefault(info.tenant, _counts())["in_flight"] += 1

    def ended(self, info: RequestInfo, outcome: str, tokens_out: int = 0) -> None:
        """A lease of the request was released (``outcome`` "retry": it goes on elsewhere)."""
        with self._lock:
            c = self._counts.setdefault(info.tenant, _counts())
            c["in_flight"] = max(0, c["in_flight"] - 1)
            if outcome != "retry":
                c["ok" if outcome == "ok" else "failed"] += 1
                c["tokens"] += max(0, int(tokens_out))

    def body_priority(self, body: dict, info: RequestInfo) -> dict:
        """``body`` with vLLM's ``priority`` set to the request's (a copy), where the replicas
        schedule by priority; else ``body`` itself."""
        if not self.vllm_priority or body.get("priority") == info.priority:
            return body
        return {**body, "priority": info.priority}

    # -- what /metrics and the panel read ----------------------------------------------------------
    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per tenant: in flight, requests, ok, failed, throttled, output tokens; with the limiter's
        throttle counts by limit."""
        with self._lock:
            out = {k: dict(v) for k, v in self._counts.items()}
        for name, c in self.limiter.counters.items():
            row = out.setdefault(name, _counts())
            for k, v in c.items():
                if k.startswith("throttled_"):
                    row[k] = v
        return out


def schedules_by_priority(target) -> bool:
    """Whether every replica of ``target`` (a Cluster: its launch plans) runs vLLM with
    ``--scheduling-policy priority``, so forwarded requests should carry vLLM's ``priority``."""
    plans = getattr(target, "plans", None) or []
    argvs = [list(getattr(p, "argv", ()) or ()) for p in plans]

    def priority(argv):
        for i, a in enumerate(argv):
            if a == "--scheduling-policy" and i + 1 < len(argv):
                return argv[i + 1] == "priority"
            if a.startswith("--scheduling-policy="):
                return a.split("=", 1)[1] == "priority"
        return False
    return bool(argvs) and all(priority(a) for a in argvs)


def request_priority(value) -> int:
    """A priority given in Python (``priority=`` of the client): a name or an int."""
    return parse_priority(value, where="priority")


__all__ = ["Admission", "TenantError", "Throttled", "as_tenants", "request_priority", "schedules_by_priority",
           "DEFAULT_TENANT"]
