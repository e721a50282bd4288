"""Benchmark results as pandas frames, on :mod:`nbkit.records` (the per-request record, the CSV and
the summary statistics shared with the simulator).

    res = bench.run(...)                       # a BenchResult: res.requests is a list of RequestResult
    res.frame()                                # one row per request (seconds; itl_s is a list)
    res.to_csv("results.csv")                  # or time_unit="ns": *_ns columns, integer nanoseconds
    res.summary()                              # one row: throughput, goodput, mean/median/p90/p99 (ms)
    res.per_replica()                          # share of requests and tokens per replica
    print(res)                                 # both, as text
    frame = read_frame("results.csv"); summary_frame(frame)

Frames have the CSV's columns (:data:`nbkit.records.CSV_COLUMNS`, or their ``*_ns`` names with
integer nanoseconds) and ``instance_id`` -1 where the replica is unknown. The definitions of TTFT,
TPOT, ITL, E2E, percentiles, throughput and goodput are :mod:`nbkit.records`'.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from nbkit.records import (CSV_COLUMNS, DEFAULT_PERCENTILES, TIME_COLUMNS, RequestResult, column_names,
                           csv_time_unit, format_summary, read_csv, summarize, write_csv)

#: the frame's columns beyond the CSV's (``extra=True``)
EXTRA_COLUMNS = ("error", "session_id", "turn", "group", "tenant")


# -- frames -----------------------------------------------------------------------------------------
def to_frame(rows: Iterable[RequestResult], time_unit: str = "s", extra: bool = True):
    """Requests as a DataFrame: the CSV columns (and ``error``, ``session_id``, ``turn``, ``group`` when
    ``extra``)."""
    import pandas as pd

    column_names(time_unit)  # checks the unit
    cols = list(CSV_COLUMNS) + (list(EXTRA_COLUMNS) if extra else [])
    df = pd.DataFrame([r.row() for r in rows], columns=cols)
    for c in ("ttft_s", "tpot_s", "e2e_s", "queue_wait_s", "arrival_s"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    ids = pd.to_numeric(df["request_id"], errors="coerce")
    if not ids.isna().any():                       # the load generator's numbers, or a CSV's
        df["request_id"] = ids.astype(int)
    df["instance_id"] = df["instance_id"].fillna(-1).astype(int)
    for c in ("input_toks", "output_toks"):
        df[c] = df[c].astype(int)
    return frame_in_unit(df, time_unit)


def frame_in_unit(df, time_unit: str):
    """Convert a results frame between seconds (``*_s``, floats) and ``*_ns`` (integer ns)."""
    import pandas as pd

    column_names(time_unit)
    have_ns = "ttft_ns" in df.columns
    if (time_unit == "ns") == have_ns:
        return df
    df = df.copy()
    for c in TIME_COLUMNS:
        src = c if time_unit == "ns" else c[:-2] + "_ns"
        dst = c[:-2] + "_ns" if time_unit == "ns" else c
        if src not in df.columns:
            continue
        if c == "itl_s":
            if time_unit == "ns":
                df[src] = [[int(round(x * 1e9)) for x in v] for v in df[src]]
            else:
                df[src] = [[x / 1e9 for x in v] for v in df[src]]
        elif time_unit == "ns":
            df[src] = pd.array([None if (x is None or (isinstance(x, float) and math.isnan(x)))
                                else int(round(x * 1e9)) for x in df[src]], dtype="Int64")
        else:
            df[src] = [float("nan") if x is None or x is pd.NA else x / 1e9 for x in df[src]]
            df[src] = df[src].astype(float)
        df = df.rename(columns={src: dst})
    return df


def from_frame(df) -> list[RequestResult]:
    """The requests of a results frame (either unit) as records; ``tpot`` is recomputed."""
    df = frame_in_unit(df, "s")
    extra = [c for c in EXTRA_COLUMNS if c in df.columns]
    out = []
    for rec in df.to_dict("records"):
        inst = _nan_none(rec["instance_id"])
        kw = {c: rec[c] for c in extra if _nan_none(rec[c]) is not None}
        if "turn" in kw:
            kw["turn"] = int(kw["turn"])
        if "group" in kw:
            kw["group"] = int(kw["group"])
        out.append(RequestResult(
            request_id=rec["request_id"], instance_id=None if inst is None or inst < 0 else int(inst),
            rank=str(rec["rank"]), policy=str(rec["policy"]), arrival_s=_nan_none(rec["arrival_s"]) or 0.0,
            queue_wait_s=_nan_none(rec["queue_wait_s"]), ttft_s=_nan_none(rec["ttft_s"]),
            itl_s=[float(x) for x in rec["itl_s"]], e2e_s=_nan_none(rec["e2e_s"]), input_toks=int(rec["input_toks"]),
            output_toks=int(rec["output_toks"]), outcome=str(rec["outcome"]), **kw))
    return out


def read_frame(path: str | os.PathLike, time_unit: str | None = None):
    """A results CSV as a frame of its columns, in ``time_unit`` (default: the one it was written
    in: ``*_s`` floats or ``*_ns`` nullable integers); ``itl`` is a list."""
    return to_frame(read_csv(path), time_unit or csv_time_unit(path), extra=False)


def write_frame(df, path: str | os.PathLike, time_unit: str = "s") -> None:
    """Write a results frame (either unit) as the CSV (:func:`nbkit.records.write_csv`)."""
    write_csv(from_frame(df), path, time_unit)


def summary_frame(rows, duration_s: float | None = None, *, slos=None,
                  percentiles: Sequence[float] = DEFAULT_PERCENTILES, label: str | None = None):
    """:func:`nbkit.records.summarize` as a one-row DataFrame, the latencies in milliseconds
    (``ttft_mean_ms``, ``ttft_median_ms``, ``ttft_p99_ms``, ...).

    ``rows``: a list of :class:`~nbkit.records.RequestResult` or a results frame (either unit).
    """
    import pandas as pd

    if isinstance(rows, pd.DataFrame):
        rows = from_frame(rows)
    row: dict[str, Any] = {}
    for k, v in summarize(rows, duration_s, slos=slos, percentiles=percentiles).items():
        if isinstance(v, dict):
            row.update({f"{k[:-2]}_{stat}_ms": x * 1e3 for stat, x in v.items()})
        else:
            row[k] = v
    out = pd.DataFrame([row])
    if label is not None:
        out.index = [label]
    return out


def per_replica(frame, replica_metrics=None):
    """Share of requests and tokens per replica (rows with an unknown replica are grouped under
    instance -1). With ``replica_metrics`` (from :func:`metrics_delta`) its counters are joined."""
    import pandas as pd

    df = frame_in_unit(frame, "s") if isinstance(frame, pd.DataFrame) else to_frame(frame)
    if df.empty:
        return pd.DataFrame(columns=["instance_id", "rank", "requests", "request_share"])
    g = df.groupby(["instance_id", "rank"], dropna=False)
    total_req = len(df)
    toks = df["input_toks"] + df["output_toks"]
    out = pd.DataFrame({
        "requests": g.size(),
        "failed": g["outcome"].apply(lambda s: int((s != "ok").sum())),
        "input_toks": g["input_toks"].sum(),
        "output_toks": g["output_toks"].sum(),
    })
    out["request_share"] = out["requests"] / total_req
    out["token_share"] = (out["input_toks"] + out["output_toks"]) / max(1, int(toks.sum()))
    ok = df[df["outcome"] == "ok"].groupby(["instance_id", "rank"])
    out["ttft_p50_ms"] = ok["ttft_s"].median() * 1e3
    out["ttft_p99_ms"] = ok["ttft_s"].quantile(0.99) * 1e3
    out = out.reset_index()
    if replica_metrics is not None and len(replica_metrics):
        rm = replica_metrics.rename(columns={"replica": "instance_id"})
        keep = [c for c in ("instance_id", "rank", "finished", "prompt_tokens", "generation_tokens",
                            "prefix_hit_rate") if c in rm.columns]
        out = out.merge(rm[keep], on=[c for c in ("instance_id", "rank") if c in keep], how="outer")
    return out


# -- replica metrics (prefix cache, tokens) ---------------------------------------------------------
def metrics_delta(before: Mapping, after: Mapping, names: Mapping | None = None):
    """Counters of each replica between two scrapes ``{(replica, engine): EngineMetrics}``:
    finished requests, prompt and generated tokens, prefix-cache queries/hits and hit rate, and
    each replica's share of finished requests and generated tokens."""
    import pandas as pd

    rows = []
    for key, a in after.items():
        b = before.get(key)
        if b is None:
            continue
        replica, engine = key
        d = {f: getattr(a, f) - getattr(b, f) for f in ("requests_finished", "prompt_tokens", "generation_tokens",
                                                         "prefix_cache_queries", "prefix_cache_hits")}
        rows.append({"replica": replica, "engine": engine, "rank": (names or {}).get(key, ""),
                     "finished": int(round(d["requests_finished"])), "prompt_tokens": int(round(d["prompt_tokens"])),
                     "generation_tokens": int(round(d["generation_tokens"])),
                     "prefix_cache_queries": int(round(d["prefix_cache_queries"])),
                     "prefix_cache_hits": int(round(d["prefix_cache_hits"])),
                     "prefix_hit_rate": (d["prefix_cache_hits"] / d["prefix_cache_queries"])
                     if d["prefix_cache_queries"] > 0 else float("nan")})
    df = pd.DataFrame(rows, columns=["replica", "engine", "rank", "finished", "prompt_tokens", "generation_tokens",
                                     "prefix_cache_queries", "prefix_cache_hits", "prefix_hit_rate"])
    if len(df):
        df["finished_share"] = df["finished"] / max(1, df["finished"].sum())
        df["generation_share"] = df["generation_tokens"] / max(1, df["generation_tokens"].sum())
    return df


def prefix_hit_rate(replica_metrics) -> float:
    """Overall prefix-cache hit rate (hits / queried tokens) over the replicas."""
    if replica_metrics is None or not len(replica_metrics):
        return float("nan")
    q = replica_metrics["prefix_cache_queries"].sum()
    return float(replica_metrics["prefix_cache_hits"].sum() / q) if q > 0 else float("nan")


# -- a run ------------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    """What :func:`nbkit.bench.run` returns."""

    requests: list[RequestResult]
    duration_s: float
    label: str = ""
    policy: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    replica_metrics: Any = None    # DataFrame from metrics_delta, when the replicas were known
    slos: Any = None

    def frame(self, time_unit: str = "s", extra: bool = True):
        """One row per request (the CSV's columns, plus ``error``, ``session_id``, ``turn``, ``group``)."""
        return to_frame(self.requests, time_unit, extra=extra)

    def to_csv(self, path: str | os.PathLike, time_unit: str = "s") -> str:
        write_csv(self.requests, path, time_unit)
        return str(path)

    def summary(self, slos=None, percentiles: Sequence[float] = DEFAULT_PERCENTILES):
        df = summary_frame(self.requests, self.duration_s, slos=slos if slos is not None else self.slos,
                           percentiles=percentiles, label=self.label or self.policy or "run")
        df.insert(0, "policy", self.policy)
        if self.replica_metrics is not None and len(self.replica_metrics):
            df["prefix_hit_rate"] = prefix_hit_rate(self.replica_metrics)
        return df

    def per_replica(self):
        return per_replica(self.frame(), self.replica_metrics)

    def by_tenant(self) -> dict[str, dict[str, Any]]:
        """Per tenant (rows of :func:`nbkit.bench.mix` workloads): :func:`nbkit.by_tenant.tenant_summaries`."""
        from nbkit.by_tenant import tenant_summaries
        return tenant_summaries(self.requests, self.duration_s)

    @classmethod
    def from_csv(cls, path: str | os.PathLike, label: str = "") -> "BenchResult":
        rows = read_csv(path)
        ends = [r.arrival_s + r.e2e_s for r in rows if r.e2e_s is not None]
        return cls(rows, max(ends) if ends else 0.0, label=label or os.path.basename(str(path)),
                   policy=rows[0].policy if rows else "")

    def report(self) -> str:
        import pandas as pd

        s = summarize(self.requests, self.duration_s, slos=self.slos)
        s["policy"] = self.policy
        if self.replica_metrics is not None and len(self.replica_metrics):
            s["prefix_hit_rate"] = prefix_hit_rate(self.replica_metrics)
        lines = [format_summary(s, self.label or "nbkit bench")]
        pr = self.per_replica()
        if len(pr):
            with pd.option_context("display.width", 160, "display.max_columns", 20):
                lines.append(pr.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        if tenants := self.by_tenant():
            from nbkit.by_tenant import format_tenants
            lines.append(format_tenants(tenants))
        failures = [r for r in self.requests if not r.ok]
        if failures:
            lines.append(f"{len(failures)} failed, e.g. {failures[0].outcome}: {failures[0].error[:200]}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()

    def _repr_html_(self) -> str:
        return (f"<b>{self.label or 'nbkit bench'}</b> ({len(self.requests)} requests, {self.duration_s:.1f} s)"
                + self.summary().to_html() + self.per_replica().to_html(index=False))

    def cdf_chart(self, metric: str = "ttft_s"):
        from nbkit.bench.charts import latency_cdf
        return latency_cdf({self.label or self.policy or "run": self}, metric)


def _nan_none(x):
    """None for a frame's missing value (None, NaN, pd.NA), else ``x``."""
    import pandas as pd

    return None if pd.isna(x) else x
