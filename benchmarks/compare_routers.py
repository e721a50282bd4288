"""Routers side by side on real replicas: nbkit's endpoint (each policy, kv_aware included),
sglang-router (round_robin, cache_aware, power_of_two) and vllm-router (round_robin, cache_aware), all
in front of the same two vLLM-CPU replicas of the tiny model, on a shared-prefix and a mixed-length
workload (and, when asked, a many-prefixes one), in one run.

    .venv/bin/python benchmarks/compare_routers.py [--quick] [--requests 150] [--rounds 2]
                                                  [--routers nbkit,sglang,vllm] [--policies P,...]
                                                  [--workloads shared-prefix,mixed,many-prefixes]
                                                  [--rate auto|R] [--load 0.8] [--kv-blocks auto|N]
                                                  [--out-name NAME] [--peers-venv .bench-venv]
Defaults: 150 measured requests per (router, policy, workload) in each of 2 interleaved rounds
(--rounds), 11 routers x 2 workloads (shared-prefix, mixed), about 16 minutes on 2 cores;
--quick: 50 requests each.
One run of 150 requests has a p99 of the 2nd-worst request, which moved by up to 2x between runs
of the same router here: the table pools the rounds and shows each round's p99 beside it.

nbkit kv_aware vs sglang-router cache_aware, where the shared prefixes exceed one replica's KV cache
but fit in both (the goals: kv_aware / cache_aware p50 TTFT <= 0.7, E2E p99 <= 0.9, throughput >= 0.95,
prefix-cache hit rate >= 1.0, each round and pooled):
    .venv/bin/python benchmarks/compare_routers.py --routers nbkit,sglang,client,direct \
        --workloads many-prefixes --policies kv_aware,cache_aware,static_prefix --requests 600 --rounds 6 \
        --out-name kv_aware

--routers ...,client adds nbkit's routing inside the load generator's process (cluster.client(), the
notebook's front door: no router hop; kv_aware reads this process's index, which takes the KV
events back from the endpoint processes for its runs), with the goals above for it too.
--routers ...,direct adds the floor no router reaches: no router process, the load generator sends
each system prompt to one replica, the same number to each (perfect affinity, no balancing by
load, no hop). Every router row shows its process's CPU per request (the replicas share the
same 2 cores, so a router's CPU is taken from them).

The peers live in a separate venv so they do not disturb the project's:
    python3 -m venv .bench-venv && .bench-venv/bin/pip install sglang-router==0.3.2 vllm-router==0.1.17
A peer that is missing or fails to start is reported and skipped; the others still run.

What runs (all on 127.0.0.1):
  replicas  2 x `vllm serve` of the tiny model, one core each (nbkit Cluster), started once;
            VLLM_SERVER_DEV_MODE=1 so /reset_prefix_cache empties their prefix caches between runs;
            --kv-blocks caps each replica's KV cache (--num-gpu-blocks-override, 128-token blocks on CPU)
            so that the shared prefixes fit on two replicas split by prefix, not on each one: where a
            request goes decides whether its prefix is cached, as on a loaded GPU. auto (default):
            3/4 of the prefix blocks of the largest prefix workload selected (half its prefixes per
            replica, plus a quarter as room): 48 for shared-prefix's 8 x 1024 tokens, 192 for
            many-prefixes' 32 x 1024 (48 with mixed alone). All workloads share these replicas, so
            only that workload is sure to have the property: the fit of each is printed and stored
            (shared-prefix's 8 prefixes all fit on each replica at 192 blocks: run it on its own).
            KV-cache events on (as a Cluster starts them): each replica's engine publishes to one port
            on 127.0.0.1 with its own topic and a replay endpoint; the Cluster's own subscriber is
            closed once they are up, and the kv_aware endpoint process binds that port for its runs
  routers   each in its own process, started, measured and stopped in turn: nbkit's Endpoint
            (router_overhead.py --serve-endpoint; for kv_aware with --kv-events-port/--kv-sources/--model:
            it follows every replica's topic, replays its history from sequence 0 and tokenizes
            prompts as vLLM does, the same ClusterKV index and tokenizer a Cluster hands its own
            endpoints), `sglang-router launch`, `vllm-router`
  load      nbkit.bench in this process (aiohttp, streaming, usage chunk): open-loop Poisson
            arrivals, the same prompts and the same arrival times (seed) for every router
Workloads
  shared-prefix  --prefixes system prompts of --prefix-len tokens, a --question-len question each, --output-len out
  mixed          prompts of --mixed-input tokens (uniform lo:hi) and outputs of --mixed-output tokens, no sharing
  many-prefixes  --many-prefixes system prompts (32) of --many-prefix-len tokens (1024), questions and
                 outputs as shared-prefix: the prefixes exceed one replica's KV cache, not both's
  hot-prefixes   the same system prompts, but as popular as real ones are: Zipf (--hot-popularity 1.0),
                 the most popular one a quarter of the requests, the least 1/130th. Affinity alone puts
                 a hot prompt's whole stream on one replica; spreading it costs a second copy's prefill
Per run: reset the replicas' prefix caches, send --warmup requests (shared-prefix, many-prefixes:
other questions on the same system prompts; not measured), then the measured requests; the
replicas' /metrics before and after give the prefix-cache hit rate (hits / queried prompt tokens)
and each replica's share of the finished requests. For kv_aware the endpoint's /metrics say whether
its index stayed warm and how many decisions fell back to prefix_affinity.
--rate auto (default): per workload, round robin's capacity is measured first (closed loop, 16 in
flight) and every router then gets --load (0.8) x that rate, so the baseline runs near saturation.
--concurrency C instead: closed loop with C requests in flight (throughput at saturation).
--policies filters every router's policies (e.g. kv_aware,cache_aware,prefix_affinity,round_robin).
Prints one table per workload and the issue's goals; writes benchmarks/results/compare_routers.json
(with the machine described), the same table as compare_routers.txt, and the per-request CSVs
under benchmarks/results/compare_routers/. A run restricted by --workloads, --routers, --policies
or a router's own policy list (or --quick) writes compare_routers_<NAME>.json/.txt and
compare_routers_<NAME>/ instead (--out-name NAME, else a name made of the workloads and policies),
so it does not overwrite the full comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from router_overhead import Children, _finite, announce_machine, free_port, versions  # noqa: E402

NBKIT_POLICIES = ("round_robin", "least_outstanding", "least_load", "power_of_two", "prefix_affinity", "kv_aware")
PEERS = {"sglang": ("round_robin", "cache_aware", "power_of_two"), "vllm": ("round_robin", "cache_aware"),
         "client": ("kv_aware",), "direct": ("static_prefix",)}
DEFAULT_ROUTERS = ("nbkit", "sglang", "vllm")
LABELS = {"nbkit": "nbkit endpoint", "sglang": "sglang-router", "vllm": "vllm-router",
          "client": "nbkit in-process client", "direct": "no router"}
WORKLOADS = ("shared-prefix", "mixed", "many-prefixes", "hot-prefixes")
DEFAULT_WORKLOADS = ("shared-prefix", "mixed")  # the full comparison (compare_routers.json)

GOAL_RR_RATIO = 1.6      # nbkit's best p99 TTFT vs its round robin, shared-prefix
GOAL_TOLERANCE = 0.05    # "at least matches": within 5% (run-to-run noise on a shared 2-core machine)

# nbkit kv_aware vs sglang-router cache_aware where the prefixes exceed one replica's KV cache
KV_GOAL_WORKLOADS = ("many-prefixes", "hot-prefixes")
KV_GOAL_PAIR = (("nbkit", "kv_aware"), ("sglang", "cache_aware"))
KV_GOAL_PAIR_CLIENT = (("client", "kv_aware"), ("sglang", "cache_aware"))
KV_GOALS = (  # (row field, what, how kv_aware / cache_aware compares, threshold)
    ("ttft_p50_ms", "p50 TTFT", "<=", 0.7),
    ("e2e_p99_ms", "E2E p99", "<=", 0.9),
    ("output_throughput", "throughput", ">=", 1 - GOAL_TOLERANCE),
    ("prefix_hit_rate", "prefix-cache hit rate", ">=", 1.0),
)

CPU_BLOCK_TOKENS = 128   # vLLM-CPU's KV block size
KV_FIT = 0.75            # --kv-blocks auto: this fraction of a prefix workload's prefix blocks per replica
KV_BLOCKS_MIXED = 48     # --kv-blocks auto without a prefix workload (as the full comparison has)


# -- routers ---------------------------------------------------------------------------------------
def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of a router process and its children so far, or None if gone."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for q in procs:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


#: an nbkit policy's name may end in a variant of the endpoint: ``kv_aware+no_migration`` runs it
#: with ``migration_limit=0`` (streams pass untouched: no ``return_token_ids``, no parsing)
VARIANTS = {"+no_migration": ["--migration-limit", "0"]}


def split_variant(policy: str) -> tuple[str, list[str]]:
    """``(policy, the endpoint's extra arguments)`` of an nbkit policy name with a variant suffix."""
    for suffix, extra in VARIANTS.items():
        if policy.endswith(suffix):
            return policy[:-len(suffix)], extra
    return policy, []


def uses_kv_index(policy: str) -> bool:
    from nbkit.policies import get_policy
    return bool(get_policy(split_variant(policy)[0]).uses_kv_index)


def router_argv(kind: str, policy: str, port: int, urls: list[str], args, kv: dict | None = None) -> list[str] | str:
    """The command line of a router, or why it cannot run. ``kv`` (the replicas' KV-event port, their
    ``topic=replay_port`` sources and the served model) goes to an nbkit policy that reads the index."""
    if kind == "nbkit":
        # the same endpoint process as router_overhead.py's (`--serve-endpoint`, http1, gc.freeze)
        policy, extra = split_variant(policy)
        argv = [sys.executable, str(HERE / "router_overhead.py"), "--serve-endpoint", "--port", str(port),
                "--policy", policy, "--parent-pid", str(os.getpid()), *extra]
        if kv is not None and uses_kv_index(policy):
            argv += ["--kv-events-port", str(kv["port"]), "--model", kv["model"], "--kv-sources", *kv["sources"]]
        return argv + ["--urls", *urls]
    exe = args.peers_venv / "bin" / ("sglang-router" if kind == "sglang" else "vllm-router")
    if not exe.exists():
        return (f"{exe} not found; install with: python3 -m venv .bench-venv && .bench-venv/bin/pip install "
                "sglang-router==0.3.2 vllm-router==0.1.17 (or pass --peers-venv)")
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls, "--policy", policy,
              "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
              "--worker-startup-check-interval", "1", "--worker-startup-timeout-secs", str(int(args.startup_timeout))]
    if kind == "sglang":
        return [str(exe), "launch", *common, "--log-level", "warn"]
    return [str(exe), *common, "--log-level", "warning"]


async def wait_ready(url: str, model: str, proc, timeout: float) -> str | None:
    """Poll a real one-token completion through ``url``; None when it answers 200, else why not."""
    import httpx
    deadline = time.monotonic() + timeout
    last = ""
    async with httpx.AsyncClient(timeout=10.0) as c:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return f"exited with code {proc.returncode}"
            try:
                r = await c.post(url + "/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 1})
                if r.status_code == 200:
                    return None
                last = f"HTTP {r.status_code}: {r.text[:300]}"
            except Exception as e:  # noqa: BLE001 - still starting
                last = repr(e)
            await asyncio.sleep(0.3)
    return f"not ready after {timeout:.0f} s (last: {last})"


async def endpoint_kv_stats(url: str) -> dict | None:
    """What nbkit's endpoint says of its KV-event index (its /metrics): per rank warm, blocks,
    events and gaps; decisions made by the fallback; matched tokens on the chosen rank (sum, count)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    try:
        async with httpx.AsyncClient(timeout=5.0) as c:
            text = (await c.get(url + "/metrics")).text
    except Exception:  # noqa: BLE001 - diagnostics only
        return None
    out: dict = {"warm": {}, "blocks": {}, "events": {}, "gaps": {}, "fallbacks": 0.0,
                 "matched_sum": 0.0, "matched_count": 0.0}
    per_rank = {"nbkit_kv_index_warm": "warm", "nbkit_kv_index_blocks": "blocks", "nbkit_kv_events_total": "events",
                "nbkit_kv_sequence_gaps_total": "gaps"}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name in per_rank and "rank" in smp.labels:
                out[per_rank[smp.name]][smp.labels["rank"]] = smp.value
            elif smp.name == "nbkit_kv_fallbacks_total":
                out["fallbacks"] = smp.value
            elif smp.name == "nbkit_kv_matched_tokens_sum":
                out["matched_sum"] = smp.value
            elif smp.name == "nbkit_kv_matched_tokens_count":
                out["matched_count"] = smp.value
    return out


def kv_delta(before: dict | None, after: dict | None) -> dict | None:
    """The measured requests' share of :func:`endpoint_kv_stats` (after - before the measured run)."""
    if after is None:
        return None
    before = before or {}
    n = after["matched_count"] - before.get("matched_count", 0.0)

    def by_rank(field):
        return sorted(after[field].items())

    return {"warm": {k: bool(v) for k, v in by_rank("warm")},
            "blocks": {k: int(v) for k, v in by_rank("blocks")},
            "events": {k: int(v - before.get("events", {}).get(k, 0)) for k, v in by_rank("events")},
            "gaps": {k: int(v) for k, v in by_rank("gaps")},
            "fallbacks": int(after["fallbacks"] - before.get("fallbacks", 0.0)),
            "matched_tokens_per_request": (after["matched_sum"] - before.get("matched_sum", 0.0)) / n if n else None}


async def wait_idle(urls: list[str], timeout: float = 60.0) -> None:
    """Until no replica runs or queues a request (a cancelled run may leave some behind)."""
    import httpx
    from nbkit.routing.metrics import parse_metrics
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0) as c:
        while time.monotonic() < deadline:
            busy = 0.0
            for u in urls:
                try:
                    for m in parse_metrics((await c.get(u + "/metrics")).text).values():
                        busy += m.running + m.waiting
                except Exception:  # noqa: BLE001
                    pass
            if busy == 0:
                return
            await asyncio.sleep(0.5)


# -- workloads -------------------------------------------------------------------------------------
def build_workloads(args, tokenizer) -> dict:
    """name -> (warm-up workload or None, measured workload)."""
    from nbkit import bench
    from nbkit.bench.workloads import Workload

    def with_prefixes(name: str, prefixes: int, prefix_len: int, seed: int, popularity: float = 0.0):
        q = math.ceil(n / prefixes)
        w = bench.shared_prefix(prefixes, q + args.warmup_per_prefix, prefix_len, args.question_len,
                                args.output_len, seed=seed, tokenizer=tokenizer, name=name, popularity=popularity)
        warm_ids, seen = set(), {}
        for i, it in enumerate(w.items):
            if seen.get(it.group, 0) < args.warmup_per_prefix:
                seen[it.group] = seen.get(it.group, 0) + 1
                warm_ids.add(i)
        warm = Workload(f"{name} warm-up", [it for i, it in enumerate(w.items) if i in warm_ids])
        meas = Workload(name, [it for i, it in enumerate(w.items) if i not in warm_ids][:n], w.tokenizer, w.params)
        return warm if warm.items else None, meas

    out = {}
    n = args.requests
    for name in args.workloads:  # in the order given
        if name == "shared-prefix":
            out[name] = with_prefixes(name, args.prefixes, args.prefix_len, args.seed)
        elif name == "mixed":
            lo, hi = args.mixed_input
            olo, ohi = args.mixed_output
            out[name] = (None, bench.synthetic(n, input_len=(lo, hi), output_len=(olo, ohi), seed=args.seed + 1,
                                               tokenizer=tokenizer, name="mixed"))
        elif name == "many-prefixes":
            out[name] = with_prefixes(name, args.many_prefixes, args.many_prefix_len, args.seed + 2)
        elif name == "hot-prefixes":
            out[name] = with_prefixes(name, args.many_prefixes, args.many_prefix_len, args.seed + 3,
                                      popularity=args.hot_popularity)
    return out


def prefix_workloads(args) -> dict[str, tuple[int, int]]:
    """The selected workloads with shared prefixes: name -> (prefixes, tokens each)."""
    every = {"shared-prefix": (args.prefixes, args.prefix_len), "many-prefixes": (args.many_prefixes, args.many_prefix_len),
             "hot-prefixes": (args.many_prefixes, args.many_prefix_len)}
    return {w: every[w] for w in args.workloads if w in every}


def auto_kv_blocks(args) -> int:
    """--kv-blocks auto: KV_FIT of the prefix blocks of the largest prefix workload selected (half
    its prefixes on each replica plus a quarter as room: on two replicas split by prefix they all
    fit, on one they do not); KV_BLOCKS_MIXED without one."""
    sizes = [p * length / CPU_BLOCK_TOKENS for p, length in prefix_workloads(args).values()]
    return math.ceil(KV_FIT * max(sizes)) if sizes else KV_BLOCKS_MIXED


def kv_fit(args) -> dict[str, dict]:
    """Per prefix workload: how many of its prefixes one replica's --kv-blocks hold, and whether
    they fit on two replicas split by prefix but not on one (where routing decides the hit rate)."""
    out = {}
    for w, (p, length) in prefix_workloads(args).items():
        per = math.ceil(length / CPU_BLOCK_TOKENS)
        total = p * per
        if not args.kv_blocks:
            out[w] = {"prefixes": p, "blocks_per_prefix": per, "prefix_blocks": total, "fits": "unknown (vLLM's default KV size)"}
            continue
        held = args.kv_blocks // per
        fits = ("all on each replica: routing cannot change the hit rate" if held >= p else
                "on two replicas split by prefix, not on one" if 2 * held >= p else
                "not even on two replicas: every router misses")
        out[w] = {"prefixes": p, "blocks_per_prefix": per, "prefix_blocks": total, "prefixes_per_replica": min(held, p),
                  "fits": fits, "as_designed": held < p <= 2 * held}
    return out


# -- the run ---------------------------------------------------------------------------------------
async def calibrate(cluster, warm, work, args) -> float:
    """Requests/s round robin sustains on ``work`` (closed loop, 16 in flight)."""
    from nbkit import bench

    await bench.reset_prefix_caches(cluster.urls)
    if warm is not None:
        await bench.arun(cluster, warm, policy="round_robin", concurrency=16, progress=False)
    res = await bench.arun(cluster, work, policy="round_robin", concurrency=16, num_prompts=min(len(work), 60),
                           progress=False)
    s = res.summary().iloc[0]
    await bench.reset_prefix_caches(cluster.urls)
    return float(s["request_throughput"])


def static_prefix_target(urls: list[str], model: str, label: str):
    """The baseline no router reaches: the load generator sends each prompt straight to a replica
    chosen by its first 256 characters (the system prompt): each new one goes to the replica with
    the fewest system prompts so far, so every system prompt lives on one replica, the replicas get
    equal numbers of them (perfect affinity, no balancing by load), and there is no router hop or
    router CPU at all."""
    from nbkit.bench.targets import Target, UrlTarget

    class StaticPrefix(Target):
        api = "completions"

        def __init__(self):
            self.label, self._policy, self.model = label, "static_prefix", model
            self.parts = [UrlTarget(u, model=model, label=label, replicas=None) for u in urls]
            self.urls = urls
            self.home: dict[str, int] = {}  # system prompt -> replica

        def replicas(self):
            from nbkit.bench.targets import ReplicaRef
            return [ReplicaRef(i, u, f"replica{i}") for i, u in enumerate(self.urls)]

        async def open(self):
            for t in self.parts:
                await t.open()

        async def close(self):
            for t in self.parts:
                await t.close()

        async def send(self, call):
            text = call.prompt if isinstance(call.prompt, str) else str(call.prompt)[:1024]
            key = text[:256]
            i = self.home.get(key)
            if i is None:
                counts = [0] * len(self.parts)
                for j in self.home.values():
                    counts[j] += 1
                i = self.home[key] = counts.index(min(counts))
            reply = await self.parts[i].send(call)
            reply.rank, reply.instance_id = f"replica{i}", i
            return reply

    return StaticPrefix()


async def one_run(kind: str, policy: str, wname: str, warm, work, rate: float, ctx: dict, args, rnd: int = 0) -> dict:
    from nbkit import bench

    cluster, children = ctx["cluster"], ctx["children"]
    label = f"{LABELS[kind]} ({policy})"
    load = {"concurrency": args.concurrency} if args.concurrency else {"request_rate": rate}
    row = {"workload": wname, "router": kind, "policy": policy, "label": label, "rate": rate, "round": rnd}
    port = free_port()
    kv = ctx.get("kv")
    reads_kv = kind == "nbkit" and uses_kv_index(policy)
    proc = None
    if kind == "direct":
        url = static_prefix_target(cluster.urls, cluster.model, label)
    elif kind == "client":
        # nbkit routing in the load generator's own process (cluster.client(): what a notebook
        # uses), no router hop; kv_aware reads this process's index, so it takes the events back
        if uses_kv_index(policy) and ctx.get("kv") is not None:
            take_back_kv_events(cluster)
        url = cluster
    else:
        argv = router_argv(kind, policy, port, cluster.urls, args, kv)
        if isinstance(argv, str):
            row["error"] = argv
            return row
        env = dict(os.environ, PYTHONUNBUFFERED="1", RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        proc = children.start(f"{kind}-{policy}", argv, env=env)
        url = f"http://127.0.0.1:{port}"
    try:
        err = None if proc is None else await wait_ready(url, cluster.model, proc, args.startup_timeout)
        if err:
            row["error"] = f"{' '.join(argv[:2])} ...: {err}\n{children.log_tail(proc)}"
            return row
        await wait_idle(cluster.urls)
        failed = await bench.reset_prefix_caches(cluster.urls)
        row["prefix_cache_reset"] = not failed
        if warm is not None:
            await bench.arun(url, warm, **load, seed=args.seed + 7, model=cluster.model, progress=False,
                             timeout_s=args.request_timeout)
        kv_before = await endpoint_kv_stats(url) if reads_kv else None
        csv = args.csv_dir / f"{wname}-{kind}-{policy.replace(':', '_')}-r{rnd}.csv"
        cpu0 = process_cpu_s(proc.pid) if proc is not None else None
        res = await bench.arun(url, work, **load, seed=args.seed, model=cluster.model, policy=policy,
                               label=label, replicas=cluster.urls, output=csv, progress=not args.no_progress,
                               timeout_s=args.request_timeout)
        cpu1 = process_cpu_s(proc.pid) if proc is not None else None
        if cpu0 is not None and cpu1 is not None and res.requests:
            row["router_cpu_ms_per_request"] = (cpu1 - cpu0) * 1e3 / len(res.requests)
        if kind == "client" and cluster.kv_index is not None:
            snap = cluster.kv_index.snapshot()
            row["kv_warm"] = {k: v["warm"] for k, v in snap.items()}
        if reads_kv:
            row["kv_index"] = kv_delta(kv_before, await endpoint_kv_stats(url))
            banner = [ln for ln in children.log_tail(proc, 4000).splitlines() if ln.startswith("nbkit endpoint on")]
            row["kv_endpoint"] = banner[-1] if banner else None
    finally:
        if proc is not None:
            children.stop(proc)
        if kind == "client" and cluster.kv is not None and ctx.get("kv") is not None:
            cluster.kv.close()  # the port goes back to the next endpoint process
    s = res.summary().iloc[0]
    rm = res.replica_metrics
    shares = [] if rm is None else [round(float(x), 3) for x in rm.sort_values("replica")["finished_share"]]
    row.update({
        "sent": int(s["requests"]), "completed": int(s["completed"]), "failed": int(s["failed"]),
        "duration_s": float(s["duration_s"]), "request_throughput": float(s["request_throughput"]),
        "output_throughput": float(s["output_throughput"]), "ttft_p50_ms": float(s["ttft_median_ms"]),
        "ttft_p99_ms": float(s["ttft_p99_ms"]), "tpot_p50_ms": float(s["tpot_median_ms"]),
        "e2e_p99_ms": float(s["e2e_p99_ms"]), "prefix_hit_rate": float(s.get("prefix_hit_rate", float("nan"))),
        "replica_share": shares, "csv": str(csv.relative_to(ROOT)) if csv.is_relative_to(ROOT) else str(csv),
    })
    row["_ttft_ms"] = [r.ttft_s * 1e3 for r in res.requests if r.ok and r.ttft_s is not None]
    row["_e2e_ms"] = [r.e2e_s * 1e3 for r in res.requests if r.ok and r.e2e_s is not None]
    errors = [r for r in res.requests if not r.ok]
    if errors:
        row["error_sample"] = f"{errors[0].outcome}: {errors[0].error[:200]}"
    return row


async def run_all(args, children: Children) -> dict:
    from nbkit import Cluster
    from nbkit.tiny import tiny_model

    model = args.model or str(tiny_model())
    extra = ("--num-gpu-blocks-override", str(args.kv_blocks)) if args.kv_blocks else ()
    # kv_events on (the default): every replica publishes its KV-cache events to one port on
    # 127.0.0.1, with its own topic and replay endpoint, exactly as a Cluster launches them
    cluster = Cluster.replicas(model, n=2, max_model_len=args.max_model_len, extra_args=extra,
                               env={"VLLM_SERVER_DEV_MODE": "1"}, port_start=args.port_start,
                               kv_events_port=args.kv_events_port or None)
    t = time.perf_counter()
    auto = " (auto)" if args.kv_blocks_auto else ""
    print(f"starting 2 replicas of {model} (kv blocks per replica: {args.kv_blocks or 'vLLM default'}{auto}) ...",
          flush=True)
    for w, f in kv_fit(args).items():
        print(f"  {w}: {f['prefixes']} prefixes of {f['blocks_per_prefix']} blocks: {f['fits']}"
              + ("" if f.get("as_designed", True) else "  <- NOT as designed; run it on its own or set --kv-blocks"),
              flush=True)
    await cluster.astart()
    print(f"replicas healthy in {time.perf_counter() - t:.0f} s: {', '.join(cluster.urls)}", flush=True)
    ctx = {"cluster": cluster, "children": children, "kv": hand_over_kv_events(cluster)}
    rows, rates = [], {}
    started = time.perf_counter()
    try:
        workloads = build_workloads(args, model)
        plan = router_plan(args)
        for wname, (warm, work) in workloads.items():
            if args.concurrency:
                rate = None
                print(f"\n{wname}: closed loop, {args.concurrency} requests in flight for every router", flush=True)
            elif args.rate == "auto":
                cap = await calibrate(cluster, warm, work, args)
                rate = round(max(0.1, args.load * cap), 2)
                print(f"\n{wname}: round robin sustains {cap:.2f} req/s closed-loop; offering {rate} req/s "
                      f"({args.load:g} x) to every router", flush=True)
            else:
                rate = float(args.rate)
                print(f"\n{wname}: offering {rate} req/s to every router", flush=True)
            rates[wname] = rate
            for rnd in range(args.rounds):
                # interleaved rounds, every other one in reverse order, so a drift of the machine
                # (another process, thermal, caches) does not favour whoever runs first
                order = plan if rnd % 2 == 0 else plan[::-1]
                for kind, policy in order:
                    print(f"  {wname} round {rnd + 1}/{args.rounds}: {LABELS[kind]} ({policy}) ...", flush=True)
                    row = await one_run(kind, policy, wname, warm, work, rate, ctx, args, rnd)
                    if "error" in row:
                        print(f"    not measured: {row['error'].splitlines()[0]}", flush=True)
                    else:
                        print(f"    TTFT p50 {row['ttft_p50_ms']:.0f} ms, p99 {row['ttft_p99_ms']:.0f} ms, "
                              f"E2E p99 {row['e2e_p99_ms']:.0f} ms, {row['output_throughput']:.0f} tok/s, "
                              f"prefix hits {row['prefix_hit_rate']:.0%}, share {row['replica_share']}"
                              + (f", router CPU {row['router_cpu_ms_per_request']:.1f} ms/request"
                                 if "router_cpu_ms_per_request" in row else ""), flush=True)
                        if "kv_warm" in row:
                            print(f"    kv index in this process: {row['kv_warm']}", flush=True)
                        if "kv_index" in row:
                            print(f"    {kv_line(row)}", flush=True)
                    rows.append(row)
    finally:
        await cluster.astop()
    kv = ctx["kv"]
    return {"rows": pooled(rows), "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
            "rates": rates, "elapsed_s": time.perf_counter() - started,
            "replicas": [{"url": p.url, "pinning": p.pinning, "kv_topic": p.kv_topic, "kv_replay_port": p.kv_replay_port}
                         for p in cluster.plans],
            "kv_events": None if kv is None else {"port": kv["port"], "sources": kv["sources"]}}


def hand_over_kv_events(cluster) -> dict | None:
    """The KV-event port the replicas publish to and each one's ``topic=replay_port`` (the sources
    the kv_aware endpoint process follows, from nbkit.cluster.kv.kv_source, in the order of
    cluster.urls), after closing the Cluster's own subscriber so that process can bind the port.
    None when the replicas do not publish (the kv_aware runs then fall back and say so)."""
    from nbkit.cluster.kv import kv_source

    if cluster.kv is None:
        print("KV-cache events: off; kv_aware will decide by prefix_affinity", flush=True)
        return None
    sources = [kv_source(p) for p in cluster.plans if not p.headless]
    port = cluster.kv.port
    cluster.kv.close()  # hand the port over: one SUB socket at a time, the replicas' PUB sockets reconnect
    if any(s is None or s["dp_size"] != 1 or s["replay_port"] is None for s in sources):
        print(f"KV-cache events: not published by every replica ({sources}); kv_aware will fall back", flush=True)
        return None
    spec = [f"{s['topic']}={s['replay_port']}" for s in sources]
    print(f"KV-cache events: the replicas publish to tcp://127.0.0.1:{port} ({', '.join(spec)}: topic=replay "
          "port); the kv_aware endpoint binds it for its runs", flush=True)
    return {"port": port, "sources": spec, "model": cluster.model}


def take_back_kv_events(cluster) -> None:
    """Bind the replicas' KV-event port in this process again (an endpoint process had it) and
    rebuild the index from each engine's replay, for an in-process kv_aware client."""
    from nbkit.cluster.kv import kv_source

    deadline = time.monotonic() + 30.0
    while True:   # the endpoint process that had the port, or a router given it as a free port, may hold it a moment
        try:
            cluster.kv.listen(move=False)
            break
        except ValueError as e:
            if "cannot bind" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    for plan in cluster.plans:
        for name in kv_source(plan)["names"].values() if kv_source(plan) else ():
            cluster.kv_index.forget(name)
        cluster.kv.watch(plan)
    if not cluster.kv.wait_replayed(30.0):
        print("    KV-cache events: the replay did not finish in 30 s; kv_aware may fall back", flush=True)


def router_plan(args) -> list[tuple[str, str]]:
    """(router, policy) in run order: nbkit's policies, then each peer's, filtered by --policies."""
    plan = [("nbkit", p) for p in args.nbkit_policies] if "nbkit" in args.routers else []
    for kind in PEERS:
        if kind in args.routers:
            plan += [(kind, p) for p in args.peer_policies[kind]]
    if args.policies:
        plan = [(k, p) for k, p in plan if p in args.policies or p.split(":", 1)[0] in args.policies]
    return plan


def kv_line(row: dict) -> str:
    kv = row.get("kv_index")
    if not kv:
        return "kv index: the endpoint's /metrics did not answer"
    warm = "/".join(f"{k} {'warm' if v else 'COLD'}" for k, v in kv["warm"].items()) or "no ranks"
    m = kv["matched_tokens_per_request"]
    gaps = sum(kv["gaps"].values())
    return (f"kv index: {warm}, {kv['fallbacks']} fallback decision(s) in the measured requests, {gaps} gap(s), "
            f"blocks {'/'.join(str(v) for v in kv['blocks'].values())}"
            + (f", {m:.0f} prompt tokens cached on the chosen rank per request" if m is not None else ""))


def pooled(runs: list[dict]) -> list[dict]:
    """One row per (workload, router, policy) over its rounds: percentiles of all the rounds'
    requests together, throughput and shares averaged, and each round's p99 TTFT kept to show the spread."""
    import numpy as np

    out: dict[tuple, dict] = {}
    for r in runs:
        key = (r["workload"], r["router"], r["policy"])
        if "error" in r:
            out.setdefault(key, {k: r[k] for k in ("workload", "router", "policy", "label", "rate", "error")})
            continue
        agg = out.get(key)
        if agg is None or "error" in agg:
            agg = out[key] = {k: r[k] for k in ("workload", "router", "policy", "label", "rate")}
            agg.update(_runs=[], _ttft=[], _e2e=[])
        agg["_runs"].append(r)
        agg["_ttft"] += r["_ttft_ms"]
        agg["_e2e"] += r["_e2e_ms"]
    rows = []
    for agg in out.values():
        runs_ = agg.pop("_runs", None)
        ttft, e2e = agg.pop("_ttft", []), agg.pop("_e2e", [])
        if runs_:
            mean = lambda k: float(np.mean([x[k] for x in runs_]))  # noqa: E731
            agg.update({
                "rounds": len(runs_), "sent": sum(x["sent"] for x in runs_),
                "completed": sum(x["completed"] for x in runs_), "failed": sum(x["failed"] for x in runs_),
                "request_throughput": mean("request_throughput"), "output_throughput": mean("output_throughput"),
                "ttft_p50_ms": float(np.percentile(ttft, 50)) if ttft else float("nan"),
                "ttft_p99_ms": float(np.percentile(ttft, 99)) if ttft else float("nan"),
                "e2e_p99_ms": float(np.percentile(e2e, 99)) if e2e else float("nan"),
                "ttft_p99_by_round_ms": [round(x["ttft_p99_ms"], 1) for x in runs_],
                "prefix_hit_rate": mean("prefix_hit_rate"),
                "replica_share": [round(float(v), 3) for v in np.mean([x["replica_share"] for x in runs_
                                                                       if x["replica_share"]], axis=0)]
                if any(x["replica_share"] for x in runs_) else [],
                "csv": [x["csv"] for x in runs_],
            })
            cpu = [x["router_cpu_ms_per_request"] for x in runs_ if "router_cpu_ms_per_request" in x]
            agg["router_cpu_ms_per_request"] = float(np.mean(cpu)) if cpu else None
            kvs = [x["kv_index"] for x in runs_ if x.get("kv_index")]
            if kvs:
                agg["kv_fallbacks"] = sum(k["fallbacks"] for k in kvs)
                agg["kv_cold_rounds"] = sum(1 for k in kvs if not all(k["warm"].values()))
        rows.append(agg)
    return rows


# -- report ----------------------------------------------------------------------------------------
def fmt(x, spec=".1f", width=9) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return f"{'-':>{width}}"
    return f"{x:{width}{spec}}"


def report(out: dict, args) -> tuple[list[str], list[dict]]:
    lines, goals = [], []
    for wname in out["rates"]:
        rows = [r for r in out["rows"] if r["workload"] == wname]
        how = (f"closed loop, {args.concurrency} in flight" if args.concurrency
               else f"{out['rates'][wname]} req/s (Poisson)")
        lines.append(f"\n{wname} workload, {args.rounds} round(s) x {args.requests} requests per router, {how}, "
                     "2 vLLM-CPU replicas of the tiny model")
        lines.append(f"{'router (policy)':<34}{'ok/sent':>9}{'req/s':>9}{'tok/s':>9}{'TTFT p50':>9}{'TTFT p99':>9}"
                     f"{'E2E p99':>9}{'prefix':>9}{'cpu/req':>9}  share r0/r1  p99 by round")
        for r in rows:
            if "error" in r:
                lines.append(f"{r['label']:<34} not measured: {r['error'].splitlines()[0][:90]}")
                continue
            share = "/".join(f"{x:.0%}" for x in r["replica_share"]) or "-"
            lines.append(f"{r['label']:<34}{r['completed']:>5}/{r['sent']:<4}{fmt(r['request_throughput'], '.2f')}"
                         f"{fmt(r['output_throughput'], '.0f')}{fmt(r['ttft_p50_ms'], '.0f')}"
                         f"{fmt(r['ttft_p99_ms'], '.0f')}{fmt(r['e2e_p99_ms'], '.0f')}"
                         f"{fmt(r['prefix_hit_rate'] * 100 if r['prefix_hit_rate'] == r['prefix_hit_rate'] else None, '.0f')}%"
                         f"{fmt(r.get('router_cpu_ms_per_request'), '.1f')}"
                         f"  {share:<11}  {'/'.join(f'{x:.0f}' for x in r.get('ttft_p99_by_round_ms', []))}")
        lines.append("(times in ms over all rounds' requests; prefix = prefix-cache hit rate of the replicas' "
                     "queried prompt tokens; cpu/req = the router process's CPU ms per measured request; "
                     "req/s, tok/s, prefix, cpu/req and share: mean of the rounds)")
        ok = [r for r in rows if "error" not in r and r["completed"] == r["sent"]]
        nb = [r for r in ok if r["router"] == "nbkit"]  # the endpoint: a router process like the peers
        peers = [r for r in ok if r["router"] not in ("nbkit", "client", "direct")]
        if nb and peers:
            best_nb = min(nb, key=lambda r: r["ttft_p99_ms"])
            best_peer = min(peers, key=lambda r: r["ttft_p99_ms"])
            v = best_nb["ttft_p99_ms"] / best_peer["ttft_p99_ms"]
            goals.append({"workload": wname, "goal": "nbkit best p99 TTFT <= best peer's", "nbkit": best_nb["label"],
                          "peer": best_peer["label"], "ratio": v, "pass": v <= 1 + GOAL_TOLERANCE})
            best_nb_t = max(nb, key=lambda r: r["output_throughput"])
            best_peer_t = max(peers, key=lambda r: r["output_throughput"])
            v = best_nb_t["output_throughput"] / best_peer_t["output_throughput"]
            goals.append({"workload": wname, "goal": "nbkit best throughput >= best peer's",
                          "nbkit": best_nb_t["label"], "peer": best_peer_t["label"], "ratio": v,
                          "pass": v >= 1 - GOAL_TOLERANCE})
        rr = next((r for r in nb if r["policy"] == "round_robin"), None)
        if wname == "shared-prefix" and rr and nb:
            best_nb = min(nb, key=lambda r: r["ttft_p99_ms"])
            v = rr["ttft_p99_ms"] / best_nb["ttft_p99_ms"]
            goals.append({"workload": wname, "goal": f"nbkit best p99 TTFT >= {GOAL_RR_RATIO}x better than round robin",
                          "nbkit": best_nb["label"], "peer": rr["label"], "ratio": v, "pass": v >= GOAL_RR_RATIO})
        for r in rows:
            if "error" not in r and r.get("kv_fallbacks") or r.get("kv_cold_rounds"):
                lines.append(f"NOTE {r['label']}: {r.get('kv_fallbacks', 0)} decision(s) by its fallback "
                             f"(prefix_affinity), index cold at the end of {r.get('kv_cold_rounds', 0)} round(s)")
    for w in KV_GOAL_WORKLOADS:
        kv = kv_goals(out, workload=w)
        if kv:
            lines += kv_goal_lines(kv)
        goals += kv
        if kv and any(r["router"] == "client" and r["policy"] == "kv_aware" for r in out["rows"]):
            kv = kv_goals(out, KV_GOAL_PAIR_CLIENT, workload=w)  # the same goals for nbkit's routing without a hop
            lines += kv_goal_lines(kv)
            goals += kv
    if goals:
        lines.append("")
        for g in goals:
            ratio = f"{g['ratio']:.2f}" if g.get("ratio") is not None else "-"
            lines.append(f"{g['workload']}: {g['goal']}: {g['nbkit']} vs {g['peer']}: ratio {ratio} "
                         f"-> {'PASS' if g['pass'] else 'FAIL'}" + (f" ({g['why']})" if g.get("why") else ""))
    return lines, goals


def _ratio(a, b) -> float | None:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return None
    if math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


def _passes(ratio: float | None, op: str, threshold: float) -> bool:
    return ratio is not None and (ratio <= threshold if op == "<=" else ratio >= threshold)


def kv_goals(out: dict, pair=None, workload: str = KV_GOAL_WORKLOADS[0]) -> list[dict]:
    """The issue's goals on ``workload`` (one of KV_GOAL_WORKLOADS), nbkit kv_aware / sglang-router
    cache_aware (``pair``: another (router, policy) pair, e.g. the in-process client's kv_aware): each
    KV_GOALS ratio per round (the two runs of that round) and pooled (the pooled rows); a round
    where either lost requests fails. [] when that workload was not run."""
    w = workload
    if w not in out["rates"]:
        return []
    (ka, pa), (kb, pb) = pair or KV_GOAL_PAIR
    label_a, label_b = f"{LABELS[ka]} ({pa})", f"{LABELS[kb]} ({pb})"

    def pick(rows, k, p):
        return [r for r in rows if r["workload"] == w and r["router"] == k and r["policy"] == p]

    a, b = pick(out["rows"], ka, pa), pick(out["rows"], kb, pb)
    why = None
    if not a or "error" in a[0]:
        why = f"{label_a} not measured" + (f": {a[0]['error'].splitlines()[0][:80]}" if a else "")
    elif not b or "error" in b[0]:
        why = f"{label_b} not measured" + (f": {b[0]['error'].splitlines()[0][:80]}" if b else " (--routers/--policies)")
    runs_a = {r["round"]: r for r in pick(out["runs"], ka, pa) if "error" not in r}
    runs_b = {r["round"]: r for r in pick(out["runs"], kb, pb) if "error" not in r}
    goals = []
    for field, what, op, thr in KV_GOALS:
        g = {"workload": w, "goal": f"{what} ratio {op} {thr:g}", "metric": field, "op": op, "threshold": thr,
             "nbkit": label_a, "peer": label_b, "ratio": None, "pass": False, "by_round": []}
        if why:
            g["why"] = why
            goals.append(g)
            continue
        for rnd in sorted(set(runs_a) & set(runs_b)):
            x, y = runs_a[rnd], runs_b[rnd]
            v = _ratio(x.get(field), y.get(field))
            complete = x["completed"] == x["sent"] and y["completed"] == y["sent"]
            g["by_round"].append({"round": rnd + 1, "nbkit": x.get(field), "peer": y.get(field), "ratio": v,
                                  "pass": complete and _passes(v, op, thr), "complete": complete})
        x, y = a[0], b[0]
        g["ratio"] = _ratio(x.get(field), y.get(field))
        g["pooled"] = {"nbkit": x.get(field), "peer": y.get(field)}
        complete = x["completed"] == x["sent"] and y["completed"] == y["sent"]
        g["pass"] = complete and _passes(g["ratio"], op, thr)
        if not complete:
            g["why"] = "requests failed"
        elif g["ratio"] is None:
            g["why"] = f"no {field}"
        goals.append(g)
    return goals


def kv_goal_lines(goals: list[dict]) -> list[str]:
    """The kv_aware vs cache_aware goals as a table: one row per goal, a column per round and pooled."""
    g0 = goals[0]
    lines = ["", f"{g0['workload']}: {g0['nbkit']} / {g0['peer']}, each round and pooled"]
    if g0.get("why") and not g0.get("pooled"):
        return lines + [f"  not measured: {g0['why']}"]
    rounds = [r["round"] for r in g0["by_round"]]

    def cell(v, ok):
        return f"{'-' if v is None else f'{v:.2f}'} {'PASS' if ok else 'FAIL'}"

    def value(v, metric):
        if v is None or math.isnan(v):
            return "-"
        return f"{v:.0%}" if metric == "prefix_hit_rate" else f"{v:.0f} ms" if metric.endswith("_ms") else f"{v:.0f}"

    lines.append(f"  {'goal':<34}" + "".join(f"{f'round {r}':>12}" for r in rounds) + f"{'pooled':>12}"
                 + "   pooled values (kv_aware vs cache_aware)")
    for g in goals:
        by = {r["round"]: r for r in g["by_round"]}
        pv = g.get("pooled", {})
        lines.append(f"  {g['goal']:<34}" + "".join(f"{cell(by[r]['ratio'], by[r]['pass']):>12}" for r in rounds)
                     + f"{cell(g['ratio'], g['pass']):>12}   {value(pv.get('nbkit'), g['metric'])} vs "
                     f"{value(pv.get('peer'), g['metric'])}")
    ok = all(g["pass"] for g in goals)
    lines.append(f"  all pooled goals: {'PASS' if ok else 'FAIL'}; rounds passing every goal: "
                 f"{sum(1 for r in rounds if all(next(x for x in g['by_round'] if x['round'] == r)['pass'] for g in goals))}"
                 f"/{len(rounds)}")
    return lines


def _vllm_version() -> str | None:
    from importlib import metadata
    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="50 requests per run (default 150)")
    ap.add_argument("--requests", type=int, default=None, help="measured requests per (router, policy, workload, round)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="interleaved rounds: every router runs once per round (every other round in reverse "
                         "order); figures pool all rounds' requests (default 2)")
    ap.add_argument("--routers", default=",".join(DEFAULT_ROUTERS), help="comma-separated from nbkit,sglang,vllm,client,direct")
    ap.add_argument("--nbkit-policies", default=",".join(NBKIT_POLICIES))
    ap.add_argument("--sglang-policies", default=",".join(PEERS["sglang"]))
    ap.add_argument("--vllm-policies", default=",".join(PEERS["vllm"]))
    ap.add_argument("--client-policies", default=",".join(PEERS["client"]),
                    help="router 'client' (not in the default --routers): nbkit's routing inside the load "
                         "generator's process (cluster.client(), as a notebook uses it): no router hop")
    ap.add_argument("--direct-policies", default=",".join(PEERS["direct"]),
                    help="router 'direct' (not in the default --routers): no router at all, the load generator "
                         "sends each system prompt to one replica (by its first 256 characters, equal numbers of "
                         "system prompts per replica): the affinity floor with no router hop")
    ap.add_argument("--policies", default=None,
                    help="keep only these policies, whichever router runs them (e.g. "
                         "kv_aware,cache_aware,prefix_affinity,round_robin); default: all")
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                    help=f"comma-separated from {','.join(WORKLOADS)} (default {','.join(DEFAULT_WORKLOADS)})")
    ap.add_argument("--rate", default="auto", help="req/s offered to every router, or auto (default)")
    ap.add_argument("--load", type=float, default=0.8, help="--rate auto: fraction of round robin's capacity")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="closed loop with this many requests in flight instead of a rate (throughput at saturation)")
    ap.add_argument("--prefixes", type=int, default=8, help="shared-prefix: system prompts (default 8)")
    ap.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: tokens per system prompt")
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--warmup-per-prefix", type=int, default=1,
                    help="shared-prefix: unmeasured requests per system prompt before each run (default 1)")
    ap.add_argument("--many-prefixes", type=int, default=32, help="many-prefixes: system prompts (default 32)")
    ap.add_argument("--many-prefix-len", type=int, default=1024, help="many-prefixes: tokens per system prompt")
    ap.add_argument("--hot-popularity", type=float, default=1.0,
                    help="hot-prefixes: Zipf exponent of the system prompts' popularity (default 1.0: the most "
                         "popular one gets a quarter of the requests)")
    ap.add_argument("--mixed-input", default="32:1536", help="mixed: prompt tokens lo:hi (uniform)")
    ap.add_argument("--mixed-output", default="8:128", help="mixed: output tokens lo:hi (uniform)")
    ap.add_argument("--kv-blocks", default="auto",
                    help="KV-cache blocks per replica (128 tokens each on CPU; 0: vLLM's default). auto (default): "
                         f"{KV_FIT:g} x the prefix blocks of the largest prefix workload selected, so half its "
                         "system prompts fit on each replica and all of them on neither: 48 (6144 tokens) for "
                         f"shared-prefix, 192 for many-prefixes, {KV_BLOCKS_MIXED} for mixed alone")
    ap.add_argument("--kv-events-port", type=int, default=0,
                    help="port on 127.0.0.1 the replicas publish KV-cache events to (0: the first free block from "
                         "15557); the kv_aware endpoint binds it")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--model", default=None, help="default: the tiny model")
    ap.add_argument("--port-start", type=int, default=8700)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers-venv", type=Path, default=ROOT / ".bench-venv")
    ap.add_argument("--startup-timeout", type=float, default=60.0, help="seconds a router may take to be ready")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (the table goes beside it as .txt); default: results/compare_routers.json, "
                         "or results/compare_routers_NAME.json for a restricted run (see --out-name)")
    ap.add_argument("--out-name", default=None,
                    help="write results/compare_routers_NAME.json/.txt and CSVs under results/compare_routers_NAME/; "
                         "default for a run restricted by --workloads/--routers/--policies/--*-policies/--quick: "
                         "a name made of its workloads and policies, so the full comparison is not overwritten")
    ap.add_argument("--csv-dir", type=Path, default=None,
                    help="per-request CSVs (default: a folder named as the results file, without .json)")
    ap.add_argument("--no-progress", action="store_true")
    # internal: nbkit's endpoint in its own process
    args = ap.parse_args(argv)
    args.requests = args.requests or (50 if args.quick else 150)
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: must be >= 1")
    args.routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    args.nbkit_policies = [p.strip() for p in args.nbkit_policies.split(",") if p.strip()]
    args.peer_policies = {k: [p.strip() for p in getattr(args, f"{k}_policies").split(",") if p.strip()]
                          for k in PEERS}
    args.workloads = list(dict.fromkeys(w.strip() for w in args.workloads.split(",") if w.strip()))
    bad = [r for r in args.routers if r not in LABELS] + [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown router/workload {bad} (routers: {','.join(LABELS)}; workloads: {','.join(WORKLOADS)})")
    if not args.workloads:
        ap.error("--workloads: none given")
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()] if args.policies else []
    offered = [("nbkit", p) for p in args.nbkit_policies] + [(k, p) for k in PEERS for p in args.peer_policies[k]]
    unknown = [f for f in args.policies if not any(p == f or p.split(":", 1)[0] == f for _, p in offered)]
    if unknown:
        ap.error(f"--policies: {unknown} is no router's policy here (nbkit: {','.join(args.nbkit_policies)}; "
                 + "; ".join(f"{k}: {','.join(v)}" for k, v in args.peer_policies.items()) + ")")
    if not router_plan(args):
        ap.error("nothing to run: --routers and --policies leave no (router, policy)")
    for name in ("mixed_input", "mixed_output"):
        lo, _, hi = getattr(args, name).partition(":")
        setattr(args, name, (int(lo), int(hi or lo)))
    if args.prefixes < 1 or args.many_prefixes < 1 or args.prefix_len < 1 or args.many_prefix_len < 1:
        ap.error("--prefixes, --many-prefixes and their lengths must be >= 1")
    if not (args.hot_popularity >= 0 and math.isfinite(args.hot_popularity)):
        ap.error(f"--hot-popularity {args.hot_popularity}: must be a finite number >= 0")
    args.kv_blocks_auto = str(args.kv_blocks).strip().lower() == "auto"
    if args.kv_blocks_auto:
        args.kv_blocks = auto_kv_blocks(args)
    else:
        try:
            args.kv_blocks = int(args.kv_blocks)
        except ValueError:
            ap.error(f"--kv-blocks {args.kv_blocks!r}: auto or a number of blocks")
        if args.kv_blocks < 0:
            ap.error(f"--kv-blocks {args.kv_blocks}: must be >= 0")
    name = args.out_name
    if name is not None and (not name or not all(c.isalnum() or c in "._-" for c in name)):
        ap.error(f"--out-name {name!r}: letters, digits, '.', '_' and '-' only")
    if args.out is None:
        if name is None and restricted(args):
            name = auto_out_name(args)
        args.out = HERE / "results" / (f"compare_routers_{name}.json" if name else "compare_routers.json")
    args.out_name = name
    if args.csv_dir is None:
        args.csv_dir = args.out.parent / args.out.stem
    return args


def restricted(args) -> bool:
    """A run that is not the full comparison (its results must not replace compare_routers.json)."""
    return (args.quick or args.workloads != list(DEFAULT_WORKLOADS) or bool(args.policies)
            or sorted(args.routers) != sorted(DEFAULT_ROUTERS) or args.nbkit_policies != list(NBKIT_POLICIES)
            or any(args.peer_policies[k] != list(v) for k, v in PEERS.items()))


def auto_out_name(args) -> str:
    """e.g. ``many-prefixes_kv_aware-cache_aware``: the workloads, then the --policies (or the routers)."""
    parts = ["-".join(args.workloads)]
    if args.policies:
        parts.append("-".join(args.policies))
    elif sorted(args.routers) != sorted(DEFAULT_ROUTERS):
        parts.append("-".join(args.routers))
    if args.quick:
        parts.append("quick")
    name = "_".join(parts)
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:100]


def main(argv=None) -> int:
    args = parse_args(argv)
    info = announce_machine()
    args.csv_dir.mkdir(parents=True, exist_ok=True)
    print(f"results: {args.out} (+ .txt), per-request CSVs under {args.csv_dir}", flush=True)
    children = Children(Path(tempfile.mkdtemp(prefix="nbkit-compare-routers-")))
    try:
        out = asyncio.run(run_all(args, children))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: stopping the processes this benchmark started", file=sys.stderr, flush=True)
        return 130
    finally:
        children.stop_all()
    info["loadavg_at_end"] = list(os.getloadavg())
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    lines, goals = report(out, args)
    print("\n".join(lines))
    # the load average at the end counts the replicas' own processes and threads (API server,
    # engine core, torch threads): only the one at the start says whether other work was running
    busy = info["loadavg_at_start"][0]
    if busy > 1.5 * (info["cores_usable"] or 1):
        print(f"WARNING: load average {busy:.1f} on {info['cores_usable']} cores before the benchmark started: "
              "other work was running; re-run on a quiet machine")
    result = {
        "benchmark": "compare_routers", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
        "versions": {**versions(args.peers_venv), "vllm": _vllm_version()},
        "setup": {"replicas": out["replicas"], "model": args.model or "nbkit tiny model (random weights)",
                  "kv_blocks_per_replica": args.kv_blocks, "kv_blocks_auto": args.kv_blocks_auto,
                  "kv_fit": kv_fit(args), "kv_events": out["kv_events"], "max_model_len": args.max_model_len,
                  "routers": args.routers, "policies_filter": args.policies or None, "out_name": args.out_name,
                  "workloads": args.workloads,
                  "requests_per_run": args.requests, "rounds": args.rounds, "rates": out["rates"], "rate_mode": args.rate, "load": args.load,
                  "arrivals": (f"closed loop, {args.concurrency} in flight" if args.concurrency
                               else "Poisson, same seed for every router"), "seed": args.seed,
                  "shared_prefix": {"prefixes": args.prefixes, "prefix_len": args.prefix_len,
                                    "question_len": args.question_len, "output_len": args.output_len,
                                    "warmup_per_prefix": args.warmup_per_prefix},
                  "many_prefixes": {"prefixes": args.many_prefixes, "prefix_len": args.many_prefix_len,
                                    "question_len": args.question_len, "output_len": args.output_len,
                                    "warmup_per_prefix": args.warmup_per_prefix},
                  "hot_prefixes": {"prefixes": args.many_prefixes, "prefix_len": args.many_prefix_len,
                                   "popularity": args.hot_popularity, "question_len": args.question_len,
                                   "output_len": args.output_len, "warmup_per_prefix": args.warmup_per_prefix},
                  "mixed": {"input": args.mixed_input, "output": args.mixed_output},
                  "load_generator": "nbkit.bench (aiohttp, streamed, ignore_eos)", "quick": args.quick},
        "goals": goals, "rows": out["rows"], "runs": out["runs"], "elapsed_s": round(out["elapsed_s"], 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_finite(result), indent=1) + "\n")
    header = (f"compare_routers, {result['when']}: {info['cpu_model']}, {info['cores_usable']} cores, "
              f"{info.get('memory_gib', '?')} GiB, python {info['python']}, {result['versions']['vllm']}, "
              f"loadavg {info['loadavg_at_start'][0]:.1f} -> {info['loadavg_at_end'][0]:.1f}")
    args.out.with_suffix(".txt").write_text(header + "\n" + "\n".join(lines) + "\n")
    print(f"\nwrote {args.out} and the per-request CSVs under {args.csv_dir} ({out['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
