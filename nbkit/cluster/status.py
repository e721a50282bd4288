"""One row of :meth:`Cluster.status <nbkit.cluster.cluster.Cluster.status>`: a replica as last seen."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReplicaStatus:
    index: int
    name: str
    state: str  # starting | healthy | unhealthy | restarting | failed | stopped
    url: str
    pinning: str
    tp_size: int
    dp_ranks: tuple[int, ...]
    pid: int | None
    uptime_s: float | None
    returncode: int | None
    rss_gib: float
    log: str
    restarts: int = 0
