"""A Cluster over OpenAI-compatible servers nbkit did not start (``vllm serve`` someone else runs,
on this host or others): routing, health, scraping, the panel, the monitor and benchmarks work
over them as over nbkit's own replicas; starting, stopping, restarting and scaling them do not::

    from nbkit import Cluster
    cluster = Cluster.attach("http://10.0.0.5:8000/v1,http://10.0.0.6:8000/v1")  # or a list of URLs
    cluster.status_frame()            # state from each server's /health; pid None
    client = cluster.client("least_load"); ep = cluster.endpoint(port=8000)
    cluster.panel()                   # load per server; no start/stop/scale controls
    cluster.stop()                    # closes its clients and endpoints; the servers keep running

The model is the first one each server lists at ``/v1/models`` unless ``model=`` is given. A
server whose ``/metrics`` labels several engines (``vllm serve --data-parallel-size N``) gives one
rank per engine, pinned by vLLM's ``X-data-parallel-rank`` header, as nbkit's own DP replicas do.

Health: every ``health_interval`` seconds each server's ``/health`` is asked; a server that stops
answering leaves the routing of every client and endpoint of the cluster at once (``mark_down``)
and comes back when it answers again (``mark_up``). Nothing is ever restarted: fault listeners
(:meth:`~nbkit.cluster.cluster.Cluster.add_fault_listener`) hear ``down`` (detail: why) and ``up``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass

from nbkit import loop
from nbkit.cluster.cluster import Cluster, ReplicaStatus
from nbkit.cluster.supervisor import Watcher
from nbkit.routing.client import discover_model, worker_urls
from nbkit.routing.metrics import EngineMetrics
from nbkit.routing.probes import ProbeError
from nbkit.routing.rank import Rank

log = logging.getLogger(__name__)

#: seconds between /health probes of attached servers
HEALTH_S = 1.0


class AttachedError(RuntimeError):
    """An action that needs nbkit to own the server's process (restart, stop_replica, scale)."""


@dataclass(frozen=True)
class AttachedPlan:
    """What the views read of a replica's plan, for a server nbkit did not start."""

    index: int
    name: str
    url: str
    model: str | None = None
    dp_size: int = 1
    tp_size: int = 1
    headless: bool = False
    role: str = "both"
    device: str = "attached"
    devices: tuple[int, ...] = ()
    argv: tuple[str, ...] = ()

    @property
    def dp_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.dp_size))

    @property
    def http_ranks(self) -> tuple[int, ...]:
        return self.dp_ranks

    @property
    def pinning(self) -> str:
        return "attached"

    @property
    def port(self) -> int:
        from urllib.parse import urlsplit
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)


class HealthWatch(Watcher):
    """The supervisor of an attached cluster: marks servers down and up by ``/health``, restarts nothing.
    Speaks the :class:`~nbkit.cluster.supervisor.Supervisor` interface the Cluster uses."""

    def __init__(self, cluster: "AttachedCluster", interval: float = HEALTH_S):
        super().__init__()
        self.cluster, self.interval = cluster, interval
        self._seen: dict[int, bool] = {}  # what the routers were last told, per server

    def start(self) -> None:
        if not self.running:
            self._seen = dict(self.cluster._health)
            self._task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        t, self._task = self._task, None
        if t is not None:
            t.cancel()
            await asyncio.gather(t, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            c = self.cluster
            now = await c.acheck_health.on_loop(c, timeout=max(2.0, self.interval))  # a slow answer is not a down
            for i, ok in now.items():
                was = self._seen.get(i)
                self._seen[i] = ok
                if ok and was is False:
                    log.warning("attach: %s (%s) answers /health again; routing to it", c.plans[i].name,
                                c.plans[i].url)
                    c.set_routable(i, True)
                    c._health[i] = True
                    self._event("up", i, c.plans[i].url)
                elif not ok and was is not False:
                    why = "does not answer /health"
                    log.warning("attach: %s (%s) %s; out of routing until it does", c.plans[i].name,
                                c.plans[i].url, why)
                    c.set_routable(i, False, why)
                    c._health[i] = False
                    self._event("down", i, why)


class AttachedCluster(Cluster):
    """A :class:`~nbkit.cluster.cluster.Cluster` over running servers; see the module docstring.
    Made by :meth:`Cluster.attach <nbkit.cluster.cluster.Cluster.attach>`."""

    attached = True

    def __init__(self, urls, *, model: str | None = None, name_prefix: str = "server",
                 health_interval: float = HEALTH_S, timeout: float = 5.0):
        if not isinstance(name_prefix, str) or not name_prefix:
            raise ValueError(f"name_prefix={name_prefix!r}: give a non-empty string")
        if not health_interval > 0:
            raise ValueError(f"health_interval={health_interval!r}: must be > 0 seconds")
        self._given_model = model
        self._specs = []
        self._init_state([AttachedPlan(i, f"{name_prefix}{i}", u, model) for i, u in enumerate(worker_urls(urls))],
                         None)
        self._users = weakref.WeakSet()  # clients and endpoints made here: closed by stop()
        self.kv = None
        self.timeout = timeout
        self._attached = False
        self._discovered = False
        self.supervisor = HealthWatch(self, health_interval)

    # -- views ------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True from attach (or start) until stop: the servers themselves run regardless."""
        return self._attached

    @property
    def ranks(self) -> list[Rank]:
        out = []
        for p in self.plans:
            if p.dp_size > 1:
                out += [Rank(p.index, r, p.url, f"{p.name}/dp{r}", (("X-data-parallel-rank", str(r)),))
                        for r in p.dp_ranks]
            else:
                out.append(Rank(p.index, 0, p.url, p.name))
        return out

    @property
    def model(self) -> str | None:
        """``model=`` as given, else the first model the first answering server listed."""
        return self._given_model or next((p.model for p in self.plans if p.model), None)

    def state(self, i: int) -> str:
        """``healthy | unhealthy`` by the last ``/health``; ``detached`` after :meth:`stop`."""
        if not self._attached:
            return "detached"
        return "healthy" if self._health.get(i) else "unhealthy"

    def logs(self, i: int, n: int = 30) -> str:
        self._check_index(i)
        p = self.plans[i]
        return f"{p.name} ({p.url}) is attached: nbkit did not start it and has no log of it"

    def add_router(self, router) -> None:
        self._routers.add(router)
        for i in range(len(self.plans)):
            if self._health.get(i) is False:
                router.mark_down(i, "does not answer /health")

    # -- attach / detach --------------------------------------------------------------------------
    async def _discover(self) -> None:
        """Each server's model (``/v1/models``) and engines (``/metrics`` labels), once."""
        probe = self.probe

        async def one(p: AttachedPlan) -> AttachedPlan:
            model = p.model or await discover_model(probe.transport, [p.url], self.timeout)
            dp = p.dp_size
            try:
                engines = sorted((await probe.metrics(p.url, self.timeout)).keys())
                if len(engines) > 1 and engines == [str(k) for k in range(len(engines))]:
                    dp = len(engines)
            except (ProbeError, ValueError):
                pass
            return AttachedPlan(p.index, p.name, p.url, model, dp_size=dp)

        self.plans = list(await asyncio.gather(*(one(p) for p in self.plans)))
        self._discovered = all(p.model for p in self.plans)
        models = {p.model for p in self.plans if p.model}
        if len(models) > 1 and self._given_model is None:
            log.warning("attach: the servers serve different models %s; requests without a model get %r",
                        sorted(models), self.model)

    @loop.on_loop
    async def astart(self, timeout: float | None = None, progress=None) -> "AttachedCluster":
        """Attach: read each server's health, model and engines, and watch their health from now on.
        Starts nothing; a server that does not answer yet is ``unhealthy`` until it does."""
        if not self._discovered:
            await self._discover()
        self._attached = True
        await self.acheck_health.on_loop(self, timeout=timeout or self.timeout)
        for i, ok in self._health.items():
            if not ok:
                log.warning("attach: %s (%s) does not answer /health (yet)", self.plans[i].name, self.plans[i].url)
        self.supervisor.start()
        return self

    start = loop.blocking(astart)

    @loop.on_loop
    async def astop(self) -> None:
        """Detach: stop watching and close the clients and endpoints made by this cluster (and the
        routers given to :meth:`add_router` stop hearing from it). The servers keep running."""
        if self._monitor is not None:
            self._monitor.stop_logging()
        await self.supervisor.stop()
        for user in list(self._users):
            try:
                if hasattr(user, "astop"):
                    await user.astop.on_loop(user)
                elif not user.local:
                    await user._aclose()
            except Exception as e:  # noqa: BLE001 - detach the rest regardless
                log.warning("attach: closing %r failed: %r", user, e)
        self._users.clear()
        self._attached = False
        self._health.clear()

    stop = loop.blocking(astop)

    # -- what needs the process -------------------------------------------------------------------
    def _refuse(self, what: str, i: int | None = None) -> AttachedError:
        who = (f"{self.plans[i].name} ({self.plans[i].url})" if i is not None and 0 <= i < len(self.plans)
               else "the servers")
        return AttachedError(f"cannot {what} {who}: it is attached (nbkit did not start it); "
                             f"{what} it where it runs")

    @loop.on_loop
    async def astop_replica(self, i: int) -> None:
        self._check_index(i)
        raise self._refuse("stop", i)

    stop_replica = loop.blocking(astop_replica)

    @loop.on_loop
    async def arestart(self, i: int, timeout: float | None = None) -> None:
        self._check_index(i)
        raise self._refuse("restart", i)

    restart = loop.blocking(arestart)

    async def arecover(self, i: int, dead) -> None:
        raise self._refuse("restart", i)

    def scale_plan(self, n: int, tp: int | None = None):
        raise self._refuse("scale")

    @loop.on_loop
    async def ascale(self, n: int, timeout: float | None = None, tp: int | None = None):
        raise self._refuse("scale")

    scale = loop.blocking(ascale)

    # -- probes -----------------------------------------------------------------------------------
    @loop.on_loop
    async def acheck_health(self, timeout: float = 2.0) -> dict[int, bool]:
        """Probe ``/health`` of every server now; updates :meth:`status`."""
        oks = await asyncio.gather(*(self.probe.health(p.url, timeout) for p in self.plans))
        self._health.update(enumerate(oks))
        return dict(enumerate(oks))

    check_health = loop.blocking(acheck_health)

    @loop.on_loop
    async def ametrics(self) -> dict[str, EngineMetrics]:
        """Scrape every server's ``/metrics`` now: ``{rank name: EngineMetrics}`` (silent ones left out)."""
        out: dict[str, EngineMetrics] = {}
        res = await asyncio.gather(*(self.probe.metrics(p.url, self.timeout) for p in self.plans),
                                   return_exceptions=True)
        for p, snaps in zip(self.plans, res):
            if isinstance(snaps, BaseException):
                continue
            for engine, m in snaps.items():
                out[f"{p.name}/dp{engine}" if p.dp_size > 1 else p.name] = m
        return out

    metrics = loop.blocking(ametrics)

    def status(self, probe: bool = True) -> list[ReplicaStatus]:
        """One row per server: state from ``/health`` (probed first unless ``probe=False``), pid None."""
        if probe and self._attached:
            self.check_health()
        return [ReplicaStatus(index=i, name=p.name, state=self.state(i), url=p.url, pinning=p.pinning,
                              tp_size=p.tp_size, dp_ranks=p.dp_ranks, pid=None, uptime_s=None, returncode=None,
                              rss_gib=0.0, log="", restarts=0) for i, p in enumerate(self.plans)]

    # -- routing ----------------------------------------------------------------------------------
    def client(self, policy=None, **options):
        c = super().client(policy, **options)
        self._users.add(c)
        return c

    def endpoint(self, port: int = 8000, *, host: str = "127.0.0.1", policy=None, start: bool = True,
                 **options):
        ep = super().endpoint(port, host=host, policy=policy, start=start, **options)
        self._users.add(ep)
        return ep

    def __repr__(self) -> str:
        states = ", ".join(f"{p.name}:{self.state(i)}" for i, p in enumerate(self.plans))
        return f"Cluster.attach({len(self.plans)} servers: {states})"


def attach(urls, model: str | None = None, *, start: bool = True, **options) -> AttachedCluster:
    """See :meth:`Cluster.attach <nbkit.cluster.cluster.Cluster.attach>`."""
    c = AttachedCluster(urls, model=model, **options)
    return c.start() if start else c

