"""Load-aware policies built on :func:`~nbkit.policies.base.load_score`: least load and power of two."""

from __future__ import annotations

from typing import Any, ClassVar

from nbkit.policies.base import (DEFAULT_KV_WEIGHT, DEFAULT_TOKENS_PER_WAITING, _EPS, Choice, Policy, RankLoad,
                                 _fmt, load_score, register)

class _LoadAware(Policy):
    """Options and scoring shared by the policies built on :func:`load_score`."""

    defaults: ClassVar[dict[str, Any]] = {
        "tokens_per_waiting": DEFAULT_TOKENS_PER_WAITING, "kv_weight": DEFAULT_KV_WEIGHT}

    def score(self, r: RankLoad) -> float:
        return load_score(r, self.tokens_per_waiting, kv_weight=self.kv_weight)

    def _least_load(self, candidates, prefix: str = "least_load") -> Choice:
        score = self.score
        pick, why = self._least_of(candidates, [score(c) for c in candidates])
        return Choice(pick.index, pick.key, f"{prefix}: " + why)


@register("least_load")
class LeastLoadPolicy(_LoadAware):
    """Minimum :func:`load_score`; ties at random. Options: ``tokens_per_waiting``,
    ``kv_weight``."""

    def _select(self, candidates, request):
        return self._least_load(candidates)

    def cost_of(self):
        if not self._plain(LeastLoadPolicy):
            return None
        if type(self).score is _LoadAware.score and (self.tokens_per_waiting, self.kv_weight) == (
                DEFAULT_TOKENS_PER_WAITING, DEFAULT_KV_WEIGHT):
            return load_score           # its defaults are the options: one call a candidate
        return self.score

    def select_by_cost(self, candidates, costs, request):
        pick, why = self._least_of(candidates, costs)
        return Choice(pick.index, pick.key, "least_load: " + why)


@register("power_of_two")
class PowerOfTwoPolicy(_LoadAware):
    """Two distinct candidates sampled at random; the lower :func:`load_score` wins (ties at
    random). One candidate is taken as is."""

    def _select(self, candidates, request):
        if len(candidates) == 1:
            c = candidates[0]
            return Choice(c.index, c.key, f"power_of_two: only candidate, load {_fmt(self.score(c))}")
        a, b = self.rng.sample(list(candidates), 2)
        sa, sb = self.score(a), self.score(b)
        if abs(sa - sb) <= _EPS:
            pick, other = (a, b) if self.rng.random() < 0.5 else (b, a)
            tie = ", tie"
        else:
            pick, other = (a, b) if sa < sb else (b, a)
            tie = ""
        return Choice(pick.index, pick.key,
                      f"power_of_two: {pick.key} load {_fmt(self.score(pick))} vs "
                      f"{other.key} load {_fmt(self.score(other))}{tie}")
