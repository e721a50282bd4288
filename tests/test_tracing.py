"""Tracing: a caller's W3C ``traceparent`` reaches the replica, and with tracing on every request
gets an OpenTelemetry span (queue, one child per attempt, the pick's reason) whose attempt's
``traceparent`` is what the replica sees, so vLLM's own spans join the same trace. Stand-in
replicas on httpx's MockTransport record the headers they were sent."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from nbkit import cli
from nbkit.routing.client import RoutedClient
from nbkit.routing.forward import Forwarder
from nbkit.routing.rank import Rank
from nbkit.routing.request_info import RequestInfo
from nbkit.routing.router import Router
from nbkit.routing.tracing import Tracing, make_tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def ranks(n=2):
    return [Rank(replica=i, dp_rank=0, url=f"http://r{i}:8000", name=f"replica{i}") for i in range(n)]


def replicas(seen: list, fail_first: int = 0):
    """A stand-in for the replicas: records (host, headers); the first ``fail_first`` answers are 503."""
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, dict(request.headers)))
        if len(seen) <= fail_first:
            return httpx.Response(503, json={"error": "busy"})
        if json.loads(request.content or b"{}").get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\n'
                                          b"data: [DONE]\n\n")
        return httpx.Response(200, json={"choices": [{"text": "hi"}], "usage": {"prompt_tokens": 2,
                                                                                  "completion_tokens": 1}})
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def send(fwd, *, stream=False, headers=None):
    body = {"model": "m", "prompt": "hello", "max_tokens": 2, "stream": stream}
    up = await fwd.open("POST", "/v1/completions", content=json.dumps(body).encode(), stream=stream,
                        headers=headers or {}, info=RequestInfo(prompt_tokens=2, max_tokens=2))
    if stream:
        async for _ in up.aiter():
            pass
    return up


def by_name(exporter):
    out: dict[str, list] = {}
    for s in exporter.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


def test_without_tracing_the_callers_traceparent_reaches_the_replica_unchanged():
    seen: list = []

    async def main():
        router = Router(ranks(), "round_robin")
        await send(Forwarder(router, replicas(seen)), headers={"traceparent": CALLER, "tracestate": "a=1"})
        await router.aclose()
    asyncio.run(main())
    assert seen[0][1]["traceparent"] == CALLER and seen[0][1]["tracestate"] == "a=1"


def test_a_request_span_joins_the_callers_trace_with_one_child_per_attempt(spans):
    provider, exporter = spans
    seen: list = []

    async def main():
        router = Router(ranks(), "round_robin")
        await send(Forwarder(router, replicas(seen, fail_first=1), tracing=Tracing(provider)),
                   headers={"traceparent": CALLER})
        await router.aclose()
    asyncio.run(main())
    got = by_name(exporter)
    (req,) = got["nbkit.request"]
    tries = sorted(got["nbkit.forward"], key=lambda s: s.start_time)
    assert format(req.context.trace_id, "032x") == TRACE_ID
    assert format(req.parent.span_id, "016x") == "00f067aa0ba902b7"  # a child of the caller's span
    assert len(tries) == 2 and all(t.parent.span_id == req.context.span_id for t in tries)
    assert not tries[0].status.is_ok and tries[1].attributes["http.response.status_code"] == 200
    assert {t.attributes["nbkit.rank"] for t in tries} == {"replica0", "replica1"}  # the retry went elsewhere
    # each replica saw the traceparent of ITS attempt's span, in the caller's trace
    for (_, headers), t in zip(seen, tries):
        assert headers["traceparent"] == f"00-{TRACE_ID}-{t.context.span_id:016x}-01"
    a = req.attributes
    assert (a["nbkit.outcome"], a["nbkit.attempts"], a["nbkit.policy"]) == ("ok", 2, "round_robin")
    assert a["nbkit.rank"] == tries[1].attributes["nbkit.rank"] and a["nbkit.reason"]


def test_a_stream_span_ends_with_the_stream_and_marks_its_first_token(spans):
    provider, exporter = spans

    async def main():
        router = Router(ranks(1), "least_load")
        await send(Forwarder(router, replicas([]), tracing=Tracing(provider)), stream=True)
        await router.aclose()
    asyncio.run(main())
    (req,) = by_name(exporter)["nbkit.request"]
    assert [e.name for e in req.events] == ["first_token"]
    assert req.events[0].timestamp <= req.end_time and req.attributes["nbkit.tokens_out"] == 2
    assert req.parent is None  # no caller's traceparent: a new trace


def test_the_routed_client_traces_its_requests(spans):
    provider, exporter = spans
    seen: list = []
    client = RoutedClient(ranks(), "round_robin", model="m", transport=replicas(seen), tracing=provider, local=True)

    async def main():
        try:
            for _ in range(3):
                await client.complete("hello", max_tokens=1)
        finally:
            await client.aclose()
    asyncio.run(main())
    reqs = by_name(exporter)["nbkit.request"]
    assert len(reqs) == 3 and len({s.context.trace_id for s in reqs}) == 3
    assert all(h["traceparent"].startswith("00-") for _, h in seen)


def test_tracing_options_and_the_cli_flag():
    assert make_tracing(None) is None and make_tracing(False) is None
    t = Tracing()
    assert make_tracing(t) is t
    args, vllm_args = cli.parse_args(["serve", "m", "-n", "2", "--otlp-traces-endpoint", "http://127.0.0.1:4317"])
    s = cli.serve_setup(args, vllm_args)
    assert s.endpoint_options["tracing"] == "http://127.0.0.1:4317"
    extra = s.spec_kwargs["extra_args"]
    assert extra[extra.index("--otlp-traces-endpoint") + 1] == "http://127.0.0.1:4317"  # the replicas trace too


def test_a_bad_collector_url_is_refused_naming_it_before_anything_starts(capsys):
    assert cli.main(["serve", "m", "-n", "2", "--engine", "sim", "--otlp-traces-endpoint", "grpc:nope"]) == 2
    assert "--otlp-traces-endpoint 'grpc:nope'" in capsys.readouterr().err
