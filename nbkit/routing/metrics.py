"""Read a vLLM server's Prometheus ``/metrics`` into one load snapshot per engine (DP rank).

Parsing uses prometheus_client's text parser; series are split by their ``engine`` label, so a
data-parallel group yields one :class:`EngineMetrics` per rank::

    snaps = parse_metrics(text_of_metrics)       # or: await Probe().metrics(url) (nbkit.routing.probes)
    snaps["0"].running, snaps["0"].waiting, snaps["0"].kv_cache_usage

Older metric names (``vllm:gpu_cache_usage_perc``) are accepted.
"""

from __future__ import annotations

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
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:prompt_tokens_by_source_total":
                if s.labels.get("source") != "external_kv_transfer":
                    continue
                attr, counter = "external_kv_tokens", True
                per = values.setdefault(s.labels.get("engine", "0"), {})
                per[(attr, s.name)] = per.get((attr, s.name), 0.0) + s.value
                continue
            if s.name in _GAUGES:
                attr, counter = _GAUGES[s.name], False
            elif s.name in _COUNTERS:
                attr, counter = _COUNTERS[s.name], True
            else:
                continue
            per = values.setdefault(s.labels.get("engine", "0"), {})
            key = (attr, s.name)
            per[key] = per.get(key, 0.0) + s.value if counter else s.value
    out: dict[str, EngineMetrics] = {}
    for engine, per in values.items():
        m = out[engine] = EngineMetrics(engine=engine, scraped_at=at)
        for attr in {a for a, _ in per}:
            best = min((n for a, n in per if a == attr), key=_PRIORITY.__getitem__)
            setattr(m, attr, per[(attr, best)])
    return out
