"""Exact token ids of prompts that share long prefixes, without tokenizing the shared part again.

Router-side tokenization (:mod:`nbkit.routing.tokenize`) runs on every request a KV-aware policy
routes. For a prompt of a thousand tokens most of that time is the pre-tokenizer's regex over the
whole text (1.4 of 1.6 ms on this machine), and most prompts repeat a long system prompt or the
conversation so far. :class:`PrefixTokenCache` remembers the token ids of such prefixes and
tokenizes only the rest::

    cache = PrefixTokenCache(tokenizers_tokenizer)       # None from .maybe() where it cannot be exact
    ids = cache.encode(system_prompt + "\\nQuestion one?", add_special_tokens=True)   # tokenized whole
    ids = cache.encode(system_prompt + "\\nQuestion two?", add_special_tokens=True)   # only the question

It is exact, not an estimate: a prompt is cut only at a *safe boundary*: where an added (special) token starts,
as a chat template's ``<|start_header_id|>`` does (the tokenizer splits the text there before
anything else), or at a position ``c`` where ``text[c-1]`` is a newline and ``text[c]`` a letter,
with no added token within reach.
For the byte-level BPE tokenizers it accepts (GPT-2's regex, or a ``Split`` with the
Llama-3 / cl100k family's regex before a regex-free ``ByteLevel``; no normalizer, or NFC) a
pre-tokenizer piece ends at such a ``c`` and no piece before it looks past ``text[c]``: the
letter alternatives stop at the newline, the whitespace alternatives end at the newline because
a letter follows, and nothing looks behind. BPE then works within pieces, so
``ids(text) == ids(text[:c]) + ids(text[c:])``. The cut points kept for a prompt are the last
``cuts_per_text`` safe boundaries of it (a question after a system prompt, the last turn of a
conversation); a later prompt probes its own last ``max_probes`` boundaries, longest first.
Memory is bounded by the characters held (``max_chars``), least recently used dropped first.
``tests/test_token_cache.py`` checks equality with the tokenizer on random texts full of
newlines, contractions, digits, unicode and special tokens, for both regex families.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from array import array
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
    off). Thread-safe."""

    def __init__(self, tokenizer: Any, *, max_chars: int = 16_000_000, min_chars: int = 256,
                 cuts_per_text: int = 4, max_probes: int = 8):
        why = unsupported(json.loads(tokenizer.to_str()))
        if why:
            raise ValueError(f"PrefixTokenCache: cannot cut this tokenizer's input exactly ({why})")
        self.tok = tokenizer
        self.max_chars, self.min_chars = int(max_chars), int(min_chars)
        self.cuts_per_text, self.max_probes = int(cuts_per_text), int(max_probes)
        added = [t for t in tokenizer.get_added_tokens_decoder().values() if t.content]
        contents = sorted({t.content for t in added}, key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._reach = max(map(len, contents), default=0) + 1
        # tokens a prompt may be cut in front of: their match cannot reach back before them
        self._starts = {t.content for t in added if not t.lstrip and not t.single_word
                        and not (t.normalized and tokenizer.normalizer is not None)}
        self._pre, self._post = self._special_parts()
        self._entries: OrderedDict[tuple[str, bool], array] = OrderedDict()   # (text[:c], letter) -> ids
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
    def _safe(self, text: str, c: int) -> bool:
        if self._added is None:
            return True
        return self._added.search(text, max(0, c - self._reach), min(len(text), c + self._reach)) is None

    def _before_added(self, text: str, c: int, m: re.Match) -> bool:
        """Whether ``c``, where an added token starts (``m``), is a boundary the tokenizer keeps: a
        token that cannot strip or check what precedes it, and no other occurrence overlapping it."""
        if m.group() not in self._starts:
            return False
        for p in range(max(0, c - self._reach), c):
            o = self._added.match(text, p)
            if o is not None and o.end() > c:
                return False
        return True

    def cuts(self, text: str, limit: int, above: int = 0) -> list[tuple[int, bool]]:
        """The last ``limit`` safe boundaries ``(c, letter)`` of ``text`` above ``max(above,
        min_chars)``, longest first: a newline followed by a letter with no added token within
        reach (``letter`` true), or the start of an added token (``<s>``, ``<|start_header_id|>``:
        the tokenizer splits the text there before anything else). The ids of ``text[:c]`` differ
        between the two (whitespace before a letter splits off its last character, before an
        added token it ends a segment), so the cache keeps them apart."""
        out: list[tuple[int, bool]] = []
        lo = max(above, self.min_chars - 1)
        end = len(text) - 1
        while len(out) < limit:
            p = text.rfind("\n", lo, end)
            if p < 0:
                break
            end = p
            if text[p + 1].isalpha() and self._safe(text, p + 1):
                out.append((p + 1, True))
        if self._added is not None and self._starts:
            before = [(m.start(), False) for m in self._added.finditer(text, lo + 1)
                      if self._before_added(text, m.start(), m)]
            if before:
                out = sorted(out + before, reverse=True)[:limit]
        return out

    # -- the cache ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``, exactly as ``tokenizer.encode(text, add_special_tokens)``."""
        base, ids, offset = 0, None, 0
        if len(text) > self.min_chars:
            probes = self.cuts(text, self.max_probes)
            with self._lock:
                for c, letter in probes:
                    key = (text[:c], letter)
                    got = self._entries.get(key)
                    if got is not None:
                        self._entries.move_to_end(key)
                        base, ids = c, got
                        break
        if ids is None:
            self.misses += 1
            enc = self.tok.encode(text, add_special_tokens=False)
            out = enc.ids
        else:
            self.hits += 1
            self.saved_chars += base
            enc = self.tok.encode(text[base:], add_special_tokens=False)
            out = ids.tolist() + enc.ids
            offset = base
        if len(text) > self.min_chars:
            self._remember(text, out, enc, offset, len(out) - len(enc.ids))
        if add_special_tokens and (self._pre or self._post):
            out = self._pre + out + self._post
        return out

    def _remember(self, text: str, ids: list[int], enc: Any, offset: int, first: int) -> None:
        """Keep ``text[:c]``'s ids for its last safe boundaries ``c`` beyond ``offset`` (the part
        ``enc``, the encoding of ``text[offset:]``, covers; its tokens start at ``ids[first]``)."""
        cuts = self.cuts(text, self.cuts_per_text, above=offset)
        if not cuts:
            return
        with self._lock:
            for c, letter in cuts:
                key = (text[:c], letter)
                if key in self._entries:
                    self._entries.move_to_end(key)
                    continue
                k = enc.char_to_token(c - offset)
                if k is None or enc.offsets[k][0] != c - offset:
                    continue  # no token starts exactly here (cannot happen at a piece boundary)
                self._entries[key] = array("l", ids[:first + k])
                self._chars += c
            while self._chars > self.max_chars and self._entries:
                key, _ = self._entries.popitem(last=False)
                self._chars -= len(key[0])

    def stats(self) -> dict[str, int]:
        """Hits, misses, entries, characters held and characters not tokenized again."""
        return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries), "chars": self._chars,
                "saved_chars": self.saved_chars}
