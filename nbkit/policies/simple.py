"""Policies that read only nbkit's own accounting: round robin, random, least outstanding, and a
user's callable (``custom``)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from nbkit.policies.base import Choice, Policy, RankLoad, RequestInfo, register

@register("round_robin")
class RoundRobinPolicy(Policy):
    """The candidate with the smallest ``index`` greater than the last one chosen, wrapping
    around. Ranks filtered out are skipped without disturbing the order of the others."""

    uses_scrape = False

    def __init__(self, seed: int | None = None, **options: Any):
        super().__init__(seed, **options)
        self.last_index: int | None = None

    def _select(self, candidates, request):
        ordered = sorted(candidates, key=lambda c: c.index)
        pick = ordered[0]
        if self.last_index is not None:
            for c in ordered:
                if c.index > self.last_index:
                    pick = c
                    break
        last, self.last_index = self.last_index, pick.index
        after = "first" if last is None else f"next after index {last}"
        return Choice(pick.index, pick.key,
                      f"round_robin: {after} -> index {pick.index} ({len(ordered)} candidates)")


@register("random")
class RandomPolicy(Policy):
    """Uniformly at random."""

    uses_scrape = False

    def _select(self, candidates, request):
        pick = self.rng.choice(list(candidates))
        return Choice(pick.index, pick.key, f"random: 1 of {len(candidates)}")


@register("least_outstanding")
class LeastOutstandingPolicy(Policy):
    """Fewest ``in_flight`` requests (local accounting only); ties at random."""

    uses_scrape = False

    def _select(self, candidates, request):
        return self.select_by_cost(candidates, [c.in_flight for c in candidates], request)

    @staticmethod
    def _in_flight(c: RankLoad) -> int:
        return c.in_flight

    def cost_of(self):
        return self._in_flight if self._plain(LeastOutstandingPolicy) else None

    def select_by_cost(self, candidates, costs, request):
        pick, why = self._least_of(candidates, costs, "in_flight")
        return Choice(pick.index, pick.key, "least_outstanding: " + why)



@register("custom")
class CustomPolicy(Policy):
    """Wraps ``fn(candidates, request)`` returning a ``RankLoad.index`` among the candidates, a
    ``RankLoad`` or a :class:`Choice`. ``fn`` gets the candidates after unhealthy ones are
    filtered; returning something that is not a candidate raises ``ValueError``."""

    def __init__(self, fn: Callable[[Sequence[RankLoad], RequestInfo], Any] | None = None,
                 seed: int | None = None, **options: Any):
        if fn is None or not callable(fn):
            raise TypeError(f"CustomPolicy needs a callable, got {fn!r}")
        super().__init__(seed, **options)
        self.fn = fn
        self.fn_name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) \
            or type(fn).__name__

    def _select(self, candidates, request):
        out = self.fn(candidates, request)
        by_index = {c.index: c for c in candidates}
        if isinstance(out, Choice):
            if out.index not in by_index:
                raise ValueError(f"custom policy {self.fn_name} chose index {out.index}, not "
                                 f"among candidates {sorted(by_index)}")
            return out
        if isinstance(out, RankLoad):
            if by_index.get(out.index) is None or by_index[out.index].key != out.key:
                raise ValueError(f"custom policy {self.fn_name} returned {out.key!r} "
                                 f"(index {out.index}), not a candidate")
            pick = by_index[out.index]
        elif isinstance(out, int) and not isinstance(out, bool):
            if out not in by_index:
                raise ValueError(f"custom policy {self.fn_name} returned index {out}, not among "
                                 f"candidates' indexes {sorted(by_index)}")
            pick = by_index[out]
        else:
            raise TypeError(f"custom policy {self.fn_name} returned {out!r}; expected an index, "
                            f"a RankLoad or a Choice")
        return Choice(pick.index, pick.key, f"custom: {self.fn_name} -> {pick.key}")

    def __repr__(self) -> str:
        return f"CustomPolicy({self.fn_name}, seed={self.seed!r})"
