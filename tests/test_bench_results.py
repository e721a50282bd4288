"""nbkit.bench: statistics (against numpy), TPOT, the CSV in both units, per-replica shares, metrics
deltas, charts, comparisons, the URL target's SSE timing against a local fake server, and the
`nbkit bench` command line."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import numpy as np
import pandas as pd
import pytest

from nbkit import bench
from nbkit.bench import workloads as wl
from nbkit import records
from nbkit.bench.results import (BenchResult, frame_in_unit, metrics_delta, per_replica, read_frame, summary_frame,
                                 write_frame)
from nbkit.records import CSV_COLUMNS, RequestResult, column_names, read_csv, tpot, write_csv
from nbkit.routing.metrics import EngineMetrics


def known_rows(n=200, seed=0):
    """Requests with known TTFT/ITL/E2E; every 10th failed, a few with 1 output token."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        out = int(rng.integers(1, 30)) if i % 17 else 1
        ttft = float(rng.uniform(0.01, 2.0))
        itl = [float(x) for x in rng.uniform(0.001, 0.1, size=out - 1)]
        rows.append(RequestResult(
            request_id=i, instance_id=i % 3, rank=f"replica{i % 3}", policy="p", arrival_s=i * 0.05,
            queue_wait_s=float(rng.uniform(0, 0.01)), ttft_s=ttft, itl_s=itl, e2e_s=ttft + sum(itl),
            input_toks=int(rng.integers(10, 500)), output_toks=out, outcome="ok" if i % 10 else "http_500"))
    return rows


# -- TPOT and statistics ----------------------------------------------------------------------------
def test_tpot_definition():
    assert tpot(2.0, 0.5, 4) == pytest.approx(0.5)           # (2.0 - 0.5) / (4 - 1)
    assert tpot(1.0, 0.2, 2) == pytest.approx(0.8)
    assert tpot(1.0, 0.2, 1) is None and tpot(1.0, 0.2, 0) is None
    assert tpot(None, 0.2, 5) is None and tpot(1.0, None, 5) is None
    r = RequestResult(0, ttft_s=0.1, e2e_s=1.1, output_toks=11)
    assert r.tpot_s == pytest.approx(0.1)
    df = bench.results.to_frame([r, RequestResult(1, ttft_s=0.1, e2e_s=0.1, output_toks=1)])
    assert df["tpot_s"].iloc[0] == pytest.approx(0.1) and math.isnan(df["tpot_s"].iloc[1])


def test_summary_percentiles_match_numpy_on_known_data():
    rows = known_rows()
    ok = [r for r in rows if r.outcome == "ok"]
    s = summary_frame(rows, duration_s=12.5, percentiles=(50, 90, 99)).iloc[0]
    ttft = np.array([r.ttft_s for r in ok])
    e2e = np.array([r.e2e_s for r in ok])
    tp = np.array([(r.e2e_s - r.ttft_s) / (r.output_toks - 1) for r in ok if r.output_toks > 1])
    itl = np.array([x for r in ok for x in r.itl_s])
    for name, v in (("ttft", ttft), ("tpot", tp), ("itl", itl), ("e2e", e2e)):
        assert s[f"{name}_mean_ms"] == pytest.approx(v.mean() * 1e3)
        assert s[f"{name}_median_ms"] == pytest.approx(np.median(v) * 1e3)
        assert s[f"{name}_p90_ms"] == pytest.approx(np.percentile(v, 90) * 1e3)
        assert s[f"{name}_p99_ms"] == pytest.approx(np.percentile(v, 99) * 1e3)
    assert s["requests"] == 200 and s["completed"] == 180 and s["failed"] == 20
    assert s["request_throughput"] == pytest.approx(180 / 12.5)
    assert s["output_throughput"] == pytest.approx(sum(r.output_toks for r in ok) / 12.5)
    assert s["total_token_throughput"] == pytest.approx(sum(r.output_toks + r.input_toks for r in ok) / 12.5)
    assert records.percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(np.percentile([1, 2, 3, 4], 90))


def test_duration_defaults_to_the_last_finish_and_goodput_counts_requests_within_slos():
    rows = [RequestResult(0, arrival_s=0.0, ttft_s=0.1, e2e_s=1.0, output_toks=10),
            RequestResult(1, arrival_s=1.0, ttft_s=0.6, e2e_s=1.5, output_toks=10),       # TTFT over 0.5
            RequestResult(2, arrival_s=2.0, ttft_s=0.2, e2e_s=3.0, output_toks=10),       # TPOT 0.311 over 0.2
            RequestResult(3, arrival_s=2.5, ttft_s=0.2, e2e_s=0.2, output_toks=1),        # no TPOT: passes it
            RequestResult(4, arrival_s=3.0, ttft_s=0.1, e2e_s=0.5, output_toks=5, outcome="error")]
    s = summary_frame(rows, slos={"ttft": 0.5, "tpot": 0.2}).iloc[0]
    assert s["duration_s"] == pytest.approx(5.0)  # request 2 ends at 2.0 + 3.0
    assert s["good_requests"] == 2 and s["goodput"] == pytest.approx(2 / 5.0)
    s2 = summary_frame(rows, slos="ttft:500 e2e:2000").iloc[0]  # ms, as vllm bench serve --goodput
    assert s2["good_requests"] == 2
    with pytest.raises(ValueError, match="choose ttft"):
        summary_frame(rows, slos={"latency": 1})


# -- CSV --------------------------------------------------------------------------------------------
def test_csv_round_trip_in_seconds(tmp_path):
    rows = known_rows(50)
    p = tmp_path / "r.csv"
    write_csv(rows, p)
    header = p.read_text().splitlines()[0].split(",")
    assert header == list(CSV_COLUMNS)
    back = read_frame(p)
    want = bench.results.to_frame(rows, extra=False)
    assert list(back.columns) == list(CSV_COLUMNS)
    pd.testing.assert_frame_equal(back.drop(columns=["itl_s"]), want.drop(columns=["itl_s"]), check_dtype=False)
    assert [list(v) for v in back["itl_s"]] == [r.itl_s for r in rows]  # exact floats
    one = next(i for i, r in enumerate(rows) if r.output_toks == 1)
    line = p.read_text().splitlines()[1 + one].split(",")
    assert line[CSV_COLUMNS.index("tpot_s")] == ""  # tpot empty when output <= 1
    # summaries agree
    a = summary_frame(rows).iloc[0]
    b = summary_frame(back).iloc[0]
    assert a["ttft_p99_ms"] == pytest.approx(b["ttft_p99_ms"]) and a["itl_p90_ms"] == pytest.approx(b["itl_p90_ms"])


def test_csv_round_trip_in_nanoseconds(tmp_path):
    rows = known_rows(50, seed=1)
    rows[3].queue_wait_s = None  # unknown -> empty cell
    p = tmp_path / "r_ns.csv"
    write_csv(rows, p, time_unit="ns")
    lines = p.read_text().splitlines()
    assert lines[0].split(",") == column_names("ns") == [
        "request_id", "instance_id", "rank", "policy", "arrival_ns", "queue_wait_ns", "ttft_ns", "tpot_ns", "itl_ns",
        "e2e_ns", "input_toks", "output_toks", "outcome"]
    back = read_frame(p)
    assert back["ttft_ns"].tolist() == [int(round(r.ttft_s * 1e9)) for r in rows]
    assert all(isinstance(x, int) for v in back["itl_ns"] for x in v)
    assert pd.isna(back["queue_wait_ns"].iloc[3])
    sec = frame_in_unit(back, "s")
    assert np.allclose(sec["e2e_s"], [r.e2e_s for r in rows], atol=1e-9, rtol=0)
    assert np.allclose([x for v in sec["itl_s"] for x in v], [x for r in rows for x in r.itl_s], atol=1e-9, rtol=0)
    # ns -> s -> ns is exact
    p2 = tmp_path / "again.csv"
    write_frame(sec, p2, time_unit="ns")
    assert p2.read_text() == p.read_text()
    res = BenchResult.from_csv(p)
    assert len(res.requests) == 50 and res.requests[0].ttft_s == pytest.approx(rows[0].ttft_s, abs=1e-9)


def test_read_csv_refuses_other_columns(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not the results columns"):
        read_csv(p)


# -- per replica, metrics ---------------------------------------------------------------------------
def test_per_replica_shares():
    rows = known_rows(90)
    pr = per_replica(rows)
    assert pr["requests"].sum() == 90 and pr["request_share"].sum() == pytest.approx(1.0)
    assert pr["token_share"].sum() == pytest.approx(1.0)
    assert sorted(pr["rank"]) == ["replica0", "replica1", "replica2"]
    r0 = pr[pr["rank"] == "replica0"].iloc[0]
    assert r0["input_toks"] == sum(r.input_toks for r in rows if r.rank == "replica0")


def test_metrics_delta_gives_prefix_hit_rate_and_shares():
    before = {(0, "0"): EngineMetrics(prefix_cache_queries=100, prefix_cache_hits=50, generation_tokens=10,
                                      requests_finished=1),
              (1, "0"): EngineMetrics(prefix_cache_queries=0, prefix_cache_hits=0)}
    after = {(0, "0"): EngineMetrics(prefix_cache_queries=1100, prefix_cache_hits=850, generation_tokens=310,
                                     requests_finished=4),
             (1, "0"): EngineMetrics(prefix_cache_queries=1000, prefix_cache_hits=200, generation_tokens=100,
                                     requests_finished=1)}
    df = metrics_delta(before, after, {(0, "0"): "replica0"})
    r0, r1 = df.iloc[0], df.iloc[1]
    assert r0["prefix_hit_rate"] == pytest.approx(0.8) and r1["prefix_hit_rate"] == pytest.approx(0.2)
    assert r0["rank"] == "replica0" and r0["finished"] == 3 and r0["generation_tokens"] == 300
    assert df["generation_share"].tolist() == pytest.approx([0.75, 0.25])
    assert bench.results.prefix_hit_rate(df) == pytest.approx(1000 / 2000)


# -- charts and comparisons -------------------------------------------------------------------------
def test_charts_build(tmp_path):
    a = BenchResult(known_rows(60), 5.0, label="a", policy="round_robin")
    b = BenchResult(known_rows(60, seed=2), 5.0, label="b", policy="least_load")
    from nbkit.bench import charts
    cdf = charts.cdf_frame({"a": a, "b": b}, "ttft_s")
    assert set(cdf["label"]) == {"a", "b"} and cdf["fraction"].max() == 1.0
    ok = [r.ttft_s for r in a.requests if r.ok]
    assert cdf[cdf["label"] == "a"]["ms"].max() == pytest.approx(max(ok) * 1e3)
    assert charts.latency_cdf({"a": a, "b": b}, "itl_s").to_dict()["mark"]["type"] == "line"
    share = charts.share_frame(a, bin_s=1.0)
    assert np.allclose(share.groupby("t_s")["share"].sum(), 1.0)
    charts.replica_share_over_time(a, bin_s=1.0).to_dict()
    cmp = bench.Comparison({"a": a, "b": b}, instances={"a": 1, "b": 2})
    t = cmp.table()
    assert list(t.index) == ["a", "b"] and t.loc["b", "instances"] == 2 and t.loc["a", "policy"] == "round_robin"
    cmp.throughput_chart().to_dict()
    assert "ttft_p99_ms" in str(cmp)
    files = cmp.to_csv(tmp_path / "cmp")
    assert len(files) == 2 and (tmp_path / "cmp" / "summary.csv").exists()
    with pytest.raises(ValueError):
        charts.latency_cdf({"a": a}, "bogus")


def test_compare_runs_each_target_with_the_same_workload():
    w = wl.Workload("fake", [wl.Prompt(f" p{i}", 2, 3) for i in range(12)])
    t1, t2 = bench.FakeTarget(policy="x"), bench.FakeTarget(policy="y", ttft_s=0.01)
    cmp = bench.compare(w, targets={"one": t1, "two": t2}, request_rate=500.0, progress=False)
    assert list(cmp.results) == ["one", "two"] and len(t1.calls) == len(t2.calls) == 12
    assert [c.prompt for c in t1.calls] == [c.prompt for c in t2.calls]
    t = cmp.table()
    assert t.loc["two", "ttft_median_ms"] > t.loc["one", "ttft_median_ms"]
    assert set(cmp.frame()["label"]) == {"one", "two"}


# -- the URL target against a local streaming server ------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    """An OpenAI-ish streaming server: ``itl`` between tokens, X-nbkit-rank alternating, /metrics
    counters that grow with the requests, HTTP 500 for the prompt " FAIL"."""

    def __init__(self, itl=0.004):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
        from starlette.routing import Route

        self.itl, self.n, self.bodies, self.headers = itl, 0, [], []
        self.gen = 0

        async def models(request):
            return JSONResponse({"data": [{"id": "fake-model", "root": "/nonexistent/fake"}]})

        async def metrics(request):
            return PlainTextResponse(
                "# TYPE vllm:generation_tokens counter\n"
                f'vllm:generation_tokens_total{{engine="0",model_name="fake-model"}} {float(self.gen)}\n'
                "# TYPE vllm:prefix_cache_queries counter\n"
                f'vllm:prefix_cache_queries_total{{engine="0",model_name="fake-model"}} {10.0 * self.n}\n'
                "# TYPE vllm:prefix_cache_hits counter\n"
                f'vllm:prefix_cache_hits_total{{engine="0",model_name="fake-model"}} {4.0 * self.n}\n')

        async def complete(request):
            body = await request.json()
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
            k = self.n
            self.n += 1
            chat = "messages" in body
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            if prompt == " FAIL":
                return JSONResponse({"error": "boom"}, status_code=500)
            n = body["max_tokens"]

            async def gen():
                for i in range(n):
                    await asyncio.sleep(self.itl)
                    self.gen += 1
                    choice = {"index": 0, "delta": {"content": f" w{i}"}} if chat else {"index": 0, "text": f" w{i}"}
                    yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
                usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
                yield b"data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream",
                                     headers={"x-nbkit-rank": f"replica{k % 2}"})

        async def health(request):
            return PlainTextResponse("")

        app = Starlette(routes=[Route("/v1/models", models), Route("/metrics", metrics), Route("/health", health),
                                Route("/v1/completions", complete, methods=["POST"]),
                                Route("/v1/chat/completions", complete, methods=["POST"])])
        import uvicorn
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t = time.monotonic()
        while not self.server.started:
            assert time.monotonic() - t < 20, "fake server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server():
    s = FakeServer()
    yield s
    s.stop()


@pytest.mark.parametrize("http", ["aiohttp", "httpx"])
def test_url_target_times_the_stream_and_reads_rank_and_usage(server, http, tmp_path):
    w = wl.Workload("w", [wl.Prompt(f" q{i}", 3, 5) for i in range(6)] + [wl.Prompt(" FAIL", 2, 5)])
    before = server.n
    t = bench.UrlTarget(server.url, http=http, replicas=[server.url])
    res = bench.run(t, w, request_rate=200.0, progress=False, output=tmp_path / "r.csv", time_unit="ns")
    df = res.frame()
    assert len(df) == 7 and server.n - before == 7
    assert (df["outcome"] == "ok").sum() == 6 and df["outcome"].iloc[-1] == "http_500"
    ok = df[df["outcome"] == "ok"]
    assert set(ok["rank"]) == {"replica0", "replica1"} and set(ok["instance_id"]) == {0, 1}
    assert (ok["output_toks"] == 5).all() and (ok["input_toks"] == 7).all()  # from the usage chunk
    assert all(len(v) == 4 for v in ok["itl_s"])                              # 5 tokens -> 4 gaps
    assert (ok["ttft_s"] >= 0.003).all()
    # the server sends the tokens 4 ms apart; on a busy machine two of them can reach the client in
    # one read (a gap of ~0, the next one twice as long), so check that real gaps were timed
    # rather than every gap (this was a one-in-several flake)
    assert all(max(v) >= 0.002 and sum(v) >= 0.004 for v in ok["itl_s"])
    assert np.allclose(ok["e2e_s"], ok["ttft_s"] + ok["itl_s"].apply(sum))
    body = server.bodies[-1]
    assert body["model"] == "fake-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert len(read_csv(tmp_path / "r.csv")) == 7
    rm = res.replica_metrics
    assert len(rm) == 1 and rm.iloc[0]["prefix_hit_rate"] == pytest.approx(0.4)
    assert rm.iloc[0]["generation_tokens"] == 30


def test_url_target_chat_and_sessions(server):
    w = wl.Workload("s", [wl.Session("sess-1", (wl.Turn(" hello", 1, 3), wl.Turn(" again", 1, 2)))])
    res = bench.run(server.url, w, api="chat", progress=False)
    assert [r.outcome for r in res.requests] == ["ok", "ok"]
    last, prev = server.bodies[-1], server.bodies[-2]
    assert prev["messages"] == [{"role": "user", "content": " hello"}]
    assert last["messages"] == [{"role": "user", "content": " hello"}, {"role": "assistant", "content": " w0 w1 w2"},
                                {"role": "user", "content": " again"}]
    assert server.headers[-1]["x-session-id"] == "sess-1"


@pytest.mark.parametrize("local", [False, True])
def test_client_target_takes_rank_and_queue_wait_from_the_router_records(server, local):
    from nbkit import RoutedClient
    from nbkit.routing.rank import Rank
    ranks = [Rank(replica=i, dp_rank=0, url=server.url, name=f"replica{i}") for i in range(2)]
    client = RoutedClient(ranks, "round_robin", model="fake-model", max_per_rank=1, local=local)
    w = wl.Workload("w", [wl.Prompt(f" q{i}", 3, 4) for i in range(8)])
    if local:
        async def main():
            async with client:
                return await bench.arun(client, w, request_rate=math.inf, progress=False)
        res = asyncio.run(main())
    else:
        res = bench.run(client, w, request_rate=math.inf, progress=False)
        client.close()
    df = res.frame()
    assert len(df) == 8 and (df["outcome"] == "ok").all()
    assert sorted(df["rank"].value_counts().tolist()) == [4, 4] and set(df["instance_id"]) == {0, 1}
    assert (df["policy"] == "round_robin").all()
    assert df["queue_wait_s"].notna().all() and df["queue_wait_s"].max() > 0.005  # 8 at once, 1 slot per rank
    assert (df["output_toks"] == 4).all()
    assert client.router.new_record.__func__ is type(client.router).new_record  # the hook is removed again


class FakeCluster:
    """What compare(layouts=...) needs of a Cluster, over the fake server."""

    def __init__(self, server, n):
        from nbkit.routing.rank import Rank
        self.ranks = [Rank(replica=i, dp_rank=0, url=server.url, name=f"replica{i}") for i in range(n)]
        self.urls = [server.url]
        self.running, self.starts, self.stops = False, 0, 0

    async def astart(self):
        self.running, self.starts = True, self.starts + 1
        return self

    async def astop(self):
        self.running, self.stops = False, self.stops + 1

    def client(self, policy="least_load", **kw):
        from nbkit import RoutedClient
        return RoutedClient(self, policy, model="fake-model", **kw)


def test_compare_layouts_and_policies_start_run_and_stop_each_layout(server):
    one, two = FakeCluster(server, 1), FakeCluster(server, 2)
    w = wl.Workload("w", [wl.Prompt(f" q{i}", 3, 2) for i in range(6)])
    cmp = bench.compare(w, layouts={"1 replica": one, "2 replicas": lambda: two},
                        policies=["round_robin", "least_load"], concurrency=3, progress=False)
    assert (one.starts, one.stops, two.starts, two.stops) == (1, 1, 1, 1)
    t = cmp.table()
    assert list(t.index) == ["1 replica/round_robin", "1 replica/least_load", "2 replicas/round_robin",
                             "2 replicas/least_load"]
    assert t["instances"].tolist() == [1, 1, 2, 2] and (t["completed"] == 6).all()
    assert t["policy"].tolist() == ["round_robin", "least_load"] * 2
    assert set(cmp.results["2 replicas/round_robin"].frame()["rank"]) == {"replica0", "replica1"}
    cmp.throughput_chart().to_dict()
    with pytest.raises(ValueError, match="exactly one"):
        bench.compare(w, targets={"a": bench.FakeTarget()}, cluster=one)


def test_cli_bench_against_a_url(server, tmp_path, capsys, tiny_model_path):
    from nbkit import cli
    out = tmp_path / "cli.csv"
    rc = cli.main(["bench", "--url", server.url, "--workload", "shared-prefix", "--num-prefixes", "2",
                   "--prefix-len", "20", "--question-len", "4", "--output-len", "3", "--num-prompts", "9",
                   "--request-rate", "100", "--seed", "1", "--output", str(out), "--time-unit", "ns",
                   "--goodput", "ttft:1000", "--no-progress", "--tokenizer", tiny_model_path,
                   "--summary", str(tmp_path / "s.csv")])
    text = capsys.readouterr().out
    assert rc == 0, text
    df = read_frame(out)
    assert len(df) == 9 and "ttft_ns" in df.columns  # the workload had 10 (2 x 5), the cap is 9
    assert "Request goodput" in text and "replica0" in text
    assert pd.read_csv(tmp_path / "s.csv")["completed"].iloc[0] == 9


def test_cli_helpers():
    from nbkit.bench.cli import parse_layouts
    assert parse_layouts("2,1x2, 4x1") == [(2, 1), (1, 2), (4, 1)]
    for bad in ("", "x2", "0", "2x0", "a"):
        with pytest.raises(ValueError):
            parse_layouts(bad)
