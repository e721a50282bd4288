"""A request inside one simulated engine (:mod:`nbkit.sim.engine`): its token counts, the block
hashes that let it use the prefix cache, its state and the steps in which it got tokens::

    >>> from nbkit.sim.request import DONE, Req, block_hashes
    >>> r = Req("a", prompt=100, output=8, ids=tuple(range(100)))
    >>> r.state, r.generated
    (0, 0)
    >>> len(block_hashes(range(100), 16))         # one hash per full block of 16 tokens
    6

The engine owns the fields beyond the constructor's: a request in decode is kept as an
aggregate (``g0``, ``c0``, ``q0``: the step, computed and generated tokens when it entered decode),
so ``computed`` and ``generated`` are settled only when it leaves; ``segs`` are the ``[a, b)`` step
ranges in which it produced tokens (the engine's ``step_ends`` give their times).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Req", "block_hashes", "stored_events", "enqueue_by_priority", "priority_key", "WAITING", "PREFILL",
           "DECODE", "DONE", "ABORTED"]

WAITING, PREFILL, DECODE, DONE, ABORTED = 0, 1, 2, 3, 4


def block_hashes(ids, block_size: int, lora: str | None = None) -> list[int]:
    """Chained hashes of the full ``block_size`` blocks of token ``ids`` (a tuple). The chain of a
    LoRA adapter's request starts from the adapter's name, as vLLM's block hashes include it: the
    same tokens under another adapter (or the base model) are other KV, never a cache hit."""
    ids = tuple(ids)
    out = []
    h = 0 if lora is None else hash(("lora", lora))
    for i in range(0, len(ids) - block_size + 1, block_size):
        h = hash((h, ids[i:i + block_size]))
        out.append(h)
    return out


def stored_events(req: "Req", blocks: list[int], block_size: int) -> list[dict]:
    """vLLM's ``BlockStored`` events (as :attr:`nbkit.sim.engine.Engine.kv_events` gets them) for
    ``req``'s newly cached ``blocks`` (ascending indexes), one per run of consecutive blocks; an
    event carries its blocks' token ids when the request has them, as vLLM's does."""
    bs, hs, ids = block_size, req.hashes, req.ids
    events, run = [], [blocks[0]]
    for k in blocks[1:] + [None]:
        if k is not None and k == run[-1] + 1:
            run.append(k)
            continue
        a, b = run[0], run[-1] + 1
        events.append({"type": "BlockStored", "block_hashes": hs[a:b], "parent_block_hash": hs[a - 1] if a else None,
                       "token_ids": list(ids[a * bs:b * bs]) if ids is not None else [], "block_size": bs,
                       "lora_name": req.lora, "medium": "GPU"})
        if k is not None:
            run = [k]
    return events


def enqueue_by_priority(waiting, req: "Req") -> None:
    """Put ``req`` in the ``waiting`` deque in vLLM's priority order, (priority, arrival), lower
    first: behind every request it does not precede, so equal keys keep their order.

    >>> from collections import deque
    >>> w = deque([Req("a", 1, 1, priority=0), Req("b", 1, 1, priority=10)])
    >>> enqueue_by_priority(w, Req("c", 1, 1, priority=0)); [r.rid for r in w]
    ['a', 'c', 'b']
    """
    key = priority_key(req)
    i = len(waiting)
    while i and priority_key(waiting[i - 1]) > key:
        i -= 1
    waiting.insert(i, req)


def priority_key(req: "Req") -> tuple:
    """What vLLM's priority scheduling orders by: the lowest runs first, the highest is preempted."""
    return req.prio, req.arrival


class Req:
    """A request inside one engine. ``prompt``/``output`` are token counts; ``ids`` (optional
    token ids of the prompt) or ``session`` (a conversation key whose block ``k`` is the same in
    every turn) enable prefix caching. ``computed`` > 0 at admission means KV that arrived from
    elsewhere (the decode side of a prefill/decode split). ``lora``: the adapter it runs under (part
    of its blocks' identity in the prefix cache)."""

    __slots__ = ("rid", "prompt", "output", "ids", "session", "hashes", "computed", "generated",
                 "n_blocks", "held", "registered", "state", "g0", "c0", "q0", "fin_g", "sched_g",
                 "arrival", "first_sched", "first_token", "finish_time", "segs", "preemptions",
                 "cached_tokens", "ext", "data", "_hit_key", "lora", "prio")

    def __init__(self, rid: Any, prompt: int, output: int, *, ids=None, session: str | None = None,
                 computed: int = 0, data: Any = None, lora: str | None = None, priority: int = 0):
        self.rid = rid
        self.lora = lora
        self.prio = priority  # vLLM's request priority (used by --scheduling-policy priority)
        self.prompt = prompt
        self.output = output
        self.ids = ids
        self.session = session
        self.hashes: list | None = None
        self.computed = computed
        self.ext = computed
        self.generated = 0
        self.n_blocks = 0
        self.held: list = []
        self.registered = 0
        self.state = WAITING
        self.g0 = self.c0 = self.q0 = self.fin_g = 0
        self.sched_g = -1
        self.arrival = 0.0
        self.first_sched: float | None = None
        self.first_token: float | None = None
        self.finish_time: float | None = None
        self.segs: list[tuple[int, int]] = []
        self.preemptions = 0
        self.cached_tokens = 0
        self.data = data

    def __repr__(self) -> str:
        return (f"Req({self.rid!r}, prompt={self.prompt}, output={self.output}, state={self.state}, "
                f"computed={self.computed}, generated={self.generated})")
