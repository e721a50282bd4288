"""The replicas nbkit starts answer ``/metrics?name[]=...`` with just the named series.

nbkit's probes scrape every replica four times a second while a load-aware policy routes
(:mod:`nbkit.routing.router`), asking only for the series they read
(:data:`nbkit.routing.probes.METRICS_QUERY`). vLLM 0.32's API server answers that query in full:
its ``/metrics`` route is prometheus-fastapi-instrumentator's, which renders the whole registry (430
series lines, 60 kB) whatever the query, in the API server's process, which a CPU replica shares
with its engine's core. Every vLLM replica a Cluster launches therefore runs with vLLM's own
middleware hook::

    vllm serve MODEL ... --middleware nbkit.cluster.metrics_filter.NamedMetrics

and :class:`NamedMetrics` sends a ``GET /metrics`` that names series (``name[]``) to prometheus_client's
own ASGI exposition over vLLM's registry, which renders only those (``registry.restricted_registry``);
every other request, an unfiltered ``/metrics`` included, goes to vLLM's app as before. Where vLLM's
registry cannot be had (another vLLM layout), nothing changes: the query is answered in full, as
without the middleware. A registry whose restricted view is empty (prometheus_client's
multiprocess mode) answers no series, and the probe then scrapes that replica unfiltered
(:meth:`nbkit.routing.probes.Probe.metrics`). ``benchmarks/metrics_scrape.py`` measures both.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: the value of ``vllm serve --middleware`` (an import path)
MIDDLEWARE = f"{__name__}.NamedMetrics"


def vllm_registry():
    """The registry vLLM's ``/metrics`` renders (vLLM 0.32: ``get_prometheus_registry()``); None
    where this vLLM has no such function."""
    try:
        from vllm.v1.metrics.prometheus import get_prometheus_registry
    except ImportError:
        return None
    return get_prometheus_registry()


class NamedMetrics:
    """ASGI middleware: ``GET /metrics?name[]=a&name[]=b`` renders only series ``a`` and ``b``.

        app = NamedMetrics(app)                       # what vLLM does with --middleware
        app = NamedMetrics(app, registry=my_registry)  # any prometheus_client registry
    """

    def __init__(self, app, registry=None):
        self.app = app
        self._registry = registry
        self._exposition = None     # prometheus_client's ASGI app over the registry; False: none to be had

    def exposition(self):
        """prometheus_client's ASGI exposition over vLLM's registry (made on first use), or None."""
        if self._exposition is None:
            registry = self._registry if self._registry is not None else vllm_registry()
            if registry is None:
                log.warning("nbkit metrics filter: no vLLM registry found; /metrics?name[]= is answered in full")
                self._exposition = False
            else:
                from prometheus_client import make_asgi_app
                self._exposition = make_asgi_app(registry=registry)
        return self._exposition or None

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["path"] == "/metrics" and scope["method"] == "GET"
                and (b"name%5B%5D=" in (q := scope.get("query_string", b"")) or b"name[]=" in q)):
            app = self.exposition()
            if app is not None:
                await app(scope, receive, send)
                return
        await self.app(scope, receive, send)
