"""Admission's pieces: a request's :class:`Lease` on a rank, a queued request's waiter, the errors
that admission raises (:class:`NoHealthyRank`, :class:`Overloaded`) and the check of its options.
The :class:`~nbkit.routing.router.Router` hands these out; a lease updates the router's per-rank
accounting under :attr:`Router.lock` and tells :meth:`Router.finished` when it is released::

    lease = await router.acquire(info)       # a Lease
    lease.first_token(); lease.token(3); lease.release("ok")
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from nbkit.policies import Choice, NoCandidateError, RequestInfo
from nbkit.policies.slots import check_slots
from nbkit.routing.state import RankState, RequestRecord

if TYPE_CHECKING:
    from nbkit.routing.router import Router


class NoHealthyRank(NoCandidateError):
    """Every rank that could take the request is down (its process exited; restarting or failed)."""

    status = 503
    retry_after = 5.0


class Overloaded(NoCandidateError):
    """The admission queue shed the request: full (``status`` 429) or waited too long (503).
    ``retry_after``: seconds a client should wait before trying again."""

    def __init__(self, message: str, status: int, retry_after: float):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


def check_admission(*, max_per_rank: int | None = None, max_concurrency: int | None = None,
                    max_queue: int | None = None, queue_timeout: float | None = None,
                    interactive_headroom: int | None = 0) -> None:
    """Raise ValueError naming the first admission option that a Router would refuse."""
    check_slots(max_per_rank=max_per_rank, max_concurrency=max_concurrency, interactive_headroom=interactive_headroom)
    if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0):
        raise ValueError(f"max_queue={max_queue!r}: must be a whole number >= 0 or None")
    if queue_timeout is not None and not (isinstance(queue_timeout, (int, float)) and queue_timeout > 0):
        raise ValueError(f"queue_timeout={queue_timeout!r}: must be > 0 seconds or None")


def uncached(info: RequestInfo, choice: Choice) -> int:
    """Prompt tokens the rank will really have to prefill (the policy's cache estimate aside)."""
    return max(0, int(info.prompt_tokens - choice.cached_tokens))


class Lease:
    """A request's hold on a rank. Update it as the response arrives; release it exactly once."""

    def __init__(self, router: "Router", state: RankState, choice: Choice, info: RequestInfo, record: RequestRecord):
        self.router, self.state, self.choice, self.info, self.record = router, state, choice, info, record
        self._t0 = time.perf_counter()
        self._last = None
        self._prefill = uncached(info, choice)
        self._decode = info.max_tokens
        self.released = False

    @property
    def rank(self):
        return self.state.rank

    @property
    def started(self) -> float:
        """``time.perf_counter()`` when the request's times start (see :meth:`backdate`)."""
        return self._t0

    def backdate(self, seconds: float) -> None:
        """Count the request's times (TTFT, E2E) from ``seconds`` earlier than the lease's start: work
        done for it before it got this rank (a prefill/decode split's prefill phase)."""
        self._t0 -= seconds

    def first_token(self) -> None:
        if self._prefill:
            with self.router.lock:
                self.state.pending_prefill_tokens -= self._prefill
                self._prefill = 0
        now = time.perf_counter()
        if self.record.ttft_s is None:
            self.record.ttft_s = now - self._t0
        self._last = now

    def token(self, n: int = 1) -> None:
        """``n`` tokens arrived (streaming)."""
        if self.record.ttft_s is None:
            self.first_token()
        now = time.perf_counter()
        if self._last is not None and self.record.tokens_out:
            self.record.itl_s.append(now - self._last)
        self._last = now
        self.record.tokens_out += n
        with self.router.lock:
            take = min(n, self._decode)
            self._decode -= take
            self.state.pending_decode_tokens -= take

    def release(self, outcome: str = "ok", error: str = "") -> None:
        with self.router.lock:
            if self.released:
                return
            self.released = True
            s = self.state
            s.in_flight -= 1
            s.pending_prefill_tokens -= self._prefill
            s.pending_decode_tokens -= self._decode
            self._prefill = self._decode = 0
            self.record.e2e_s = time.perf_counter() - self._t0
            self.record.outcome = outcome
            if error:
                self.record.error = error
            if outcome == "ok":
                s.failures = 0
            self.router.finished(self)


class Waiter:
    """A request in the admission queue; ``granted`` once a lease is on its way to it."""

    __slots__ = ("fut", "info", "rank", "exclude", "record", "roles", "granted")

    def __init__(self, fut, info, rank, exclude, record, roles):
        self.fut, self.info, self.rank, self.exclude, self.record, self.roles = fut, info, rank, exclude, record, roles
        self.granted = False


def settle(fut: asyncio.Future, lease: Lease | None = None, exc: BaseException | None = None) -> None:
    """Complete a waiter's future from whichever thread the grant happens on."""
    try:
        here = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    home = fut.get_loop()
    if home is here:
        complete_waiter(fut, lease, exc)
        return
    try:
        home.call_soon_threadsafe(complete_waiter, fut, lease, exc)
    except RuntimeError:  # the waiter's loop is closed: nobody is waiting any more
        if lease is not None:
            lease.release("cancelled")


def complete_waiter(fut: asyncio.Future, lease: Lease | None, exc: BaseException | None) -> None:
    if fut.done():  # the waiter was cancelled while its lease was on the way
        if lease is not None:
            lease.release("cancelled")
    elif exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(lease)
