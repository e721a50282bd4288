"""nbkit.routing.probes: /health and /metrics of replicas, with the server-side metrics filter."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app

from nbkit.routing.metrics import METRIC_NAMES
from nbkit.routing.probes import METRICS_QUERY, Probe, ProbeError
from test_metrics import TWO_ENGINES

URL = "http://127.0.0.1:8100"


def run_with(handler, fn):
    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            probe = Probe(client)
            try:
                return await fn(probe)
            finally:
                await probe.aclose()
    return asyncio.run(main())


def test_metrics_asks_for_the_series_nbkit_reads_and_parses_them():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, text=TWO_ENGINES, headers={"content-type": "text/plain; version=0.0.4"})

    snaps = run_with(handler, lambda p: p.metrics(URL))
    assert sorted(snaps) == ["0", "1"]
    assert snaps["1"].running == 4.0 and snaps["1"].requests_finished == 8.0
    assert [u.path for u in seen] == ["/metrics"]
    asked = parse_qs(urlsplit(str(seen[0])).query)["name[]"]
    assert asked == list(METRIC_NAMES)
    assert "vllm:num_requests_running" in asked and "vllm:kv_cache_usage_perc" in asked


def test_error_status_and_failed_exchange_raise_probe_error():
    def overloaded(request):
        return httpx.Response(503, text="overloaded")

    with pytest.raises(ProbeError, match="HTTP 503"):
        run_with(overloaded, lambda p: p.metrics(URL))

    def refused(request):
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(ProbeError, match="refused"):
        run_with(refused, lambda p: p.metrics(URL))


def test_health_is_true_only_on_200():
    for status, want in ((200, True), (503, False), (404, False)):
        assert run_with(lambda r, s=status: httpx.Response(s), lambda p: p.health(URL)) is want

    def refused(request):
        raise httpx.ConnectError("refused", request=request)

    assert run_with(refused, lambda p: p.health(URL)) is False


def test_a_server_whose_filtered_answer_is_empty_is_scraped_in_full_from_then_on():
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(bool(request.url.query))
        return httpx.Response(200, text="" if request.url.query else TWO_ENGINES)

    async def twice(p):
        return await p.metrics(URL), await p.metrics(URL)

    first, second = run_with(handler, twice)
    assert sorted(first) == sorted(second) == ["0", "1"]
    assert first["1"].running == second["1"].running == 4.0
    assert asked == [True, False, False]  # filtered once, then in full: remembered per server


def test_prometheus_clients_own_exposition_honours_the_query():
    """The filter as prometheus_client's ASGI app (the one vLLM mounts at /metrics) applies it."""
    reg = CollectorRegistry()
    running = Gauge("vllm:num_requests_running", "r", ["engine"], registry=reg)
    Gauge("vllm:num_requests_waiting", "w", ["engine"], registry=reg).labels("0").set(2)
    Counter("vllm:prompt_tokens", "p", ["engine"], registry=reg).labels("0").inc(120)
    hist = Histogram("vllm:e2e_request_latency_seconds", "e", ["engine"], registry=reg, buckets=[0.1 * i for i in range(1, 40)])
    running.labels("0").set(5)
    hist.labels("0").observe(0.3)
    app = make_asgi_app(reg)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=URL) as client:
            full = (await client.get("/metrics")).text
            filtered = (await client.get("/metrics" + METRICS_QUERY)).text
            probe = Probe(client)
            return full, filtered, await probe.metrics(URL)

    full, filtered, snaps = asyncio.run(main())
    assert "vllm:e2e_request_latency_seconds_bucket" in full
    assert "e2e_request_latency" not in filtered and len(filtered) < len(full) / 4
    assert "vllm:num_requests_running" in filtered and "vllm:prompt_tokens_total" in filtered
    m = snaps["0"]
    assert (m.running, m.waiting, m.prompt_tokens) == (5.0, 2.0, 120.0)
