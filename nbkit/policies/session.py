"""Sticky sessions by consistent hashing (``session``)."""

from __future__ import annotations

import bisect
import hashlib
from typing import Any, ClassVar, Sequence

from nbkit.policies.base import Choice, register
from nbkit.policies.load import _LoadAware

def _ring_pos(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big")


@register("session")
class SessionPolicy(_LoadAware):
    """Sticky sessions by consistent hashing.

    Each rank key owns ``vnodes`` (default 64) points on a BLAKE2b ring; a session goes to the
    first point clockwise of its own hash whose rank is among the candidates. An unhealthy or
    removed rank therefore only moves the sessions it held, and a new rank takes about 1/N of
    them. The ring holds the keys given to ``on_ranks_changed`` plus any candidate key seen
    since. Requests without a session key are routed by least load.
    """

    defaults: ClassVar[dict[str, Any]] = {**_LoadAware.defaults, "vnodes": 64}

    def __init__(self, seed: int | None = None, **options: Any):
        super().__init__(seed, **options)
        if int(self.vnodes) < 1:
            raise ValueError("vnodes must be >= 1")
        self.vnodes = int(self.vnodes)
        self._keys: set[str] = set()
        self._positions: list[int] = []
        self._owners: list[str] = []

    def _rebuild(self) -> None:
        ring = sorted((_ring_pos(f"{k}#{i}"), k) for k in self._keys for i in range(self.vnodes))
        self._positions = [p for p, _ in ring]
        self._owners = [k for _, k in ring]

    def on_ranks_changed(self, keys):
        self._keys = set(keys)
        self._rebuild()

    def home(self, session: str, keys: Sequence[str] | None = None) -> str | None:
        """The rank key ``session`` maps to among ``keys`` (default: every key on the ring)."""
        if not self._positions:
            return None
        allowed = None if keys is None else set(keys)
        n = len(self._positions)
        start = bisect.bisect_right(self._positions, _ring_pos(session))
        for j in range(n):
            owner = self._owners[(start + j) % n]
            if allowed is None or owner in allowed:
                return owner
        return None

    def _select(self, candidates, request):
        if request.session is None:
            return self._least_load(candidates, "session: no session key; least_load")
        new = {c.key for c in candidates} - self._keys
        if new:
            self._keys |= new
            self._rebuild()
        by_key = {c.key: c for c in candidates}
        key = self.home(request.session, list(by_key))
        pick = by_key[key]  # a candidate key is always on the ring
        primary = self.home(request.session)
        moved = f" (home {primary} unavailable)" if primary != key else ""
        return Choice(pick.index, pick.key, f"session {request.session} -> {key}{moved}")
