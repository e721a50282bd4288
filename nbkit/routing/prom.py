"""The endpoint's Prometheus metrics: a collector that reads the router's (and its cluster's) state
when ``/metrics`` is scraped, and the three latency histograms the endpoint updates per request.

    metrics = EndpointMetrics(router, cluster)   # registers itself in metrics.registry
    router.add_listener(metrics.observe)         # counts each finished request
    app = make_asgi_app(metrics.registry)        # /metrics: gzip and OpenMetrics negotiation

Counts are counters (``nbkit_<name>_total``) read from :attr:`Router.counters`, the ranks'
:class:`~nbkit.routing.state.RankState` and the cluster's supervisor; levels are gauges. Series
per rank exist for the ranks the router has now: a rank that was scaled away is gone from the next
scrape. The ``path`` label is one of :data:`PATHS` or ``other`` (no query strings), so the label
set stays bounded whatever callers send. Every metric is listed in :data:`METRICS`.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

#: The ``path`` label's values (any other path is ``other``).
PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/models",
                   "/tokenize", "/detokenize", "/pooling", "/classify", "/score", "/rerank", "/v1/rerank",
                   "/v1/score"})

#: name -> (type, labels, help): every series the endpoint's /metrics has (counters get ``_total``).
METRICS = {
    "nbkit_requests": ("counter", ("path", "outcome"),
                       "Requests through the endpoint by path and outcome (ok, error, cancelled, shed, http_N)"),
    "nbkit_picks": ("counter", ("rank",), "Requests dispatched to the rank (a retry or a migration is one more)"),
    "nbkit_retries": ("counter", (), "Retries on another rank before the first byte"),
    "nbkit_failures": ("counter", (), "Requests that did not end ok (errors, shed, HTTP errors; not cancels)"),
    "nbkit_migrations": ("counter", (), "Streams continued on another rank after theirs broke"),
    "nbkit_shed": ("counter", (), "Requests the admission queue shed (429/503)"),
    "nbkit_restarts": ("counter", (), "Replica restarts by the cluster's supervisor"),
    "nbkit_scale_events": ("counter", ("direction",), "Replicas added (up) or drained and stopped (down) by the "
                           "cluster's autoscaler, one per decision"),
    "nbkit_replicas_desired": ("gauge", (), "Replicas the autoscaler's last decision wants (the cluster's size "
                               "without one)"),
    "nbkit_kv_fallbacks": ("counter", (), "Decisions a policy made by its fallback"),
    "nbkit_kv_events": ("counter", ("rank",), "KV-cache events applied to the router's index"),
    "nbkit_kv_sequence_gaps": ("counter", ("rank",), "KV-event batches missed (sequence gaps)"),
    "nbkit_in_flight": ("gauge", ("rank",), "Requests in flight on the rank"),
    "nbkit_pending_prefill_tokens": ("gauge", ("rank",), "Prompt tokens dispatched to the rank, not yet prefilled"),
    "nbkit_pending_decode_tokens": ("gauge", ("rank",), "Tokens the rank's requests may still generate"),
    "nbkit_rank_healthy": ("gauge", ("rank",), "1 while the rank may be routed to (alive, health checks pass)"),
    "nbkit_healthy_ranks": ("gauge", (), "Ranks that may be routed to (alive, health checks pass)"),
    "nbkit_ranks": ("gauge", (), "Ranks the router knows"),
    "nbkit_queued_requests": ("gauge", (), "Requests waiting in the admission queue"),
    "nbkit_kv_index_blocks": ("gauge", ("rank",), "KV-cache blocks the index holds"),
    "nbkit_kv_index_warm": ("gauge", ("rank",), "1 while the rank's index is trusted (0: cold)"),
    "nbkit_tenant_requests": ("counter", ("tenant",), "Requests by tenant (admitted or throttled)"),
    "nbkit_tenant_throttled": ("counter", ("tenant", "limit"), "Requests answered 429 because the tenant was over "
                               "its requests_per_minute or tokens_per_minute"),
    "nbkit_tenant_output_tokens": ("counter", ("tenant",), "Tokens generated for the tenant's finished requests"),
    "nbkit_tenant_in_flight": ("gauge", ("tenant",), "The tenant's requests on a rank now"),
    "nbkit_tenant_queued": ("gauge", ("tenant",), "The tenant's requests waiting in the admission queue"),
    "nbkit_queue_wait_seconds": ("histogram", (), "Time waiting for admission"),
    "nbkit_time_to_first_token_seconds": ("histogram", (), "TTFT seen by the endpoint (requests that ended ok)"),
    "nbkit_kv_matched_tokens": ("histogram", (), "Prompt tokens cached on the chosen rank (KV-index policies)"),
}

_COUNTERS = {"nbkit_retries": "retries", "nbkit_failures": "failures", "nbkit_migrations": "migrations",
             "nbkit_shed": "shed"}


def path_label(path: str) -> str:
    """A request path as the bounded ``path`` label: the path without its query, or ``other``."""
    path = path.split("?", 1)[0]
    return path if path in PATHS else "other"


def _family(name: str, cls=None):
    kind, labels, doc = METRICS[name]
    cls = cls or (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)
    return cls(name, doc, labels=list(labels))


class EndpointMetrics:
    """The collector (``collect``), its registry and histograms; see the module docstring."""

    def __init__(self, router, cluster=None):
        self.router, self.cluster = router, cluster
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        self.registry = CollectorRegistry()
        self.queue_wait = self._histogram("nbkit_queue_wait_seconds", (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5,
                                                                       1, 5, 30))
        self.ttft = self._histogram("nbkit_time_to_first_token_seconds", (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                                                           10, 30))
        self.kv_matched = self._histogram("nbkit_kv_matched_tokens", (0, 16, 64, 128, 256, 512, 1024, 2048, 4096,
                                                                      8192))
        self.registry.register(self)

    def _histogram(self, name: str, buckets) -> Histogram:
        return Histogram(name, METRICS[name][2], registry=self.registry, buckets=buckets)

    def count_request(self, path: str, outcome: str) -> None:
        """One request on ``path`` (any path: it is bounded here) ended with ``outcome``."""
        key = (path_label(path), outcome)
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1

    def observe(self, rec) -> None:
        """A router listener: count a finished request and its times."""
        self.count_request(rec.path, rec.outcome)
        self.queue_wait.observe(rec.queue_wait_s)
        if rec.rank and self.router.policy.uses_kv_index:
            self.kv_matched.observe(rec.cached_tokens)
        if rec.ttft_s is not None and rec.outcome == "ok":
            self.ttft.observe(rec.ttft_s)

    def describe(self):
        return [_family(n) for n, (kind, _, _) in METRICS.items() if kind != "histogram"]

    def collect(self):
        router = self.router
        fam = {n: _family(n) for n, (kind, _, _) in METRICS.items() if kind != "histogram"}
        with self._lock:
            requests = sorted(self._requests.items())
        for (path, outcome), n in requests:
            fam["nbkit_requests"].add_metric([path, outcome], n)
        with router.lock:
            counters = dict(router.counters)
            states = [(s.key, s.picks, s.in_flight, s.pending_prefill_tokens, s.pending_decode_tokens,
                       s.healthy and not s.down) for s in router.states]
            queued, fallbacks = router.queued, router.fallbacks
            queued_by = router.queued_by_tenant()
        for tenant, c in sorted(router.admission.snapshot().items()):
            fam["nbkit_tenant_requests"].add_metric([tenant], c["requests"])
            fam["nbkit_tenant_output_tokens"].add_metric([tenant], c["tokens"])
            fam["nbkit_tenant_in_flight"].add_metric([tenant], c["in_flight"])
            fam["nbkit_tenant_queued"].add_metric([tenant], queued_by.pop(tenant, 0))
            for limit in ("requests_per_minute", "tokens_per_minute"):
                fam["nbkit_tenant_throttled"].add_metric([tenant, limit], c.get(f"throttled_{limit}", 0))
        for tenant, n in sorted(queued_by.items()):
            fam["nbkit_tenant_queued"].add_metric([tenant], n)
        for name, key in _COUNTERS.items():
            fam[name].add_metric([], counters.get(key, 0))
        fam["nbkit_restarts"].add_metric([], getattr(self.cluster, "restarts", 0) or 0)
        scaler = getattr(self.cluster, "autoscaler", None)
        history = scaler.decisions if scaler is not None else []
        for direction in ("up", "down"):
            fam["nbkit_scale_events"].add_metric([direction], sum(1 for d in history if d.direction == direction))
        if self.cluster is not None:
            last = scaler.last if scaler is not None else None
            fam["nbkit_replicas_desired"].add_metric([], last.desired if last is not None else len(self.cluster))
        fam["nbkit_kv_fallbacks"].add_metric([], fallbacks)
        for key, picks, in_flight, prefill, decode, up in states:
            fam["nbkit_picks"].add_metric([key], picks)
            fam["nbkit_in_flight"].add_metric([key], in_flight)
            fam["nbkit_pending_prefill_tokens"].add_metric([key], max(0, prefill))
            fam["nbkit_pending_decode_tokens"].add_metric([key], max(0, decode))
            fam["nbkit_rank_healthy"].add_metric([key], 1 if up else 0)
        fam["nbkit_healthy_ranks"].add_metric([], sum(1 for *_, up in states if up))
        fam["nbkit_ranks"].add_metric([], len(states))
        fam["nbkit_queued_requests"].add_metric([], queued)
        kv = router.kv_index
        if kv is not None:
            snaps = kv.snapshot()
            for key, *_ in states:  # only ranks that exist now (the index may still hold a removed one)
                snap = snaps.get(key)
                if snap is None:
                    continue
                fam["nbkit_kv_events"].add_metric([key], snap["events"])
                fam["nbkit_kv_sequence_gaps"].add_metric([key], snap["gaps"])
                fam["nbkit_kv_index_blocks"].add_metric([key], snap["blocks"])
                fam["nbkit_kv_index_warm"].add_metric([key], 1 if snap["warm"] else 0)
        return list(fam.values())
