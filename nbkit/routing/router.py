"""The router's mechanism: per-rank accounting, a fair admission queue, load scraping, health and
circuit breaking. Which rank gets a request is the policy's business (:mod:`nbkit.policies`).

    router = Router(cluster.ranks, policy="least_load", max_per_rank=64, max_concurrency=256)
    await router.start()                       # on nbkit's loop: scraper + health checker
    lease = await router.acquire(RequestInfo(prompt_tokens=120, max_tokens=64))
    ... send to lease.rank.url ...
    lease.first_token(); lease.token(); lease.release("ok")
    router.records[-1]                         # what happened, and why

Accounting: a lease adds ``in_flight``, the prompt's tokens to ``pending_prefill_tokens`` and
``max_tokens`` to ``pending_decode_tokens`` at dispatch; the first token moves the prompt out of
prefill, each streamed token takes one off decode, and :meth:`Lease.release` (called in a
``finally``: success, error, cancel, stream end) removes what is left. Every
``scrape_interval`` (250 ms) each replica's ``/metrics`` is read concurrently, while the policy
reads scraped load (``Policy.uses_scrape``; every ``IDLE_SCRAPE_S`` = 2 s otherwise); a reading
older than two intervals is stale and ignored by the policies.

Admission: with ``max_per_rank`` and/or ``max_concurrency`` set, requests that cannot be placed
wait in one queue (a :class:`~nbkit.policies.tenants.FairQueue`): the most urgent priority first,
then weighted fair queuing on tokens across tenants, FIFO within a tenant (one tenant and one
priority: plain FIFO); when a slot frees, the first request in that order that can be placed picks
among the ranks with room. ``tenants`` (:mod:`nbkit.routing.admission`) names who sent what, their
weights and priorities, and rate-limits them (:meth:`admit`: 429 over a limit). ``max_queue`` bounds the queue's depth (a request beyond it is shed at once:
:class:`Overloaded`, status 429) and ``queue_timeout`` the wait (shed after it: status 503); both
unbounded by default. Shed requests are counted (``counters["shed"]``).

Faults: the owner of the ranks' processes (the :class:`~nbkit.cluster.cluster.Cluster`) calls
:meth:`Router.mark_down` the moment a replica's process exits, and :meth:`Router.mark_up` once its
restart is healthy; a down rank gets no request (grace or not), and when every candidate is down
:meth:`Router.acquire` raises :class:`NoHealthyRank` (the endpoint's 503) instead of waiting.

Threads: one Router may be used from several event loops at once (a RoutedClient serves callers
on their own loops while the scraper runs on nbkit's): every change to the accounting, the queue
and the policy's state happens under one lock, and a queued request granted from another thread
is handed to its own loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import threading
import time
from collections import deque
from typing import Callable, Iterable, Sequence

from nbkit.policies.slots import Slots, request_cost
from nbkit.policies.tenants import FairQueue
from nbkit.routing.admission import Admission, Throttled
from nbkit.routing.lease import (Lease, NoHealthyRank, Overloaded, Waiter, check_admission, settle,  # noqa: F401
                                 uncached)
from nbkit.routing.state import RankState, RequestRecord
from nbkit.routing.probes import PROBE_TIMEOUT_S, Probe, ProbeError
from nbkit.routing.request_info import request_info
from nbkit.policies import Choice, NoCandidateError, Policy, RankLoad, RequestInfo, get_policy
from nbkit.http.transport import Transport

log = logging.getLogger(__name__)

#: Consecutive failures that open a rank's circuit breaker.
BREAKER_FAILURES = 3
#: Seconds an open breaker keeps a rank out before a request may try it again.
BREAKER_OPEN_S = 5.0
#: Records kept in memory.
MAX_RECORDS = 20_000


#: Scrape interval while the policy ignores scraped load (round_robin, random, least_outstanding)
IDLE_SCRAPE_S = 2.0


class Router:
    """Routes requests over ranks with a policy; see the module docstring."""

    def __init__(self, ranks: Sequence, policy: str | Policy | Callable = "least_load", *,
                 max_per_rank: int | None = None, max_concurrency: int | None = None,
                 scrape_interval: float = 0.25, health_interval: float = 1.0, startup_grace: float = 30.0,
                 seed: int | None = None, client: "Transport | str | None" = None, probe: Probe | None = None,
                 kv_index=None, tokenizer=None, max_queue: int | None = None, queue_timeout: float | None = None,
                 tenants=None, vllm_priority: bool = False, interactive_headroom: int = 0, loras=None):
        check_admission(max_per_rank=max_per_rank, max_concurrency=max_concurrency, max_queue=max_queue,
                        queue_timeout=queue_timeout, interactive_headroom=interactive_headroom)
        #: the caps (max_per_rank, max_concurrency, interactive_headroom: slots beyond them only
        #: interactive requests may use), the rule the simulator applies too
        self.slots = Slots(max_per_rank, max_concurrency, interactive_headroom)
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        if scrape_interval <= 0 or scrape_interval > 0.25:
            raise ValueError(f"scrape_interval={scrape_interval!r}: must be in (0, 0.25] seconds")
        self._seed = seed
        self._lock = threading.RLock()
        self.lock = self._lock  #: guards the accounting, the queue and the policy (leases take it too)
        #: the exact KV-cache index (:class:`~nbkit.policies.kv_index.KVIndex`) and the served model's
        #: tokenizer (:class:`~nbkit.routing.tokenize.PromptTokenizer`), for policies that read them
        self.kv_index, self.tokenizer = kv_index, tokenizer
        #: which rank holds which LoRA adapter, and their loads (:class:`~nbkit.routing.lora.Adapters`)
        self.loras = loras
        #: tenants, priorities and rate limits (:class:`~nbkit.routing.admission.Admission`)
        self.admission = Admission(tenants, vllm_priority=vllm_priority)
        self._fallback = ""  # the last cause a policy gave for not deciding as designed
        self._policy = self._make_policy(policy)
        self.scrape_interval = scrape_interval
        self.health_interval = health_interval
        self.startup_grace = startup_grace
        self.states: list[RankState] = []
        self.set_ranks(ranks)
        self.records: deque[RequestRecord] = deque(maxlen=MAX_RECORDS)
        #: called with each record when its request is finished (or abandoned); see :meth:`add_listener`
        self.listeners: list[Callable[[RequestRecord], None]] = []
        #: called with each record as it is created, on the caller's thread (before routing)
        self.created_listeners: list[Callable[[RequestRecord], None]] = []
        self._queue = FairQueue()  # of Waiters: priority, then fair share across tenants, FIFO within one
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []
        # /metrics and /health: a Probe given (not closed here), or one over ``client`` (a transport
        # name, a Transport or an httpx.AsyncClient; the lean http1 transport by default)
        self._client = client
        self._probe: Probe | None = probe
        self._own_probe = probe is None
        self.counters = {"requests": 0, "retries": 0, "failures": 0, "shed": 0, "migrations": 0, "throttled": 0}
        self.fallbacks = 0  # decisions a policy made by its fallback (kv_aware without a trusted index)

    # -- configuration ---------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, spec) -> None:
        """Switch policy live (by name, instance, class or callable)."""
        p = self._make_policy(spec)
        with self._lock:
            p.on_ranks_changed([s.key for s in self.states])
            self._policy = p

    def _make_policy(self, spec) -> Policy:
        if self._seed is not None and (isinstance(spec, str) or (isinstance(spec, type) and issubclass(spec, Policy))):
            spec = get_policy(spec, seed=self._seed)
        p = get_policy(spec)  # a name may carry its own options: "prefix_affinity:affinity_weight=0.5"
        if p.uses_kv_index:
            p.kv_index = self.kv_index
        return p

    def set_ranks(self, ranks: Iterable) -> None:
        """Replace the rank set (after a scale); keeps state of ranks that stay."""
        old = {s.key: s for s in self.states}
        new = []
        for i, r in enumerate(ranks):
            s = old.get(r.name)
            if s is None or s.rank.url != r.url:
                s = RankState(rank=r, index=i)
            s.rank, s.index = r, i
            new.append(s)
        if not new:
            raise ValueError("ranks: a router needs at least one rank")
        with self._lock:
            self.states = new
            self._policy.on_ranks_changed([s.key for s in new])
            if getattr(self, "_queue", None):
                self._pump()  # new ranks may have room for queued requests

    def set_max_concurrency(self, value: int | None) -> None:
        """Change the cap on requests in flight over all ranks (None or 0: no cap), live; requests
        queued behind the old cap are admitted at once if the new one has room."""
        value = value or None
        if value is not None and value < 1:
            raise ValueError(f"max_concurrency={value!r}: must be >= 1 or None")
        with self._lock:
            self.slots.max_concurrency = value
            log.info("router: max_concurrency -> %s", value or "unlimited")
            self._pump()

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.states)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def queued_by_tenant(self) -> dict[str, int]:
        """Requests waiting in the admission queue, per tenant."""
        with self._lock:
            return {t: int(v["queued"]) for t, v in self._queue.stats().items()}

    def loads(self) -> list[RankLoad]:
        now = time.time()
        return [s.view(2 * self.scrape_interval, now) for s in self.states]

    # -- admission -------------------------------------------------------------------------------
    max_per_rank = property(lambda self: self.slots.max_per_rank)
    max_concurrency = property(lambda self: self.slots.max_concurrency)
    interactive_headroom = property(lambda self: self.slots.interactive_headroom)

    def _has_room(self, s: RankState, info: RequestInfo) -> bool:
        return self.slots.rank_room(s.in_flight, info.priority)

    def _global_room(self, info: RequestInfo) -> bool:
        return self.slots.total_room(self.in_flight, info.priority)

    def _place(self, info: RequestInfo, rank, exclude: frozenset, roles: frozenset | None = None
               ) -> tuple[RankState, Choice] | None:
        if not self._global_room(info):
            return None
        if rank is not None:
            s = self._resolve(rank)
            if s.down:
                raise NoHealthyRank(f"rank={rank!r}: {s.key} is down ({s.down})")
            if not self._has_room(s, info):
                return None
            return s, Choice(s.index, s.key, f"explicit rank={rank!r}")
        now = time.time()
        pool = [s for s in self.states if s.key not in exclude
                and (roles is None or getattr(s.rank, "role", "both") in roles)]
        up = [s for s in pool if not s.down]
        if pool and not up:
            raise NoHealthyRank("no healthy rank: " + "; ".join(f"{s.key} {s.down}" for s in pool))
        cands = [s for s in up if self._has_room(s, info)]
        if not cands:
            return None
        views = [s.view(2 * self.scrape_interval, now) for s in cands]
        if self.loras is not None and info.lora:
            self.loras.annotate(views)  # RankLoad.loras: the policy's LoRA affinity reads them
        choice = self._policy.select(views, info)
        return self.states[choice.index], choice

    def _resolve(self, rank) -> RankState:
        if isinstance(rank, int) and not isinstance(rank, bool):
            if not 0 <= rank < len(self.states):
                raise ValueError(f"rank={rank!r}: out of range 0..{len(self.states) - 1}")
            return self.states[rank]
        key = getattr(rank, "name", rank)
        for s in self.states:
            if s.key == key:
                return s
        raise ValueError(f"rank={rank!r}: no such rank (have {[s.key for s in self.states]})")

    def _grant(self, s: RankState, choice: Choice, info: RequestInfo, record: RequestRecord) -> Lease:
        s.in_flight += 1
        if s.in_flight > s.inflight_peak:
            s.inflight_peak = s.in_flight
        s.pending_prefill_tokens += uncached(info, choice)
        s.pending_decode_tokens += info.max_tokens
        s.picks += 1
        record.rank, record.replica, record.dp_rank = s.key, s.rank.replica, s.rank.dp_rank
        record.reason = choice.reason
        record.cached_tokens = int(choice.cached_tokens)
        record.queue_wait_s = time.time() - record.arrival
        record.tenant, record.priority = info.tenant, info.priority
        self.admission.started(info)
        if choice.fallback != self._fallback:
            if choice.fallback:
                log.warning("router: %s cannot decide as designed (%s); %s", self._policy.name, choice.fallback,
                            choice.reason.split(":", 1)[0])
            else:
                log.info("router: %s decides as designed again", self._policy.name)
            self._fallback = choice.fallback
        if choice.fallback:
            self.fallbacks += 1
        self._policy.on_dispatch(choice, info)
        return Lease(self, s, choice, info, record)

    def describe(self, body, headers=None, *, trusted: bool = False) -> RequestInfo:
        """What the policy needs of an OpenAI-style request body: token counts, prefix, session, the
        exact token ids when the policy reads the KV-cache index and a tokenizer is set, and who
        sent it with what priority (``trusted``: the in-kernel client, whose tenant needs no API
        key). Raises :class:`~nbkit.routing.admission.TenantError` (401/400) for a bad key or name."""
        tokenizer = self.tokenizer if self._policy.uses_kv_index else None
        info = request_info(body, headers, tokenizer=tokenizer)
        if self.loras is not None:  # the adapter it names; UnknownAdapter (404) for one nobody has
            self.loras.classify(info, body)
        return self.admission.classify(info, headers, body, trusted=trusted)

    def admit(self, info: RequestInfo, record: RequestRecord) -> None:
        """Charge a new request to its tenant's rate limits (once, before its first attempt); over a
        limit it is abandoned as ``throttled`` and :class:`~nbkit.routing.admission.Throttled`
        (429, ``retry_after``) is raised."""
        try:
            self.admission.charge(info, record)
        except Throttled as e:
            self.count("throttled")
            self._abandon(record, "throttled", str(e))
            raise

    async def acquire(self, info: RequestInfo, *, rank=None, exclude: Iterable[str] = (), path: str = "",
                      record: RequestRecord | None = None, roles: Iterable[str] | None = None) -> Lease:
        """Pick a rank for ``info`` (or use ``rank=``) and wait, FIFO, until it has room; a LoRA request's
        adapter is then loaded there if it is not yet (:mod:`nbkit.routing.lora`).

        ``roles`` limits the candidates to ranks of those roles (``{"prefill", "both"}``, ...).
        """
        lease = await self._acquire(info, rank=rank, exclude=exclude, path=path, record=record, roles=roles)
        if self.loras is not None and info.lora:
            await self.loras.ensure(lease)
        return lease

    async def _acquire(self, info: RequestInfo, *, rank=None, exclude: Iterable[str] = (),
                       path: str = "", record: RequestRecord | None = None, roles: Iterable[str] | None = None) -> Lease:
        exclude = frozenset(exclude)
        roles = frozenset(roles) if roles is not None else None
        if roles is not None and not any(getattr(s.rank, "role", "both") in roles for s in self.states):
            e = ValueError(f"roles={sorted(roles)}: no rank has one of these roles")
            if record is None:
                record = self.new_record(path, info)
            self._abandon(record, "error", repr(e))
            raise e
        if record is None:
            record = self.new_record(path, info)
        with self._lock:
            try:
                if rank is not None:
                    self._resolve(rank)  # fail fast on a bad rank
                # The queue only ever holds requests that cannot be placed now (every release pumps
                # it), so a newcomer that fits somewhere goes at once without overtaking anyone who could.
                self._pump()
                placed = self._place(info, rank, exclude, roles)
            except Exception as e:
                self._abandon(record, "error", repr(e))
                raise
            if placed is not None:
                return self._grant(*placed, info, record)
            if self.max_queue is not None and len(self._queue) >= self.max_queue:
                e = Overloaded(f"admission queue full ({len(self._queue)} waiting, max_queue={self.max_queue})",
                               429, self._retry_after())
                self._shed(record, e)
                raise e
            waiter = Waiter(asyncio.get_running_loop().create_future(), info, rank, exclude, record, roles)
            self._queue.push(waiter, tenant=info.tenant, weight=self.admission.weight(info.tenant),
                             priority=info.priority, cost=request_cost(info.prompt_tokens, info.max_tokens))
        try:
            if self.queue_timeout is None:
                return await waiter.fut
            done, _ = await asyncio.wait((waiter.fut,), timeout=self.queue_timeout)
            if not done:
                with self._lock:
                    if self._unqueue(waiter):
                        e = Overloaded(f"no rank had room within queue_timeout={self.queue_timeout:g} s",
                                       503, self._retry_after())
                        self._shed(record, e)
                        waiter.fut.cancel()
                        raise e
            return await waiter.fut  # granted meanwhile (perhaps from another thread): take it
        except asyncio.CancelledError:
            with self._lock:
                if self._unqueue(waiter):
                    self._abandon(record, "cancelled")
                elif waiter.fut.done() and not waiter.fut.cancelled():
                    waiter.fut.result().release("cancelled")
                # else: the lease is on its way from another thread; complete_waiter releases it there
            raise
        except Exception as e:
            self._abandon(record, "error", repr(e))
            raise

    def _unqueue(self, waiter: Waiter) -> bool:
        """Take a waiter that was not granted out of the queue (under the lock); False if it was granted."""
        if waiter.granted:
            return False
        self._queue.remove(waiter)
        return True

    def _retry_after(self) -> float:
        """A Retry-After for shed requests: about how long the queue takes to move (>= 1 s)."""
        return float(max(1, min(30, round(self.queue_timeout or 1.0))))

    def _shed(self, record: RequestRecord, e: Overloaded) -> None:
        self.counters["shed"] += 1
        log.info("router: request %d shed: %s", record.id, e)
        self._abandon(record, "shed", str(e))

    def _abandon(self, record: RequestRecord, outcome: str, error: str = "") -> None:
        """A request that never got a rank (cancelled while queued, bad rank, router closed)."""
        if record.outcome == "pending":
            record.outcome, record.error = outcome, error
            record.queue_wait_s = time.time() - record.arrival
            self._publish(record)

    def count(self, key: str) -> None:
        """Add one to ``counters[key]`` (callers on several threads)."""
        with self._lock:
            self.counters[key] += 1

    def add_listener(self, fn: Callable[[RequestRecord], None], *, when: str = "finished") -> Callable[[], None]:
        """Call ``fn(record)`` for every request, ``when="created"`` (as the router opens its record,
        on the caller's thread) or ``"finished"`` (once it is published to :attr:`records`).
        Returns a function that removes the listener. A listener that raises is ignored."""
        if when not in ("created", "finished"):
            raise ValueError(f"when={when!r}: expected 'created' or 'finished'")
        lst = self.created_listeners if when == "created" else self.listeners
        lst.append(fn)

        def remove() -> None:
            try:
                lst.remove(fn)
            except ValueError:
                pass
        return remove

    def new_record(self, path: str, info: RequestInfo) -> RequestRecord:
        self.count("requests")
        record = RequestRecord(id=next(self._ids), path=path, policy=self._policy.name, arrival=time.time(),
                               tokens_in=info.prompt_tokens)
        self._notify(self.created_listeners, record)
        return record

    @staticmethod
    def _notify(listeners: list, record: RequestRecord) -> None:
        for fn in list(listeners):
            try:
                fn(record)
            except Exception:  # noqa: BLE001 - a listener must not break routing
                log.exception("router: a record listener raised (ignored)")

    def finished(self, lease: Lease) -> None:
        """A lease was released: publish its record (unless the request is being retried), admit more."""
        self.admission.ended(lease.info, lease.record.outcome, lease.record.tokens_out)
        if lease.record.outcome != "retry":
            self._publish(lease.record)
        self._policy.on_release(lease.choice, lease.info)
        self._pump()

    def _publish(self, record: RequestRecord) -> None:
        self.records.append(record)
        if record.outcome not in ("ok", "cancelled"):
            self.count("failures")
        self._notify(self.listeners, record)

    def _pump(self) -> None:
        """Place the waiting requests that can be placed now, in the queue's order."""
        if not self._queue:
            return
        with self._lock:
            for w in self._queue:  # a snapshot in service order: taking from it is safe
                if w.fut.done():  # cancelled: its own loop abandons the record
                    self._queue.remove(w)
                    continue
                try:
                    placed = self._place(w.info, w.rank, w.exclude, w.roles)
                except Exception as e:  # noqa: BLE001 - hand the error to the waiter
                    self._queue.remove(w)
                    w.granted = True
                    settle(w.fut, exc=e)
                    continue
                if placed is None:
                    if not self._global_room(w.info):  # the rest are no more urgent: none fits
                        break
                    continue
                self._queue.take(w)
                w.granted = True
                settle(w.fut, self._grant(*placed, w.info, w.record))

    def mark_down(self, replica: int, reason: str) -> None:
        """Replica ``replica``'s process is gone: its ranks leave routing now (startup grace or
        not) until :meth:`mark_up`. Requests waiting for them are re-placed (or get NoHealthyRank)."""
        with self._lock:
            for s in self.states:
                if s.rank.replica == replica:
                    if not s.down:
                        log.warning("router: %s is down (%s); out of routing", s.key, reason)
                    s.down, s.healthy = reason or "down", False
            self._pump()

    def mark_up(self, replica: int) -> None:
        """Replica ``replica`` serves again (restarted and healthy): route to it, with a fresh breaker
        and load reading."""
        with self._lock:
            for s in self.states:
                if s.rank.replica == replica and (s.down or not s.healthy):
                    log.warning("router: %s is back in routing", s.key)
                    s.down, s.healthy, s.failures, s.open_until, s.scraped = "", True, 0, 0.0, None
                    s.added_at = time.monotonic()
            self._pump()

    @property
    def healthy_ranks(self) -> list[str]:
        """Names of the ranks that may be routed to now (not down, health checks passing)."""
        return [s.key for s in self.states if s.healthy and not s.down]

    def report_failure(self, state: RankState) -> None:
        """A connection error / 5xx / 429 on ``state``: count it towards its circuit breaker."""
        with self._lock:
            state.failures += 1
        in_grace = time.monotonic() - state.added_at < self.startup_grace and state.scraped is None
        if state.failures >= BREAKER_FAILURES and not in_grace:
            if time.monotonic() >= state.open_until:
                log.warning("router: %s failed %d times in a row; breaker open for %.0f s",
                            state.key, state.failures, BREAKER_OPEN_S)
            state.open_until = time.monotonic() + BREAKER_OPEN_S

    # -- background: scrape and health -----------------------------------------------------------
    async def start(self) -> None:
        """Start scraping and health checks on the current (nbkit's) loop."""
        if self._tasks:
            return
        self._tasks = [asyncio.ensure_future(self._scrape_loop()), asyncio.ensure_future(self._health_loop())]

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        with self._lock:
            for w in self._queue:
                w.granted = True
                settle(w.fut, exc=NoCandidateError("router closed"))
            self._queue.clear()
        if self._probe is not None and self._own_probe:
            await self._probe.aclose()
            self._probe = None

    @property
    def probe(self) -> Probe:
        """The :class:`~nbkit.routing.probes.Probe` that reads the ranks' /metrics and /health."""
        if self._probe is None:
            self._probe = Probe(self._client, timeout=PROBE_TIMEOUT_S)
        return self._probe

    async def scrape_once(self) -> None:
        probe = self.probe
        by_url: dict[str, list[RankState]] = {}
        for s in self.states:
            by_url.setdefault(s.rank.url, []).append(s)

        async def one(url: str, states: list[RankState]) -> None:
            peaks = []
            with self._lock:
                for s in states:  # the window this reading may describe starts now
                    peaks.append(s.inflight_peak)
                    s.inflight_peak = s.in_flight
            try:
                snaps = await probe.metrics(url)
            except (ProbeError, ValueError) as e:
                self._scrape_failed(states, e)
                return
            with self._lock:
                for s, peak in zip(states, peaks):
                    m = snaps.get(str(s.rank.dp_rank))
                    if m is None and len(snaps) == 1:
                        m = next(iter(snaps.values()))
                    if m is not None:
                        if s.scrape_error:
                            log.info("router: %s scraped again", s.key)
                            s.scrape_error = ""
                        s.scraped = m
                        # everything ours that ran since the previous scrape was sent may be in the gauge
                        s.inflight_seen = max(peak, s.inflight_peak)

        await asyncio.gather(*(one(u, ss) for u, ss in by_url.items()))

    @property
    def current_scrape_interval(self) -> float:
        """``scrape_interval`` while the policy reads scraped load; ``IDLE_SCRAPE_S`` otherwise.

        Reading vLLM's /metrics costs its API server ~4 ms of CPU each time, taken from serving:
        at 250 ms over two replicas that is ~40 ms more TTFT at p50 on a 2-core machine."""
        return self.scrape_interval if getattr(self._policy, "uses_scrape", True) else IDLE_SCRAPE_S

    async def _scrape_loop(self) -> None:
        while True:
            t = time.monotonic()
            await self.scrape_once()
            await asyncio.sleep(max(0.0, self.current_scrape_interval - (time.monotonic() - t)))

    def _scrape_failed(self, states: list[RankState], error: BaseException) -> None:
        why = re.sub(r"\?\S*", "", str(error))  # not the long series filter of the URL
        for s in states:
            if not s.scrape_error and s.scraped is not None and not s.down:  # once per outage; not when known down
                log.warning("router: scraping %s failed: %s", s.key, why)
            s.scrape_error = why

    async def check_health_once(self) -> None:
        probe = self.probe

        async def one(s: RankState) -> None:
            ok = await probe.health(s.rank.url)
            in_grace = time.monotonic() - s.added_at < self.startup_grace
            with self._lock:
                if s.down:
                    return  # its owner says when it serves again (mark_up)
                if ok:
                    if not s.healthy or s.open_until:
                        log.info("router: %s is healthy%s", s.key, " (breaker closed)" if s.open_until else "")
                    s.healthy, s.failures, s.open_until = True, 0, 0.0
                elif not in_grace:
                    if s.healthy:
                        log.warning("router: %s failed its health check; out of routing until it answers", s.key)
                    s.healthy = False
                if ok or not in_grace:
                    self._pump()

        await asyncio.gather(*(one(s) for s in self.states))

    async def _health_loop(self) -> None:
        while True:
            await self.check_health_once()
            await asyncio.sleep(self.health_interval)
