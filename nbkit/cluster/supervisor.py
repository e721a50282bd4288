"""Supervision policy: when a replica counts as dead, whether and when it is restarted, when it is
given up. The mechanism (stopping what is left of it, starting it again on the same port and
pinning, telling the routers) is the :class:`~nbkit.cluster.cluster.Cluster`'s.

A replica whose process exits, or whose ``/health`` has not answered for ``unresponsive_after``
seconds (it is then killed), leaves the routing of every client and endpoint of the cluster at
once and is restarted after a backoff (``restart="on-failure"``): 1 s, doubling up to 30 s while it
keeps dying within ``STABLE_S`` of coming up, back to 1 s once it has served that long.
More than ``max_restarts`` restarts within ``restart_window`` seconds and it stays ``failed``;
``restart="never"`` leaves every dead replica ``failed``. The user taking a replica in hand
(``stop_replica``, ``restart``, ``scale``) cancels what the supervisor had planned for it::

    sup = Supervisor(cluster, restart="on-failure", max_restarts=5, restart_window=600)
    sup.start()                  # on nbkit's loop, once the cluster is up (Cluster.astart does it)
    sup.state(1)                 # None | "restarting" | "failed"
    sup.restarts, sup.restarts_of(1)
    sup.add_listener(lambda event, i, detail: print(event, i, detail))   # exited | restarted | failed
    await sup.stop()
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from nbkit.cluster.process import ReplicaStartError
from nbkit.cluster.spec import SpecError

log = logging.getLogger(__name__)

#: seconds between looks at the replicas' processes
WATCH_S = 0.2
#: seconds between /health probes (a replica silent for ``unresponsive_after`` is killed)
HEALTH_S = 2.0
#: backoff before a restart: min(BACKOFF_CAP_S, 2 ** k) seconds, k = deaths in a row within
#: STABLE_S of coming up (a replica that served that long starts again at 1 s)
BACKOFF_CAP_S = 30.0
STABLE_S = 60.0
RESTART_POLICIES = ("on-failure", "never")


def check_options(restart: str, max_restarts: int, restart_window: float, unresponsive_after: float | None) -> None:
    """Raise :class:`SpecError` naming the first supervision option that cannot work."""
    if restart not in RESTART_POLICIES:
        raise SpecError("restart", restart, f"expected one of {', '.join(RESTART_POLICIES)}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise SpecError("max_restarts", max_restarts, "must be a whole number >= 0")
    if not (isinstance(restart_window, (int, float)) and restart_window > 0):
        raise SpecError("restart_window", restart_window, "must be > 0 seconds")
    if unresponsive_after is not None and not (isinstance(unresponsive_after, (int, float)) and unresponsive_after > 0):
        raise SpecError("unresponsive_after", unresponsive_after, "must be > 0 seconds (or None: never)")


def notify(listeners: list, event: str, i: int, detail: str) -> None:
    """Call each fault listener ``fn(event, index, detail)``; one that raises is logged and skipped
    (a listener must not stop supervision or a health watch)."""
    for fn in list(listeners):
        try:
            fn(event, i, detail)
        except Exception:  # noqa: BLE001
            log.exception("a fault listener raised on %s of replica %d (ignored)", event, i)


class Watcher:
    """What a Cluster asks of the task that watches its replicas: running, restart counts, fault
    listeners. :class:`Supervisor` (restarts the dead) and the attach health watch are the two."""

    def __init__(self):
        self._task: asyncio.Task | None = None
        self._listeners: list[Callable[[str, int, str], None]] = []

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def restarts(self) -> int:
        """Restarts made so far, all replicas."""
        return 0

    def restarts_of(self, i: int) -> int:
        return 0

    def add_listener(self, fn: Callable[[str, int, str], None]) -> Callable[[], None]:
        """Call ``fn(event, index, detail)`` on nbkit's loop thread: ``exited`` (detail: why),
        ``restarted`` (the new pid), ``failed`` (gave up; why); an attached cluster's watch says
        ``down`` and ``up``. Returns a remover."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def _event(self, event: str, i: int, detail: str) -> None:
        notify(self._listeners, event, i, detail)

    def state(self, i: int) -> str | None:
        """What the watch says of replica ``i`` beyond its health (None: nothing)."""
        return None

    def reset(self) -> None:
        """Forget what was seen (the cluster starts again)."""

    async def hands_off(self, i: int) -> None:
        """The user takes replica ``i`` in hand: drop what was planned for it."""


class Supervisor(Watcher):
    """Watches one Cluster's replicas and restarts the dead ones (see the module docstring)."""

    def __init__(self, cluster, *, restart: str = "on-failure", max_restarts: int = 5, restart_window: float = 600.0,
                 unresponsive_after: float | None = 60.0):
        check_options(restart, max_restarts, restart_window, unresponsive_after)
        super().__init__()
        self.cluster = cluster
        self.policy, self.max_restarts = restart, max_restarts
        self.restart_window, self.unresponsive_after = float(restart_window), unresponsive_after
        self._times: dict[int, list[float]] = {}      # monotonic times of recent restarts, per replica
        self._counts: dict[int, int] = {}
        self._restarting: dict[int, asyncio.Task] = {}
        self._given_up: dict[int, str] = {}           # replica -> why it stays failed
        self._last_ok: dict[int, float] = {}          # last good /health, per replica (monotonic)
        self._up_since: dict[int, float] = {}         # when it last came up (monotonic)
        self._streak: dict[int, int] = {}             # deaths in a row within STABLE_S of coming up

    # -- views -------------------------------------------------------------------------------------
    def state(self, i: int) -> str | None:
        """``"failed"`` (given up), ``"restarting"`` (dead, a restart pending or under way), else None."""
        if i in self._given_up:
            return "failed"
        if i in self._restarting:
            return "restarting"
        proc = self.cluster.process(i)
        if proc is not None and not proc.stopping and not proc.alive:  # dead, not yet seen
            return "restarting" if self.running and self.policy == "on-failure" else "failed"
        return None

    @property
    def restarts(self) -> int:
        """Restarts made so far, all replicas."""
        return sum(self._counts.values())

    def restarts_of(self, i: int) -> int:
        return self._counts.get(i, 0)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start watching (on the running loop: nbkit's). Starting twice is a no-op."""
        if not self.running:
            now = time.monotonic()
            self._last_ok = {i: now for i in range(len(self.cluster))}
            self._up_since = {i: now for i in range(len(self.cluster))}
            self._task = asyncio.ensure_future(self._watch())

    def reset(self) -> None:
        """A fresh start of the whole cluster: nothing is given up, no restart is recent."""
        self._given_up.clear()
        self._times.clear()
        self._streak.clear()

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._restarting.values()) if t is not None]
        self._task = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._restarting.clear()

    async def hands_off(self, i: int) -> None:
        """The user takes replica ``i`` in hand (stop, restart, scale): drop what was planned for it."""
        self._given_up.pop(i, None)
        t = self._restarting.pop(i, None)
        if t is not None and t is not asyncio.current_task():
            t.cancel()
            await asyncio.gather(t, return_exceptions=True)
        self._last_ok[i] = self._up_since[i] = time.monotonic()
        self._streak.pop(i, None)

    # -- policy ------------------------------------------------------------------------------------
    async def _watch(self) -> None:
        next_health = time.monotonic() + HEALTH_S
        while True:
            await asyncio.sleep(WATCH_S)
            for i in range(len(self.cluster)):
                proc = self.cluster.process(i)
                if proc is None or proc.stopping or i in self._restarting or i in self._given_up:
                    continue
                if not proc.alive:
                    self._dead(i, proc, f"exited with code {proc.returncode}")
            if self.unresponsive_after is not None and time.monotonic() >= next_health:
                next_health = time.monotonic() + HEALTH_S
                await self._check_responsive()

    async def _check_responsive(self) -> None:
        c = self.cluster

        async def one(i: int, proc) -> None:
            ok = await c.probe.health(c.plans[i].url, 5.0)
            now = time.monotonic()
            if ok:
                self._last_ok[i] = now
                return
            silent = now - self._last_ok.get(i, now)
            if silent >= self.unresponsive_after and proc.alive and not proc.stopping and i not in self._restarting:
                log.warning("supervisor: %s has not answered /health for %.0f s; killing it", c.plans[i].name, silent)
                self._dead(i, proc, f"did not answer /health for {silent:.0f} s")

        live = [(i, c.process(i)) for i in range(len(c)) if c.state(i) in ("healthy", "unhealthy")
                and not c.plans[i].headless]
        await asyncio.gather(*(one(i, p) for i, p in live), return_exceptions=True)

    def _recent(self, i: int) -> list[float]:
        now = time.monotonic()
        self._times[i] = [t for t in self._times.get(i, []) if now - t < self.restart_window]
        return self._times[i]

    def _dead(self, i: int, proc, why: str) -> None:
        """Replica ``i`` is dead (or hung): out of routing now; restarted or given up."""
        self.cluster.set_routable(i, False, why)
        self._event("exited", i, why)
        if self.policy == "never":
            self._give_up(i, f"{why} (restart='never')")
            return
        recent = self._recent(i)
        if len(recent) >= self.max_restarts:
            self._give_up(i, f"{why}; {len(recent)} restarts in the last {self.restart_window:.0f} s "
                             f"(max_restarts={self.max_restarts})")
            return
        now = time.monotonic()
        served = now - self._up_since.get(i, now)
        streak = 0 if served >= STABLE_S else self._streak.get(i, -1) + 1
        self._streak[i] = streak
        delay = min(BACKOFF_CAP_S, 2.0 ** streak)
        log.warning("supervisor: %s %s after %.0f s up; restarting it in %.0f s (restart %d within %.0f s)",
                    self.cluster.plans[i].name, why, served, delay, len(recent) + 1, self.restart_window)
        self._restarting[i] = asyncio.ensure_future(self._restart_later(i, proc, delay))

    def _give_up(self, i: int, why: str) -> None:
        self._given_up[i] = why
        log.error("supervisor: %s stays failed: %s. Last lines of its log:\n%s", self.cluster.plans[i].name, why,
                  self.cluster.logs(i, 10))
        self._event("failed", i, why)

    async def _restart_later(self, i: int, proc, delay: float) -> None:
        c = self.cluster
        try:
            while True:
                await asyncio.sleep(delay)
                self._times.setdefault(i, []).append(time.monotonic())
                self._counts[i] = self._counts.get(i, 0) + 1
                try:
                    new = await c.arecover(i, proc)
                except ReplicaStartError as e:
                    proc = c.process(i)
                    recent = self._recent(i)
                    if len(recent) >= self.max_restarts:
                        self._give_up(i, f"its restart failed: {e.reason}; {len(recent)} restarts in the last "
                                         f"{self.restart_window:.0f} s (max_restarts={self.max_restarts})")
                        return
                    self._streak[i] = self._streak.get(i, 0) + 1
                    delay = min(BACKOFF_CAP_S, 2.0 ** self._streak[i])
                    log.warning("supervisor: restarting %s failed (%s); again in %.0f s", c.plans[i].name, e.reason,
                                delay)
                    continue
                if new is None:
                    self._counts[i] -= 1  # the user took it in hand meanwhile
                    return
                self._last_ok[i] = self._up_since[i] = time.monotonic()
                log.warning("supervisor: %s restarted (pid %s, %s, port %s)", c.plans[i].name, new.pid,
                            c.plans[i].pinning, c.plans[i].port)
                self._event("restarted", i, str(new.pid))
                return
        finally:
            if self._restarting.get(i) is asyncio.current_task():
                del self._restarting[i]
