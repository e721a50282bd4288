"""Read a vLLM server's Prometheus ``/metrics`` into one load snapshot per engine (DP rank).

Parsing uses prometheus_client's text parser; series are split by their ``engine`` label, so a
data-parallel group yields one :class:`EngineMetrics` per rank::

    snaps = parse_metrics(httpx.get(url + "/metrics").text)
    snaps["0"].running, snaps["0"].waiting, snaps["0"].kv_cache_usage

Older metric names (``vllm:gpu_cache_usage_perc``) are accepted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

# sample name -> attribute; the first name found wins (new names before old ones)
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
    scraped_at: float = field(default_factory=time.time)
    _seen: set = field(default_factory=set, repr=False, compare=False)


def parse_metrics(text: str, scraped_at: float | None = None) -> dict[str, EngineMetrics]:
    """Parse Prometheus text into ``{engine label: EngineMetrics}`` (label '0' if absent)."""
    at = scraped_at if scraped_at is not None else time.time()
    out: dict[str, EngineMetrics] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            attr = _GAUGES.get(s.name)
            counter = False
            if attr is None:
                attr = _COUNTERS.get(s.name)
                counter = True
            if attr is None:
                continue
            engine = s.labels.get("engine", "0")
            m = out.get(engine)
            if m is None:
                m = out[engine] = EngineMetrics(engine=engine, scraped_at=at)
            if counter:
                # counters with extra labels (finished_reason, ...) are summed
                key = (attr, s.name)
                if attr in m._seen and key not in m._seen:
                    continue  # an older alias of a counter already read
                m._seen.update({attr, key})
                setattr(m, attr, getattr(m, attr) + s.value)
            else:
                if attr in m._seen:
                    continue
                m._seen.add(attr)
                setattr(m, attr, s.value)
    return out


async def scrape(client: httpx.AsyncClient, url: str, timeout: float = 2.0) -> dict[str, EngineMetrics]:
    """GET ``url/metrics`` and parse it."""
    r = await client.get(f"{url}/metrics", timeout=timeout)
    r.raise_for_status()
    return parse_metrics(r.text)
