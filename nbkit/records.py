"""One per-request record for the benchmark and the simulator: the CSV, TPOT, percentiles and the
summary statistics.

A :class:`RequestResult` is one request as the load generator measured it (:mod:`nbkit.bench`) or
as the simulator produced it (:mod:`nbkit.sim`). Both write and read the same CSV::

    >>> import os, tempfile
    >>> from nbkit.records import RequestResult, format_summary, read_csv, summarize, write_csv
    >>> r = RequestResult("0", instance_id=1, rank="inst1", policy="least_load", arrival_s=0.5,
    ...                   ttft_s=0.25, itl_s=[0.25, 0.25], e2e_s=0.75, input_toks=100, output_toks=3)
    >>> r.tpot_s                                  # (e2e - ttft) / (output - 1)
    0.25
    >>> path = os.path.join(tempfile.mkdtemp(), "r.csv")
    >>> write_csv([r], path, time_unit="ns")      # or "s", the default
    >>> print(open(path).read().splitlines()[1])
    0,1,inst1,least_load,500000000,,250000000,250000000,"[250000000,250000000]",750000000,100,3,ok
    >>> back = read_csv(path)[0]
    >>> back.ttft_s, back.itl_s, back.instance_id
    (0.25, [0.25, 0.25], 1)
    >>> s = summarize([r])
    >>> s["completed"], s["output_throughput"], s["ttft_s"]["p99"]
    (1, 4.0, 0.25)
    >>> print(format_summary(s).splitlines()[2])
    Successful requests:                                       1

CSV columns (``time_unit="s"``)::

    request_id, instance_id, rank, policy, arrival_s, queue_wait_s, ttft_s, tpot_s, itl_s, e2e_s,
    input_toks, output_toks, outcome

With ``time_unit="ns"`` (the seed simulator's format) the time columns are named ``*_ns`` and hold
integer nanoseconds. Unknown values are empty cells; ``itl`` is a JSON list; seconds are written
exactly (``repr``). :func:`read_csv` reads both units back into seconds.

Definitions (as ``vllm bench serve``): TTFT from sending the request to its first streamed token;
ITL the gaps between later tokens; E2E to the last token; TPOT = (E2E - TTFT) / (output - 1),
empty when output <= 1; percentiles are numpy's (linear interpolation); ITL statistics pool every
gap of every completed request; throughputs count completed requests over the run's duration
(first send to last finish); goodput counts the completed requests within every given SLO.

This module imports nothing else of nbkit, and numpy only when statistics are computed.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["RequestResult", "CSV_COLUMNS", "TIME_COLUMNS", "METRICS", "DEFAULT_PERCENTILES", "column_names",
           "csv_time_unit", "tpot", "write_csv", "CsvWriter", "read_csv", "percentile", "stats", "weighted_stats",
           "parse_slos", "summarize", "Summarizer", "format_summary"]

#: the CSV's columns, in order (seconds); with time_unit="ns" the ``*_s`` ones become ``*_ns``
CSV_COLUMNS = ("request_id", "instance_id", "rank", "policy", "arrival_s", "queue_wait_s", "ttft_s", "tpot_s",
               "itl_s", "e2e_s", "input_toks", "output_toks", "outcome")
TIME_COLUMNS = ("arrival_s", "queue_wait_s", "ttft_s", "tpot_s", "itl_s", "e2e_s")
#: the latency metrics of a summary, in the order they are printed
METRICS = ("ttft", "tpot", "itl", "e2e")
DEFAULT_PERCENTILES = (50, 90, 99)


def _check_unit(time_unit: str) -> None:
    if time_unit not in ("s", "ns"):
        raise ValueError(f"time_unit={time_unit!r}: choose 's' or 'ns'")


def column_names(time_unit: str = "s") -> list[str]:
    """The CSV's header in ``time_unit`` ("s" or "ns")."""
    _check_unit(time_unit)
    return [c[:-2] + "_ns" if time_unit == "ns" and c in TIME_COLUMNS else c for c in CSV_COLUMNS]


@dataclass(slots=True)
class RequestResult:
    """One request: the CSV's fields (times in seconds: ``arrival_s`` from the run's start, the
    others from the request's arrival) and what either side knows beyond them.

    The load generator numbers its requests (``request_id`` an int); the simulator and
    :func:`read_csv` give strings (``"3"``, ``"<session>/<turn>"``)."""

    request_id: int | str
    instance_id: int | None = None     # replica (instance) index; None if unknown
    rank: str = ""                     # "replica0", "replica0/dp1", "inst3"; "" if unknown
    policy: str = ""
    arrival_s: float = 0.0
    queue_wait_s: float | None = None  # router admission wait (bench: through the in-kernel client);
    #                                    simulator: arrival to the first scheduled step
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    input_toks: int = 0
    output_toks: int = 0
    outcome: str = "ok"                # ok | error | timeout | cancelled | http_<status>
    # not in the CSV
    error: str = ""
    session_id: str = ""               # the conversation (bench's multi-turn sessions, the trace's sessions)
    turn: int = 0                      # the turn within it
    group: int | None = None           # the workload item's group (shared_prefix: which system prompt)
    prefill_instance: int | None = None  # simulator, prefill/decode split: the prefill instance
    cached_tokens: int = 0             # simulator: prompt tokens found in the prefix cache
    preemptions: int = 0               # simulator: times the request was preempted
    tenant: str = ""                   # who sent it (bench.mix, the simulator's tenants); "" if unknown

    @property
    def tpot_s(self) -> float | None:
        return tpot(self.e2e_s, self.ttft_s, self.output_toks)

    ok = property(lambda self: self.outcome == "ok")

    def row(self) -> dict[str, Any]:
        """Every field by name, plus ``tpot_s``."""
        d = {f: getattr(self, f) for f in _FIELDS}
        d["tpot_s"] = self.tpot_s
        return d


_FIELDS = tuple(f.name for f in fields(RequestResult))


def tpot(e2e_s: float | None, ttft_s: float | None, output_toks: int) -> float | None:
    """Time per output token after the first: ``(e2e - ttft) / (output - 1)``; None when output <= 1.

        >>> tpot(2.0, 0.5, 4), tpot(1.0, 0.2, 1)
        (0.5, None)
    """
    if e2e_s is None or ttft_s is None or output_toks is None or output_toks <= 1:
        return None
    return (e2e_s - ttft_s) / (output_toks - 1)


# -- CSV --------------------------------------------------------------------------------------------
def _known(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))  # NaN (from a frame): unknown too


def write_csv(rows: Iterable[RequestResult], path: str | os.PathLike, time_unit: str = "s") -> None:
    """Write ``rows`` as the CSV (see the module doc); in ``time_unit="ns"`` TPOT is computed from
    the integer E2E and TTFT, so a file read back and written again is the same file."""
    with CsvWriter(path, time_unit) as w:
        for r in rows:
            w.write(r)


class CsvWriter:
    """The CSV written one row at a time (a run that streams its rows as requests finish)::

        with CsvWriter("out.csv", time_unit="s", token_detail=False) as w:
            w.write(result)             # a RequestResult

    ``token_detail=False`` leaves the ``itl`` cells empty (unknown; :func:`read_csv` reads ``[]``):
    a row then costs nothing per token. ``rows`` counts the rows written."""

    def __init__(self, path: str | os.PathLike, time_unit: str = "s", token_detail: bool = True):
        _check_unit(time_unit)
        self.ns = time_unit == "ns"
        self.token_detail = token_detail
        self.rows = 0
        parent = os.path.dirname(os.fspath(path))
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._f = open(path, "w", newline="", encoding="utf-8")
        self._w = csv.writer(self._f)
        self._w.writerow(column_names(time_unit))

    def write(self, r: RequestResult) -> None:
        ns = self.ns
        if ns:
            e, ft = _t_ns(r.e2e_s), _t_ns(r.ttft_s)
            tp = tpot(e, ft, r.output_toks)
            tp_cell = "" if tp is None else str(int(round(tp)))
            itl = (json.dumps([int(round(x * 1e9)) for x in r.itl_s], separators=(",", ":"))
                   if self.token_detail else "")
            t = _cell_ns
        else:
            itl = json.dumps([float(x) for x in r.itl_s], separators=(",", ":")) if self.token_detail else ""
            tp_cell = _cell_s(r.tpot_s)
            t = _cell_s
        inst = r.instance_id
        self._w.writerow([r.request_id, "" if inst is None or inst < 0 else int(inst), r.rank, r.policy,
                          t(r.arrival_s), t(r.queue_wait_s), t(r.ttft_s), tp_cell, itl, t(r.e2e_s),
                          int(r.input_toks), int(r.output_toks), r.outcome])
        self.rows += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "CsvWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _cell_s(x) -> str:
    return repr(float(x)) if _known(x) else ""


def _cell_ns(x) -> str:
    return str(int(round(x * 1e9))) if _known(x) else ""


def _t_ns(x) -> int | None:
    return int(round(x * 1e9)) if _known(x) else None


def _unit_of(columns: Sequence[str], path) -> str:
    if "ttft_ns" in columns:
        return "ns"
    if "ttft_s" in columns:
        return "s"
    raise ValueError(f"{os.fspath(path)}: columns {list(columns)} are not the results columns "
                     f"{list(CSV_COLUMNS)} (no ttft_s or ttft_ns column)")


def csv_time_unit(path: str | os.PathLike) -> str:
    """The time unit a results CSV was written in: "s" or "ns" (from its header)."""
    with open(path, newline="", encoding="utf-8") as f:
        return _unit_of(next(csv.reader(f), []), path)


def read_csv(path: str | os.PathLike) -> list[RequestResult]:
    """Read a results CSV written in seconds (``*_s``) or nanoseconds (``*_ns``), in either case
    back into seconds. ``queue_wait``, ``itl``, ``tpot``, ``instance_id``, ``rank``, ``policy``
    and ``outcome`` may be missing (TPOT is always recomputed); an ``instance_id`` below 0 (older
    files) reads as unknown."""
    name = os.fspath(path)
    with open(path, newline="", encoding="utf-8") as f:
        rd = csv.DictReader(f)
        cols = rd.fieldnames or []
        unit = _unit_of(cols, path)
        div = 1e9 if unit == "ns" else 1.0
        missing = [c for c in ("request_id", f"arrival_{unit}", f"ttft_{unit}", f"e2e_{unit}", "input_toks",
                               "output_toks") if c not in cols]
        if missing:
            raise ValueError(f"{name}: missing column(s) {', '.join(missing)} of the results columns "
                             f"{column_names(unit)}")

        def num(row, col, line):
            v = row.get(col)
            if v is None or v == "":
                return None
            try:
                return float(v) / div
            except ValueError:
                raise ValueError(f"{name}:{line}: {col}={v!r} is not a number") from None

        arrival, queue, ttft, e2e, itl_col = (f"{c}_{unit}" for c in ("arrival", "queue_wait", "ttft", "e2e", "itl"))
        out = []
        for line, row in enumerate(rd, 2):
            try:
                itl = [float(x) / div for x in json.loads(row.get(itl_col) or "[]")]
            except (ValueError, TypeError):
                raise ValueError(f"{name}:{line}: {itl_col} is not a JSON list of numbers") from None
            inst = row.get("instance_id") or ""
            try:
                instance_id = int(float(inst)) if inst else None
            except ValueError:
                instance_id = None
            if instance_id is not None and instance_id < 0:  # older files wrote -1 for unknown
                instance_id = None
            out.append(RequestResult(
                request_id=row["request_id"], instance_id=instance_id, rank=row.get("rank") or "",
                policy=row.get("policy") or "",
                arrival_s=num(row, arrival, line) or 0.0, queue_wait_s=num(row, queue, line),
                ttft_s=num(row, ttft, line), itl_s=itl, e2e_s=num(row, e2e, line),
                input_toks=int(float(row.get("input_toks") or 0)), output_toks=int(float(row.get("output_toks") or 0)),
                outcome=row.get("outcome") or "ok"))
        return out


# -- statistics -------------------------------------------------------------------------------------
def _values(values):
    """``values`` without None and NaN, as a float array."""
    import numpy as np

    if isinstance(values, np.ndarray):
        v = values.astype(float, copy=False)
    else:
        v = np.fromiter((x for x in values if x is not None), dtype=float)
    return v[~np.isnan(v)]


def percentile(values: Iterable[float | None], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` as numpy computes it by default (linear
    interpolation between the closest ranks); None and NaN are left out; NaN when nothing is left.

        >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([], 90)
        (2.5, nan)
    """
    import numpy as np

    v = _values(values)
    return float(np.percentile(v, q)) if v.size else math.nan


def stats(values: Iterable[float | None], percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
    """``{"mean", "median", "p90", "p99", ...}`` of ``values`` (one ``pXX`` per percentile other
    than 50); NaN for no values.

        >>> stats([1.0, 2.0, 3.0, 4.0], (50, 75))
        {'mean': 2.5, 'median': 2.5, 'p75': 3.25}
    """
    v = _values(values)
    out = {"mean": float(v.mean()) if v.size else math.nan, "median": percentile(v, 50)}
    for q in percentiles:
        if q != 50:
            out[f"p{q:g}"] = percentile(v, q)
    return out


def parse_slos(slos) -> dict[str, float]:
    """SLOs in seconds by metric: ``{"ttft": 0.5, "tpot": 0.05, "e2e": 10}``; keys may also be
    ``ttft_ms``/``ttft_s``, or a string ``"ttft:500 tpot:50"`` in ms (``vllm bench serve --goodput``).

        >>> parse_slos("ttft:500 e2el:2000")
        {'ttft': 0.5, 'e2e': 2.0}
    """
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


def _within(r: RequestResult, slo: Mapping[str, float]) -> bool:
    if "ttft" in slo and not (r.ttft_s is not None and r.ttft_s <= slo["ttft"]):
        return False
    tp = r.tpot_s
    if "tpot" in slo and tp is not None and not tp <= slo["tpot"]:  # no TPOT (one token): passes
        return False
    return not ("e2e" in slo and not (r.e2e_s is not None and r.e2e_s <= slo["e2e"]))


def summarize(rows: Sequence[RequestResult], duration_s: float | None = None, *, slos=None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, Any]:
    """A run's figures: ``requests``, ``completed``, ``failed``, ``duration_s``, ``input_toks``,
    ``output_toks`` (of the completed requests), ``request_throughput``, ``output_throughput``,
    ``total_token_throughput`` (per second), with ``slos`` (see :func:`parse_slos`)
    ``good_requests`` and ``goodput``; then :func:`stats` in seconds of ``ttft_s``, ``tpot_s``,
    ``itl_s`` and ``e2e_s`` (completed requests), and ``queue_wait_s`` (mean, p99) where known.

    ``duration_s`` defaults to the first arrival to the last finish (``arrival + e2e``);
    throughputs are NaN over no time."""
    rows = list(rows)
    ok = [r for r in rows if r.outcome == "ok"]
    if duration_s is None:
        ends = [r.arrival_s + r.e2e_s for r in rows if r.e2e_s is not None]
        duration_s = max(ends) - min(r.arrival_s for r in rows) if ends else 0.0
    dur = float(duration_s) if duration_s and duration_s > 0 else math.nan
    in_toks = sum(r.input_toks for r in ok)
    out_toks = sum(r.output_toks for r in ok)
    s: dict[str, Any] = {
        "requests": len(rows), "completed": len(ok), "failed": len(rows) - len(ok), "duration_s": float(duration_s),
        "input_toks": in_toks, "output_toks": out_toks, "request_throughput": len(ok) / dur,
        "output_throughput": out_toks / dur, "total_token_throughput": (in_toks + out_toks) / dur,
    }
    slo = parse_slos(slos)
    if slo:
        good = sum(1 for r in ok if _within(r, slo))
        s["good_requests"] = good
        s["goodput"] = good / dur
    s["ttft_s"] = stats((r.ttft_s for r in ok), percentiles)
    s["tpot_s"] = stats((r.tpot_s for r in ok), percentiles)
    s["itl_s"] = stats((x for r in ok for x in r.itl_s), percentiles)
    s["e2e_s"] = stats((r.e2e_s for r in ok), percentiles)
    qw = [r.queue_wait_s for r in rows if _known(r.queue_wait_s)]
    if qw:
        s["queue_wait_s"] = {"mean": sum(qw) / len(qw), "p99": percentile(qw, 99)}
    return s


def _weighted_percentile(values, cum, q: float) -> float:
    """:func:`percentile` of the multiset holding ``cum[i] - cum[i-1]`` copies of ``values[i]``
    (``values`` sorted, ``cum`` the cumulative counts): numpy's linear method, to the bit."""
    import numpy as np

    n = int(cum[-1]) if len(cum) else 0
    if n == 0:
        return math.nan
    vi = np.asanyarray((n - 1) * np.true_divide(q, 100))
    if vi >= n - 1:
        return float(values[-1])
    prev = np.floor(vi)
    gamma = vi - prev
    k = int(prev)
    i, j = np.searchsorted(cum, [k, k + 1], side="right")
    a, b = values[i], values[j]
    diff = np.subtract(b, a)
    out = b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma
    return float(out)


def weighted_stats(values, counts, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
    """:func:`stats` of ``counts[i]`` copies of each ``values[i]`` without making the copies (the
    percentiles exactly as numpy's on the copies; the mean up to rounding).

        >>> weighted_stats([3.0, 1.0, 2.0], [1, 2, 1], (50, 75)) == stats([3.0, 1.0, 1.0, 2.0], (50, 75))
        True
    """
    import numpy as np

    v = np.asarray(values, dtype=float)
    c = np.asarray(counts, dtype=np.int64)
    if len(c) and (c.min() <= 0 or np.isnan(v).any()):
        keep = (c > 0) & ~np.isnan(v)
        v, c = v[keep], c[keep]
    order = np.argsort(v, kind="stable")
    v, c = v[order], c[order]
    del order
    n = int(c.sum())
    mean = float(np.dot(v, c) / n) if n else math.nan
    cum = np.cumsum(c, out=c)       # c is a copy: its room is reused
    out = {"mean": mean, "median": _weighted_percentile(v, cum, 50)}
    for q in percentiles:
        if q != 50:
            out[f"p{q:g}"] = _weighted_percentile(v, cum, q)
    return out


class Summarizer:
    """:func:`summarize` of rows seen one at a time, keeping a few numbers per request and none per
    token: a run that streams its rows (to a :class:`CsvWriter`) still gets its summary::

        >>> rows = [RequestResult(str(k), arrival_s=k * 0.1, ttft_s=0.2 + k / 100, itl_s=[0.01] * 3,
        ...                       e2e_s=0.3 + k / 50, output_toks=4) for k in range(5)]
        >>> acc = Summarizer()
        >>> for r in reversed(rows):               # any order: as requests finish
        ...     acc.add(r)
        >>> acc.summary() == summarize(rows)
        True

    ``add(r, itl=False)`` leaves ``r.itl_s`` out; :meth:`add_itl` takes gaps as ``(values, counts)``
    instead (the simulator's step gaps, each shared by the requests with a token in both steps).
    The figures are :func:`summarize`'s on the rows sorted by arrival (the ITL mean from counted
    gaps up to rounding)."""

    def __init__(self, *, slos=None, percentiles: Sequence[float] = DEFAULT_PERCENTILES):
        from array import array

        self.slo = parse_slos(slos)
        self.percentiles = tuple(percentiles)
        self.requests = self.completed = self.good = self.input_toks = self.output_toks = 0
        self.first_arrival = math.inf
        self.last_end: float | None = None
        # per completed row: arrival (to restore arrival order), ttft, tpot, e2e (NaN: unknown)
        self._ok = [array("d") for _ in range(4)]
        self._qw = (array("d"), array("d"))         # arrival, queue wait of rows that know it
        self._itl = array("d")                       # gaps given one by one, in row order
        self._itl_rows = (array("d"), array("q"))    # arrival and gap count of each row that gave gaps
        self._counted: list[tuple[Any, Any]] = []    # (values, counts) from add_itl
        self._itl_cache: dict[str, float] | None = None

    def add(self, r: RequestResult, itl: bool = True) -> None:
        """Count one row (in any order)."""
        self.requests += 1
        a = r.arrival_s
        if a < self.first_arrival:
            self.first_arrival = a
        if r.e2e_s is not None:
            end = a + r.e2e_s
            if self.last_end is None or end > self.last_end:
                self.last_end = end
        if _known(r.queue_wait_s):
            self._qw[0].append(a)
            self._qw[1].append(r.queue_wait_s)
        if r.outcome != "ok":
            return
        self.completed += 1
        self.input_toks += r.input_toks
        self.output_toks += r.output_toks
        if self.slo and _within(r, self.slo):
            self.good += 1
        arr, ttft, tp, e2e = self._ok
        nan = math.nan
        arr.append(a)
        ttft.append(nan if r.ttft_s is None else r.ttft_s)
        t = r.tpot_s
        tp.append(nan if t is None else t)
        e2e.append(nan if r.e2e_s is None else r.e2e_s)
        if itl and r.itl_s:
            self._itl_cache = None
            self._itl.extend(r.itl_s)
            self._itl_rows[0].append(a)
            self._itl_rows[1].append(len(r.itl_s))

    def add_itl(self, values, counts=None) -> None:
        """Inter-token gaps of completed rows: ``counts[i]`` copies of ``values[i]`` (all 1 if None)."""
        import numpy as np
        v = np.asarray(values, dtype=float)
        c = np.ones(len(v), dtype=np.int64) if counts is None else np.asarray(counts, dtype=np.int64)
        if len(v):
            self._counted.append((v, c))
            self._itl_cache = None

    def summary(self, duration_s: float | None = None) -> dict[str, Any]:
        """The figures of :func:`summarize` for the rows added so far."""
        import numpy as np
        if duration_s is None:
            duration_s = self.last_end - self.first_arrival if self.last_end is not None else 0.0
        dur = float(duration_s) if duration_s and duration_s > 0 else math.nan
        n_ok, in_toks, out_toks = self.completed, self.input_toks, self.output_toks
        s: dict[str, Any] = {
            "requests": self.requests, "completed": n_ok, "failed": self.requests - n_ok,
            "duration_s": float(duration_s), "input_toks": in_toks, "output_toks": out_toks,
            "request_throughput": n_ok / dur, "output_throughput": out_toks / dur,
            "total_token_throughput": (in_toks + out_toks) / dur,
        }
        if self.slo:
            s["good_requests"] = self.good
            s["goodput"] = self.good / dur
        arr, ttft, tp, e2e = (np.frombuffer(x, dtype=float) if len(x) else np.zeros(0) for x in self._ok)
        order = np.argsort(arr, kind="stable")
        pct = self.percentiles
        s["ttft_s"] = stats(ttft[order], pct)
        s["tpot_s"] = stats(tp[order], pct)
        if self._itl_cache is None:     # summary() is often asked twice (figures, then text)
            self._itl_cache = self._itl_stats()
        s["itl_s"] = dict(self._itl_cache)
        s["e2e_s"] = stats(e2e[order], pct)
        qa, qv = self._qw
        if len(qv):
            o = np.argsort(np.frombuffer(qa, dtype=float), kind="stable")
            qw = np.frombuffer(qv, dtype=float)[o].tolist()
            s["queue_wait_s"] = {"mean": sum(qw) / len(qw), "p99": percentile(qw, 99)}
        return s

    def _itl_stats(self) -> dict[str, float]:
        import numpy as np
        raw = np.frombuffer(self._itl, dtype=float) if len(self._itl) else np.zeros(0)
        if not self._counted:       # every gap one by one: pooled in arrival order, as summarize does
            if len(raw):
                ra = np.frombuffer(self._itl_rows[0], dtype=float)
                rn = np.frombuffer(self._itl_rows[1], dtype=np.int64)
                starts = np.cumsum(rn) - rn
                o = np.argsort(ra, kind="stable")
                lo = rn[o]
                idx = np.repeat(starts[o] - (np.cumsum(lo) - lo), lo) + np.arange(int(lo.sum()))
                raw = raw[idx]
            return stats(raw, self.percentiles)
        vals = [raw] + [v for v, _ in self._counted]
        cnts = [np.ones(len(raw), dtype=np.int64)] + [c for _, c in self._counted]
        return weighted_stats(np.concatenate(vals), np.concatenate(cnts), self.percentiles)


_TITLES = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
           ("itl", "Inter-token Latency"), ("e2e", "End-to-end Latency"))


def format_summary(s: Mapping[str, Any], title: str = "nbkit") -> str:
    """:func:`summarize`'s figures as text in ``vllm bench serve``'s layout (milliseconds), with
    ``policy``, ``prefix_hit_rate`` and ``preemptions`` where ``s`` has them; unknown (NaN)
    figures are left out."""
    lines = [f"{' ' + title + ' ':=^60}"]

    def add(name, value, fmt="{:.2f}"):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        lines.append(f"{name:<44}{fmt.format(value):>16}")

    add("Policy:", s.get("policy") or "-", "{}")
    add("Successful requests:", s["completed"], "{:d}")
    add("Failed requests:", s["failed"], "{:d}")
    add("Benchmark duration (s):", s["duration_s"])
    add("Total input tokens:", s["input_toks"], "{:d}")
    add("Total generated tokens:", s["output_toks"], "{:d}")
    add("Request throughput (req/s):", s["request_throughput"])
    add("Request goodput (req/s):", s.get("goodput"))
    add("Output token throughput (tok/s):", s["output_throughput"])
    add("Total token throughput (tok/s):", s["total_token_throughput"])
    add("Prefix cache hit rate:", s.get("prefix_hit_rate"), "{:.1%}")
    if s.get("preemptions"):
        add("Preemptions:", s["preemptions"], "{:d}")
    for m, name in _TITLES:
        lines.append(f"{' ' + name + ' ':-^60}")
        for stat, v in s[f"{m}_s"].items():
            label = stat.capitalize() if stat in ("mean", "median") else stat.upper()
            add(f"{label} {m.upper()} (ms):", v * 1e3)
    lines.append("=" * 60)
    return "\n".join(lines)
