"""Ray-based multi-node placement: one pinned vLLM replica per Ray node, routed by nbkit's client.

Use it when the replicas of one model should spread over several machines that already form a
Ray cluster (or when you want to rehearse that on one machine)::

    from nbkit import RoutedClient
    from nbkit.ray import RayNodes, RayReplicas

    nodes = RayNodes.local(num_nodes=2)            # rehearsal: a head + 1 node on 127.0.0.1
    # nodes = RayNodes.connect("auto")             # real: join the cluster of `ray start --head ...`
    group = RayReplicas.one_per_node(model, nodes=nodes, port_start=8100)
    try:
        group.start()                              # blocks until every replica answers /health
        group.placement_frame()                    # rank -> node id -> URL, pinning, pids
        client = RoutedClient(group.ranks, "least_load", model=group.model)   # or group.client()
        ...
    finally:
        group.stop()                               # replicas (SIGTERM group -> SIGKILL), then actors
        nodes.shutdown()                           # the rehearsal cluster (a connection: disconnect only)

What runs where
- The kernel (the Ray *driver*) holds :class:`RayNodes` (a Ray connection) and
  :class:`RayReplicas` (actor handles), and sends requests straight to the replicas' URLs
  through :class:`~nbkit.routing.client.RoutedClient`; Ray carries no request traffic.
- On each chosen node, a :class:`ReplicaHost` actor (``num_cpus=0``; ``num_gpus`` = the
  replica's GPUs on GPU nodes, so Ray's ``CUDA_VISIBLE_DEVICES`` scopes it) is placed by
  ``NodeAffinitySchedulingStrategy(node_id, soft=False)``. In its own process it plans the
  replica with :func:`nbkit.cluster.placement.plan_replicas` against *that node's* inventory, binds it to the
  node's IP (``VLLM_HOST_IP`` too), spawns it with :class:`nbkit.cluster.process.ReplicaProcess` (own
  session, log file on the node) and waits for ``/health``.
- Nodes that share a machine (the local rehearsal: every node is 127.0.0.1) split its CPU cores:
  with 2 cores, node 0's replica is pinned to core 0 and node 1's to core 1. On separate
  machines each replica gets its whole node. Explicit ``ReplicaSpec.cores`` win.

Nothing left running
- ``group.stop()`` asks every actor to stop its replica (SIGTERM to the process group, SIGKILL
  after ``stop_grace``), then kills the actors. A failed or interrupted ``start()`` does the same.
- If an actor's worker process dies (``ray.kill``, node trouble, the driver's job ending), the
  nbkit watchdog that the actor's process started (:mod:`nbkit.cluster.watchdog`, its own session) sees
  EOF and kills the replica's group. Ray's per-worker cleanup cannot reach the replica (new
  session) nor that watchdog, so the watchdog always gets to act.
- :meth:`RayNodes.local` runs the rehearsal cluster (``ray.cluster_utils.Cluster``) inside a
  small helper process in its own session, registered with the kernel's nbkit watchdog:
  ``nodes.shutdown()`` stops it cleanly, and if the kernel dies the watchdog kills the whole
  group (GCS, raylets, agents); the actors' workers then exit and their watchdogs stop the
  replicas. Only processes this module started are ever signalled.

Quirks of Ray 2.60 handled here: ``ray.init`` rewrites ``127.0.0.1`` into the machine's address
(where a loopback-bound cluster does not listen), so the driver connects with that rewrite
switched off. A raylet dies if its dashboard agent has not written its port within 15 s (fixed
in the binary); on a busy 2-core machine the agent's ``import ray`` is the problem, mostly
``jsonschema`` importing ``rfc3987_syntax``, which builds an Earley parser at import (~5 s of
CPU). The rehearsal's Ray processes therefore get a shim that defers that parser to its first
use (same results), the head skips the autoscaler and log monitors, and a failed start is
retried.
"""

from nbkit.ray.nodes import RayNodes
from nbkit.ray.placement import HEAD_RESOURCE, Placement, RayNode, alive_nodes, place, plan_on_node, ranks_of, share
from nbkit.ray.replicas import RayReplicas

__all__ = ["RayNodes", "RayReplicas", "HEAD_RESOURCE", "Placement", "RayNode", "alive_nodes", "place", "plan_on_node",
           "ranks_of", "share"]
