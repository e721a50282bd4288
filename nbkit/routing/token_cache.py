"""Exact token ids of prompts that share long prefixes, without tokenizing the shared part again.

Router-side tokenization (:mod:`nbkit.routing.tokenize`) runs on every request a KV-aware policy
routes. For a prompt of a thousand tokens most of that time is the pre-tokenizer's regex over the
whole text (1.4 of 1.6 ms on this machine), and most prompts repeat a long system prompt, a
document or the conversation so far. :class:`PrefixTokenCache` keeps recent prompts with their
ids and tokenizes only what a new prompt does not share with one of them::

    cache = PrefixTokenCache(tokenizers_tokenizer)       # None from .maybe() where it cannot be exact
    ids = cache.encode(system_prompt + " Question one?", add_special_tokens=True)   # tokenized whole
    ids = cache.encode(system_prompt + " Question two?", add_special_tokens=True)   # whole, and kept
    ids = cache.encode(system_prompt + " Question six?", add_special_tokens=True)   # only the question

How: kept prompts are indexed by the hashes of their first ``j * min_chars`` characters for every
``j``; a new prompt finds the kept prompt sharing the most whole chunks with it (a binary search
over ``j``: a dozen dictionary lookups), their exact common prefix ``L`` (a binary search of slice
compares), then the last *safe boundary* ``c`` well inside it, takes the kept prompt's ids before
``c`` and tokenizes ``text[c:]``. A prompt is kept the second time its opening (first
``min_chars`` characters) is seen, so traffic that shares nothing costs a remembered hash, not its
ids. Interleaved conversations on one system prompt each continue from their own last turn.

It is exact, not an estimate. A safe boundary is where the text must split whatever follows: the
start of an added (special) token, as a chat template's ``<|start_header_id|>`` (the tokenizer
splits the text there before anything else; tokens that strip to their left or need a word
boundary excluded), a letter after a newline, or a space between a letter and a non-space, with no
added token within reach. For the byte-level BPE tokenizers it accepts (GPT-2's regex, or a ``Split`` with
the Llama-3 / cl100k family's regex before a regex-free ``ByteLevel``; no normalizer, or NFC), a
pre-tokenizer piece ends there and no piece before it looks past ``text[c]``: letter runs stop
at the space or newline, whitespace runs stop at the letter, nothing looks behind, and
the characters around ``c`` are shared with the stored prompt (``c + reach < L``). BPE then works within
pieces, so ``ids(text) == ids(text)[:k] + ids(text[c:])``. Memory is bounded by the characters
held (``max_chars``), least recently used prompts dropped first. ``tests/test_token_cache.py``
checks equality with the tokenizer on random texts full of newlines, contractions, digits,
whitespace runs, unicode and special tokens, for both regex families.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

# The pre-tokenizer regexes the safe-boundary argument holds for (see the module docstring).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SAFE_PATTERNS = frozenset({
    GPT2_PATTERN, LLAMA3_PATTERN,
    LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}"),                       # Qwen2's
    LLAMA3_PATTERN.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"),
})
SAFE_NORMALIZERS = (None, "NFC")


def unsupported(config: dict) -> str | None:
    """Why a tokenizer (its ``tokenizer.json`` as a dict) cannot be cut at safe boundaries, or None."""
    norm = config.get("normalizer")
    if (norm or {}).get("type") not in SAFE_NORMALIZERS:
        return f"normalizer {norm.get('type')}"
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return "ByteLevel pre-tokenizer with add_prefix_space or without its regex"
        return None
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
                and (steps[0].get("pattern") or {}).get("Regex") in SAFE_PATTERNS
                and not steps[1].get("add_prefix_space") and not steps[1].get("use_regex", True)):
            return None
        return "pre-tokenizer sequence " + "+".join(str(s.get("type")) for s in steps)
    return f"pre-tokenizer {pre.get('type')}"


class PrefixTokenCache:
    """See the module docstring. ``tokenizer``: a ``tokenizers.Tokenizer`` (truncation and padding
    off). ``min_chars``: the chunk of the prefix index (and the shortest prompt it keeps).
    ``max_openings``: openings remembered for the seen-twice rule. Thread-safe."""

    def __init__(self, tokenizer: Any, *, max_chars: int = 16_000_000, min_chars: int = 128,
                 max_openings: int = 100_000, max_scan: int = 512):
        why = unsupported(json.loads(tokenizer.to_str()))
        if why:
            raise ValueError(f"PrefixTokenCache: cannot cut this tokenizer's input exactly ({why})")
        self.tok = tokenizer
        self.max_chars, self.min_chars = int(max_chars), max(1, int(min_chars))
        self.max_openings, self.max_scan = int(max_openings), int(max_scan)
        added = [t for t in tokenizer.get_added_tokens_decoder().values() if t.content]
        contents = sorted({t.content for t in added}, key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._reach = max(map(len, contents), default=0) + 1
        # tokens a prompt may be cut in front of: their match cannot reach back before them
        self._starts = {t.content for t in added if not t.lstrip and not t.single_word
                        and not (t.normalized and tokenizer.normalizer is not None)}
        self._first_chars = {t[0] for t in self._starts}
        self._pre, self._post = self._special_parts()
        # prompt -> (ids, end offset of each token, the chunk hashes it put in _chunks), least recent first
        self._prompts: OrderedDict[str, tuple[array, array, list[int]]] = OrderedDict()
        # hash of a prompt's first j * min_chars characters -> a kept prompt that starts so
        self._chunks: dict[int, str] = {}
        # hashes of openings (first min_chars characters) seen once, whose prompts were not kept
        self._openings: OrderedDict[int, None] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.saved_chars = 0

    @classmethod
    def maybe(cls, tokenizer: Any, **kw: Any) -> "PrefixTokenCache | None":
        """A cache for ``tokenizer``, or None (logged) where it cannot be exact."""
        try:
            return cls(tokenizer, **kw)
        except ValueError as e:
            log.info("%s: tokenizing every prompt whole", e)
            return None

    def _special_parts(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a single sequence (BOS, EOS), checked
        on a probe text; raises ValueError if it does anything else."""
        probe = "Probe text\nwith a second line"
        bare = self.tok.encode(probe, add_special_tokens=False).ids
        full = self.tok.encode(probe, add_special_tokens=True).ids
        for i in range(len(full) - len(bare) + 1):
            if full[i:i + len(bare)] == bare:
                pre, post = full[:i], full[i + len(bare):]
                if self.tok.encode("Other\nprobe", add_special_tokens=True).ids == pre + self.tok.encode(
                        "Other\nprobe", add_special_tokens=False).ids + post:
                    return pre, post
        raise ValueError("post-processor does more than add tokens around the sequence")

    # -- boundaries --------------------------------------------------------------------------------
    def _clear(self, text: str, c: int) -> bool:
        """No added token within reach of ``c``."""
        return self._added is None or self._added.search(
            text, max(0, c - self._reach), min(len(text), c + self._reach)) is None

    def _before_added(self, text: str, c: int) -> bool:
        """Whether an added token starts at ``c`` that the tokenizer splits in front of: one that
        cannot strip or check what precedes it, and no other occurrence overlapping ``c``."""
        m = self._added.match(text, c)
        if m is None or m.group() not in self._starts:
            return False
        for p in range(max(0, c - self._reach), c):
            o = self._added.match(text, p)
            if o is not None and o.end() > c:
                return False
        return True

    def safe_cut(self, text: str, limit: int) -> int:
        """The last safe boundary ``c`` of ``text`` with ``c + reach < limit`` (0 if none within
        ``max_scan`` characters): see the module docstring."""
        hi = min(limit - self._reach - 1, len(text) - 2)   # text[c + 1] is read too
        for c in range(hi, max(0, hi - self.max_scan), -1):
            ch, before = text[c], text[c - 1]
            if (ch == " " and before.isalpha() and not text[c + 1].isspace()) or (before == "\n" and ch.isalpha()):
                if self._clear(text, c):
                    return c
            elif ch in self._first_chars and self._before_added(text, c):
                return c
        return 0

    # -- the cache ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``, exactly as ``tokenizer.encode(text, add_special_tokens)``."""
        n = len(text)
        base, ids, ends = 0, None, None
        if n > self.min_chars:
            with self._lock:
                other, shared = self._longest(text)
                if other is not None:
                    c = self.safe_cut(text, _common_prefix(text, other, shared))
                    if c > 0:
                        oids, oends, _ = self._prompts[other]
                        self._prompts.move_to_end(other)
                        k = bisect_right(oends, c)
                        base, ids, ends = c, oids[:k], oends[:k]
        if ids is None:
            self.misses += 1
            enc = self.tok.encode(text, add_special_tokens=False)
            out = enc.ids
            if n > self.min_chars:
                self._remember(text, out, None, enc)
        else:
            self.hits += 1
            self.saved_chars += base
            enc = self.tok.encode(text[base:], add_special_tokens=False)
            ids.extend(enc.ids)
            ends.extend([e + base for _, e in enc.offsets])
            out = ids.tolist()
            self._remember(text, ids, ends)
        if add_special_tokens and (self._pre or self._post):
            out = self._pre + out + self._post
        return out

    def _longest(self, text: str) -> tuple[str | None, int]:
        """A kept prompt sharing the most whole chunks with ``text`` (binary search over the chunk
        count: a prompt sharing ``j`` chunks shares every shorter run) and the characters those
        chunks hold, or ``(None, 0)``."""
        size, chunks, prompts = self.min_chars, self._chunks, self._prompts
        lo, hi, found = 0, len(text) // size, None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            p = chunks.get(hash(text[:mid * size]))
            if p is not None and p in prompts and p.startswith(text[:mid * size]):
                lo, found = mid, p
            else:
                hi = mid - 1
        return found, lo * size

    def _remember(self, text: str, ids: array | list[int], ends: array | None, enc: Any = None) -> None:
        """Keep ``text``'s ids, if its opening was seen before (prompts that share nothing with
        any other cost one remembered hash, not their ids)."""
        size = self.min_chars
        with self._lock:
            if text in self._prompts:
                self._prompts.move_to_end(text)
                return
            opening = hash(text[:size])
            if opening not in self._chunks and opening not in self._openings:
                self._openings[opening] = None
                if len(self._openings) > self.max_openings:
                    self._openings.popitem(last=False)
                return
            self._openings.pop(opening, None)
            if ends is None:
                ids, ends = array("l", ids), array("l", [e for _, e in enc.offsets])
            mine = []
            for j in range(len(text) // size, 0, -1):   # the chunk runs no kept prompt starts with yet
                h = hash(text[:j * size])
                p = self._chunks.get(h)
                if p is not None and p in self._prompts:
                    break
                self._chunks[h] = text
                mine.append(h)
            self._prompts[text] = (ids, ends, mine)
            self._chars += len(text)
            while self._chars > self.max_chars and self._prompts:
                old, (_, _, hashes) = self._prompts.popitem(last=False)
                self._chars -= len(old)
                for h in hashes:
                    if self._chunks.get(h) is old:
                        del self._chunks[h]

    def stats(self) -> dict[str, int]:
        """Hits, misses, prompts held, characters held and characters not tokenized again."""
        return {"hits": self.hits, "misses": self.misses, "prompts": len(self._prompts),
                "chars": self._chars, "saved_chars": self.saved_chars}


def _common_prefix(a: str, b: str, known: int = 0) -> int:
    """Length of the common prefix of ``a`` and ``b`` (their first ``known`` characters are equal):
    a binary search of slice compares, each one C-level ``memcmp``."""
    lo, hi = known, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo + 1 < hi:      # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo
