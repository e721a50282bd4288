"""What one /metrics scrape costs the vLLM API server: unfiltered vs vLLM's server-side name filter.

    .venv/bin/python benchmarks/metrics_scrape.py [--scrapes 200] [--rounds 6]

nbkit's probes ask a replica only for the series the router reads
(``/metrics?name[]=vllm:num_requests_running&...``, :data:`nbkit.routing.metrics.METRIC_NAMES`);
vLLM answers that in full by itself, and the replicas a Cluster starts run with nbkit's middleware
(``--middleware nbkit.cluster.metrics_filter.NamedMetrics``) that renders only those series.
This starts one vLLM-CPU replica of the tiny model (nbkit Cluster), sends a few requests so every
histogram has samples, then alternates rounds of ``--scrapes`` back-to-back scrapes, unfiltered and
filtered, and reads the API server process's own CPU time (user + system, psutil) before and after
each round. Printed per round and pooled: CPU ms per scrape, response bytes, series lines, and the
ratio filtered / unfiltered. Writes benchmarks/results/metrics_scrape.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from nbkit import Cluster  # noqa: E402
from nbkit.routing.probes import METRICS_QUERY  # noqa: E402


def api_server(cluster) -> psutil.Process:
    """The replica's API server: the process listening on its HTTP port."""
    port = cluster.plans[0].port
    for p in cluster.process(0).processes():
        try:
            if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in p.net_connections()):
                return p
        except psutil.Error:
            continue
    raise RuntimeError(f"no process of replica0 listens on port {port}")


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def one_round(client: httpx.Client, url: str, proc: psutil.Process, n: int) -> dict:
    sizes, lines = [], []
    c0, t0 = cpu_s(proc), time.perf_counter()
    for _ in range(n):
        r = client.get(url)
        r.raise_for_status()
        sizes.append(len(r.content))
        lines.append(sum(1 for ln in r.text.splitlines() if ln and not ln.startswith("#")))
    wall, cpu = time.perf_counter() - t0, cpu_s(proc) - c0
    return {"cpu_ms_per_scrape": 1000 * cpu / n, "wall_ms_per_scrape": 1000 * wall / n,
            "bytes": statistics.median(sizes), "series_lines": statistics.median(lines)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scrapes", type=int, default=200, help="scrapes per round")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per variant, interleaved")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "metrics_scrape.json")
    args = ap.parse_args()

    cluster = Cluster.replicas(n=1, cores=(0,), port_start=8930)
    cluster.start()
    try:
        base = cluster.urls[0]
        with httpx.Client(timeout=30) as client:
            for i in range(8):  # samples in every histogram and counter
                client.post(f"{base}/v1/completions", json={"model": cluster.model, "prompt": f"warm {i}",
                                                             "max_tokens": 8}).raise_for_status()
            proc = api_server(cluster)
            variants = {"unfiltered": f"{base}/metrics", "filtered": f"{base}/metrics{METRICS_QUERY}"}
            for url in variants.values():  # untimed warm-up of both paths
                one_round(client, url, proc, 10)
            rounds = []
            for r in range(args.rounds):
                for name in (variants if r % 2 == 0 else reversed(list(variants))):
                    row = {"round": r, "variant": name, **one_round(client, variants[name], proc, args.scrapes)}
                    rounds.append(row)
                    print(f"round {r} {name:<10} cpu {row['cpu_ms_per_scrape']:6.2f} ms/scrape  wall "
                          f"{row['wall_ms_per_scrape']:6.2f} ms  {row['bytes']:>7.0f} B  "
                          f"{row['series_lines']:>4.0f} series lines", flush=True)
    finally:
        cluster.stop()

    pooled = {}
    for name in ("unfiltered", "filtered"):
        rows = [x for x in rounds if x["variant"] == name]
        pooled[name] = {k: statistics.median(x[k] for x in rows)
                        for k in ("cpu_ms_per_scrape", "wall_ms_per_scrape", "bytes", "series_lines")}
    ratio = pooled["filtered"]["cpu_ms_per_scrape"] / pooled["unfiltered"]["cpu_ms_per_scrape"]
    per_round = [f["cpu_ms_per_scrape"] / u["cpu_ms_per_scrape"]
                 for u, f in zip([x for x in rounds if x["variant"] == "unfiltered"],
                                 [x for x in rounds if x["variant"] == "filtered"])]
    print(f"\nmedian of {args.rounds} rounds x {args.scrapes} scrapes:")
    for name, p in pooled.items():
        print(f"  {name:<10} {p['cpu_ms_per_scrape']:.2f} ms API-server CPU per scrape, {p['bytes']:.0f} B, "
              f"{p['series_lines']:.0f} series lines")
    print(f"  filtered / unfiltered CPU: {ratio:.2f} (per round: {', '.join(f'{x:.2f}' for x in per_round)})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python benchmarks/metrics_scrape.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "scrapes_per_round": args.scrapes, "rounds": rounds, "pooled": pooled,
        "cpu_ratio_filtered_over_unfiltered": ratio, "cpu_ratio_per_round": per_round}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
