"""Autoscaling in the simulator: the live :class:`~nbkit.policies.autoscale.Autoscaler`, acting on
simulated replicas that take ``cold_start_s`` to come up and drain before they stop.

:meth:`nbkit.sim.Simulator` builds ``max_replicas`` copies of the config's one instance
(``inst0`` ... ``instN-1``) and a :class:`Fleet` over them; ``min_replicas`` serve from the start.
Every ``interval_s`` of simulated time the fleet asks the autoscaler (fed each finished request's
TTFT) for a decision: **up** starts idle copies (taking back draining ones first), which serves ``cold_start_s`` later (an empty
prefix cache, as a new replica has); **down** drains the serving replica with the fewest requests
in flight: no new requests go to it, and it stops once its last request finishes. Only serving
replicas are routing candidates. ``timeline`` records (t, serving, starting, draining) at every
change, ``scaler.history`` every up and down with its reason::

    sim = Simulator(cfg, policy="least_load", autoscale="min=1,max=8,ttft_p90_ms=500,cold_start_s=60")
    res = sim.run(trace)
    res.scaling["events"], res.scaling["replica_seconds"]
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from nbkit.policies.autoscale import Autoscaler, AutoscaleSpec

log = logging.getLogger(__name__)


def scaled_setups(setups: Sequence, spec: AutoscaleSpec) -> list:
    """``max_replicas`` copies of the config's single instance, named ``inst0`` ... (ValueError for
    configs it cannot scale: several instances, prefill/decode roles, data-parallel groups)."""
    if len(setups) != 1:
        raise ValueError(f"autoscale: the cluster config must describe one instance to copy, it has {len(setups)}")
    s = setups[0]
    if s.pd_type is not None or s.dp_group is not None:
        raise ValueError("autoscale: prefill/decode or data-parallel instances cannot be autoscaled yet")
    return [dataclasses.replace(s, index=k, key=f"inst{k}", path=f"{s.path} (copy {k})")
            for k in range(spec.max_replicas)]


class Fleet:
    """Which of the simulator's engines serve, start, drain or are off; the owner runs the clock."""

    def __init__(self, engines: Sequence, spec: AutoscaleSpec, t0: float):
        self.engines, self.spec = list(engines), spec
        self.scaler = Autoscaler(spec)
        self.state = ["serving" if k < spec.min_replicas else "off" for k in range(len(self.engines))]
        self.timeline: list[tuple[float, int, int, int]] = []
        self.t0 = self._since = t0
        self._replica_s = 0.0
        self._note(t0)

    def serving(self, index: int) -> bool:
        return self.state[index] == "serving"

    def keys(self) -> list[str]:
        return [e.key for e, s in zip(self.engines, self.state) if s == "serving"]

    def count(self, state: str) -> int:
        return self.state.count(state)

    def _note(self, t: float) -> None:
        if self.timeline:
            prev = self.timeline[-1]
            self._replica_s += (prev[1] + prev[2] + prev[3]) * (t - self._since)
        self._since = t
        row = (t, self.count("serving"), self.count("starting"), self.count("draining"))
        if not self.timeline or self.timeline[-1][1:] != row[1:]:
            self.timeline.append(row)

    def observe(self, t: float, ttft_s: float | None) -> None:
        if ttft_s is not None:
            self.scaler.observe(t, ttft_s)

    def tick(self, t: float) -> tuple[list[int], bool]:
        """One decision at ``t``. Returns (engines that start now: each serves ``cold_start_s``
        later, through :meth:`ready`), and whether the serving set changed."""
        changed = False
        for k, e in enumerate(self.engines):
            if self.state[k] == "draining" and e.in_flight == 0 and not e.has_work():
                self.state[k] = "off"
                log.info("sim autoscale: %s drained and stopped at %.1f s", e.key, t)
        waiting = sum(len(e.waiting) for k, e in enumerate(self.engines) if self.state[k] != "off")
        d = self.scaler.decide(t, self.count("serving"), self.count("starting"), waiting)
        started: list[int] = []
        for _ in range(d.desired - d.current if d.direction == "up" else 0):
            if "draining" in self.state:      # take a draining replica back rather than start one
                self.state[self.state.index("draining")] = "serving"
                changed = True
            elif "off" in self.state:
                k = self.state.index("off")
                self.state[k] = "starting"
                self.engines[k].clear_cache()   # a new replica: nothing cached
                started.append(k)
        if d.direction == "down":
            k = min((k for k, s in enumerate(self.state) if s == "serving"),
                    key=lambda k: (self.engines[k].in_flight, -k))
            self.state[k] = "draining"
            changed = True
        if d.direction != "hold":
            log.info("sim autoscale at %.1f s: %s to %d (%s)", t, d.direction, d.desired, d.reason)
        self._note(t)
        return started, changed

    def ready(self, index: int, t: float) -> None:
        """A started engine serves from ``t``."""
        if self.state[index] == "starting":
            self.state[index] = "serving"
            self._note(t)

    def busy(self) -> bool:
        return any(s in ("starting", "draining") for s in self.state)

    def report(self, t_end: float) -> dict:
        """What the run's scaling did: each up/down with its reason, the replica count over time
        (``t_s`` from the first arrival; a decision's ``t`` is the simulator's clock),
        replica-seconds (started to stopped, cold starts included) and the peak."""
        self._note(t_end)
        return {
            "spec": dataclasses.asdict(self.spec),
            "events": [{"t_s": d.t - self.t0, **dataclasses.asdict(d)} for d in self.scaler.history],
            "timeline": [{"t_s": t - self.t0, "serving": a, "starting": b, "draining": c}
                         for t, a, b, c in self.timeline],
            "replica_seconds": self._replica_s,
            "peak_replicas": max(a + b + c for _, a, b, c in self.timeline),
        }
