"""A short CPU-scheduler slice for nbkit's router thread, so that its wakeups do not wait behind
the replicas' compute threads.

On a machine whose cores are busy with the replicas (vLLM's engine and API-server threads; on CPU
replicas, all of them), a router thread woken by a socket waits until the scheduler preempts a
running thread for it. Linux's EEVDF scheduler (6.6 and newer) decides that by deadlines, and since
6.12 a task may ask for a shorter slice (``sched_setattr`` with ``sched_runtime``, 0.1-100 ms, no
privilege needed): its deadlines come sooner, so it runs sooner after it wakes, for shorter turns.
That is what a router is: many short bursts of work, each on some request's critical path.

    from nbkit.sched_slice import request_short_slice
    request_short_slice()            # the calling thread; NBKIT_SCHED_SLICE_US (default 100) decides
    request_short_slice(0)           # nothing asked (the kernel's default slice)

nbkit's loop thread (:mod:`nbkit.loop`) asks for it when it starts. The request carries
``SCHED_FLAG_RESET_ON_FORK``, so the processes and threads that thread starts (the replicas among
them) get the kernel's default slice, not this one. On kernels without custom slices the value is
accepted and ignored; on other systems (no ``sched_setattr``) nothing happens. Either way the
outcome is logged at debug level and returned; ``NBKIT_SCHED_SLICE_US=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

#: what nbkit's loop thread asks for unless NBKIT_SCHED_SLICE_US says otherwise (the kernel's floor)
DEFAULT_SLICE_US = 100
_SYSCALL = {"x86_64": 314, "aarch64": 274}   # __NR_sched_setattr
_RESET_ON_FORK = 0x01                        # SCHED_FLAG_RESET_ON_FORK
_SCHED_OTHER = 0


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32), ("sched_flags", ctypes.c_uint64),
                ("sched_nice", ctypes.c_int32), ("sched_priority", ctypes.c_uint32),
                ("sched_runtime", ctypes.c_uint64), ("sched_deadline", ctypes.c_uint64),
                ("sched_period", ctypes.c_uint64), ("sched_util_min", ctypes.c_uint32),
                ("sched_util_max", ctypes.c_uint32)]


def slice_from_env() -> int:
    """Microseconds from ``NBKIT_SCHED_SLICE_US`` (default :data:`DEFAULT_SLICE_US`; 0: off)."""
    raw = os.environ.get("NBKIT_SCHED_SLICE_US", "").strip()
    if not raw:
        return DEFAULT_SLICE_US
    try:
        us = int(raw)
    except ValueError:
        raise ValueError(f"NBKIT_SCHED_SLICE_US={raw!r}: expected a whole number of microseconds "
                         f"(100-100000, 0: off)") from None
    if us and not 100 <= us <= 100_000:
        raise ValueError(f"NBKIT_SCHED_SLICE_US={raw!r}: the kernel takes 100-100000 microseconds (0: off)")
    return us


def request_short_slice(us: int | None = None) -> str:
    """Ask for a ``us``-microsecond slice for the calling thread (None: :func:`slice_from_env`).
    Returns what happened, in words ("slice 100 us", "off", "not on this system: ...")."""
    us = slice_from_env() if us is None else us
    if not us:
        return "off"
    nr = _SYSCALL.get(platform.machine())
    if not sys.platform.startswith("linux") or nr is None:
        return f"not on this system: no sched_setattr on {sys.platform}/{platform.machine()}"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        nice = os.getpriority(os.PRIO_PROCESS, 0)  # the thread's own nice: kept as it is
        attr = _SchedAttr(size=ctypes.sizeof(_SchedAttr), sched_policy=_SCHED_OTHER, sched_flags=_RESET_ON_FORK,
                          sched_nice=nice, sched_runtime=us * 1000)
        if os.sched_getscheduler(0) != _SCHED_OTHER:
            return "not changed: the thread is not under the normal (SCHED_OTHER) policy"
        if libc.syscall(nr, 0, ctypes.byref(attr), 0) != 0:
            err = ctypes.get_errno()
            outcome = f"not granted: sched_setattr failed ({os.strerror(err)})"
        else:
            outcome = f"slice {us} us"
    except (OSError, AttributeError) as e:
        outcome = f"not granted: {e!r}"
    log.debug("scheduler slice for thread %d: %s", threading_id(), outcome)
    return outcome


def threading_id() -> int:
    """The calling thread's kernel id (what ``ps -L`` shows)."""
    import threading
    return threading.get_native_id()
