"""Request traces in the seed simulator's JSONL format, shared by the live benchmark and the simulator.

One JSON object per line, of either kind::

    {"input_toks": 512, "output_toks": 128, "arrival_time_ns": 0, "input_tok_ids": [1, 2, ...]}
    {"session_id": "s1", "arrival_time_ns": 5000000,
     "sub_requests": [{"input_toks": 300, "output_toks": 40, "tool_duration_ns": 2000000}, ...]}

A flat line is one request (``input_tok_ids`` is optional). Either kind may name its ``tenant``
and ``priority`` (``"interactive"``, ``"batch"`` or an integer), read by the simulator's admission
(:mod:`nbkit.sim.admission`). A session is an agentic conversation:
sub-request k+1 starts ``tool_duration_ns`` (of sub-request k) after sub-request k finishes, with
the conversation so far plus its own ``input_toks`` new tokens as the prompt.

    >>> from nbkit.traces import TraceRequest, read_trace, write_trace
    >>> write_trace("/tmp/t.jsonl", [TraceRequest(16, 8, 0), TraceRequest(32, 4, 1_000_000)])
    >>> [r.input_toks for r in read_trace("/tmp/t.jsonl")]
    [16, 32]

Bad lines raise :class:`TraceError` naming the file, the line and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

__all__ = ["TraceRequest", "SubRequest", "TraceSession", "TraceError", "iter_trace", "read_trace", "write_trace", "parse_line",
           "poisson_trace"]


class TraceError(ValueError):
    """A trace line that cannot be read; the message names the line and the field."""


@dataclass(frozen=True)
class TraceRequest:
    input_toks: int
    output_toks: int
    arrival_time_ns: int
    input_tok_ids: tuple[int, ...] | None = None
    tenant: str | None = None              # who sends it (the simulator's admission; bench.mix)
    priority: str | int | None = None      # "interactive", "batch" or an integer; None: the tenant's
    lora: str | None = None                # the LoRA adapter it names (the simulator's nbkit.sim.lora)


@dataclass(frozen=True)
class SubRequest:
    input_toks: int
    output_toks: int
    tool_duration_ns: int = 0


@dataclass(frozen=True)
class TraceSession:
    session_id: str
    arrival_time_ns: int
    sub_requests: tuple[SubRequest, ...]
    tenant: str | None = None
    priority: str | int | None = None
    lora: str | None = None


_WHO = {"tenant", "priority", "lora"}
_FLAT = {"input_toks", "output_toks", "arrival_time_ns", "input_tok_ids"} | _WHO
_SESSION = {"session_id", "arrival_time_ns", "sub_requests"} | _WHO
_SUB = {"input_toks", "output_toks", "tool_duration_ns"}


def _int(obj: dict, key: str, where: str, *, minimum: int = 0, required: bool = True, default: int = 0) -> int:
    if key not in obj:
        if required:
            raise TraceError(f"{where}: missing field {key!r}")
        return default
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise TraceError(f"{where}.{key}={v!r}: expected an integer")
    if v < minimum:
        raise TraceError(f"{where}.{key}={v!r}: must be >= {minimum}")
    return int(v)


def _unknown(obj: dict, allowed: set[str], where: str) -> None:
    if allowed.issuperset(obj):
        return
    extra = sorted(set(obj) - allowed)
    if extra:
        raise TraceError(f"{where}: unknown field(s) {', '.join(extra)} (expected some of {', '.join(sorted(allowed))})")


def _who(obj: dict, where: str) -> tuple[str | None, str | int | None, str | None]:
    t, p, lora = obj.get("tenant"), obj.get("priority"), obj.get("lora")
    if t is not None and (not isinstance(t, str) or not t):
        raise TraceError(f"{where}.tenant={t!r}: expected a non-empty string")
    if lora is not None and (not isinstance(lora, str) or not lora):
        raise TraceError(f"{where}.lora={lora!r}: expected an adapter's name")
    if p is not None and (isinstance(p, bool) or not isinstance(p, (str, int))):
        raise TraceError(f"{where}.priority={p!r}: expected a name (interactive, batch) or an integer")
    return t, p, lora


def parse_line(obj: Any, where: str = "line") -> TraceRequest | TraceSession:
    """One decoded JSON object -> a :class:`TraceRequest` or :class:`TraceSession`."""
    if type(obj) is dict and len(obj) == 3:     # the usual line, three counts: checked at once
        n_in, n_out, t = obj.get("input_toks"), obj.get("output_toks"), obj.get("arrival_time_ns")
        if type(n_in) is int and type(n_out) is int and type(t) is int and n_in >= 1 and n_out >= 1 and t >= 0:
            return TraceRequest(n_in, n_out, t)
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "sub_requests" in obj or "session_id" in obj:
        _unknown(obj, _SESSION, where)
        sid = obj.get("session_id")
        if not isinstance(sid, (str, int)) or isinstance(sid, bool):
            raise TraceError(f"{where}.session_id={sid!r}: expected a string")
        subs = obj.get("sub_requests")
        if not isinstance(subs, list) or not subs:
            raise TraceError(f"{where}.sub_requests: expected a non-empty list")
        parsed = []
        for k, s in enumerate(subs):
            w = f"{where}.sub_requests[{k}]"
            if not isinstance(s, dict):
                raise TraceError(f"{w}: expected a JSON object")
            _unknown(s, _SUB, w)
            parsed.append(SubRequest(_int(s, "input_toks", w, minimum=1), _int(s, "output_toks", w, minimum=1),
                                     _int(s, "tool_duration_ns", w, required=False)))
        return TraceSession(str(sid), _int(obj, "arrival_time_ns", where), tuple(parsed), *_who(obj, where))
    _unknown(obj, _FLAT, where)
    ids = obj.get("input_tok_ids")
    n_in = _int(obj, "input_toks", where, minimum=1)
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TraceError(f"{where}.input_tok_ids: expected a list of integers")
        if len(ids) != n_in:
            raise TraceError(f"{where}.input_tok_ids: has {len(ids)} ids but input_toks={n_in}")
        ids = tuple(ids)
    return TraceRequest(n_in, _int(obj, "output_toks", where, minimum=1), _int(obj, "arrival_time_ns", where), ids,
                        *_who(obj, where))


def iter_trace(path: str | os.PathLike) -> Iterator[TraceRequest | TraceSession]:
    """The items of a JSONL trace one by one, in file order (blank lines skipped): for a trace too
    large to hold, already sorted by arrival time. :func:`read_trace` reads it whole and sorts."""
    loads = json.loads
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{os.fspath(path)}:{n}: not valid JSON ({e.msg})") from None
            try:
                item = parse_line(obj)
            except TraceError:          # read again, naming the line (its name made only then)
                item = None
            yield item if item is not None else parse_line(obj, f"{os.fspath(path)}:{n}")


def read_trace(path: str | os.PathLike) -> list[TraceRequest | TraceSession]:
    """Read a JSONL trace, sorted by arrival time (stable). Blank lines are skipped."""
    items = list(iter_trace(path))
    items.sort(key=lambda r: r.arrival_time_ns)
    return items


def _to_json(item: TraceRequest | TraceSession) -> dict:
    d: dict[str, Any]
    if isinstance(item, TraceSession):
        d = {"session_id": item.session_id, "arrival_time_ns": item.arrival_time_ns,
             "sub_requests": [{"input_toks": s.input_toks, "output_toks": s.output_toks,
                               "tool_duration_ns": s.tool_duration_ns} for s in item.sub_requests]}
    else:
        d = {"input_toks": item.input_toks, "output_toks": item.output_toks, "arrival_time_ns": item.arrival_time_ns}
        if item.input_tok_ids is not None:
            d["input_tok_ids"] = list(item.input_tok_ids)
    for k in ("tenant", "priority", "lora"):
        if getattr(item, k) is not None:
            d[k] = getattr(item, k)
    return d


def write_trace(path: str | os.PathLike, items: Iterable[TraceRequest | TraceSession]) -> None:
    """Write items as JSONL (one object per line, in the order given)."""
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(_to_json(item), separators=(",", ":")) + "\n")


def poisson_trace(n: int, rate: float, input_toks: tuple[int, int] = (128, 1024),
                  output_toks: tuple[int, int] = (32, 256), *, seed: int = 0) -> list[TraceRequest]:
    """``n`` requests with Poisson arrivals at ``rate`` per second (the first at 0), prompt and
    output lengths uniform in the inclusive ranges; the same ``seed`` gives the same trace.

        >>> t = poisson_trace(1000, rate=10.0, seed=1)
        >>> round(t[-1].arrival_time_ns / 1e9 / 999, 1)          # mean gap ~ 1/rate
        0.1
    """
    import random

    if n < 0 or rate <= 0:
        raise ValueError(f"n={n!r}, rate={rate!r}: need n >= 0 and rate > 0")
    for name, (lo, hi) in (("input_toks", input_toks), ("output_toks", output_toks)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name}={(lo, hi)!r}: need 1 <= low <= high")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(TraceRequest(rng.randint(*input_toks), rng.randint(*output_toks), int(t * 1e9)))
        t += rng.expovariate(rate)
    return out
