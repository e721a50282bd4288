"""``nbkit bench``: the benchmark from a shell (``vllm bench serve``-like flags).

    nbkit bench --url http://127.0.0.1:8000 --workload shared-prefix --request-rate 6 --num-prompts 200 \\
                --output results.csv
    nbkit bench --cluster 2 --policy round_robin,least_load,prefix_affinity --workload shared-prefix \\
                --num-prefixes 8 --prefix-len 1024 --request-rate 6 --num-prompts 200 --output results.csv
    nbkit bench --cluster 1x2,2 --policy least_load --workload synthetic --input-len 512 --output-len 64 \\
                --range-ratio 0.5 --concurrency 16 --output results.csv --time-unit ns
    nbkit bench --url http://127.0.0.1:8100 --workload trace.jsonl --output results.csv
    nbkit bench --base-url http://127.0.0.1:8000 --dataset-name random --random-input-len 512 \\
                --random-output-len 128 --max-concurrency 16 --num-prompts 200 --save-result --result-dir out

``vllm bench serve``'s spellings are aliases: --base-url (--url), --dataset-name (--workload: random
is synthetic, prefix_repetition is shared-prefix), --dataset-path (--dataset), --max-concurrency
(--concurrency), --random-input-len / --random-output-len / --random-range-ratio /
--random-prefix-len (--input-len / --output-len / --range-ratio / --prefix-len), --disable-tqdm
(--no-progress), --endpoint /v1/chat/completions (--api chat), --save-result with --result-dir and
--result-filename (the per-request CSV there, plus the summary as CSV and JSON). A path given to
--workload is read as a trace (JSONL, see nbkit.traces).

``--cluster`` starts each layout (``N`` replicas, or ``NxTP``: N replicas of tensor-parallel size TP)
in turn, runs every ``--policy`` on it through the in-kernel client (``--via endpoint``: through
nbkit's HTTP endpoint), emptying the replicas' prefix caches before each run, and stops it.
Several runs write ``<output>-<label>.csv`` each and print a comparison table (``--summary`` writes it as CSV).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help of every option (but not "(default: None)" nor a flag's False),
    descriptions as written. ``nbkit serve`` uses it too."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, [], argparse.SUPPRESS) or action.default is False and action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


WORKLOADS = ("synthetic", "shared-prefix", "multi-turn", "trace", "sharegpt")
#: ``vllm bench serve --dataset-name`` values that mean one of ours.
WORKLOAD_ALIASES = {"random": "synthetic", "prefix_repetition": "shared-prefix", "prefix-repetition": "shared-prefix",
                    "shared_prefix": "shared-prefix", "multi_turn": "multi-turn", "custom": "trace"}


def workload_arg(text: str) -> str:
    """argparse type of ``--workload``: a name, a ``vllm bench`` dataset name, or a trace file's path
    (kept as the path; :func:`resolve_workload` turns it into ``trace`` + ``--dataset``)."""
    name = WORKLOAD_ALIASES.get(text, text)
    if name in WORKLOADS or os.path.isfile(os.path.expanduser(text)):
        return name
    raise argparse.ArgumentTypeError(f"{text!r} is neither a workload ({', '.join(WORKLOADS)}; vllm bench's "
                                     f"{', '.join(WORKLOAD_ALIASES)}) nor a trace file")


def api_arg(text: str) -> str:
    """``--api`` / ``--endpoint``: completions | chat, or vLLM's endpoint path."""
    if text in ("completions", "chat"):
        return text
    if text.rstrip("/").endswith("/chat/completions"):
        return "chat"
    if text.rstrip("/").endswith("/completions"):
        return "completions"
    raise argparse.ArgumentTypeError(f"{text!r}: expected completions, chat, /v1/completions or /v1/chat/completions")


def resolve_workload(args) -> None:
    """A path given to ``--workload`` means ``--workload trace --dataset PATH``."""
    if args.workload not in WORKLOADS:
        if args.dataset and args.dataset != args.workload:
            raise ValueError(f"--workload {args.workload} is a trace file, and --dataset {args.dataset} another")
        args.workload, args.dataset = "trace", args.workload


def result_paths(args) -> None:
    """``--save-result``: the per-request CSV in ``--result-dir`` (``--result-filename``, default
    ``nbkit-bench-<time>.csv``) unless ``--output`` names one, and the summary beside it."""
    if not args.save_result:
        return
    import time
    name = args.result_filename or f"nbkit-bench-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    if not name.endswith(".csv"):
        name = os.path.splitext(name)[0] + ".csv"
    if args.output is None:
        args.output = os.path.join(args.result_dir or ".", name)
    stem = os.path.splitext(args.output)[0]
    if args.summary is None:
        args.summary = stem + "-summary.csv"
    args.summary_json = stem + "-summary.json"


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="benchmark a URL or replicas started here (vllm bench serve flags): "
                                     "per-request CSV, summary, comparison",
                       description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                       formatter_class=HelpFormatter)
    t = b.add_argument_group("target")
    where = t.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", "--base-url", dest="url", help="an OpenAI-compatible server (vLLM, `nbkit serve`, a peer router)")
    where.add_argument("--cluster", help="layouts to start here: N or NxTP, comma-separated to compare (e.g. 2,1x2)")
    t.add_argument("--model", default=None, help="--cluster: the model to serve (default: the tiny model on CPU); "
                                                 "--url: the request's model (default: the server's first)")
    t.add_argument("--policy", default=None,
                   help="routing policy, comma-separated to compare (--cluster; default least_load); "
                        "with --url only the label of the rows")
    t.add_argument("--via", choices=("client", "endpoint"), default="client",
                   help="--cluster: through the in-kernel RoutedClient (default) or nbkit's HTTP endpoint")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"), help="--cluster: where replicas run")
    t.add_argument("--port-start", type=int, default=None, help="--cluster: first replica port")
    t.add_argument("--replica-arg", action="append", default=[], metavar="ARG",
                   help="--cluster: extra `vllm serve` argument (repeat), e.g. --replica-arg=--max-num-seqs=64")
    t.add_argument("--replica-url", action="append", default=[], metavar="URL",
                   help="--url: a replica behind it whose /metrics to read (prefix-cache hit rate, shares); repeat")
    t.add_argument("--reset-prefix-cache", action="store_true",
                   help="POST /reset_prefix_cache to the replicas first (needs VLLM_SERVER_DEV_MODE=1 on them)")
    t.add_argument("--api", "--endpoint", dest="api", type=api_arg, default="completions",
                   help="completions or chat (or vLLM's /v1/completions, /v1/chat/completions)")
    t.add_argument("--label", default=None, help="name of the run (single run)")

    w = b.add_argument_group("workload")
    w.add_argument("--workload", "--dataset-name", dest="workload", type=workload_arg, default="synthetic",
                   metavar="NAME|PATH", help=f"{', '.join(WORKLOADS)}, vllm bench's random / prefix_repetition, "
                                             "or the path of a trace (JSONL) to replay")
    w.add_argument("--dataset", "--dataset-path", dest="dataset", default=None,
                   help="--workload trace: the JSONL trace; sharegpt: the JSON file")
    w.add_argument("--tokenizer", default=None,
                   help="tokenizer for building prompts (default: the served model's when local, else the tiny model)")
    w.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=256,
                   help="synthetic: prompt tokens")
    w.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=None,
                   help="output tokens (default 64; sharegpt: the answer's length)")
    w.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=float, default=0.0,
                   help="spread of the lengths around their value")
    w.add_argument("--len-dist", choices=("fixed", "uniform", "normal", "lognormal"), default="uniform",
                   help="how --range-ratio spreads lengths")
    w.add_argument("--prefix-len", "--random-prefix-len", dest="prefix_len", type=int, default=None,
                   help="shared-prefix: system prompt tokens (default 512); synthetic/multi-turn: a common prefix")
    w.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix / multi-turn: system prompts")
    w.add_argument("--question-len", type=int, default=32, help="shared-prefix: question tokens")
    w.add_argument("--turns", type=int, default=4, help="multi-turn: requests per session")
    w.add_argument("--turn-len", type=int, default=32, help="multi-turn: new tokens per later turn")
    w.add_argument("--think-s", type=float, default=0.0, help="multi-turn: pause between turns")
    w.add_argument("--time-scale", type=float, default=1.0, help="trace: multiply its timestamps (0.5: twice as fast)")

    a = b.add_argument_group("load")
    a.add_argument("--request-rate", type=float, default=None,
                   help="requests/s, open loop (inf: all at once; default: inf, or closed loop with --concurrency, "
                        "or the trace's timestamps)")
    a.add_argument("--arrival", choices=("poisson", "constant", "burst", "trace"), default="poisson",
                   help="how requests arrive at --request-rate (trace: at the trace's times)")
    a.add_argument("--burstiness", type=float, default=1.0, help="poisson: gamma shape (1: Poisson)")
    a.add_argument("--burst-size", type=int, default=None, help="burst: requests per burst (default 8)")
    a.add_argument("--concurrency", "--max-concurrency", dest="concurrency", type=int, default=None,
                   help="closed loop with this many workers; with --request-rate a cap on requests in flight")
    a.add_argument("--num-prompts", type=int, default=200, help="requests to send (cap)")
    a.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    a.add_argument("--drain", type=float, default=None, help="cancel what still runs this long after sending stops")
    a.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")

    o = b.add_argument_group("output")
    o.add_argument("--output", "-o", default=None, help="per-request CSV")
    o.add_argument("--time-unit", choices=("s", "ns"), default="s", help="CSV times in s (floats) or ns (integers)")
    o.add_argument("--goodput", nargs="*", default=None, metavar="METRIC:MS",
                   help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 e2e:10000 (ms)")
    o.add_argument("--summary", default=None, help="write the summary table (one row per run) as CSV")
    o.add_argument("--chart", default=None, help="write the TTFT CDF chart (.png, .svg or .html)")
    o.add_argument("--no-progress", "--disable-tqdm", dest="no_progress", action="store_true",
                   help="no progress bar")
    o.add_argument("--save-result", action="store_true",
                   help="write the per-request CSV and the summary (CSV and JSON) into --result-dir")
    o.add_argument("--result-dir", default=None, help="--save-result: the folder (default: here)")
    o.add_argument("--result-filename", default=None,
                   help="--save-result: the CSV's name (default: nbkit-bench-<time>.csv)")
    return b


# -- building blocks (unit-testable) ----------------------------------------------------------------
def parse_layouts(spec: str) -> list[tuple[int, int]]:
    """``"2,1x2"`` -> ``[(2, 1), (1, 2)]`` (replicas, tensor-parallel size)."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        n, _, tp = part.lower().partition("x")
        try:
            n_i, tp_i = int(n), int(tp or 1)
        except ValueError:
            raise ValueError(f"--cluster {spec!r}: {part!r} is not N or NxTP") from None
        if n_i < 1 or tp_i < 1:
            raise ValueError(f"--cluster {spec!r}: {part!r}: counts must be >= 1")
        out.append((n_i, tp_i))
    if not out:
        raise ValueError(f"--cluster {spec!r}: no layout")
    return out


def build_workload(args, tokenizer):
    from nbkit.bench import workloads as wl

    n = args.num_prompts
    out_len = args.output_len if args.output_len is not None else 64
    if args.workload == "synthetic":
        return wl.synthetic(n, args.input_len, out_len, range_ratio=args.range_ratio, dist=args.len_dist,
                            prefix_len=args.prefix_len or 0, seed=args.seed, tokenizer=tokenizer)
    if args.workload == "shared-prefix":
        q = max(1, math.ceil(n / args.num_prefixes))
        return wl.shared_prefix(args.num_prefixes, q, args.prefix_len or 512, args.question_len, out_len,
                                range_ratio=args.range_ratio, seed=args.seed, tokenizer=tokenizer)
    if args.workload == "multi-turn":
        sessions = max(1, math.ceil(n / args.turns))
        return wl.multi_turn(sessions, args.turns, args.input_len, args.turn_len, out_len, think_s=args.think_s,
                             num_prefixes=args.num_prefixes if args.prefix_len else 0, prefix_len=args.prefix_len or 0,
                             seed=args.seed, tokenizer=tokenizer)
    if not args.dataset:
        raise ValueError(f"--workload {args.workload}: give the file with --dataset PATH")
    if args.workload == "trace":
        return wl.from_trace(args.dataset, tokenizer=tokenizer, time_scale=args.time_scale, seed=args.seed)
    return wl.sharegpt(args.dataset, n=None, output_len=args.output_len, seed=args.seed, tokenizer=tokenizer).head(n)


def run_kwargs(args) -> dict:
    kw = dict(request_rate=args.request_rate, concurrency=args.concurrency, arrival=args.arrival,
              burstiness=args.burstiness, burst_size=args.burst_size, num_prompts=args.num_prompts,
              duration_s=args.duration, drain_s=args.drain, seed=args.seed, api=args.api,
              slos=" ".join(args.goodput) if args.goodput else None, progress=not args.no_progress,
              reset_prefix_cache=args.reset_prefix_cache)
    if args.arrival == "trace":
        from nbkit.bench.arrivals import TraceTimes
        kw["arrivals"] = TraceTimes(time_scale=1.0, max_concurrency=args.concurrency)
    return kw


def _served_tokenizer(url: str, model: str | None) -> str | None:
    """The model folder a server at ``url`` reports (vLLM's /v1/models ``root``), if it exists here."""
    import httpx
    try:
        data = httpx.get(url.rstrip("/") + "/v1/models", timeout=10).json().get("data") or []
    except (httpx.HTTPError, ValueError):
        return None
    for m in data:
        if model and m.get("id") != model:
            continue
        for cand in (m.get("root"), m.get("id")):
            if cand and os.path.isdir(cand):
                return cand
    return None


def _out_path(base: str | None, label: str, several: bool) -> str | None:
    if not base:
        return None
    if not several:
        return base
    p = Path(base)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return str(p.with_name(f"{p.stem}-{safe}{p.suffix or '.csv'}"))


def main(args) -> int:
    """Run ``nbkit bench`` (``args`` from :func:`add_parser`)."""
    from nbkit.bench.compare import Comparison
    from nbkit.bench.loadgen import run

    resolve_workload(args)
    result_paths(args)
    kw = run_kwargs(args)
    results: dict = {}
    instances: dict = {}
    if args.url:
        tok = args.tokenizer or _served_tokenizer(args.url, args.model)
        if tok is None:
            print("nbkit bench: the server's model is not a local folder: building prompts with the tiny model's "
                  "tokenizer (give --tokenizer for exact lengths)", file=sys.stderr)
        workload = build_workload(args, tok)
        label = args.label or args.url
        res = run(args.url, workload, model=args.model, policy=args.policy or "", label=label,
                  replicas=args.replica_url or None, output=_out_path(args.output, label, False),
                  time_unit=args.time_unit, **kw)
        results[label] = res
    else:
        from nbkit.cluster.cluster import Cluster
        from nbkit.policies import get_policy

        policies = [p.strip() for p in (args.policy or "least_load").split(",") if p.strip()]
        for p in policies:
            get_policy(p)  # fail on a bad name before starting anything
        layouts = parse_layouts(args.cluster)
        several = len(layouts) * len(policies) > 1
        workload = None
        for n, tp in layouts:
            # dev mode: /reset_prefix_cache, so that no run inherits what the one before cached
            ckw = dict(device=args.device, extra_args=tuple(args.replica_arg), env={"VLLM_SERVER_DEV_MODE": "1"})
            if args.port_start:
                ckw["port_start"] = args.port_start
            cluster = Cluster.replicas(args.model, n=n, tp=tp, **ckw)
            if workload is None:
                tok = args.tokenizer or (cluster.model if os.path.isdir(cluster.model) else None) or cluster.model
                workload = build_workload(args, tok)
            name = f"{n}x{tp}" if tp > 1 else f"{n}"
            print(f"nbkit bench: starting {n} replica(s) of tp {tp} ({cluster.model})", flush=True)
            with cluster:
                for p in policies:
                    label = args.label if (args.label and not several) else (
                        f"{name}/{p}" if len(layouts) > 1 else p)
                    out = _out_path(args.output, label, several)
                    kw["reset_prefix_cache"] = True
                    if args.via == "endpoint":
                        from nbkit.http.ports import port_is_free
                        port = next(q for q in range(8000, 8200) if port_is_free("127.0.0.1", q))
                        with cluster.endpoint(port=port, policy=p) as ep:
                            res = run(ep, workload, label=label, output=out, time_unit=args.time_unit, **kw)
                    else:
                        res = run(cluster, workload, policy=p, label=label, output=out, time_unit=args.time_unit,
                                  **kw)
                    results[label] = res
                    instances[label] = len(cluster.ranks)
    for label, res in results.items():
        print(res.report(), flush=True)
        if args.output:
            print(f"wrote {_out_path(args.output, label, len(results) > 1)} ({len(res.requests)} rows)")
    cmp = Comparison(results, instances if len(set(instances.values())) > 1 else {}, slos=kw["slos"])
    if len(results) > 1:
        print()
        print(cmp)
    for path in (args.output, args.summary, args.chart):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if args.summary:
        cmp.table().to_csv(args.summary, index_label="label")
        print(f"wrote {args.summary}")
    if getattr(args, "summary_json", None):
        cmp.table().to_json(args.summary_json, orient="index", indent=1)
        print(f"wrote {args.summary_json}")
    if args.chart:
        chart = cmp.chart("ttft_s")
        chart.save(args.chart)
        print(f"wrote {args.chart}")
    return 0 if all(any(r.ok for r in res.requests) for res in results.values()) else 1
