"""Tracing: W3C trace context through the router, and OpenTelemetry spans of each request.

A caller's ``traceparent`` / ``tracestate`` headers always go on to the replica unchanged. With
``tracing`` on (``RoutedClient(..., tracing=True)``, ``Endpoint(..., tracing=True)``, ``nbkit serve
--otlp-traces-endpoint URL``) and ``opentelemetry`` installed (it comes with vLLM), each request
gets a span ``nbkit.request`` (a child of the caller's ``traceparent``, if any) with:

- a child ``nbkit.queue``: the time it waited in the router's admission queue;
- a child ``nbkit.forward`` per attempt (``nbkit.rank``, the HTTP status or the error); the
  ``traceparent`` sent to the replica is this span's, so vLLM's own spans
  (``vllm serve --otlp-traces-endpoint``) join the same trace under it;
- attributes ``nbkit.policy``, ``nbkit.rank``, ``nbkit.reason`` (why the policy picked it),
  ``nbkit.outcome``, ``nbkit.attempts``, ``nbkit.migrations``, ``nbkit.queue_wait_s``,
  ``nbkit.ttft_s``, token counts, and an event ``first_token``.

    >>> from nbkit.routing.tracing import Tracing
    >>> client = cluster.client("least_load", tracing=True)              # doctest: +SKIP
    >>> client = cluster.client("least_load", tracing=Tracing(provider))  # doctest: +SKIP

``tracing=True`` uses OpenTelemetry's global tracer provider (set it up as usual, or call
:func:`otlp_provider`). This module is the mechanism; which spans a request gets is decided by
what the forwarder reports to it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

log = logging.getLogger(__name__)

TRACE_HEADERS = ("traceparent", "tracestate")
_MAX_OPEN = 10_000  # spans of requests still in flight; beyond that the oldest is ended as "abandoned"


def _ns(t: float) -> int:
    """time.time() seconds -> OpenTelemetry's nanoseconds."""
    return int(t * 1e9)


class Tracing:
    """OpenTelemetry spans for the requests of one router (see the module docstring).

    ``provider``: an OpenTelemetry ``TracerProvider`` (default: the global one).
    """

    def __init__(self, provider=None):
        try:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as e:  # pragma: no cover - opentelemetry comes with vLLM
            raise RuntimeError("tracing needs the opentelemetry-api and opentelemetry-sdk packages") from e
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self.tracer = trace.get_tracer("nbkit", tracer_provider=provider)
        self._open: OrderedDict[int, tuple] = OrderedDict()  # record id -> (span, its context)
        self._routers: set[int] = set()

    # -- the forwarder's reports -------------------------------------------------------------------
    def begin(self, router, record, headers) -> None:
        """A request arrived (``headers``: the caller's, maybe with a ``traceparent``)."""
        if id(router) not in self._routers:
            self._routers.add(id(router))
            router.add_listener(self.finish)
        parent = self._propagator.extract({k.lower(): v for k, v in (headers or {}).items()})
        span = self.tracer.start_span("nbkit.request", context=parent, kind=self._trace.SpanKind.SERVER,
                                      start_time=_ns(record.arrival or time.time()),
                                      attributes={"nbkit.path": record.path.split("?", 1)[0]})
        self._open[record.id] = (span, self._trace.set_span_in_context(span, parent))
        while len(self._open) > _MAX_OPEN:
            _, (old, _) = self._open.popitem(last=False)
            old.set_attribute("nbkit.outcome", "abandoned")
            old.end()

    def attempt(self, record, rank: str, url: str):
        """One try on ``rank``: returns ``(span, headers)``, the headers carrying its traceparent
        (to send to the replica), or ``(None, {})`` for a request that has no span."""
        opened = self._open.get(record.id)
        if opened is None:
            return None, {}
        span = self.tracer.start_span("nbkit.forward", context=opened[1], kind=self._trace.SpanKind.CLIENT,
                                      attributes={"nbkit.rank": rank, "url.full": url})
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span, opened[1]))
        return span, carrier

    def attempt_done(self, span, *, status: int | None = None, error: BaseException | None = None) -> None:
        if span is None:
            return
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, repr(error)[:200]))
        elif status is not None and status >= 400:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, f"HTTP {status}"))
        span.end()

    def finish(self, record) -> None:
        """The request is done (a router listener): its attributes, its queue span, and the end."""
        opened = self._open.pop(record.id, None)
        if opened is None:
            return
        span, ctx = opened
        start = record.arrival or time.time()
        if record.queue_wait_s:
            q = self.tracer.start_span("nbkit.queue", context=ctx, start_time=_ns(start))
            q.end(end_time=_ns(start + record.queue_wait_s))
        if record.ttft_s is not None:
            span.add_event("first_token", timestamp=_ns(start + record.ttft_s))
        attrs = {"nbkit.policy": record.policy, "nbkit.rank": record.rank, "nbkit.reason": record.reason,
                 "nbkit.outcome": record.outcome, "nbkit.attempts": record.attempts,
                 "nbkit.migrations": record.migrations, "nbkit.queue_wait_s": record.queue_wait_s,
                 "nbkit.tokens_in": record.tokens_in, "nbkit.tokens_out": record.tokens_out}
        if record.ttft_s is not None:
            attrs["nbkit.ttft_s"] = record.ttft_s
        if record.prefill_rank:
            attrs["nbkit.prefill_rank"] = record.prefill_rank
        span.set_attributes({k: v for k, v in attrs.items() if v is not None})
        if record.outcome != "ok":
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, record.error[:200] or record.outcome))
        end = start + record.e2e_s if record.e2e_s is not None else time.time()
        span.end(end_time=_ns(max(end, start)))


def make_tracing(spec) -> Tracing | None:
    """``tracing=`` as users give it: None/False (off), True (OpenTelemetry's global provider), an
    OTLP collector's URL (``"http://127.0.0.1:4317"``: spans are exported there), a provider, or a
    Tracing."""
    if spec is None or spec is False:
        return None
    if isinstance(spec, Tracing):
        return spec
    if isinstance(spec, str):
        return Tracing(otlp_provider(spec, set_global=False))
    return Tracing(None if spec is True else spec)


def otlp_provider(endpoint: str, service_name: str = "nbkit", *, set_global: bool = True):
    """A tracer provider that exports to an OTLP collector at ``endpoint`` (gRPC, e.g.
    ``http://127.0.0.1:4317``, the same value as vLLM's ``--otlp-traces-endpoint``); made the
    global one unless ``set_global=False``."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    if set_global:
        trace.set_tracer_provider(provider)
    log.info("tracing: spans go to the OTLP collector at %s", endpoint)
    return provider
