"""Probes: ``GET /health`` and ``GET /metrics`` of replicas over one pooled transport.

Every reader of a replica's state goes through a :class:`Probe`: the router's scraper and health
checks, the Cluster's start-up wait, ``status()`` and ``metrics()``, the monitor when no router
has a fresh reading, and the benchmark's before/after counters::

    probe = Probe()                          # make it on the loop that will use it
    ok = await probe.health("http://127.0.0.1:8100")            # True on 200, False otherwise
    snaps = await probe.metrics("http://127.0.0.1:8100")        # {engine label: EngineMetrics}
    snaps["0"].running, snaps["0"].kv_cache_usage
    await probe.aclose()

``/metrics`` is asked with the server-side filter of prometheus_client's exposition
(``/metrics?name[]=vllm:num_requests_running&...``, the sample names of
:data:`nbkit.routing.metrics.METRIC_NAMES`), so a server that honours it renders a few dozen lines
instead of several hundred. vLLM 0.32.0's API server alone does not: it answers the filtered
query in full (430 series lines, 60 kB), and the parser keeps what it needs; the replicas a Cluster
starts run with nbkit's middleware (:mod:`nbkit.cluster.metrics_filter`), which answers it with the
16 lines asked for: 1.3 instead of 10.8 ms of the API server's CPU per scrape
(``benchmarks/metrics_scrape.py``). A server whose filtered answer holds none of those series
(prometheus_client's multiprocess mode) is asked without the filter from then on, and the probe
logs it once.
"""

from __future__ import annotations

import logging
from urllib.parse import urlencode

from nbkit.http.transport import DEFAULT_TRANSPORT, Transport, make_transport
from nbkit.routing.metrics import METRIC_NAMES, EngineMetrics, parse_metrics

log = logging.getLogger(__name__)

#: Seconds a /metrics or /health probe may take.
PROBE_TIMEOUT_S = 2.0
#: The query that asks a replica for just the series nbkit reads.
METRICS_QUERY = "?" + urlencode([("name[]", n) for n in METRIC_NAMES])


class ProbeError(RuntimeError):
    """A probe failed: the replica did not answer, or answered with an error status."""


class Probe:
    """``/health`` and ``/metrics`` of replicas over one keep-alive transport (see the module doc).

    ``transport``: a name (``"http1"``, the default: the least CPU per GET), a
    :class:`~nbkit.http.transport.Transport` or an ``httpx.AsyncClient`` (not closed by the probe).
    ``filtered=False`` never uses the server-side filter. A probe's transport belongs to the event
    loop that first uses it.
    """

    def __init__(self, transport=DEFAULT_TRANSPORT, *, timeout: float = PROBE_TIMEOUT_S, filtered: bool = True,
                 max_connections: int = 64):
        self._spec = transport
        self._own = transport is None or isinstance(transport, str)
        self._transport: Transport | None = None
        self.timeout = timeout
        self.filtered = filtered
        self._unfiltered: set[str] = set()  # servers whose filtered answer was empty
        self.max_connections = max_connections

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = make_transport(self._spec or DEFAULT_TRANSPORT, timeout=self.timeout,
                                             connect_timeout=self.timeout, max_connections=self.max_connections)
        return self._transport

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What a failed exchange raises (besides :class:`ProbeError`)."""
        return self.transport.errors

    async def get(self, url: str, timeout: float | None = None) -> tuple[int, bytes]:
        """GET ``url``: status and whole body (the connection is kept for the next probe)."""
        r = await self.transport.send("GET", url, timeout=timeout or self.timeout)
        try:
            return r.status_code, await r.aread()
        finally:
            await r.aclose()

    async def health(self, url: str, timeout: float | None = None) -> bool:
        """True if ``url/health`` answers 200; False on any other status or a failed exchange."""
        try:
            return (await self.get(f"{url}/health", timeout))[0] == 200
        except self.errors:
            return False

    async def metrics(self, url: str, timeout: float | None = None) -> dict[str, EngineMetrics]:
        """``url/metrics`` parsed: ``{engine label: EngineMetrics}`` (label ``"0"`` without DP).

        Raises :class:`ProbeError` on an error status or a failed exchange."""
        filtered = self.filtered and url not in self._unfiltered
        text = await self._text(url + "/metrics" + (METRICS_QUERY if filtered else ""), timeout)
        snaps = parse_metrics(text)
        if filtered and not snaps:
            full = parse_metrics(await self._text(url + "/metrics", timeout))
            if full:
                self._unfiltered.add(url)
                log.info("probe: %s ignores the /metrics name[] filter's series; scraping it unfiltered", url)
            return full
        return snaps

    async def _text(self, url: str, timeout: float | None) -> str:
        try:
            status, body = await self.get(url, timeout)
        except self.errors as e:
            raise ProbeError(f"GET {url}: {e!r}") from e
        if status != 200:
            raise ProbeError(f"GET {url}: HTTP {status}")
        return body.decode("utf-8", "replace")

    async def aclose(self) -> None:
        """Close the transport's connections (unless it was given, not made, here)."""
        t, self._transport = self._transport, None
        if t is not None and self._own:
            await t.aclose()
