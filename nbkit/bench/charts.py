"""altair charts of benchmark results.

    from nbkit.bench import charts
    charts.latency_cdf({"rr": res_rr, "prefix": res_pa}, "ttft_s")   # or cmp.chart("ttft_s")
    charts.throughput_vs_instances(cmp.table())                       # layouts with an "instances" column
    charts.replica_share_over_time(res, bin_s=5)                      # who served what, over the run
    chart.save("ttft.png")                                            # headless, through vl-convert

Each chart carries a bounded number of points (CDFs at 201 quantiles per series, shares per time
bin), so specs stay small in a notebook.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

_METRIC_TITLES = {"ttft_s": "TTFT (ms)", "tpot_s": "TPOT (ms)", "itl_s": "ITL (ms)", "e2e_s": "E2E latency (ms)",
                  "queue_wait_s": "queue wait (ms)"}


def _frames(results) -> dict:
    """label -> results frame (seconds) from a Comparison, a mapping, a BenchResult or a frame."""
    import pandas as pd
    from nbkit.bench.results import frame_in_unit

    if hasattr(results, "results") and isinstance(getattr(results, "results"), Mapping):
        results = results.results
    if isinstance(results, pd.DataFrame):
        if "label" in results.columns:
            return {k: frame_in_unit(g, "s") for k, g in results.groupby("label", sort=False)}
        return {"run": frame_in_unit(results, "s")}
    if hasattr(results, "frame"):
        return {results.label or "run": results.frame()}
    out = {}
    for k, v in dict(results).items():
        out[str(k)] = v.frame() if hasattr(v, "frame") else frame_in_unit(v, "s")
    return out


def _values(df, metric: str) -> np.ndarray:
    ok = df[df["outcome"] == "ok"]
    if metric == "itl_s":
        return np.asarray([x for v in ok["itl_s"] for x in v], dtype=float)
    if metric == "tpot_s":
        col = ok["tpot_s"]
    else:
        col = ok[metric]
    v = np.asarray(col.dropna(), dtype=float)
    return v


def cdf_frame(results, metric: str = "ttft_s", points: int = 201):
    """Long frame (label, ms, fraction) of each series' CDF, at ``points`` quantiles."""
    import pandas as pd

    if metric not in _METRIC_TITLES:
        raise ValueError(f"metric={metric!r}: choose from {list(_METRIC_TITLES)}")
    parts = []
    q = np.linspace(0, 1, points)
    for label, df in _frames(results).items():
        v = _values(df, metric)
        if not v.size:
            continue
        parts.append(pd.DataFrame({"label": label, "ms": np.quantile(v, q) * 1e3, "fraction": q}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["label", "ms", "fraction"])


def latency_cdf(results, metric: str = "ttft_s", *, log_x: bool = False, title: str | None = None,
                width: int = 420, height: int = 260):
    """Latency CDF per series (policy, layout, router): x = latency in ms, y = fraction of requests."""
    import altair as alt

    data = cdf_frame(results, metric)
    x = alt.X("ms:Q", title=_METRIC_TITLES[metric], scale=alt.Scale(type="log") if log_x else alt.Undefined)
    return (alt.Chart(data, title=title or f"{_METRIC_TITLES[metric].split(' (')[0]} CDF")
            .mark_line(interpolate="step-after")
            .encode(x=x, y=alt.Y("fraction:Q", title="fraction of requests", scale=alt.Scale(domain=[0, 1])),
                    color=alt.Color("label:N", title=None), tooltip=["label", "ms", "fraction"])
            .properties(width=width, height=height))


def throughput_vs_instances(table, *, y: str = "output_throughput", color: str = "policy", title: str | None = None,
                            width: int = 360, height: int = 240):
    """Throughput (``y``, a column of :meth:`Comparison.table`) against the ``instances`` column."""
    import altair as alt

    data = table.reset_index(names="label") if "label" not in table.columns else table
    if "instances" not in data.columns:
        raise ValueError("table has no 'instances' column: compare cluster layouts (compare(..., layouts=...))")
    enc = dict(x=alt.X("instances:O", title="instances"), y=alt.Y(f"{y}:Q", title=y.replace("_", " ")),
               tooltip=[c for c in ("label", "policy", "instances", y) if c in data.columns])
    if color in data.columns:
        enc["color"] = alt.Color(f"{color}:N", title=None)
    return (alt.Chart(data, title=title or f"{y.replace('_', ' ')} vs instances").mark_line(point=True)
            .encode(**enc).properties(width=width, height=height))


def share_frame(result, bin_s: float | None = None, by: str = "requests"):
    """Long frame (t_s, rank, share) of each replica's share of requests (or tokens) per time bin
    of the requests' send times."""
    import pandas as pd

    frames = _frames(result)
    if len(frames) != 1:
        raise ValueError(f"one run at a time: got {list(frames)}")
    df = next(iter(frames.values()))
    if df.empty:
        return pd.DataFrame(columns=["t_s", "rank", "share"])
    span = float(df["arrival_s"].max()) or 1.0
    bin_s = bin_s or max(span / 20.0, 1e-3)
    d = df.assign(t_s=(df["arrival_s"] // bin_s) * bin_s,
                  rank=df["rank"].replace("", "unknown"),
                  w=(df["input_toks"] + df["output_toks"]) if by == "tokens" else 1)
    g = d.groupby(["t_s", "rank"])["w"].sum().reset_index()
    g["share"] = g["w"] / g.groupby("t_s")["w"].transform("sum")
    return g[["t_s", "rank", "share"]]


def replica_share_over_time(result, bin_s: float | None = None, *, by: str = "requests", title: str | None = None,
                            width: int = 420, height: int = 200):
    """Stacked share of each replica over the run (time bins of ``bin_s`` seconds)."""
    import altair as alt

    data = share_frame(result, bin_s, by)
    return (alt.Chart(data, title=title or f"share of {by} per replica").mark_area()
            .encode(x=alt.X("t_s:Q", title="time since start (s)"),
                    y=alt.Y("share:Q", stack="normalize", title="share"),
                    color=alt.Color("rank:N", title=None), tooltip=["t_s", "rank", "share"])
            .properties(width=width, height=height))
