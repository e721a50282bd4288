"""Per-request results, the CSV (shared with the simulator), and the summary statistics.

    res = bench.run(...)                       # a BenchResult
    res.frame()                                # one row per request (seconds; itl_s is a list)
    res.to_csv("results.csv")                  # or time_unit="ns": *_ns columns, integer nanoseconds
    res.summary()                              # one row: throughput, goodput, mean/median/p90/p99 (ms)
    res.per_replica()                          # share of requests and tokens per replica
    print(res)                                 # both, as text
    frame = read_csv("results.csv"); summarize(frame)

Definitions (as ``vllm bench serve``): TTFT from sending the request to its first streamed chunk;
ITL the gaps between later chunks; E2E to the last chunk; TPOT = (E2E - TTFT) / (output - 1),
empty when output <= 1; percentiles are numpy's (linear interpolation); ITL statistics pool every
gap of every completed request; throughputs count completed requests over the run's duration
(first send to last finish); goodput counts the completed requests within every given SLO.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

#: the CSV's columns, in order (seconds); with time_unit="ns" the ``*_s`` ones become ``*_ns``
CSV_COLUMNS = ("request_id", "instance_id", "rank", "policy", "arrival_s", "queue_wait_s", "ttft_s", "tpot_s",
               "itl_s", "e2e_s", "input_toks", "output_toks", "outcome")
TIME_COLUMNS = ("arrival_s", "queue_wait_s", "ttft_s", "tpot_s", "itl_s", "e2e_s")
METRICS = ("ttft", "tpot", "itl", "e2e")
DEFAULT_PERCENTILES = (50, 90, 99)


def column_names(time_unit: str = "s") -> list[str]:
    _check_unit(time_unit)
    return [c[:-2] + "_ns" if time_unit == "ns" and c in TIME_COLUMNS else c for c in CSV_COLUMNS]


def _check_unit(time_unit: str) -> None:
    if time_unit not in ("s", "ns"):
        raise ValueError(f"time_unit={time_unit!r}: choose 's' or 'ns'")


@dataclass
class RequestResult:
    """One request as the load generator saw it (times in seconds)."""

    request_id: int
    instance_id: int = -1          # replica index; -1 if unknown
    rank: str = ""                 # "replica0", "replica0/dp1"; "" if unknown
    policy: str = ""
    arrival_s: float = 0.0         # when it was sent, from the run's start
    queue_wait_s: float | None = None  # router admission wait (known through the in-kernel client)
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    input_toks: int = 0
    output_toks: int = 0
    outcome: str = "ok"            # ok | error | timeout | cancelled | http_<status>
    error: str = ""
    session_id: str = ""
    turn: int = 0
    group: int | None = None       # the workload item's group (shared_prefix: which system prompt)

    @property
    def tpot_s(self) -> float | None:
        return tpot(self.e2e_s, self.ttft_s, self.output_toks)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        return d


def tpot(e2e_s: float | None, ttft_s: float | None, output_toks: int) -> float | None:
    """Time per output token after the first: ``(e2e - ttft) / (output - 1)``; None when output <= 1."""
    if e2e_s is None or ttft_s is None or output_toks is None or output_toks <= 1:
        return None
    return (e2e_s - ttft_s) / (output_toks - 1)


# -- frames and CSV ---------------------------------------------------------------------------------
def to_frame(rows: Iterable[RequestResult], time_unit: str = "s", extra: bool = True):
    """Requests as a DataFrame: the CSV columns (and ``error``, ``session_id``, ``turn``, ``group`` when
    ``extra``)."""
    import pandas as pd

    _check_unit(time_unit)
    recs = [r.row() for r in rows]
    cols = list(CSV_COLUMNS) + (["error", "session_id", "turn", "group"] if extra else [])
    df = pd.DataFrame(recs, columns=cols)
    for c in ("ttft_s", "tpot_s", "e2e_s", "queue_wait_s", "arrival_s"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ("request_id", "instance_id", "input_toks", "output_toks"):
        df[c] = df[c].astype(int)
    return frame_in_unit(df, time_unit)


def frame_in_unit(df, time_unit: str):
    """Convert a results frame between seconds (``*_s``, floats) and ``*_ns`` (integer ns)."""
    import pandas as pd

    _check_unit(time_unit)
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


def write_csv(rows_or_frame, path: str | os.PathLike, time_unit: str = "s") -> None:
    """Write the CSV (exactly :data:`CSV_COLUMNS`, or their ``*_ns`` names with integer ns).

    Empty cells for unknown values; ``itl`` as a JSON list; floats written exactly (``repr``)."""
    import pandas as pd

    _check_unit(time_unit)
    df = rows_or_frame if isinstance(rows_or_frame, pd.DataFrame) else to_frame(rows_or_frame, "s", extra=False)
    df = frame_in_unit(df, time_unit)
    cols = column_names(time_unit)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}")
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for rec in df[cols].itertuples(index=False):
            w.writerow([_cell(v, name) for v, name in zip(rec, cols)])


def _cell(v, name: str) -> str:
    if name.startswith("itl_"):
        return json.dumps([int(x) if isinstance(x, (int, np.integer)) else float(x) for x in (v or [])])
    if v is None or v is getattr(__import__("pandas"), "NA") or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(_num(v))


def _num(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return repr(float(x))
    if isinstance(x, float):
        return repr(x)
    return x


def read_csv(path: str | os.PathLike):
    """Read a results CSV back into a frame in the unit it was written in (``*_s`` floats or
    ``*_ns`` nullable integers); ``itl`` becomes a list again. :func:`frame_in_unit` converts."""
    import pandas as pd

    df = pd.read_csv(path, dtype={"rank": str, "policy": str, "outcome": str}, keep_default_na=False,
                     na_values={c: [""] for c in ("arrival_s", "queue_wait_s", "ttft_s", "tpot_s", "e2e_s",
                                                  "arrival_ns", "queue_wait_ns", "ttft_ns", "tpot_ns", "e2e_ns")})
    ns = "ttft_ns" in df.columns
    expected = column_names("ns" if ns else "s")
    if list(df.columns) != expected:
        raise ValueError(f"{path}: columns {list(df.columns)} are not the results columns {expected}")
    itl = "itl_ns" if ns else "itl_s"
    df[itl] = [json.loads(v) if isinstance(v, str) and v else [] for v in df[itl]]
    for c in ("arrival", "queue_wait", "ttft", "tpot", "e2e"):
        col = f"{c}_{'ns' if ns else 's'}"
        df[col] = df[col].astype("Int64") if ns else df[col].astype(float)
    for c in ("rank", "policy", "outcome"):
        df[c] = df[c].fillna("").astype(str)
    return df


# -- statistics -------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """numpy's percentile (linear interpolation); NaN for no values."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    return float(np.percentile(v, q)) if v.size else float("nan")


def _stats(values: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    out = {"mean": float(v.mean()) if v.size else float("nan"),
           "median": float(np.median(v)) if v.size else float("nan")}
    for q in percentiles:
        if q == 50:
            continue
        out[f"p{q:g}"] = float(np.percentile(v, q)) if v.size else float("nan")
    return out


def parse_slos(slos) -> dict[str, float]:
    """SLOs in seconds by metric: ``{"ttft": 0.5, "tpot": 0.05, "e2e": 10}``; keys may also be
    ``ttft_ms``/``ttft_s``, or a string ``"ttft:500 tpot:50"`` in ms (``vllm bench serve --goodput``)."""
    if not slos:
        return {}
    if isinstance(slos, str):
        out = {}
        for part in slos.replace(",", " ").split():
            k, _, v = part.partition(":")
            out[f"{k.strip()}_ms"] = float(v)
        slos = out
    res = {}
    for k, v in dict(slos).items():
        k = k.lower().replace("e2el", "e2e")
        if k.endswith("_ms"):
            k, v = k[:-3], float(v) / 1e3
        elif k.endswith("_s"):
            k = k[:-2]
        if k not in ("ttft", "tpot", "e2e"):
            raise ValueError(f"slo {k!r}: choose ttft, tpot or e2e")
        if not float(v) > 0:
            raise ValueError(f"slo {k}={v!r}: must be > 0")
        res[k] = float(v)
    return res


def summarize(frame, duration_s: float | None = None, *, slos=None, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              label: str | None = None):
    """One-row DataFrame of a run: completed/failed, request and token throughput, goodput under
    ``slos``, and mean/median/pXX of TTFT, TPOT, ITL and E2E in milliseconds.

    ``frame`` is a results frame (either unit) or a list of :class:`RequestResult`;
    ``duration_s`` defaults to the last finish time (``max(arrival + e2e)``).
    """
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        frame = to_frame(frame)
    df = frame_in_unit(frame, "s")
    ok = df[df["outcome"] == "ok"]
    if duration_s is None:
        ends = (df["arrival_s"] + df["e2e_s"]).dropna()
        duration_s = float(ends.max()) if len(ends) else 0.0
    dur = float(duration_s) if duration_s and duration_s > 0 else float("nan")
    tp = ok["tpot_s"].astype(float)
    if tp.isna().all() and len(ok):  # a frame without tpot (e.g. from elsewhere): compute it
        tp = pd.Series([tpot(e, t, o) for e, t, o in zip(ok["e2e_s"], ok["ttft_s"], ok["output_toks"])],
                       index=ok.index, dtype=float)
    row: dict[str, Any] = {
        "requests": int(len(df)), "completed": int(len(ok)), "failed": int(len(df) - len(ok)),
        "duration_s": float(duration_s),
        "input_toks": int(ok["input_toks"].sum()), "output_toks": int(ok["output_toks"].sum()),
        "request_throughput": len(ok) / dur,
        "output_throughput": ok["output_toks"].sum() / dur,
        "total_token_throughput": (ok["input_toks"].sum() + ok["output_toks"].sum()) / dur,
    }
    slo = parse_slos(slos)
    if slo:
        good = pd.Series(True, index=ok.index)
        if "ttft" in slo:
            good &= ok["ttft_s"] <= slo["ttft"]
        if "tpot" in slo:
            good &= tp.isna() | (tp <= slo["tpot"])
        if "e2e" in slo:
            good &= ok["e2e_s"] <= slo["e2e"]
        row["good_requests"] = int(good.sum())
        row["goodput"] = int(good.sum()) / dur
    itl = [x for v in ok["itl_s"] for x in v]
    series = {"ttft": ok["ttft_s"].tolist(), "tpot": tp.tolist(), "itl": itl, "e2e": ok["e2e_s"].tolist()}
    for m in METRICS:
        for k, v in _stats(series[m], percentiles).items():
            row[f"{m}_{k}_ms"] = v * 1e3
    qw = df["queue_wait_s"].dropna()
    if len(qw):
        row["queue_wait_mean_ms"] = float(qw.mean()) * 1e3
        row["queue_wait_p99_ms"] = float(np.percentile(qw, 99)) * 1e3
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
        """One row per request (the CSV's columns, plus ``error``, ``session_id``, ``turn``)."""
        return to_frame(self.requests, time_unit, extra=extra)

    def to_csv(self, path: str | os.PathLike, time_unit: str = "s") -> str:
        write_csv(self.requests, path, time_unit)
        return str(path)

    def summary(self, slos=None, percentiles: Sequence[float] = DEFAULT_PERCENTILES):
        df = summarize(self.frame(), self.duration_s, slos=slos if slos is not None else self.slos,
                       percentiles=percentiles, label=self.label or self.policy or "run")
        df.insert(0, "policy", self.policy)
        if self.replica_metrics is not None and len(self.replica_metrics):
            df["prefix_hit_rate"] = prefix_hit_rate(self.replica_metrics)
        return df

    def per_replica(self):
        return per_replica(self.frame(), self.replica_metrics)

    @classmethod
    def from_csv(cls, path: str | os.PathLike, label: str = "") -> "BenchResult":
        df = frame_in_unit(read_csv(path), "s")
        rows = []
        for r in df.itertuples(index=False):
            rows.append(RequestResult(
                request_id=int(r.request_id), instance_id=int(r.instance_id), rank=r.rank, policy=r.policy,
                arrival_s=float(r.arrival_s), queue_wait_s=_nan_none(r.queue_wait_s), ttft_s=_nan_none(r.ttft_s),
                itl_s=list(r.itl_s), e2e_s=_nan_none(r.e2e_s), input_toks=int(r.input_toks),
                output_toks=int(r.output_toks), outcome=r.outcome))
        ends = [r.arrival_s + r.e2e_s for r in rows if r.e2e_s is not None]
        return cls(rows, max(ends) if ends else 0.0, label=label or os.path.basename(str(path)),
                   policy=rows[0].policy if rows else "")

    def report(self) -> str:
        import pandas as pd

        s = self.summary().iloc[0]
        lines = [f"{' ' + (self.label or 'nbkit bench') + ' ':=^60}"]

        def add(name, value, fmt="{:.2f}"):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return
            lines.append(f"{name:<44}{fmt.format(value):>16}")

        add("Policy:", self.policy or "-", "{}")
        add("Successful requests:", s["completed"], "{:d}")
        add("Failed requests:", s["failed"], "{:d}")
        add("Benchmark duration (s):", s["duration_s"])
        add("Total input tokens:", s["input_toks"], "{:d}")
        add("Total generated tokens:", s["output_toks"], "{:d}")
        add("Request throughput (req/s):", s["request_throughput"])
        if "goodput" in s:
            add("Request goodput (req/s):", s["goodput"])
        add("Output token throughput (tok/s):", s["output_throughput"])
        add("Total token throughput (tok/s):", s["total_token_throughput"])
        if "prefix_hit_rate" in s:
            add("Prefix cache hit rate:", s["prefix_hit_rate"], "{:.1%}")
        for m, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                         ("itl", "Inter-token Latency"), ("e2e", "End-to-end Latency")):
            lines.append(f"{' ' + title + ' ':-^60}")
            for k in [c for c in s.index if c.startswith(m + "_") and c.endswith("_ms")]:
                stat = k[len(m) + 1:-3]
                add(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {m.upper()} (ms):", s[k])
        lines.append("=" * 60)
        pr = self.per_replica()
        if len(pr):
            with pd.option_context("display.width", 160, "display.max_columns", 20):
                lines.append(pr.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
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
    if x is None:
        return None
    try:
        return None if math.isnan(x) else float(x)
    except TypeError:
        return None
