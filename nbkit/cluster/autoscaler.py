"""SLO autoscaling of a live :class:`~nbkit.cluster.Cluster`: the same
:class:`~nbkit.policies.autoscale.Autoscaler` the simulator runs, driving :meth:`Cluster.ascale`.

A control loop on nbkit's loop thread. Every finished request of the cluster's clients and
endpoints (their routers' record listeners) gives the autoscaler a TTFT; every ``interval_s`` it
reads the queue (requests the routers hold back, plus vLLM's ``num_requests_waiting`` from their
scrapes) and the replicas' states, and acts on the decision:

- **up**: copies of the last replica's spec are started (:meth:`Cluster.ascale`); the routers route
  to each once it is healthy. Until they are, it decides nothing more (``ascale`` returns then).
- **down**: the last replica is drained (out of routing; its in-flight requests finish), then
  stopped. Nothing in flight is lost.

Replicas must be placeable without restarting the running ones (on CPU, pin the first replicas to
cores, e.g. ``cores=(0,)``): :meth:`ClusterAutoscaler.start` checks that every size up to
``max_replicas`` keeps them and raises :class:`~nbkit.cluster.spec.SpecError` before anything
runs otherwise. Usage::

    cluster = Cluster.replicas(n=1, cores=(0,)).start()
    scaler = cluster.autoscale("min=1,max=2,ttft_p90_ms=500")   # or AutoscaleSpec(...), or keywords
    ...                                      # load through cluster.client() / cluster.endpoint()
    scaler.decisions                         # every up/down with its reason
    scaler.stop()
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from nbkit import loop
from nbkit.cluster.spec import SpecError
from nbkit.policies.autoscale import Autoscaler, AutoscaleSpec, ScaleDecision

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 600.0


class ClusterAutoscaler:
    """The control loop over one cluster (see the module doc). Make it with :meth:`start`."""

    def __init__(self, cluster, spec: AutoscaleSpec):
        self.cluster, self.spec = cluster, spec
        self.scaler = Autoscaler(spec)
        self.last: ScaleDecision | None = None
        self.started_at = time.monotonic()   # the clock of the decisions' ``t``
        self.draining: str | None = None
        self._listening: dict[int, Any] = {}
        self._task: asyncio.Task | None = None
        self._action: asyncio.Task | None = None

    @classmethod
    def start(cls, cluster, spec: AutoscaleSpec | str | None = None, **options) -> "ClusterAutoscaler":
        """Check ``spec`` against the cluster, then run the loop. ``spec``: an AutoscaleSpec, its text
        (``"min=1,max=4,ttft_p90_ms=500"``) or None; ``options`` override its fields."""
        if isinstance(spec, str):
            spec = AutoscaleSpec.parse(spec)
        spec = AutoscaleSpec(**{**(dataclasses.asdict(spec) if spec is not None else {}), **options})
        if not cluster.running:
            raise RuntimeError("autoscale: start() the cluster first")
        n = len(cluster)
        if not spec.min_replicas <= n <= spec.max_replicas:
            raise SpecError("autoscale.min_replicas", n, f"the cluster runs {n} replica(s), outside "
                            f"min_replicas={spec.min_replicas}..max_replicas={spec.max_replicas}")
        for m in range(n + 1, spec.max_replicas + 1):
            moved = [d for a, _, d in cluster.scale_plan(m) if a == "restart"]
            if moved:
                raise SpecError("autoscale.max_replicas", spec.max_replicas,
                                f"growing to {m} replicas would restart running ones ({'; '.join(moved)}); "
                                "pin them so the copies fit beside them (e.g. cores=(0,))")
        self = cls(cluster, spec)
        loop.run_in_loop_thread(self._begin)
        log.info("autoscale: %s, %d..%d replicas", cluster, spec.min_replicas, spec.max_replicas)
        return self

    def _begin(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    # -- signals -----------------------------------------------------------------------------------
    def _listen(self) -> None:
        for r in self.cluster.routers():
            if id(r) not in self._listening:
                self._listening[id(r)] = r.add_listener(self._finished)

    def _finished(self, record) -> None:
        if record.outcome == "ok" and record.ttft_s is not None:  # as the user saw it: queue wait included
            self.scaler.observe(time.monotonic(), (record.queue_wait_s or 0.0) + record.ttft_s)

    def waiting(self) -> int:
        """Requests queued now: held back by the routers, plus waiting in vLLM (last scrapes)."""
        routers = self.cluster.routers()
        held = sum(r.queued for r in routers)
        engine = {}
        for r in routers:
            for view in r.loads():
                engine[view.key] = max(engine.get(view.key, 0.0), 0.0 if view.stale else view.waiting)
        return held + int(sum(engine.values()))

    # -- the loop ------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.spec.interval_s)
            if not self.cluster.running:
                log.info("autoscale: the cluster stopped; so does its autoscaler")
                return
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must keep running
                log.exception("autoscale: a decision failed (ignored)")

    def tick(self) -> ScaleDecision | None:
        """One decision now (the loop calls it every ``interval_s``; on the loop thread). While a
        scale-up or a drain is under way it decides nothing and returns the last decision."""
        self._listen()
        if self._action is not None and not self._action.done():
            return self.last  # a change is under way: no decision it could not act on (history stays true)
        ready = sum(1 for i in range(len(self.cluster))
                    if self.cluster.state(i) == "healthy" and self.cluster.plans[i].name != self.draining)
        d = self.scaler.decide(time.monotonic(), ready, 0, self.waiting())
        self.last = d
        if d.direction == "up":
            self._action = asyncio.ensure_future(self._up(len(self.cluster) + d.desired - d.current, d))
        elif d.direction == "down":
            self._action = asyncio.ensure_future(self._down(d))
        return d

    async def _up(self, n: int, d: ScaleDecision) -> None:
        log.warning("autoscale: up to %d replicas (%s)", n, d.reason)
        await self.cluster.ascale(n)

    async def _down(self, d: ScaleDecision) -> None:
        i = len(self.cluster) - 1
        name = self.cluster.plans[i].name
        log.warning("autoscale: draining %s, then down to %d replicas (%s)", name, i, d.reason)
        self.draining = name
        self.cluster.set_routable(i, False, "draining (autoscale)")
        try:
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while self.in_flight(i) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await self.cluster.ascale(i)
        finally:
            self.draining = None

    def in_flight(self, replica: int) -> int:
        """Requests the cluster's routers have in flight on ``replica`` (each of its ranks)."""
        keys = {rank.name for rank in self.cluster.ranks if rank.replica == replica}
        return sum(v.in_flight for r in self.cluster.routers() for v in r.loads() if v.key in keys)

    @property
    def decisions(self) -> list[ScaleDecision]:
        """Every up and down so far, with its reason."""
        return list(self.scaler.history)

    async def aclose(self) -> None:
        """Stop deciding; a change under way is cancelled (a replica being drained is stopped by
        whoever stops the cluster, one being started is stopped by its start's own cleanup)."""
        for task in (self._task, self._action):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - it is being stopped
                    pass
        for remove in self._listening.values():
            remove()
        self._listening.clear()

    def stop(self) -> None:
        """Blocking :meth:`aclose` (on the loop's thread: scheduled)."""
        if loop.in_loop_thread():
            asyncio.ensure_future(self.aclose())
        else:
            loop.run(self.aclose())
