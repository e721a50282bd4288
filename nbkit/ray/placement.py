"""Placement of replicas on Ray nodes, as pure functions: which node runs which replica, with
which cores or GPUs, and the routable ranks of what started."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from nbkit.cluster.spec import DEFAULT_PORT_START, Inventory, LaunchPlan, ReplicaSpec, SpecError, resolve_device
from nbkit.cluster.placement import plan_replicas



HEAD_RESOURCE = "node:__internal_head__"


# -- pure planning (no Ray needed) -------------------------------------------------------------------
@dataclass(frozen=True)
class RayNode:
    """One alive Ray node as the driver sees it (from ``ray.nodes()``)."""

    node_id: str
    address: str
    hostname: str = ""
    is_head: bool = False
    resources: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def cpus(self) -> float:
        return self.resources.get("CPU", 0.0)

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0.0)

    @property
    def labels(self) -> list[str]:
        """Custom resources (e.g. ``node0``), without Ray's built-in and per-address ones."""
        builtin = {"CPU", "GPU", "memory", "object_store_memory"}
        return sorted(k for k in self.resources if k not in builtin and not k.startswith("node:")
                      and not k.startswith("accelerator_type:"))

    @classmethod
    def from_ray(cls, info: dict) -> "RayNode":
        res = dict(info.get("Resources") or {})
        return cls(node_id=info["NodeID"], address=info.get("NodeManagerAddress", ""),
                   hostname=info.get("NodeManagerHostname", ""), is_head=HEAD_RESOURCE in res, resources=res)


def alive_nodes(infos: Sequence[dict]) -> list[RayNode]:
    """``ray.nodes()`` -> alive nodes, head first, then by (address, first custom resource, id)."""
    nodes = [RayNode.from_ray(n) for n in infos if n.get("Alive", n.get("alive", False))]
    return sorted(nodes, key=lambda n: (not n.is_head, n.address, n.labels[:1], n.node_id))


@dataclass(frozen=True)
class Placement:
    """Replica ``index`` goes to ``node``; it is ``slot`` of ``slots`` replicas on that machine."""

    index: int
    spec: ReplicaSpec
    node: RayNode
    slot: int = 0
    slots: int = 1
    port: int = DEFAULT_PORT_START
    name: str = ""


def place(specs: Sequence[ReplicaSpec], nodes: Sequence[RayNode], *, node_ids: Sequence[str] | None = None,
          port_start: int = DEFAULT_PORT_START) -> list[Placement]:
    """One replica per node, in order. Pure: validates and assigns ports, names and machine slots.

    ``node_ids`` picks (and orders) the nodes; by default the first ``len(specs)`` of ``nodes``.
    Replica ``i`` gets ``spec.port`` or ``port_start + i`` (distinct even on one machine) and the
    name ``spec.name`` or ``node{i}``. Nodes with the same address share one machine: each gets a
    ``slot`` so the node-side planner can split that machine's cores.
    """
    if not specs:
        raise SpecError("replicas", [], "at least one replica is needed")
    by_id = {n.node_id: n for n in nodes}
    if node_ids is not None:
        missing = [i for i in node_ids if i not in by_id]
        if missing:
            raise SpecError("node_ids", list(node_ids), f"not alive Ray nodes: {missing} (alive: {sorted(by_id)})")
        if len(set(node_ids)) != len(node_ids):
            raise SpecError("node_ids", list(node_ids), "one replica per node: a node is listed twice")
        chosen = [by_id[i] for i in node_ids]
    else:
        chosen = list(nodes)
    if len(specs) > len(chosen):
        raise SpecError("replicas", len(specs), f"one replica per node needs {len(specs)} nodes, "
                                                f"{len(chosen)} {'given' if node_ids is not None else 'alive'}")
    if len(chosen) > len(specs) and node_ids is not None:
        raise SpecError("node_ids", list(node_ids), f"{len(node_ids)} nodes for {len(specs)} replicas")
    chosen = chosen[:len(specs)]
    ports: list[int] = []
    for i, s in enumerate(specs):
        if s.headless:
            raise SpecError(f"replicas[{i}].headless", True, "headless DP nodes are not placed by RayReplicas; "
                                                             "use data_parallel_specs with one Cluster per node")
        ports.append(s.port if s.port is not None else port_start + i)
    for i, p in enumerate(ports):  # two replicas on one machine cannot share a port
        for j in range(i):
            if ports[j] == p and chosen[j].address == chosen[i].address:
                raise SpecError(f"replicas[{i}].port", p, f"replica {j} uses it on the same machine ({chosen[i].address})")
    names = [s.name or f"node{i}" for i, s in enumerate(specs)]
    if len(set(names)) != len(names):
        raise SpecError("replicas.name", names, "replica names must be unique")
    out, seen = [], {}
    for i, (s, n) in enumerate(zip(specs, chosen)):
        same = [m for m in chosen if m.address == n.address]
        slot = seen.get(n.address, 0)
        seen[n.address] = slot + 1
        out.append(Placement(i, s, n, slot, len(same), ports[i], names[i]))
    return out


def share(items: Sequence[int], slot: int, slots: int) -> tuple[int, ...]:
    """Slot ``slot`` of ``slots`` equal, contiguous shares of ``items``.

    >>> share((0, 1), 0, 2), share((0, 1), 1, 2), share(tuple(range(8)), 1, 3)
    ((0,), (1,), (2, 3))
    """
    per = len(items) // slots
    if per < 1:
        raise SpecError("cores", list(items), f"{len(items)} cores cannot be split over {slots} nodes on one machine")
    items = sorted(items)
    return tuple(items[slot * per:(slot + 1) * per])


def node_spec(p: Placement, inventory: Inventory, host: str) -> ReplicaSpec:
    """The spec as the node runs it: bound to the node's IP, ``VLLM_HOST_IP``, a fixed port, and on a
    machine shared by several nodes, this node's share of the cores."""
    s = p.spec
    update: dict[str, Any] = {"host": host, "port": p.port, "name": p.name,
                              "env": {"VLLM_HOST_IP": host, **s.env}}
    kind = resolve_device(s.device, inventory, f"replicas[{p.index}].device")
    if kind == "cpu" and s.cores is None and p.slots > 1:
        update["cores"] = share(inventory.cores, p.slot, p.slots)
    return s.model_copy(update=update)


def plan_on_node(p: Placement, inventory: Inventory, host: str, *, check_models: bool = True,
                 port_free=None, python: str = sys.executable) -> LaunchPlan:
    """The :class:`LaunchPlan` a :class:`ReplicaHost` runs (pure given the node's inventory)."""
    kw = {} if port_free is None else {"port_free": port_free}
    try:
        plan = plan_replicas([node_spec(p, inventory, host)], inventory, port_start=p.port, check_models=check_models,
                             python=python, **kw)[0]
    except SpecError as e:  # name the replica and the node, not "replicas[0]"
        raise SpecError(e.field.replace("replicas[0]", f"replicas[{p.index}]"), e.value,
                        f"{str(e).split(': ', 1)[-1]} (on Ray node {p.node.node_id[:8]} at {host})") from None
    return LaunchPlan(**{**{f: getattr(plan, f) for f in plan.__dataclass_fields__}, "index": p.index})


def ranks_of(plans: Sequence[LaunchPlan]):
    """Routable :class:`~nbkit.routing.rank.Rank` s of started plans (a DP group: one per DP rank, by header)."""
    from nbkit.routing.rank import Rank
    out = []
    for p in plans:
        for r in p.http_ranks:
            if p.dp_size > 1:
                out.append(Rank(p.index, r, p.url, f"{p.name}/dp{r}", (("X-data-parallel-rank", str(r)),)))
            else:
                out.append(Rank(p.index, r, p.url, p.name))
    return out
