"""Benchmarks: workloads, a load generator, per-request CSV, summaries and charts.

In a notebook::

    from nbkit import Cluster, bench
    cluster = Cluster.replicas(n=2).start()
    w = bench.shared_prefix(num_prefixes=4, questions_per_prefix=50, prefix_len=1024, question_len=32)
    res = bench.run(cluster, w, policy="prefix_affinity", request_rate=6, num_prompts=200, slos="ttft:500")
    res.summary(); res.per_replica(); res.to_csv("results.csv")       # or time_unit="ns"
    cmp = bench.compare(w, cluster=cluster, policies=["round_robin", "least_load", "prefix_affinity"],
                        request_rate=6)
    cmp.table(); cmp.chart("ttft_s")

    res = bench.run("http://127.0.0.1:8000", w, request_rate=6)    # any OpenAI-compatible URL (nbkit's
                                                                   # endpoint: replica from X-nbkit-rank)

From a shell::

    nbkit bench --url http://127.0.0.1:8000 --workload shared-prefix --request-rate 6 --num-prompts 200 \\
                --output results.csv
    nbkit bench --cluster 2 --policy round_robin,prefix_affinity --workload synthetic --input-len 512 \\
                --output-len 64 --concurrency 16 --num-prompts 200 --output results.csv

Workloads (:mod:`~nbkit.bench.workloads`): :func:`synthetic`, :func:`shared_prefix`,
:func:`multi_turn`, :func:`from_trace` (the simulator's JSONL), :func:`sharegpt`; several tenants'
as one: :func:`mix`. Arrivals
(:mod:`~nbkit.bench.arrivals`): :class:`Poisson`, :class:`Constant`, :class:`Bursts`,
:class:`TraceTimes`, :class:`ClosedLoop`. Results (:mod:`~nbkit.bench.results`): frames of the
per-request records of :mod:`nbkit.records` (:class:`~nbkit.records.RequestResult`, the CSV with the
columns ``request_id, instance_id, rank, policy, arrival_s, queue_wait_s, ttft_s, tpot_s, itl_s, e2e_s,
input_toks, output_toks, outcome``, :func:`~nbkit.records.read_csv`); :func:`summary_frame`,
:func:`read_frame`, :func:`write_frame`. Charts: :mod:`~nbkit.bench.charts`.
"""

from nbkit.bench.arrivals import Arrivals, Bursts, ClosedLoop, Constant, Poisson, TraceTimes, make_arrivals
from nbkit.bench.compare import Comparison, acompare, compare
from nbkit.bench.mix import mix
from nbkit.bench.loadgen import arun, drive, reset_prefix_caches, run, scrape_replicas
from nbkit.bench.results import (BenchResult, frame_in_unit, from_frame, metrics_delta, per_replica, read_frame, summary_frame, to_frame, write_frame)
from nbkit.bench.targets import Call, ClientTarget, FakeTarget, Reply, Target, UrlTarget, as_target
from nbkit.bench.workloads import (Prompt, Session, TextBuilder, Turn, Workload, from_spec, from_trace, get_tokenizer, multi_turn, sample_lengths, shared_prefix, sharegpt, synthetic, text_builder)

__all__ = [
    "run", "arun", "compare", "acompare", "Comparison", "drive", "summary_frame", "per_replica", "read_frame",
    "write_frame", "to_frame", "from_frame", "frame_in_unit", "metrics_delta", "BenchResult", "scrape_replicas",
    "reset_prefix_caches",
    "Arrivals", "Poisson", "Constant", "Bursts", "TraceTimes", "ClosedLoop", "make_arrivals",
    "Target", "UrlTarget", "ClientTarget", "FakeTarget", "Call", "Reply", "as_target",
    "Workload", "Prompt", "Session", "Turn", "TextBuilder", "synthetic", "shared_prefix", "multi_turn", "from_trace",
    "sharegpt", "from_spec", "get_tokenizer", "text_builder", "sample_lengths", "mix",
]
