"""The endpoint meets users' tools: /metrics follows Prometheus' conventions (types as declared,
counters named ``_total``, a bounded ``path`` label, per-rank series only for ranks that exist,
gzip and OpenMetrics), every error nbkit makes up has OpenAI's shape, ``/v1/models`` merges the
ranks' models, and token accounting ignores what is not a token (an embeddings ``input``, a
usage-only stream chunk). Simulated replicas (real processes and sockets, no vLLM) and stand-ins."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from nbkit import Cluster
from nbkit.routing.endpoint import Endpoint
from nbkit.routing.forward import Forwarder, sse_events
from nbkit.routing.prom import METRICS, PATHS, path_label
from nbkit.routing.rank import Rank
from nbkit.routing.request_info import request_info


def sim_cluster(tmp_path, n: int = 2) -> Cluster:
    return Cluster.replicas(n=n, engine="sim", port_start=free_port(19400), run_dir=tmp_path / "run",
                            stop_grace=2.0)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Two simulated replicas of the tiny model and a round-robin endpoint over them."""
    c = sim_cluster(tmp_path_factory.mktemp("prom"))
    c.start(timeout=120)
    ep = c.endpoint(port=free_port(19480), policy="round_robin")
    try:
        yield c, ep
    finally:
        ep.stop()
        c.stop()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("nbkit_")}


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["code"] == status and isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


# ------------------------------------------------------------------------------ /metrics
def test_every_metric_parses_with_the_type_it_declares(sim):
    _, ep = sim
    with httpx.Client(base_url=ep.url, timeout=30) as h:
        assert h.post("/v1/completions", json={"prompt": "hello there", "max_tokens": 4}).status_code == 200
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
        with h.stream("POST", "/v1/chat/completions", json=chat) as r:
            assert r.status_code == 200 and r.read()
        text = h.get("/metrics").text
    fams = families(text)
    for name, (kind, labels, _) in METRICS.items():
        assert name in fams, f"{name} missing from /metrics"
        f = fams[name]
        assert f.type == kind, (name, f.type)
        if kind == "counter":
            assert f.samples, name
            assert all(s.name == name + "_total" for s in f.samples), (name, [s.name for s in f.samples])
        if kind in ("counter", "gauge"):
            assert all(set(s.labels) == set(labels) for s in f.samples), (name, f.samples)
    extra = set(fams) - set(METRICS)
    # prometheus_client's own companion series of the histograms, nothing else
    assert extra <= {n + "_created" for n, (k, _, _) in METRICS.items() if k == "histogram"}, extra
    assert all(f.type == "gauge" for n, f in fams.items() if n in extra)
    requests = {tuple(sorted(s.labels.items())): s.value for s in fams["nbkit_requests"].samples}
    assert requests[(("outcome", "ok"), ("path", "/v1/chat/completions"))] >= 1
    assert {s.labels["rank"] for s in fams["nbkit_in_flight"].samples} == {"replica0", "replica1"}
    assert fams["nbkit_ranks"].samples[0].value == 2 and fams["nbkit_healthy_ranks"].samples[0].value == 2
    assert sum(s.value for s in fams["nbkit_picks"].samples) >= 2


def test_metrics_app_negotiates_openmetrics_and_gzip(sim):
    _, ep = sim
    r = httpx.get(ep.url + "/metrics", headers={"accept-encoding": "gzip"}, timeout=10)
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert "nbkit_retries_total" in r.text  # httpx decoded it
    raw = httpx.get(ep.url + "/metrics", headers={"accept-encoding": "identity"}, timeout=10)
    assert "content-encoding" not in raw.headers and raw.headers["content-type"].startswith("text/plain")
    om = httpx.get(ep.url + "/metrics", headers={"accept": "application/openmetrics-text"}, timeout=10)
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    fams = {f.name: f for f in openmetrics_families(om.text)}
    assert fams["nbkit_retries"].type == "counter" and fams["nbkit_in_flight"].type == "gauge"
    assert om.text.rstrip().endswith("# EOF")


def test_path_label_is_bounded_whatever_the_callers_send(sim):
    _, ep = sim
    with httpx.Client(base_url=ep.url, timeout=30) as h:
        for path in ("/v1/completions?api-version=2024-01-01&user=123", "/v1/completions?x=" + "y" * 200):
            assert h.post(path, json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        h.get("/v1/models?limit=5")
        for odd in ("/a/b/c?d=e", "/v1/chat/completions/extra", "/%2e%2e/etc/passwd", "/v1/Completions"):
            h.post(odd, json={"prompt": "x"})
        text = h.get("/metrics").text
    paths = {s.labels["path"] for s in families(text)["nbkit_requests"].samples}
    assert paths <= PATHS | {"other"}, paths
    assert {"/v1/completions", "/v1/models", "other"} <= paths
    assert "?" not in "".join(paths)
    assert path_label("/v1/embeddings?x=1") == "/v1/embeddings" and path_label("/tokenize") == "/tokenize"
    assert path_label("/v1/completions/../x") == "other"


def test_series_of_a_rank_that_was_scaled_away_disappear(tmp_path):
    c = sim_cluster(tmp_path)
    c.start(timeout=120)
    try:
        ep = c.endpoint(port=free_port(19520), policy="round_robin")
        for _ in range(2):
            httpx.post(ep.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        before = families(httpx.get(ep.url + "/metrics", timeout=10).text)
        assert {s.labels["rank"] for s in before["nbkit_picks"].samples} == {"replica0", "replica1"}
        c.scale(1)
        text = httpx.get(ep.url + "/metrics", timeout=10).text
        assert 'rank="replica1"' not in text
        after = families(text)
        for name, (_, labels, _) in METRICS.items():
            if "rank" in labels:
                assert {s.labels["rank"] for s in after[name].samples} <= {"replica0"}, name
        assert after["nbkit_ranks"].samples[0].value == 1
        assert [s.value for s in after["nbkit_picks"].samples] == [1.0]
        ep.stop()
    finally:
        c.stop()


# ------------------------------------------------------------------------------ errors
def test_every_error_nbkit_makes_up_has_openais_shape(sim):
    c, ep = sim
    with httpx.Client(base_url=ep.url, timeout=30) as h:
        err = assert_openai_error(h.post("/v1/completions", content=b"{not json",
                                         headers={"content-type": "application/json"}), 400)
        assert "JSON" in err["message"]
        for pin in ("7", "replica9"):
            err = assert_openai_error(h.post("/v1/completions", json={"prompt": "x"}, headers={"x-nbkit-rank": pin}),
                                      400)
            assert err["param"] == "x-nbkit-rank" and pin in err["message"]
        assert_openai_error(h.request("OPTIONS", "/v1/completions"), 405)
        for i in (0, 1):
            ep.router.mark_down(i, "stopped by the test")
        try:
            r = h.post("/v1/completions", json={"prompt": "x"})
            assert_openai_error(r, 503)
            assert int(r.headers["retry-after"]) >= 1
            r = h.get("/v1/models")
            assert_openai_error(r, 503)
        finally:
            for i in (0, 1):
                ep.router.mark_up(i)
        assert h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        # a replica's own error passes through as it came
        direct = httpx.post(c.urls[0] + "/no/such/route", json={}, timeout=10)
        r = h.post("/no/such/route", json={}, headers={"x-nbkit-rank": "0"})
        assert (r.status_code, r.content) == (direct.status_code, direct.content) and r.status_code == 404


def test_shed_and_timeout_answers_have_openais_shape(sim):
    c, _ = sim
    slow = {"prompt": "Tell me a long story.", "max_tokens": 120, "ignore_eos": True}  # ~2 s on the sim
    ep = c.endpoint(port=free_port(19540), policy="round_robin", max_concurrency=1, max_queue=0)
    try:
        async def shed():
            async with httpx.AsyncClient(base_url=ep.url, timeout=30) as h:
                first = asyncio.ensure_future(h.post("/v1/completions", json=slow))
                while ep.router.in_flight < 1:
                    await asyncio.sleep(0.01)
                second = await h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                return await first, second
        first, second = asyncio.run(shed())
        assert first.status_code == 200
        assert_openai_error(second, 429)
        assert int(second.headers["retry-after"]) >= 1
    finally:
        ep.stop()
    ep = c.endpoint(port=free_port(19560), policy="round_robin", timeout=0.3)
    try:
        err = assert_openai_error(httpx.post(ep.url + "/v1/completions", json=slow, timeout=30), 504)
        assert err["type"] == "GatewayTimeout"
    finally:
        ep.stop()


def fake_endpoint(handler, n: int = 2) -> Endpoint:
    ranks = [Rank(replica=i, dp_rank=0, url=f"http://r{i}:8000", name=f"replica{i}") for i in range(n)]
    ep = Endpoint(ranks, port=8000, policy="round_robin", seed=0)
    ep._fwd = Forwarder(ep.router, httpx.AsyncClient(transport=httpx.MockTransport(handler)), retries=ep.retries)
    return ep


def call(ep: Endpoint, method: str, path: str, **kw) -> httpx.Response:
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ep.app), base_url="http://ep") as c:
            return await c.request(method, path, **kw)
    return asyncio.run(main())


def test_a_timeout_of_every_transport_kind_is_504():
    def handler(request):
        raise httpx.ReadTimeout("no bytes", request=request)
    ep = fake_endpoint(handler)
    err = assert_openai_error(call(ep, "POST", "/v1/completions", json={"prompt": "x"}), 504)
    assert err["type"] == "GatewayTimeout"
    assert ep.router.records[-1].outcome == "error"


# ------------------------------------------------------------------------------ /v1/models
def test_models_lists_every_model_of_every_rank_once(sim):
    c, ep = sim
    served = httpx.get(c.urls[0] + "/v1/models", timeout=10).json()["data"]
    data = httpx.get(ep.url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in data] == [served[0]["id"]]  # both ranks serve it: listed once

    lists = {"r0": ["base", "lora-a"], "r1": ["base", "lora-b"], "r2": ["base"]}
    seen = []

    def handler(request):
        seen.append(request.url.host)
        return httpx.Response(200, json={"object": "list", "data": [{"id": i, "object": "model"}
                                                                     for i in lists[request.url.host]]})
    ep = fake_endpoint(handler, 3)
    r = call(ep, "GET", "/v1/models")
    assert r.status_code == 200 and r.json()["object"] == "list"
    assert [m["id"] for m in r.json()["data"]] == ["base", "lora-a", "lora-b"]
    assert sorted(seen) == ["r0", "r1", "r2"]
    ep.router.mark_down(1, "gone")
    assert [m["id"] for m in call(ep, "GET", "/v1/models").json()["data"]] == ["base", "lora-a"]
    # pinned: that rank's own answer
    assert [m["id"] for m in call(ep, "GET", "/v1/models", headers={"x-nbkit-rank": "2"}).json()["data"]] == ["base"]


def test_models_passes_a_replica_error_on_when_no_rank_lists_any():
    ep = fake_endpoint(lambda request: httpx.Response(401, json={"error": "bad key"}))
    r = call(ep, "GET", "/v1/models")
    assert (r.status_code, r.json()) == (401, {"error": "bad key"})


# ------------------------------------------------------------------------------ accounting
def test_an_input_request_is_accounted_by_its_input_not_as_decode_tokens():
    i = request_info({"model": "e5", "input": "a" * 400})
    assert (i.prompt_tokens, i.max_tokens) == (101, 0)
    assert request_info({"input": [1, 2, 3, 4]}).prompt_tokens == 4
    assert request_info({"input": [[1, 2], [3, 4, 5]]}).prompt_tokens == 5
    assert request_info({"input": ["abcd" * 10, "efgh" * 10]}).max_tokens == 0
    r = request_info({"input": [{"role": "user", "content": [{"type": "input_text", "text": "x" * 80}]}],
                      "max_output_tokens": 64})
    assert r.max_tokens == 64 and 20 <= r.prompt_tokens <= 30
    assert request_info({"input": "hi", "max_output_tokens": 9}).max_tokens == 9
    assert request_info({"messages": [{"role": "user", "content": "hi"}]}).max_tokens == 256  # chat: unchanged


def test_the_router_describes_an_embeddings_body_without_decode_tokens():
    ep = fake_endpoint(lambda request: httpx.Response(200, json={"data": [{"embedding": [0.1]}]}))
    assert ep.router.describe({"model": "m", "input": "some text to embed"}).max_tokens == 0
    assert call(ep, "POST", "/v1/embeddings", json={"input": "some text to embed"}).status_code == 200
    assert ep.router.records[-1].tokens_in == len("some text to embed") // 4 + 1


def test_a_usage_only_chunk_is_not_a_token():
    usage = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n'
    spaced = b'data: {"id": "x", "choices": [], "usage": {"completion_tokens": 2}}\n\n'
    token = b'data: {"id":"x","choices":[{"index":0,"text":"a"}]}\n\n'
    assert sse_events(usage) == 0 and sse_events(spaced) == 0
    assert sse_events(token + token + usage + b"data: [DONE]\n\n") == 2


def test_a_stream_with_usage_counts_only_its_tokens(sim):
    c, _ = sim
    ep = c.endpoint(port=free_port(19580), policy="round_robin", migration_limit=0)  # counted from the SSE
    try:
        body = {"prompt": "hi there", "max_tokens": 7, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", ep.url + "/v1/completions", json=body, timeout=30) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 7
        rec = ep.router.records[-1]
        assert (rec.outcome, rec.tokens_out, len(rec.itl_s)) == ("ok", 7, 6)
    finally:
        ep.stop()
