"""The router thread's short scheduler slice: asked for with reset-on-fork, so what it starts gets
the kernel's default; the setting is checked and refused with a clear error; off when asked."""
from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
import threading

import pytest

from nbkit import sched_slice
from nbkit.sched_slice import request_short_slice, slice_from_env

_GETATTR = {"x86_64": 315, "aarch64": 275}  # __NR_sched_getattr


def runtime_ns(tid: int = 0) -> int | None:
    """sched_getattr's sched_runtime of a thread (0: the caller): the slice on kernels >= 6.12."""
    nr = _GETATTR.get(platform.machine())
    if nr is None or not sys.platform.startswith("linux"):
        return None
    attr = sched_slice._SchedAttr()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(nr, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        return None
    return attr.sched_runtime


def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_the_env_setting_is_checked_and_names_itself(monkeypatch):
    monkeypatch.delenv("NBKIT_SCHED_SLICE_US", raising=False)
    assert slice_from_env() == sched_slice.DEFAULT_SLICE_US
    monkeypatch.setenv("NBKIT_SCHED_SLICE_US", "0")
    assert slice_from_env() == 0 and request_short_slice() == "off"
    monkeypatch.setenv("NBKIT_SCHED_SLICE_US", "250")
    assert slice_from_env() == 250
    for bad in ("fast", "50", "200000", "1.5"):
        monkeypatch.setenv("NBKIT_SCHED_SLICE_US", bad)
        with pytest.raises(ValueError, match=f"NBKIT_SCHED_SLICE_US='{bad}'"):
            slice_from_env()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sched_setattr is Linux's")
def test_a_thread_gets_the_slice_and_what_it_starts_does_not():
    default = in_thread(runtime_ns)  # a fresh thread: the kernel's default slice
    if default is None or default == 0:
        pytest.skip("this kernel reports no slice through sched_getattr (custom slices: Linux 6.12+)")

    def ask_then_spawn():
        outcome = request_short_slice(300)
        mine = runtime_ns()
        child_thread = in_thread(runtime_ns)
        # a child process (as the loop thread starts replicas) reads its own slice
        probe = subprocess.run([sys.executable, __file__, "--runtime"], capture_output=True, text=True, timeout=60)
        return outcome, mine, child_thread, probe.stdout.strip()

    outcome, mine, child_thread, child_process = in_thread(ask_then_spawn)
    assert outcome == "slice 300 us"
    assert mine == 300_000
    assert child_thread == default
    assert int(child_process) == default
    assert in_thread(runtime_ns) == default  # another thread of this process was never touched


if __name__ == "__main__" and sys.argv[1:] == ["--runtime"]:
    print(runtime_ns())
