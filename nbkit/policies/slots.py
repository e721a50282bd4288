"""How many requests a rank, and the whole router, may hold at once: the admission rule that the
live router (:class:`~nbkit.routing.router.Router`) and the simulator
(:class:`~nbkit.sim.admission.SimAdmission`) both apply, so a simulated queue fills and drains as
the live one does.

    >>> slots = Slots(max_per_rank=2, interactive_headroom=1)
    >>> slots.rank_room(2, priority=10), slots.rank_room(2, priority=0)   # batch waits, interactive goes
    (False, True)
    >>> request_cost(prompt_tokens=100, max_tokens=28)                    # what fair share and tokens/min charge
    128

``max_per_rank``/``max_concurrency`` None: unbounded (nothing ever waits). ``interactive_headroom``:
slots per rank (and in total) beyond the caps that only requests of priority <= 0 (interactive) may
use, so an interactive request need not wait for a batch one to end.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Slots", "check_slots", "request_cost"]


def check_slots(*, max_per_rank: int | None = None, max_concurrency: int | None = None,
                interactive_headroom: int | None = 0) -> None:
    """Raise ValueError naming the first cap that is not a whole number in range (or None)."""
    for name, value, low in (("max_per_rank", max_per_rank, 1), ("max_concurrency", max_concurrency, 1),
                             ("interactive_headroom", interactive_headroom, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name}={value!r}: must be a whole number >= {low} or None")


@dataclass
class Slots:
    """The caps (see the module doc); mutable (the panel's concurrency slider sets ``max_concurrency``)."""

    max_per_rank: int | None = None
    max_concurrency: int | None = None
    interactive_headroom: int = 0

    def __post_init__(self) -> None:
        check_slots(max_per_rank=self.max_per_rank, max_concurrency=self.max_concurrency,
                    interactive_headroom=self.interactive_headroom)
        self.interactive_headroom = self.interactive_headroom or 0

    def extra(self, priority: int) -> int:
        """Slots beyond the caps a request of ``priority`` may use."""
        return self.interactive_headroom if priority <= 0 else 0

    def rank_room(self, in_flight: int, priority: int) -> bool:
        """Whether a rank holding ``in_flight`` requests takes one more of ``priority``."""
        return self.max_per_rank is None or in_flight < self.max_per_rank + self.extra(priority)

    def total_room(self, in_flight: int, priority: int) -> bool:
        """Whether the router holding ``in_flight`` requests in all takes one more of ``priority``."""
        return self.max_concurrency is None or in_flight < self.max_concurrency + self.extra(priority)


def request_cost(prompt_tokens: int, max_tokens: int) -> int:
    """A request's tokens as fair share and ``tokens_per_minute`` count them: prompt + expected output."""
    return max(0, int(prompt_tokens)) + max(0, int(max_tokens))
