"""The same workload across policies, cluster layouts or targets: one table, one chart.

    from nbkit import bench
    w = bench.shared_prefix(8, 25, prefix_len=1024)
    cmp = bench.compare(w, cluster=cluster, policies=["round_robin", "least_load", "prefix_affinity"],
                        request_rate=6, num_prompts=200)
    cmp.table()                     # one row per policy: throughput, goodput, TTFT/TPOT/ITL/E2E stats
    cmp.chart("ttft_s")             # latency CDFs, one line per policy
    cmp = bench.compare(w, layouts={"1 x TP2": Cluster.replicas(n=1, tp=2), "2 x TP1": Cluster.replicas(n=2)},
                        policy="least_load", concurrency=16)              # each started, run, stopped in turn
    cmp.throughput_chart()          # throughput vs instances
    cmp = bench.compare(w, targets={"nbkit": "http://127.0.0.1:8000", "sglang": "http://127.0.0.1:30000"})

Every run gets the same workload and the same arrival seed. ``reset_prefix_cache=True`` empties
the replicas' prefix caches before each run (vLLM needs ``VLLM_SERVER_DEV_MODE=1`` for that),
so no run inherits what the previous one cached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from nbkit import loop
from nbkit.bench.loadgen import _arun
from nbkit.bench.results import BenchResult
from nbkit.bench.workloads import Workload


@dataclass
class Comparison:
    """Results by label, and what to show of them."""

    results: dict[str, BenchResult] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    slos: Any = None

    def table(self, slos=None):
        """One row per run: the summary columns, plus ``policy``, ``instances`` (layouts) and the
        prefix-cache hit rate (when the replicas were known)."""
        import pandas as pd

        rows = []
        for label, r in self.results.items():
            s = r.summary(slos=slos if slos is not None else self.slos)
            s.index = [label]
            if label in self.instances:
                s.insert(1, "instances", self.instances[label])
            rows.append(s)
        return pd.concat(rows) if rows else pd.DataFrame()

    def frame(self):
        """Every request of every run, with a ``label`` column."""
        import pandas as pd

        parts = [r.frame().assign(label=label) for label, r in self.results.items()]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def chart(self, metric: str = "ttft_s", **kw):
        from nbkit.bench.charts import latency_cdf
        return latency_cdf(self.results, metric, **kw)

    def throughput_chart(self, y: str = "output_throughput", **kw):
        from nbkit.bench.charts import throughput_vs_instances
        return throughput_vs_instances(self.table(), y=y, **kw)

    def share_chart(self, label: str, bin_s: float | None = None, **kw):
        from nbkit.bench.charts import replica_share_over_time
        return replica_share_over_time(self.results[label], bin_s, **kw)

    def to_csv(self, folder: str | os.PathLike, time_unit: str = "s") -> list[str]:
        """One CSV per run in ``folder`` (``<label>.csv``) and ``summary.csv``."""
        os.makedirs(folder, exist_ok=True)
        out = []
        for label, r in self.results.items():
            out.append(r.to_csv(os.path.join(folder, f"{_safe(label)}.csv"), time_unit))
        self.table().to_csv(os.path.join(folder, "summary.csv"), index_label="label")
        return out

    def __str__(self) -> str:
        import pandas as pd

        t = self.table()
        cols = [c for c in ("policy", "instances", "completed", "failed", "request_throughput", "output_throughput",
                            "goodput", "ttft_median_ms", "ttft_p99_ms", "tpot_median_ms", "itl_p99_ms", "e2e_p99_ms",
                            "prefix_hit_rate") if c in t.columns]
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            return t[cols].to_string(float_format=lambda x: f"{x:.3f}")

    def _repr_html_(self) -> str:
        return self.table().to_html(float_format=lambda x: f"{x:.3f}")


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def compare(workload: Workload, *, targets: Mapping[str, Any] | None = None, cluster=None,
            policies: Sequence | None = None, layouts: Mapping[str, Any] | None = None, policy=None,
            slos=None, progress: bool = True, **run_kw) -> Comparison:
    """Blocking; see :func:`acompare`."""
    return loop.run(_acompare(workload, targets=targets, cluster=cluster, policies=policies, layouts=layouts,
                              policy=policy, slos=slos, progress=progress, **run_kw))


async def acompare(workload: Workload, **kw) -> Comparison:
    """Run ``workload`` on each of:

    - ``targets``: ``{label: target}`` (URLs, Endpoints, RoutedClients, Targets);
    - ``policies`` on ``cluster`` (a running Cluster): one in-kernel RoutedClient per policy;
    - ``layouts``: ``{label: Cluster or a callable returning one}``, each started (unless running),
      benchmarked with ``policy`` (or each of ``policies``) and stopped again if started here.

    Other keyword arguments go to :func:`nbkit.bench.run` (``request_rate``, ``concurrency``,
    ``num_prompts``, ``reset_prefix_cache``, ...). Runs one after another.
    """
    return await loop.wrap(_acompare(workload, **kw))


async def _acompare(workload: Workload, *, targets=None, cluster=None, policies=None, layouts=None, policy=None,
                    slos=None, progress: bool = True, **run_kw) -> Comparison:
    if sum(x is not None for x in (targets, layouts, cluster)) != 1:
        raise ValueError("give exactly one of targets=, cluster= (with policies=) or layouts=")
    cmp = Comparison(slos=slos)
    if targets is not None:
        for label, t in targets.items():
            cmp.results[label] = await _arun(t, workload, label=label, policy=policy, slos=slos, progress=progress,
                                             **run_kw)
        return cmp
    if cluster is not None:
        for p in policies or [policy or "least_load"]:
            label = _policy_label(p)
            cmp.results[label] = await _arun(cluster, workload, policy=p, label=label, slos=slos, progress=progress,
                                             **run_kw)
            cmp.instances[label] = len(cluster.ranks)
        return cmp
    for name, spec in layouts.items():
        c = spec() if callable(spec) and not hasattr(spec, "ranks") else spec
        started = False
        if not c.running:
            await c.astart()
            started = True
        try:
            for p in policies or [policy or "least_load"]:
                label = name if not policies or len(policies) == 1 else f"{name}/{_policy_label(p)}"
                cmp.results[label] = await _arun(c, workload, policy=p, label=label, slos=slos, progress=progress,
                                                 **run_kw)
                cmp.instances[label] = len(c.ranks)
        finally:
            if started:
                await c.astop()
    return cmp


def _policy_label(p) -> str:
    if isinstance(p, str):
        return p
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__
