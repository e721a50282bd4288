"""What the router routes to: one engine, a replica or one data-parallel rank of a replica."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rank:
    """One routable engine: a replica, or one DP rank of a data-parallel group."""

    replica: int
    dp_rank: int
    url: str
    name: str
    headers: tuple[tuple[str, str], ...] = ()
    role: str = "both"  # both | prefill | decode (prefill/decode split, see nbkit.cluster.pd)
