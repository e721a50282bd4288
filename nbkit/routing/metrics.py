"""Read a vLLM server's Prometheus ``/metrics`` into one load snapshot per engine (DP rank).

Only the sample lines of the names nbkit reads are parsed: plain ones (``name{a="x",b="y"} 1.0``,
what vLLM writes) by one regular expression, anything else (escaped label values, odd spacing) by
prometheus_client's text parser, which took 2.2 ms for vLLM's 16 such lines here against the
expression's 0.4 ms (the router scrapes every replica four times a second). Series are split by their ``engine``
label, so a data-parallel group yields one :class:`EngineMetrics` per rank::

    snaps = parse_metrics(text_of_metrics)       # or: await Probe().metrics(url) (nbkit.routing.probes)
    snaps["0"].running, snaps["0"].waiting, snaps["0"].kv_cache_usage

Older metric names (``vllm:gpu_cache_usage_perc``) are accepted.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

# sample name -> attribute; for several names of one attribute, the first listed wins
_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
    "vllm:cpu_cache_usage_perc": "kv_cache_usage",
}
_COUNTERS = {
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:request_success_total": "requests_finished",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:gpu_prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:gpu_prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:external_prefix_cache_hits_total": "external_prefix_cache_hits",
}
#: every sample name nbkit reads (what a probe asks the server-side filter for)
METRIC_NAMES = (*_GAUGES, *_COUNTERS, "vllm:prompt_tokens_by_source_total")
_PRIORITY = {name: k for k, name in enumerate(METRIC_NAMES)}
# sample lines worth parsing: "<name>{" or "<name> " for the names above (vLLM's /metrics has ~600
# lines, mostly histogram buckets; parsing all of them costs ~8 ms, these few well under 1 ms)
_LINE_PREFIXES = tuple(f"{name}{sep}" for name in _PRIORITY for sep in ("{", " "))


def relevant_lines(text: str) -> str:
    """Only the sample lines :func:`parse_metrics` reads (comments and other families dropped)."""
    return "\n".join(line for line in text.splitlines() if line.startswith(_LINE_PREFIXES)) + "\n"


# a sample line as vLLM writes it: name, labels without escapes or braces inside, a value, maybe a timestamp
_PLAIN = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^{}\\]*)\})? ([^ ]+)(?: -?[0-9]+)?')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"(?:,|$)')


def samples(text: str):
    """``(name, labels, value)`` of every sample line of ``text`` (comment lines skipped): plain
    lines by :data:`_PLAIN`, any other by prometheus_client's parser; the same samples as that
    parser gives for the lines without their comments.

        >>> list(samples('vllm:num_requests_running{engine="0",model_name="m"} 3.0\\n'))
        [('vllm:num_requests_running', {'engine': '0', 'model_name': 'm'}, 3.0)]
    """
    odd = []
    for line in text.splitlines():
        m = _PLAIN.fullmatch(line)
        if m is None:
            if line and not line.startswith("#"):
                odd.append(line)
            continue
        name, raw, value = m.groups()
        labels = {}
        if raw:
            end = 0
            for lm in _LABEL.finditer(raw):
                if lm.start() != end:
                    break
                labels[lm.group(1)] = lm.group(2)
                end = lm.end()
            if end != len(raw):
                odd.append(line)
                continue
        try:
            yield name, labels, float(value)
        except ValueError:
            odd.append(line)
    if odd:
        for family in text_string_to_metric_families("\n".join(odd) + "\n"):
            for s in family.samples:
                yield s.name, s.labels, s.value


@dataclass
class EngineMetrics:
    """Load and counters of one engine (one DP rank) at ``scraped_at`` (time.time())."""

    engine: str = "0"
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    requests_finished: float = 0.0
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    external_prefix_cache_hits: float = 0.0
    external_kv_tokens: float = 0.0  # prompt tokens whose KV came from a KV connector (PD split)
    scraped_at: float = field(default_factory=time.time)


def parse_metrics(text: str, scraped_at: float | None = None) -> dict[str, EngineMetrics]:
    """Parse Prometheus text into ``{engine label: EngineMetrics}`` (label '0' if absent).

    When a metric appears under several names (new and old), the name listed first in
    ``_GAUGES``/``_COUNTERS`` wins, whatever order the text has. Counters with extra labels
    (``finished_reason``, ...) are summed.
    """
    at = scraped_at if scraped_at is not None else time.time()
    text = relevant_lines(text)
    # engine -> attr -> (priority, name) chosen so far, and the running value per (attr, name)
    values: dict[str, dict[tuple[str, str], float]] = {}
    for name, labels, value in samples(text):
        if name == "vllm:prompt_tokens_by_source_total":
            if labels.get("source") != "external_kv_transfer":
                continue
            attr, counter = "external_kv_tokens", True
            per = values.setdefault(labels.get("engine", "0"), {})
            per[(attr, name)] = per.get((attr, name), 0.0) + value
            continue
        if name in _GAUGES:
            attr, counter = _GAUGES[name], False
        elif name in _COUNTERS:
            attr, counter = _COUNTERS[name], True
        else:
            continue
        per = values.setdefault(labels.get("engine", "0"), {})
        key = (attr, name)
        per[key] = per.get(key, 0.0) + value if counter else value
    out: dict[str, EngineMetrics] = {}
    for engine, per in values.items():
        m = out[engine] = EngineMetrics(engine=engine, scraped_at=at)
        for attr in {a for a, _ in per}:
            best = min((n for a, n in per if a == attr), key=_PRIORITY.__getitem__)
            setattr(m, attr, per[(attr, best)])
    return out
