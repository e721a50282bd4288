"""nbkit: run several vLLM replicas side by side from a Jupyter kernel and route requests across them.

    from nbkit import Cluster
    with Cluster.replicas(n=2) as cluster:      # tiny model on CPU cores when there is no GPU
        print(cluster.status_frame())
"""

from .client import RoutedClient, RoutedClientError
from .cluster import Cluster, Rank, ReplicaStatus
from .dispatch import Endpoint
from .policies import Policy, RankLoad, RequestInfo, available_policies, get_policy, register
from .router import RequestRecord, Router
from .launch import ReplicaStartError
from .plan import GPU, Inventory, LaunchPlan, ReplicaSpec, SpecError, data_parallel_specs, discover, plan_replicas
from .tiny import tiny_model

__all__ = [
    "RoutedClient", "RoutedClientError", "Endpoint", "Policy", "RankLoad", "RequestInfo", "available_policies",
    "get_policy", "register", "RequestRecord", "Router", "Cluster", "Rank", "ReplicaStatus", "ReplicaStartError", "GPU", "Inventory", "LaunchPlan",
    "ReplicaSpec", "SpecError", "data_parallel_specs", "discover", "plan_replicas", "tiny_model",
]
__version__ = "0.1.0"
