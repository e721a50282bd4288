"""The Cluster: start, watch, restart, scale and stop pinned vLLM replicas from a kernel or script.

Blocking and awaitable forms of every action; both work in a Jupyter kernel (ipykernel 7),
under nbmake and in plain scripts, because the work runs on nbkit's own loop thread::

    from nbkit import Cluster
    with Cluster.replicas(n=2) as cluster:          # the tiny model on 2 cores when no GPU
        cluster.status()                            # one row per replica
        url = cluster.ranks[0].url                  # http://127.0.0.1:8100
        print(cluster.logs(1))                      # tail of replica 1's log

    cluster = Cluster.replicas("meta-llama/Llama-3.1-8B", n=4, tp=2)   # 8 GPUs: 4 x TP2
    await cluster.astart(); await cluster.arestart(0); await cluster.astop()

Validation happens when the Cluster is built and again when it starts: nothing is launched for
a spec that cannot run. A replica that fails to start stops the whole start and raises
:class:`~nbkit.cluster.process.ReplicaStartError` quoting its log; nothing is left running.

Supervision (after a start; policy in :mod:`nbkit.cluster.supervisor`): a replica that exits or
stops answering leaves every client's and endpoint's routing at once and is restarted on the same
port and pinning, with backoff, up to ``max_restarts`` per ``restart_window`` (then ``failed``;
``restart="never"`` opts out). The others keep serving throughout::

    cluster = Cluster.replicas(n=2, restart="on-failure", max_restarts=5, restart_window=600)
    cluster.status_frame()[["name", "state", "restarts"]]   # state: restarting while it comes back
    cluster.restarts                                          # restarts so far, all replicas
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
import tempfile
import time
from pathlib import Path
from typing import Sequence

from nbkit import loop
from nbkit.routing.rank import Rank
from nbkit.cluster.process import ReplicaProcess, preload
from nbkit.cluster import startup
from nbkit.routing.metrics import EngineMetrics
from nbkit.routing.probes import Probe
from nbkit.cluster.kv import ClusterKV, default_policy
from nbkit.http.ports import port_is_free
from nbkit.cluster.spec import (DEFAULT_PORT_START, Inventory, LaunchPlan, ReplicaSpec, SpecError, check_port, discover,
                                resolve_device)
from nbkit.cluster.placement import plan_replicas
from nbkit.cluster.supervisor import Supervisor, check_options as check_supervision
from nbkit.cluster.status import ReplicaStatus
from nbkit.cluster.lora import cluster_adapters

log = logging.getLogger(__name__)


class Cluster:
    """A set of vLLM replicas described by :class:`~nbkit.cluster.spec.ReplicaSpec` s."""

    def __init__(self, specs: Sequence[ReplicaSpec] | ReplicaSpec, *, run_dir: str | os.PathLike | None = None,
                 port_start: int = DEFAULT_PORT_START, startup_timeout: float = 600.0,
                 stop_grace: float = 15.0, inventory: Inventory | None = None, log_interval: float | None = None,
                 kv_events: bool = True, kv_events_port: int | None = None, restart: str = "on-failure",
                 max_restarts: int = 5, restart_window: float = 600.0, unresponsive_after: float | None = 60.0,
                 lora_modules: dict[str, str] | None = None):
        check_supervision(restart, max_restarts, restart_window, unresponsive_after)
        if log_interval is not None and log_interval <= 0:
            raise SpecError("log_interval", log_interval, "must be > 0 seconds (or None)")
        check_port("port_start", port_start)
        if kv_events_port is not None:
            check_port("kv_events_port", kv_events_port)
        if isinstance(specs, ReplicaSpec):
            specs = [specs]
        if lora_modules:  # every replica serves these LoRA adapters too (nbkit.cluster.lora)
            specs = [s.model_copy(update={"lora_modules": {**s.lora_modules, **lora_modules}}) for s in specs]
        self._specs: list[ReplicaSpec] = list(specs)
        self._inventory = inventory or discover()
        self.port_start = port_start
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.gettempdir()) / "nbkit-runs" / (
            time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{id(self) % 10000:04d}")
        # vLLM's KV-cache events of every replica, into this process's index (kv_aware routing)
        self.kv = (ClusterKV(self._specs[0].model, kv_events_port, extra_args=self._specs[0].extra_args)
                   if kv_events and self._specs else None)
        self._init_state(self._plan(self._specs), log_interval)  # validates before anything starts
        self.lora = cluster_adapters(self)  # which rank holds which LoRA adapter (None: no LoRA)
        self.supervisor = Supervisor(self, restart=restart, max_restarts=max_restarts, restart_window=restart_window,
                                     unresponsive_after=unresponsive_after)

    def _init_state(self, plans: list, log_interval: float | None) -> None:
        """The state every cluster keeps, started or attached: its plans and what runs them."""
        self.plans: list[LaunchPlan] = plans
        self._procs: list[ReplicaProcess | None] = [None] * len(plans)
        self._health: dict[int, bool] = {}
        self._lock: asyncio.Lock | None = None
        self._routers: "weakref.WeakSet" = weakref.WeakSet()  # routers to tell when ranks change
        self._probe: Probe | None = None  # /health and /metrics, on nbkit's loop
        self._monitor = self.autoscaler = self.lora = None  # the panel's monitor; autoscale()'s loop; LoRA table
        self.log_interval = log_interval

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def replicas(cls, model: str | None = None, n: int = 2, tp: int = 1, *, device: str = "auto",
                 cluster_kwargs: dict | None = None, **spec_kwargs) -> "Cluster":
        """``n`` identical replicas of ``model`` with tensor-parallel size ``tp``, placed automatically.

        ``model`` defaults to ``$NBKIT_MODEL``, else the generated tiny model on CPU. Other keyword
        arguments are :class:`ReplicaSpec` fields (``extra_args``, ``kv_cache_gib``, ...);
        Cluster options go in ``cluster_kwargs`` (or use ``run_dir``/``port_start``/... directly).
        """
        if not isinstance(n, int) or n < 1:
            raise SpecError("n", n, "the number of replicas must be a positive integer")
        ckw = dict(cluster_kwargs or {})
        for k in ("run_dir", "port_start", "startup_timeout", "stop_grace", "inventory", "log_interval",
                  "kv_events", "kv_events_port", "restart", "max_restarts", "restart_window", "unresponsive_after"):
            if k in spec_kwargs:
                ckw[k] = spec_kwargs.pop(k)
        inventory = ckw.get("inventory") or discover()
        ckw["inventory"] = inventory
        model = model or os.environ.get("NBKIT_MODEL") or None
        if model is None:
            if spec_kwargs.get("engine") != "sim" and resolve_device(device, inventory) == "gpu":
                raise SpecError("model", None, "give a model (or set NBKIT_MODEL) when running on GPUs")
            from nbkit.tiny import tiny_model
            model = str(tiny_model())
        spec = ReplicaSpec(model=model, tp_size=tp, device=device, **spec_kwargs)
        return cls([spec] * n, **ckw)

    #: True for a Cluster over servers nbkit did not start (:meth:`attach`): no start/stop/restart/scale
    attached = False

    @classmethod
    def attach(cls, urls, model: str | None = None, *, name_prefix: str = "server", start: bool = True,
               **options) -> "Cluster":
        """A Cluster over running OpenAI-compatible servers (``"http://a:8000/v1,http://b:8001/v1"`` or a
        list of URLs): routing, panel, monitor and bench over them; nothing is launched or stopped.
        See :mod:`nbkit.cluster.attach`."""
        from nbkit.cluster.attach import attach
        return attach(urls, model, name_prefix=name_prefix, start=start, **options)

    def _plan(self, specs: Sequence[ReplicaSpec], own_ports: set[int] = frozenset(),
              replay_ports: dict[int, int] | None = None) -> list[LaunchPlan]:
        def free(host: str, port: int) -> bool:
            return port in own_ports or port_is_free(host, port)

        return plan_replicas(specs, self._inventory, port_start=self.port_start, port_free=free,
                             kv_events_port=self.kv.port if self.kv is not None else None,
                             kv_replay_ports=replay_ports)

    # -- views -------------------------------------------------------------------------------
    @property
    def specs(self) -> list[ReplicaSpec]:
        return list(self._specs)

    def __len__(self) -> int:
        return len(self.plans)

    @property
    def running(self) -> bool:
        return any(p is not None and p.alive for p in self._procs)

    @property
    def urls(self) -> list[str]:
        """Base URL of each replica that serves HTTP."""
        return [p.url for p in self.plans if not p.headless]

    @property
    def ranks(self) -> list[Rank]:
        """Every routable engine; a DP group contributes one Rank per DP rank (pinned by header)."""
        return [Rank(p.index, r, p.url, f"{p.name}/dp{r}", (("X-data-parallel-rank", str(r)),), p.role)
                if p.dp_size > 1 else Rank(p.index, r, p.url, p.name, role=p.role)
                for p in self.plans for r in p.http_ranks]

    @property
    def model(self) -> str:
        """The served model name (the ``model`` field of requests)."""
        return self.plans[0].model

    def log_path(self, i: int) -> Path:
        return self.run_dir / f"{self.plans[i].name}.log"

    def logs(self, i: int, n: int = 30) -> str:
        """The last ``n`` lines of replica ``i``'s log."""
        self._check_index(i)
        from nbkit.cluster.process import tail
        return tail(self.log_path(i), n)

    def process(self, i: int) -> ReplicaProcess | None:
        self._check_index(i)
        return self._procs[i]

    def routers(self) -> list:
        """The routers of this cluster's open clients and endpoints (they follow :meth:`scale`)."""
        return list(self._routers)

    def remove_router(self, router) -> None:
        """Forget ``router`` (its client was closed or its endpoint stopped)."""
        self._routers.discard(router)

    def add_router(self, router) -> None:
        """Tell ``router`` about rank changes and faults from now on (clients and endpoints made by
        :meth:`client`/:meth:`endpoint` are added already); replicas down now are down for it too."""
        self._routers.add(router)
        for i in range(len(self.plans)):
            if self.running and self.state(i) in ("restarting", "failed", "stopped"):
                router.mark_down(i, self.state(i))

    @property
    def kv_index(self):
        """The exact index of what each rank caches (:class:`~nbkit.policies.kv_index.KVIndex`), fed by
        the replicas' KV-cache events; None with ``kv_events=False``."""
        return self.kv.index if self.kv is not None else None

    @property
    def tokenizer(self):
        """The served model's tokenizer for router-side lookups (:class:`~nbkit.routing.tokenize.PromptTokenizer`)."""
        return self.kv.tokenizer if self.kv is not None else None

    @property
    def probe(self) -> Probe:
        """The :class:`~nbkit.routing.probes.Probe` for this cluster's /health and /metrics (on nbkit's loop)."""
        if self._probe is None:
            self._probe = Probe()
        return self._probe

    def _check_index(self, i: int) -> None:
        if not isinstance(i, int) or not 0 <= i < len(self.plans):
            raise IndexError(f"replica index {i!r} out of range 0..{len(self.plans) - 1}")

    def state(self, i: int) -> str:
        """``starting | healthy | unhealthy | restarting | failed | stopped``: replica ``i`` as last seen."""
        supervised = self.supervisor.state(i)
        if supervised is not None:
            return supervised
        proc = self._procs[i]
        if proc is None or proc.stopped or proc.stopping:
            return "stopped"
        if not proc.alive:
            return "failed"
        h = self._health.get(i)
        return "starting" if h is None else ("healthy" if h else "unhealthy")

    # -- async API -----------------------------------------------------------------------------
    def _alock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _waves(self, idx: Sequence[int]) -> list[list[int]]:
        return startup.waves(self.plans, idx)  # replicas sharing a GPU one after another

    def _launch(self, i: int) -> ReplicaProcess:
        if self.kv is not None:
            self.kv.watch(self.plans[i])  # listening before the engine publishes anything
        self._procs[i] = ReplicaProcess(self.plans[i], self.log_path(i))
        if self.lora is not None:  # a new process holds its configured adapters only
            self.lora.reset([r for r in self.ranks if r.replica == i])
        self._health.pop(i, None)
        return self._procs[i]

    async def _start_some(self, idx: Sequence[int], timeout: float, progress=None) -> None:
        """Start ``idx`` in :mod:`~nbkit.cluster.startup` order; on a failure stop them all and raise."""
        try:
            await startup.start_replicas(self.plans, idx, self._launch, timeout=timeout, probe=self.probe,
                                         progress=progress, on_healthy=lambda i, _: self._health.__setitem__(i, True))
        except BaseException:
            await asyncio.gather(*(self._procs[i].stop(self.stop_grace) for i in idx if self._procs[i] is not None))
            for i in idx:
                self._health.pop(i, None)
            raise

    @loop.on_loop
    async def astart(self, timeout: float | None = None, progress=None) -> "Cluster":
        """Start every replica (those sharing a GPU one after another) and wait until all are healthy.
        ``progress``: a bar per replica; None: if stderr is a terminal or in a notebook (see
        :mod:`~nbkit.cluster.startup`: True, False, a file object or a Progress)."""
        async with self._alock():
            if self.running:
                raise RuntimeError("cluster is already running; stop() it first or use restart()/scale()")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.kv is not None:
                self.kv.listen()  # the KV-event socket is bound before the plans name its port
            self.plans = self._plan(self._specs)  # re-check ports etc. right before launching
            self._procs = [None] * len(self.plans)
            await asyncio.to_thread(preload, self.plans)  # vLLM imported once, off the loop
            try:
                await self._start_some(range(len(self.plans)), timeout or self.startup_timeout,
                                       startup.open_progress(progress))
            except BaseException:
                await self._stop_some(range(len(self.plans)))
                raise
            self.supervisor.reset()
            self.supervisor.start()
        if self.log_interval:
            self.monitor().start_logging(self.log_interval)
        return self

    start = loop.blocking(astart)

    async def _stop_some(self, idx: Sequence[int]) -> None:
        procs = [(i, self._procs[i]) for i in idx if self._procs[i] is not None]
        await asyncio.gather(*(p.stop(self.stop_grace) for _, p in procs))
        for i, _ in procs:
            self._health.pop(i, None)
            if self.kv is not None and i < len(self.plans):
                self.kv.unwatch(self.plans[i])

    @loop.on_loop
    async def astop(self) -> None:
        """Stop every replica (SIGTERM, SIGKILL after ``stop_grace``). Safe to call twice."""
        if self._monitor is not None:
            self._monitor.stop_logging()
        if self.autoscaler is not None:
            await self.autoscaler.aclose()  # no scaling under a stop
        await self.supervisor.stop()
        async with self._alock():
            await self._stop_some(range(len(self._procs)))
            if self.kv is not None:
                self.kv.close()

    stop = loop.blocking(astop)

    # -- supervision (the policy is the Supervisor's; these are its hooks) ------------------------
    @property
    def restarts(self) -> int:
        """Restarts the supervisor made so far (all replicas, since this Cluster was built)."""
        return self.supervisor.restarts

    def restarts_of(self, i: int) -> int:
        """Restarts of replica ``i`` so far."""
        self._check_index(i)
        return self.supervisor.restarts_of(i)

    def add_fault_listener(self, fn) -> "callable":
        """Call ``fn(event, index, detail)`` on nbkit's loop thread for each supervision event:
        ``exited`` (detail: why), ``restarted`` (the new pid), ``failed`` (gave up; why). Returns
        a function that removes it."""
        return self.supervisor.add_listener(fn)

    def set_routable(self, i: int, up: bool, reason: str = "") -> None:
        """Tell every router of this cluster that replica ``i`` serves (``up``) or is down (``reason``)."""
        if not up:
            self._health.pop(i, None)
        for r in list(self._routers):
            if up:
                r.mark_up(i)
            else:
                r.mark_down(i, reason)

    async def arecover(self, i: int, dead: ReplicaProcess) -> ReplicaProcess | None:
        """Start replica ``i`` again on its plan (port, pinning) after its process ``dead`` died:
        what is left of it is stopped first, and the routers route to it once it is healthy.
        Returns the new process, or None when ``i`` is no longer ``dead`` (the user stopped,
        restarted or scaled it meanwhile). Raises ReplicaStartError if it does not come up."""
        async with self._alock():
            if i >= len(self._procs) or self._procs[i] is not dead or not self.supervisor.running:
                return None
            await self._stop_some([i])
            await self._start_some([i], self.startup_timeout)
        self.set_routable(i, True)
        return self._procs[i]

    @loop.on_loop
    async def astop_replica(self, i: int) -> None:
        """Stop replica ``i`` only (it shows as stopped; ``restart(i)`` brings it back)."""
        self._check_index(i)
        await self.supervisor.hands_off(i)
        self.set_routable(i, False, "stopped")
        async with self._alock():
            await self._stop_some([i])

    stop_replica = loop.blocking(astop_replica)

    @loop.on_loop
    async def arestart(self, i: int, timeout: float | None = None) -> None:
        """Stop replica ``i`` and start it again with the same plan; waits until healthy."""
        self._check_index(i)
        await self.supervisor.hands_off(i)
        self.set_routable(i, False, "restarting")
        async with self._alock():
            await self._stop_some([i])
            await self._start_some([i], timeout or self.startup_timeout)
        self.set_routable(i, True)
        if self.running:
            self.supervisor.start()

    restart = loop.blocking(arestart)

    def scale_plan(self, n: int, tp: int | None = None) -> list[tuple[str, int, str]]:
        """What :meth:`scale` would do: ``[(action, index, detail)]``, action in keep/restart/start/stop."""
        _, plans, actions = self._scale_target(n, tp)
        return actions

    def _scale_target(self, n: int, tp: int | None = None):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SpecError("n", n, "the number of replicas must be a positive integer")
        if tp is not None and (not isinstance(tp, int) or tp < 1):
            raise SpecError("tp", tp, "the tensor-parallel size must be a positive integer")
        old = self.plans
        base = self._specs
        if tp is not None and any(s.tp_size != tp for s in base):
            # a new TP size re-places every replica automatically
            base = [s.model_copy(update={"tp_size": tp, "cores": None, "devices": None}) for s in base]
        if n <= len(base):
            specs = base[:n]
        else:
            t = base[-1]
            # copies are placed automatically; a replica on one (shareable) GPU keeps sharing it
            shared_gpu = t.devices if t.devices is not None and len(t.devices) == 1 and t.workers == 1 else None
            template = t.model_copy(update={"cores": None, "devices": shared_gpu, "port": None, "name": None})
            specs = base + [template] * (n - len(base))
        live = [i for i, p in enumerate(old) if self._procs[i] is not None and self._procs[i].alive]
        own = {old[i].port for i in live}
        # a running replica keeps its KV replay port too (its engine holds it), so it is kept, not restarted
        replay = {i: old[i].kv_replay_port for i in live if old[i].kv_replay_port is not None and i < n}
        # keep running replicas on their ports
        specs = [s.model_copy(update={"port": old[i].port}) if i < len(old) and s.port is None
                 and self._procs[i] is not None and self._procs[i].alive else s for i, s in enumerate(specs)]
        plans = self._plan(specs, own_ports=own, replay_ports=replay)
        actions = []
        for i in range(max(n, len(old))):
            if i >= n:
                actions.append(("stop", i, f"{old[i].name} ({old[i].pinning})"))
            elif i >= len(old) or self._procs[i] is None or not self._procs[i].alive:
                actions.append(("start", i, f"{plans[i].name} on {plans[i].pinning}, port {plans[i].port}"))
            elif old[i].same_process(plans[i]):
                actions.append(("keep", i, f"{old[i].name} ({old[i].pinning})"))
            else:
                actions.append(("restart", i, f"{old[i].name}: {old[i].pinning} -> {plans[i].pinning}"))
        return specs, plans, actions

    @loop.on_loop
    async def ascale(self, n: int, timeout: float | None = None, tp: int | None = None) -> list[tuple[str, int, str]]:
        """Grow or shrink to ``n`` replicas (copies of the last spec, placed automatically).

        Replicas whose pinning must change to make room (e.g. 1 replica on 2 cores -> 2 replicas
        on 1 core each) are restarted; the others keep serving. Returns the actions taken.
        """
        async with self._alock():
            specs, plans, actions = self._scale_target(n, tp)
            to_stop = [i for a, i, _ in actions if a in ("stop", "restart")]
            await self._stop_some(to_stop)
            self._specs, self.plans = specs, plans
            self._procs = (self._procs + [None] * n)[:n]
            to_start = [i for a, i, _ in actions if a in ("start", "restart")]
            for _, i, _ in actions:  # replaced or gone: no longer supervised as before
                if i >= n or i in to_start:
                    await self.supervisor.hands_off(i)
            try:
                if to_start:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    await self._start_some(to_start, timeout or self.startup_timeout)
            finally:
                for r in list(self._routers):
                    r.set_ranks(self.ranks)
                    for i in to_start:
                        if self._health.get(i):
                            r.mark_up(i)
            if self.running:
                self.supervisor.start()
            return actions

    scale = loop.blocking(ascale)

    def autoscale(self, spec=None, **options):
        """Hold an SLO by adding and draining replicas (:mod:`nbkit.cluster.autoscaler`): ``self.autoscaler``."""
        from nbkit.cluster.autoscaler import ClusterAutoscaler
        self.autoscaler = ClusterAutoscaler.start(self, spec, **options)
        return self.autoscaler

    @loop.on_loop
    async def acheck_health(self, timeout: float = 2.0) -> dict[int, bool]:
        """Probe ``/health`` of every live replica now; updates :meth:`status`."""
        async def one(i: int) -> tuple[int, bool | None]:
            proc = self._procs[i]
            if proc is None or not proc.alive:
                return i, None
            if self.plans[i].headless:
                return i, True
            return i, await self.probe.health(self.plans[i].url, timeout)

        for i, ok in await asyncio.gather(*(one(i) for i in range(len(self.plans)))):
            if ok is None:
                self._health.pop(i, None)
            else:
                if self._health.get(i) is not None and self._health[i] != ok:
                    log.warning("cluster: %s is %s", self.plans[i].name, "healthy again" if ok else "unhealthy")
                self._health[i] = ok
        return dict(self._health)

    check_health = loop.blocking(acheck_health)

    @loop.on_loop
    async def ametrics(self) -> dict[str, EngineMetrics]:
        """Scrape every replica's ``/metrics`` now: ``{rank name: EngineMetrics}``."""
        out: dict[str, EngineMetrics] = {}
        plans = [p for p in self.plans if not p.headless and self._procs[p.index] is not None
                 and self._procs[p.index].alive]
        results = await asyncio.gather(*(self.probe.metrics(p.url, 5.0) for p in plans), return_exceptions=True)
        for p, res in zip(plans, results):
            if isinstance(res, BaseException):
                continue
            for engine, m in res.items():
                name = f"{p.name}/dp{engine}" if p.dp_size > 1 else p.name
                out[name] = m
        return out

    metrics = loop.blocking(ametrics)

    def status(self, probe: bool = True) -> list[ReplicaStatus]:
        """One :class:`ReplicaStatus` per replica (probes ``/health`` first unless ``probe=False``)."""
        if probe and self.running:
            self.check_health()
        out = []
        for i, p in enumerate(self.plans):
            proc = self._procs[i]
            alive = proc is not None and proc.alive
            out.append(ReplicaStatus(
                index=i, name=p.name, state=self.state(i), url=p.url if not p.headless else "(headless)",
                pinning=p.pinning, tp_size=p.tp_size, dp_ranks=p.dp_ranks,
                pid=proc.pid if proc else None,
                uptime_s=round(time.time() - proc.started_at, 1) if alive and proc.started_at else None,
                returncode=proc.returncode if proc else None,
                rss_gib=round(proc.rss_bytes() / 2**30, 2) if alive else 0.0,
                log=str(self.log_path(i)), restarts=self.supervisor.restarts_of(i),
            ))
        return out

    def status_frame(self, probe: bool = True):
        """:meth:`status` as a pandas DataFrame."""
        import pandas as pd
        from dataclasses import asdict
        return pd.DataFrame([asdict(s) for s in self.status(probe)]).set_index("index")

    # -- routing ---------------------------------------------------------------------------------
    def default_policy(self) -> str:
        """The policy of :meth:`client`/:meth:`endpoint` named None: kv_aware or least_load (:func:`default_policy`)."""
        return default_policy(self)[0]

    def _routing(self, policy, options: dict):
        """The policy to route by, and what a router over this cluster reads (into ``options``)."""
        if policy is None:
            policy, why = default_policy(self)
            log.info("cluster: routing by %s (%s)", policy, why)
        options.setdefault("kv_index", self.kv_index)
        options.setdefault("tokenizer", self.tokenizer)
        options.setdefault("loras", self.lora)
        return policy

    def client(self, policy=None, **options):
        """A :class:`~nbkit.routing.client.RoutedClient` over the ranks (follows scale()); policy None: the default."""
        from nbkit.routing.client import RoutedClient
        policy = self._routing(policy, options)
        c = RoutedClient(self, policy, **options)
        self.add_router(c.router)
        return c

    def endpoint(self, port: int = 8000, *, host: str = "127.0.0.1", policy=None, start: bool = True,
                 **options):
        """An OpenAI-compatible :class:`~nbkit.routing.endpoint.Endpoint` (started unless start=False)."""
        from nbkit.routing.endpoint import Endpoint
        policy = self._routing(policy, options)
        ep = Endpoint(self, host=host, port=port, policy=policy, **options)
        self.add_router(ep.router)
        return ep.start() if start else ep

    def monitor(self):
        """The cluster's :class:`~nbkit.ui.monitor.Monitor` (one per cluster)."""
        if self._monitor is None:
            from nbkit.ui.monitor import Monitor
            self._monitor = Monitor(self)
        return self._monitor

    def panel(self, **options):
        """The live control panel (ipywidgets); see :mod:`nbkit.ui.panel`."""
        from nbkit.ui.panel import Panel
        return Panel(self, **options)

    # -- context managers ----------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def __aenter__(self) -> "Cluster":
        return await self.astart()

    async def __aexit__(self, *exc) -> None:
        await self.astop()

    def __repr__(self) -> str:
        states = ", ".join(f"{p.name}:{self.state(i)}" for i, p in enumerate(self.plans))
        return f"Cluster({len(self.plans)} replicas: {states})"

    def _repr_html_(self) -> str:
        return self.status_frame(probe=False).to_html()
