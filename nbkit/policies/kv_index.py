"""An exact index of the KV-cache blocks each rank holds, fed by vLLM's KV-cache events.

vLLM publishes ``BlockStored`` (the token ids of each new full block and its parent),
``BlockRemoved`` and ``AllBlocksCleared`` (see :mod:`nbkit.routing.kv_events` for the socket).
The index keys blocks by its own chained hash of token blocks (:func:`block_keys`), so the router
can look a prompt up from its token ids alone: it needs the engine's tokenization and block size,
not vLLM's hash seed. A LoRA adapter's name is part of the key (its blocks are not the base
model's)::

    index = KVIndex()
    index.apply("replica0", {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": None,
                             "token_ids": list(range(32)), "block_size": 16, "lora_name": None})
    index.match("replica0", list(range(40)))          # 32: two full blocks cached
    index.apply("replica0", {"type": "BlockRemoved", "block_hashes": [12]})
    index.match("replica0", list(range(40)))          # 16

A rank's entry is *warm* once the index has seen its history from the start (a replay from
sequence 0, or the engine's first batch) and stays so while no sequence number is skipped; it is
*cold* otherwise (:attr:`RankBlocks.cold` says why), and the ``kv_aware`` policy then does not
trust it. Memory is bounded: at most ``max_blocks_per_rank`` keys per rank, the oldest dropped
first (a warm rank that overflows turns cold). Thread-safe: events are applied on the
subscriber's thread while policies read on the router's.
"""

from __future__ import annotations

import hashlib
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

#: The parent of a sequence's first block.
ROOT = b"nbkit-kv-root"
#: The block size assumed for a rank before its first event says (vLLM's GPU default).
DEFAULT_BLOCK_SIZE = 16

# positional (array_like) encodings of older vLLM versions, after the tag
_POSITIONAL = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                    "lora_name"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


def root_key(lora: str | None = None) -> bytes:
    """The parent of a sequence's first block: one per LoRA adapter, one for the base model."""
    return ROOT if not lora else hashlib.blake2b(ROOT + lora.encode(), digest_size=8).digest()


def block_keys(token_ids: Sequence[int], block_size: int, lora: str | None = None, parent: bytes | None = None,
               limit: int | None = None) -> list[bytes]:
    """Chained 8-byte BLAKE2b keys of the full ``block_size`` blocks of ``token_ids`` (a partial last
    block has none, as in vLLM). ``parent`` chains on from an earlier block (default: the root of
    ``lora``, or of the base model); ``limit`` stops after that many blocks.

    >>> a = block_keys(list(range(40)), 16)
    >>> len(a), a == block_keys(list(range(32)) + [0] * 8, 16), a[0] != block_keys(list(range(40)), 16, "ad")[0]
    (2, True, True)
    """
    if parent is None:
        parent = root_key(lora)
    n = len(token_ids) // block_size
    if limit is not None:
        n = min(n, limit)
    out = []
    h = parent
    data = array("q", token_ids[:n * block_size]).tobytes()   # one conversion, sliced per block
    step = 8 * block_size
    blake2b = hashlib.blake2b
    for i in range(0, n * step, step):
        h = blake2b(h + data[i:i + step], digest_size=8).digest()
        out.append(h)
    return out


def event_fields(event: Any) -> tuple[str, Mapping[str, Any]]:
    """``(type, fields)`` of one decoded event: a map with ``"type"`` (vLLM >= 0.10) or a positional
    array ``[tag, field, ...]`` (older versions). Unknown shapes raise ``ValueError``."""
    if isinstance(event, Mapping):
        kind = event.get("type")
        if not isinstance(kind, str):
            raise ValueError(f"KV event without a type: {event!r:.200}")
        return kind, event
    if isinstance(event, (list, tuple)) and event and isinstance(event[0], str):
        kind, values = event[0], event[1:]
        names = _POSITIONAL.get(kind)
        if names is None:
            return kind, {}
        return kind, dict(zip(names, values))
    raise ValueError(f"KV event of unknown shape: {event!r:.200}")


@dataclass
class RankBlocks:
    """One rank's cached blocks, as the events told, and how far the index can trust them."""

    keys: "OrderedDict[bytes, None]" = field(default_factory=OrderedDict)  # our keys, oldest first
    engine: dict[int, bytes] = field(default_factory=dict)  # vLLM's block hash -> our key
    block_size: int | None = None
    cold: str = "no events yet"   # why the index cannot be trusted ("" when warm)
    last_seq: int | None = None
    events: int = 0               # events applied
    batches: int = 0
    gaps: int = 0                 # sequence numbers skipped
    orphans: int = 0              # stored blocks whose parent the index never saw
    last_event_at: float = 0.0    # time.time() of the last batch
    stored: int = 0
    removed: int = 0

    @property
    def warm(self) -> bool:
        return not self.cold


class KVIndex:
    """Per-rank cached-block index (see the module docstring)."""

    def __init__(self, max_blocks_per_rank: int = 1 << 20):
        if max_blocks_per_rank < 1:
            raise ValueError(f"max_blocks_per_rank={max_blocks_per_rank!r}: must be >= 1")
        self.max_blocks_per_rank = max_blocks_per_rank
        self.ranks: dict[str, RankBlocks] = {}
        self._lock = threading.Lock()

    # -- what the subscriber does ----------------------------------------------------------------
    def rank(self, key: str) -> RankBlocks:
        """The entry of rank ``key`` (made, cold, on first use)."""
        with self._lock:
            return self._rank(key)

    def _rank(self, key: str) -> RankBlocks:
        r = self.ranks.get(key)
        if r is None:
            r = self.ranks[key] = RankBlocks()
        return r

    def apply_batch(self, key: str, seq: int | None, events: Iterable[Any], *, replay: bool = False) -> int:
        """Apply one published batch of rank ``key``. ``seq`` is its sequence number: the first batch
        (0) makes a cold rank warm (the index then has the whole history); a skipped number makes it
        cold (``gaps`` counts them). Returns how many sequence numbers were skipped."""
        with self._lock:
            r = self._rank(key)
            skipped = 0
            if seq is not None:
                if seq == 0 and r.last_seq is not None and not replay:  # a new engine behind this rank
                    r.keys.clear()
                    r.engine.clear()
                    r.last_seq, r.cold = None, ""
                if r.last_seq is not None and seq <= r.last_seq:
                    return 0  # a duplicate (a replay overlapping what arrived live)
                if r.last_seq is None:
                    if seq == 0:
                        r.cold = ""
                    elif not replay:
                        r.cold = f"joined at sequence {seq}: earlier events were not seen"
                else:
                    skipped = seq - r.last_seq - 1
                    if skipped:
                        r.gaps += skipped
                        r.cold = f"{skipped} event batch(es) missed after sequence {r.last_seq}"
                r.last_seq = seq
            r.batches += 1
            r.last_event_at = time.time()
            for ev in events:
                self._apply(r, ev)
            return skipped

    def apply(self, key: str, event: Any) -> None:
        """Apply one event to rank ``key`` outside any batch (tests, the simulator)."""
        with self._lock:
            self._apply(self._rank(key), event)

    def _apply(self, r: RankBlocks, event: Any) -> None:
        kind, f = event_fields(event)
        r.events += 1
        if kind == "BlockStored":
            size = int(f.get("block_size") or DEFAULT_BLOCK_SIZE)
            r.block_size = size
            hashes = list(f.get("block_hashes") or [])
            tokens = list(f.get("token_ids") or [])
            parent_hash = f.get("parent_block_hash")
            if parent_hash is None:
                parent = root_key(f.get("lora_name"))
            else:
                parent = r.engine.get(_h(parent_hash))
                if parent is None:
                    r.orphans += len(hashes)  # its prefix was stored before we listened
                    return
            keys = block_keys(tokens, size, parent=parent)
            for h, k in zip(hashes, keys):
                r.engine[_h(h)] = k
                r.keys[k] = None
                r.keys.move_to_end(k)
                r.stored += 1
            while len(r.keys) > self.max_blocks_per_rank:
                r.keys.popitem(last=False)
                if not r.cold:
                    r.cold = f"more than max_blocks_per_rank={self.max_blocks_per_rank} blocks"
        elif kind == "BlockRemoved":
            for h in f.get("block_hashes") or []:
                k = r.engine.pop(_h(h), None)
                if k is not None:
                    r.keys.pop(k, None)
                    r.removed += 1
        elif kind == "AllBlocksCleared":
            r.keys.clear()
            r.engine.clear()
            if r.cold and r.last_seq is not None:
                r.cold = ""  # an empty cache is known exactly

    def mark_cold(self, key: str, why: str) -> None:
        with self._lock:
            self._rank(key).cold = why

    def mark_empty(self, key: str) -> None:
        """Rank ``key``'s engine has published nothing yet (its replay buffer is empty): its cache is
        known to be empty, so the index is warm."""
        with self._lock:
            r = self._rank(key)
            if r.last_seq is None:
                r.keys.clear()
                r.engine.clear()
                r.cold, r.last_seq = "", -1

    def forget(self, key: str) -> None:
        """Drop rank ``key`` (its replica stopped or restarted: a new engine starts empty)."""
        with self._lock:
            self.ranks.pop(key, None)

    # -- what the policy asks --------------------------------------------------------------------
    def block_size(self, key: str) -> int:
        r = self.ranks.get(key)
        return (r.block_size if r is not None and r.block_size else None) or DEFAULT_BLOCK_SIZE

    def match(self, key: str, token_ids: Sequence[int], lora: str | None = None,
              keys: Sequence[bytes] | None = None) -> int:
        """Tokens of ``token_ids`` that rank ``key`` holds as a cached prefix (whole blocks only).
        ``keys`` are the prompt's :func:`block_keys` at this rank's block size, if computed already."""
        r = self.ranks.get(key)
        if r is None:
            return 0
        size = r.block_size or DEFAULT_BLOCK_SIZE
        if keys is None:
            keys = block_keys(token_ids, size, lora)
        n = 0
        with self._lock:
            held = r.keys
            for k in keys:
                if k not in held:
                    break
                n += 1
        return n * size

    def blocks(self, key: str) -> int:
        r = self.ranks.get(key)
        return len(r.keys) if r is not None else 0

    def snapshot(self) -> dict[str, dict]:
        """Per rank: blocks held, block size, warm or why cold, events, gaps, orphans."""
        with self._lock:
            return {k: {"blocks": len(r.keys), "block_size": r.block_size, "warm": r.warm, "cold": r.cold,
                        "events": r.events, "batches": r.batches, "gaps": r.gaps, "orphans": r.orphans,
                        "last_seq": r.last_seq, "last_event_at": r.last_event_at}
                    for k, r in self.ranks.items()}


def _h(x: Any) -> int:
    """vLLM's block hashes come as ints (or bytes in some versions): one hashable form."""
    return x if isinstance(x, int) else hash(bytes(x)) if isinstance(x, (bytes, bytearray)) else hash(x)
