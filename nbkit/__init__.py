"""nbkit: run several vLLM replicas side by side from a Jupyter kernel and route requests across them.

    from nbkit import Cluster
    with Cluster.replicas(n=2) as cluster:      # tiny model on CPU cores when there is no GPU
        print(cluster.status_frame())

The public names below are imported on first use, so ``import nbkit`` (and ``import nbkit.sim``)
stays cheap. The layers, each a subpackage that imports only the ones before it:

- ``nbkit.http``: transports and the lean HTTP/1.1 client (imports nothing else of nbkit)
- ``nbkit.policies``, ``nbkit.records``, ``nbkit.traces``: pure data and decisions, shared by the
  router and the simulator
- ``nbkit.routing``: router (accounting, admission, health), probes, forwarding, client, endpoint
- ``nbkit.cluster``: specs, placement, replica processes, watchdog, the Cluster; ``nbkit.ray``
- ``nbkit.ui`` (monitor, panel), ``nbkit.bench``, ``nbkit.sim``, ``nbkit.cli``
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "RoutedClient": "nbkit.routing.client", "RoutedClientError": "nbkit.routing.client",
    "Endpoint": "nbkit.routing.endpoint",
    "Router": "nbkit.routing.router", "RequestRecord": "nbkit.routing.state",
    "Rank": "nbkit.routing.rank",
    "Policy": "nbkit.policies", "RankLoad": "nbkit.policies", "RequestInfo": "nbkit.policies",
    "available_policies": "nbkit.policies", "get_policy": "nbkit.policies", "register": "nbkit.policies",
    "Cluster": "nbkit.cluster.cluster", "ReplicaStatus": "nbkit.cluster.cluster",
    "ReplicaStartError": "nbkit.cluster.process",
    "GPU": "nbkit.cluster.spec", "Inventory": "nbkit.cluster.spec", "LaunchPlan": "nbkit.cluster.spec",
    "ReplicaSpec": "nbkit.cluster.spec", "SpecError": "nbkit.cluster.spec",
    "data_parallel_specs": "nbkit.cluster.spec", "discover": "nbkit.cluster.spec",
    "plan_replicas": "nbkit.cluster.placement",
    "tiny_model": "nbkit.tiny", "tiny_lora": "nbkit.tiny",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nbkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from nbkit.cluster.cluster import Cluster, ReplicaStatus  # noqa: F401
    from nbkit.cluster.placement import plan_replicas  # noqa: F401
    from nbkit.cluster.process import ReplicaStartError  # noqa: F401
    from nbkit.cluster.spec import GPU, Inventory, LaunchPlan, ReplicaSpec, SpecError, data_parallel_specs, discover  # noqa: F401
    from nbkit.policies import Policy, RankLoad, RequestInfo, available_policies, get_policy, register  # noqa: F401
    from nbkit.routing.client import RoutedClient, RoutedClientError  # noqa: F401
    from nbkit.routing.endpoint import Endpoint  # noqa: F401
    from nbkit.routing.rank import Rank  # noqa: F401
    from nbkit.routing.router import Router  # noqa: F401
    from nbkit.routing.state import RequestRecord  # noqa: F401
    from nbkit.tiny import tiny_lora, tiny_model  # noqa: F401
