"""Workloads: what the benchmark sends, built with the served model's tokenizer.

    from nbkit.bench import workloads as wl
    w = wl.synthetic(200, input_len=256, output_len=64, range_ratio=0.5)          # mixed lengths
    w = wl.shared_prefix(num_prefixes=4, questions_per_prefix=50, prefix_len=1024, question_len=32)
    w = wl.multi_turn(sessions=16, turns=4, first_len=256, turn_len=32, output_len=32)
    w = wl.from_trace("trace.jsonl")                 # the seed simulator's JSONL (flat lines and agentic sessions)
    w = wl.sharegpt("ShareGPT_V3_unfiltered_cleaned_split.json", n=500)           # a local file
    w.num_requests, len(w), w.describe()

A workload is a list of items: a :class:`Prompt` (one request) or a :class:`Session` (turns sent one
after another on one sticky session: turn k+1 goes ``delay_s`` after turn k finished, with the
conversation so far -- previous prompts and answers -- plus its own new tokens).

Prompts of a given token length are made of whole-word tokens of the tokenizer (``" cache"``,
``" the"``, ...) that each encode to themselves, so ``len(tokenizer.encode(text)) == n`` exactly and
prompts built on one prefix share that prefix token for token. The tokenizer defaults to the tiny
model's (:func:`nbkit.tiny.tiny_model`); pass ``tokenizer=`` (a path, a hub id or a tokenizer) for
another model.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np


# -- items ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """One request: ``text`` (or token ids) of ``input_toks`` tokens, asking for ``output_toks``."""

    text: str | tuple[int, ...]
    input_toks: int
    output_toks: int
    arrival_s: float | None = None  # trace timestamp (seconds from the trace's start), else None
    group: int | None = None        # e.g. the shared prefix it belongs to
    tenant: str | None = None       # who sends it (:func:`nbkit.bench.mix`)
    priority: str | int | None = None   # "interactive", "batch" or an int; None: the tenant's

    @property
    def requests(self) -> int:
        return 1


@dataclass(frozen=True)
class Turn:
    """One request of a session: ``text`` is the *new* input (``input_toks`` tokens) of this turn."""

    text: str
    input_toks: int
    output_toks: int
    delay_s: float = 0.0  # wait after the previous turn finished (think time, tool duration)


@dataclass(frozen=True)
class Session:
    """A conversation sent turn after turn, sticky on one replica (``X-Session-Id`` / ``session=``)."""

    session_id: str
    turns: tuple[Turn, ...]
    arrival_s: float | None = None
    group: int | None = None
    tenant: str | None = None
    priority: str | int | None = None

    @property
    def requests(self) -> int:
        return len(self.turns)


Item = Union[Prompt, Session]


@dataclass
class Workload:
    """A named list of items plus how it was made (``params``)."""

    name: str
    items: list[Item]
    tokenizer: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    #: tenant -> API key sent as ``Authorization: Bearer`` with its items (:func:`nbkit.bench.mix`)
    api_keys: dict[str, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    @property
    def num_requests(self) -> int:
        return sum(it.requests for it in self.items)

    @property
    def has_timestamps(self) -> bool:
        return bool(self.items) and all(it.arrival_s is not None for it in self.items)

    def head(self, n: int) -> "Workload":
        """The first ``n`` items."""
        return Workload(self.name, self.items[:n], self.tokenizer, dict(self.params, head=n), dict(self.api_keys))

    def describe(self) -> dict[str, Any]:
        """Counts and token statistics (of the new input per request and of the outputs)."""
        ins, outs = [], []
        for it in self.items:
            if isinstance(it, Prompt):
                ins.append(it.input_toks)
                outs.append(it.output_toks)
            else:
                ins += [t.input_toks for t in it.turns]
                outs += [t.output_toks for t in it.turns]
        d = {"name": self.name, "items": len(self.items), "requests": len(ins)}
        if ins:
            d.update(input_toks_mean=float(np.mean(ins)), input_toks_max=int(np.max(ins)),
                     output_toks_mean=float(np.mean(outs)), output_toks_max=int(np.max(outs)))
        return d

    def __repr__(self) -> str:
        return f"Workload({self.name!r}, items={len(self.items)}, requests={self.num_requests})"


# -- tokenizer and exact-length text ----------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _load_tokenizer(name: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name)


def get_tokenizer(tokenizer=None):
    """A tokenizer: an object with ``encode``/``decode`` as is, else a path/hub id (cached);
    ``None``: the tiny model's."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) and hasattr(tokenizer, "encode"):
        return tokenizer
    if tokenizer is None:
        from nbkit.tiny import tiny_model
        tokenizer = str(tiny_model())
    return _load_tokenizer(str(tokenizer))


def tokenizer_name(tokenizer) -> str | None:
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        return str(tokenizer) if tokenizer is not None else None
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


class TextBuilder:
    """Text of an exact token count for one tokenizer.

    ``words`` are the vocabulary entries of the form ``" <letters>"`` that encode to themselves;
    a byte-level BPE with a word-splitting pre-tokenizer (GPT-2, Llama 3, the tiny model) keeps
    each one a token of its own when they are concatenated. With fewer than 16 such words (e.g. a
    SentencePiece vocabulary), text is made by decoding random tokens and re-encoding until the
    count is right (nearly always exact).
    """

    def __init__(self, tokenizer=None):
        self.tok = get_tokenizer(tokenizer)
        self.words = self._words()

    def _words(self) -> list[str]:
        tok = self.tok
        special = set(getattr(tok, "all_special_ids", []) or [])
        out = []
        ids = [i for i in range(len(tok)) if i not in special]
        texts = tok.batch_decode([[i] for i in ids]) if hasattr(tok, "batch_decode") else [tok.decode([i]) for i in ids]
        for s in texts:
            if len(s) >= 2 and s[0] == " " and s[1:].isascii() and s[1:].isalpha():
                out.append(s)
        # keep the ones that really are one token on their own (and up to 4096 of them)
        out = out[:8192]
        return [s for s in out if len(self.encode(s)) == 1][:4096]

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def text(self, n: int, rng: np.random.Generator) -> str:
        """Random text of exactly ``n`` tokens (``n >= 1``)."""
        n = int(n)
        if n <= 0:
            return ""
        if len(self.words) >= 16:
            idx = rng.integers(0, len(self.words), size=n)
            return "".join(self.words[i] for i in idx)
        return self._fallback(n, rng)

    def _clean_vocab(self) -> list[int]:
        """Ids that decode to printable ASCII on their own (no partial UTF-8 bytes)."""
        if getattr(self, "_clean", None) is None:
            special = set(getattr(self.tok, "all_special_ids", []) or [])
            ids = [i for i in range(len(self.tok)) if i not in special]
            texts = self.tok.batch_decode([[i] for i in ids])
            self._clean = [i for i, s in zip(ids, texts) if s.strip() and s.isascii() and s.isprintable()] or ids
        return self._clean

    def from_ids(self, ids: Sequence[int]) -> str:
        """Text with one word token per id: equal ids give equal words, so shared id prefixes stay
        shared token prefixes (used for traces' ``input_tok_ids``)."""
        if len(self.words) >= 16:
            return "".join(self.words[int(i) % len(self.words)] for i in ids)
        vocab = self._clean_vocab()
        return self.tok.decode([vocab[int(i) % len(vocab)] for i in ids])

    def _fallback(self, n: int, rng: np.random.Generator) -> str:
        vocab = self._clean_vocab()
        ids = [vocab[i] for i in rng.integers(0, len(vocab), size=n)]
        text = self.tok.decode(ids)
        for _ in range(10):
            enc = self.encode(text)
            if len(enc) == n:
                return text
            if len(enc) > n:
                enc = enc[:n]
            else:
                enc = enc + [vocab[i] for i in rng.integers(0, len(vocab), size=n - len(enc))]
            text = self.tok.decode(enc)
        return text


@functools.lru_cache(maxsize=8)
def _builder_for(key: str) -> TextBuilder:
    return TextBuilder(key)


def text_builder(tokenizer=None) -> TextBuilder:
    """A (cached, for names and paths) :class:`TextBuilder`."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        return _builder_for(str(get_tokenizer(tokenizer).name_or_path) if tokenizer is None else str(tokenizer))
    return TextBuilder(tokenizer)


# -- length distributions ---------------------------------------------------------------------------
LengthSpec = Union[int, tuple, Sequence[int], Callable[[np.random.Generator, int], Sequence[int]]]


def sample_lengths(spec: LengthSpec, n: int, rng: np.random.Generator, *, range_ratio: float = 0.0,
                   dist: str = "uniform") -> np.ndarray:
    """``n`` token lengths (each >= 1) from ``spec``:

    - ``int`` L: fixed; with ``range_ratio`` r > 0, ``dist`` says how it spreads: ``"uniform"`` in
      [L(1-r), L(1+r)] (as ``vllm bench serve --random-range-ratio``), ``"normal"`` with std rL,
      ``"lognormal"`` with median L and sigma r;
    - ``(lo, hi)``: uniform integers in [lo, hi];
    - a list/array: an empirical distribution, sampled with replacement;
    - a callable ``f(rng, n)``.
    """
    if n <= 0:
        return np.zeros(0, dtype=int)
    if callable(spec):
        out = np.asarray(spec(rng, n), dtype=float)
    elif isinstance(spec, tuple) and len(spec) == 2:
        lo, hi = int(spec[0]), int(spec[1])
        if lo > hi:
            raise ValueError(f"length range {spec!r}: lo > hi")
        out = rng.integers(lo, hi + 1, size=n).astype(float)
    elif isinstance(spec, (list, np.ndarray)) or (isinstance(spec, Sequence) and not isinstance(spec, str)):
        vals = np.asarray(list(spec), dtype=float)
        if vals.size == 0:
            raise ValueError("length distribution: empty list")
        out = rng.choice(vals, size=n, replace=True)
    else:
        base = int(spec)
        if base < 1:
            raise ValueError(f"length {spec!r}: must be >= 1")
        r = float(range_ratio)
        if r < 0:
            raise ValueError(f"range_ratio={range_ratio!r}: must be >= 0")
        if r == 0:
            out = np.full(n, base, dtype=float)
        elif dist == "uniform":
            if r >= 1:
                raise ValueError(f"range_ratio={range_ratio!r}: must be < 1 for a uniform spread")
            out = rng.integers(int(np.floor(base * (1 - r))), int(np.ceil(base * (1 + r))) + 1, size=n).astype(float)
        elif dist == "normal":
            out = rng.normal(base, r * base, size=n)
        elif dist == "lognormal":
            out = rng.lognormal(np.log(base), r, size=n)
        else:
            raise ValueError(f"dist={dist!r}: choose fixed, uniform, normal or lognormal")
    return np.maximum(1, np.rint(out)).astype(int)


# -- builders ---------------------------------------------------------------------------------------
def synthetic(n: int = 100, input_len: LengthSpec = 256, output_len: LengthSpec = 64, *,
              range_ratio: float = 0.0, dist: str = "uniform", prefix_len: int = 0, seed: int = 0,
              tokenizer=None, name: str | None = None) -> Workload:
    """``n`` random prompts with sampled input and output lengths (see :func:`sample_lengths`).

    ``prefix_len`` > 0 puts one common prefix of that many tokens before every prompt (its tokens
    count in ``input_toks``).

        wl.synthetic(200, input_len=(32, 1500), output_len=(8, 128))           # mixed lengths
        wl.synthetic(100, input_len=512, output_len=128, range_ratio=0.25)
    """
    if n < 0:
        raise ValueError(f"n={n!r}: must be >= 0")
    rng = np.random.default_rng(seed)
    tb = text_builder(tokenizer)
    if dist == "fixed":
        dist, range_ratio = "uniform", 0.0
    ins = sample_lengths(input_len, n, rng, range_ratio=range_ratio, dist=dist)
    outs = sample_lengths(output_len, n, rng, range_ratio=range_ratio, dist=dist)
    prefix = tb.text(prefix_len, rng) if prefix_len > 0 else ""
    items: list[Item] = [Prompt(prefix + tb.text(int(i), rng), int(i) + max(0, prefix_len), int(o))
                         for i, o in zip(ins, outs)]
    return Workload(name or "synthetic", items, tokenizer_name(tokenizer),
                    dict(n=n, input_len=_jsonable(input_len), output_len=_jsonable(output_len),
                         range_ratio=range_ratio, dist=dist, prefix_len=prefix_len, seed=seed))


def shared_prefix(num_prefixes: int = 4, questions_per_prefix: int = 25, prefix_len: int = 512,
                  question_len: LengthSpec = 32, output_len: LengthSpec = 32, *, shuffle: bool = True,
                  range_ratio: float = 0.0, popularity: float = 0.0, seed: int = 0, tokenizer=None,
                  name: str | None = None) -> Workload:
    """``num_prefixes`` system prompts of ``prefix_len`` tokens x ``questions_per_prefix`` questions each.

    Every prompt is its system prompt followed by its question, so the prompts of one group share
    exactly ``prefix_len`` leading tokens (``Prompt.group`` is the group). ``shuffle`` interleaves
    the groups at random (else group after group).

    ``popularity`` > 0 makes some system prompts more popular than others, as one product's prompt
    is in real traffic: the same ``num_prefixes * questions_per_prefix`` questions are shared out
    Zipf-like, group ``g`` getting a share proportional to ``1 / (g + 1) ** popularity``
    (:func:`zipf_counts`; 0, the default, gives every group ``questions_per_prefix``)::

        w = shared_prefix(32, 20, 1024, popularity=1.0)   # group 0: 158 of 640, group 31: 5
    """
    if num_prefixes < 1 or questions_per_prefix < 1:
        raise ValueError("num_prefixes and questions_per_prefix must be >= 1")
    if prefix_len < 1:
        raise ValueError(f"prefix_len={prefix_len!r}: must be >= 1")
    if not (popularity >= 0 and math.isfinite(popularity)):
        raise ValueError(f"popularity={popularity!r}: must be a finite number >= 0 (a Zipf exponent)")
    rng = np.random.default_rng(seed)
    tb = text_builder(tokenizer)
    prefixes = [tb.text(prefix_len, rng) for _ in range(num_prefixes)]
    n = num_prefixes * questions_per_prefix
    qs = sample_lengths(question_len, n, rng, range_ratio=range_ratio)
    outs = sample_lengths(output_len, n, rng, range_ratio=range_ratio)
    counts = zipf_counts(n, num_prefixes, popularity) if popularity else [questions_per_prefix] * num_prefixes
    groups = [g for g, c in enumerate(counts) for _ in range(c)]
    items: list[Item] = []
    for k in range(n):
        g = groups[k]
        items.append(Prompt(prefixes[g] + tb.text(int(qs[k]), rng), prefix_len + int(qs[k]), int(outs[k]), group=g))
    if shuffle:
        order = rng.permutation(n)
        items = [items[i] for i in order]
    return Workload(name or "shared-prefix", items, tokenizer_name(tokenizer),
                    dict(num_prefixes=num_prefixes, questions_per_prefix=questions_per_prefix, prefix_len=prefix_len,
                         question_len=_jsonable(question_len), output_len=_jsonable(output_len), shuffle=shuffle,
                         seed=seed, **({"popularity": popularity} if popularity else {})))


def zipf_counts(total: int, groups: int, exponent: float) -> list[int]:
    """``total`` items shared out over ``groups`` in proportion to ``1 / (g + 1) ** exponent``
    (largest remainders, so the counts add up exactly).

        >>> zipf_counts(10, 3, 1.0), zipf_counts(9, 3, 0.0)
        ([5, 3, 2], [3, 3, 3])
    """
    weights = [1.0 / (g + 1) ** exponent for g in range(groups)]
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    counts = [int(x) for x in exact]
    for g in sorted(range(groups), key=lambda g: counts[g] - exact[g])[:total - sum(counts)]:
        counts[g] += 1
    return counts


def multi_turn(sessions: int = 16, turns: int = 4, first_len: LengthSpec = 256, turn_len: LengthSpec = 32,
               output_len: LengthSpec = 32, *, think_s: float = 0.0, num_prefixes: int = 0, prefix_len: int = 0,
               seed: int = 0, tokenizer=None, name: str | None = None) -> Workload:
    """``sessions`` conversations of ``turns`` requests that grow: turn 1 sends ``first_len`` new
    tokens (after a shared system prompt of ``prefix_len`` tokens when ``num_prefixes`` > 0), each
    later turn resends the conversation so far plus ``turn_len`` new tokens, ``think_s`` after the
    previous answer."""
    if sessions < 1 or turns < 1:
        raise ValueError("sessions and turns must be >= 1")
    rng = np.random.default_rng(seed)
    tb = text_builder(tokenizer)
    prefixes = [tb.text(prefix_len, rng) for _ in range(num_prefixes)] if num_prefixes and prefix_len else []
    firsts = sample_lengths(first_len, sessions, rng)
    later = sample_lengths(turn_len, sessions * turns, rng)
    outs = sample_lengths(output_len, sessions * turns, rng)
    items: list[Item] = []
    for s in range(sessions):
        g = s % len(prefixes) if prefixes else None
        head = prefixes[g] if prefixes else ""
        ts = []
        for k in range(turns):
            n_new = int(firsts[s]) if k == 0 else int(later[s * turns + k])
            text = (head if k == 0 else "") + tb.text(n_new, rng)
            n_tok = n_new + (len(tb.encode(head)) if k == 0 and head else 0)
            ts.append(Turn(text, n_tok, int(outs[s * turns + k]), delay_s=0.0 if k == 0 else float(think_s)))
        items.append(Session(f"s{seed}-{s}", tuple(ts), group=g))
    return Workload(name or "multi-turn", items, tokenizer_name(tokenizer),
                    dict(sessions=sessions, turns=turns, first_len=_jsonable(first_len), turn_len=_jsonable(turn_len),
                         output_len=_jsonable(output_len), think_s=think_s, num_prefixes=num_prefixes,
                         prefix_len=prefix_len, seed=seed))


def from_trace(path: str | os.PathLike, *, tokenizer=None, time_scale: float = 1.0, seed: int = 0,
               name: str | None = None) -> Workload:
    """The seed simulator's trace JSONL (read by :func:`nbkit.traces.read_trace`).

    A flat line becomes a :class:`Prompt` of ``input_toks`` tokens at its ``arrival_time_ns``
    (with ``input_tok_ids`` the text follows the ids, so requests sharing id prefixes share token
    prefixes); an agentic session becomes a :class:`Session` whose sub-request k+1 is sent
    ``tool_duration_ns`` of sub-request k after k finished. Times are relative to the trace's first
    arrival and multiplied by ``time_scale``. A line's ``tenant`` and ``priority`` are kept.
    """
    from nbkit.traces import TraceSession, read_trace

    items_in = read_trace(path)
    rng = np.random.default_rng(seed)
    tb = text_builder(tokenizer)
    t0 = min((it.arrival_time_ns for it in items_in), default=0)
    items: list[Item] = []
    for k, it in enumerate(items_in):
        at = (it.arrival_time_ns - t0) / 1e9 * time_scale
        if isinstance(it, TraceSession):
            ts = []
            for j, sr in enumerate(it.sub_requests):
                delay = it.sub_requests[j - 1].tool_duration_ns / 1e9 * time_scale if j else 0.0
                ts.append(Turn(tb.text(sr.input_toks, rng), int(sr.input_toks), int(sr.output_toks), delay_s=delay))
            items.append(Session(str(it.session_id), tuple(ts), arrival_s=at, tenant=it.tenant, priority=it.priority))
        else:
            ids = getattr(it, "input_tok_ids", None)
            text = tb.from_ids(ids) if ids else tb.text(it.input_toks, rng)
            items.append(Prompt(text, int(it.input_toks), int(it.output_toks), arrival_s=at, tenant=it.tenant,
                                priority=it.priority))
    return Workload(name or f"trace:{Path(path).name}", items, tokenizer_name(tokenizer),
                    dict(path=str(path), time_scale=time_scale, seed=seed))


def sharegpt(path: str | os.PathLike, n: int | None = None, *, output_len: int | None = None,
             max_input_len: int = 1024, max_total_len: int = 2048, min_len: int = 4, seed: int = 0,
             tokenizer=None, name: str | None = None) -> Workload:
    """ShareGPT-format conversations from a local JSON (or JSONL) file, as ``vllm bench serve``
    reads them: the first human turn is the prompt, the length of the answer that follows is the
    output length (or ``output_len``); pairs with fewer than ``min_len`` tokens either side, a
    prompt over ``max_input_len`` or a total over ``max_total_len`` are dropped; the rest is
    shuffled with ``seed`` and the first ``n`` kept."""
    p = Path(path)
    raw = p.read_text()
    try:
        data = json.loads(raw)
    except ValueError:
        data = [json.loads(line) for line in raw.splitlines() if line.strip()]
    if not isinstance(data, list):
        raise ValueError(f"{p}: expected a JSON list of conversations")
    tb = text_builder(tokenizer)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    items: list[Item] = []
    for i in order:
        entry = data[i]
        conv = (entry.get("conversations") or entry.get("conversation") or []) if isinstance(entry, dict) else []
        if len(conv) < 2:
            continue
        prompt, answer = _turn_text(conv[0]), _turn_text(conv[1])
        if not prompt:
            continue
        n_in = tb.count(prompt)
        n_out = int(output_len) if output_len is not None else tb.count(answer)
        if n_in < min_len or n_out < (1 if output_len is not None else min_len):
            continue
        if n_in > max_input_len or n_in + n_out > max_total_len:
            continue
        items.append(Prompt(prompt, n_in, n_out))
        if n is not None and len(items) >= n:
            break
    if n is not None and len(items) < n:
        raise ValueError(f"{p}: only {len(items)} usable conversations, asked for n={n}")
    return Workload(name or f"sharegpt:{p.name}", items, tokenizer_name(tokenizer),
                    dict(path=str(p), n=n, output_len=output_len, max_input_len=max_input_len,
                         max_total_len=max_total_len, seed=seed))


def _turn_text(turn) -> str:
    if isinstance(turn, dict):
        return str(turn.get("value", turn.get("content", "")) or "")
    return str(turn)


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if callable(x):
        return getattr(x, "__name__", "callable")
    if isinstance(x, tuple):
        return list(x)
    return x


def from_spec(kind: str, *, tokenizer=None, seed: int = 0, **kw) -> Workload:
    """Build a workload by name (used by the command line): ``synthetic``, ``shared-prefix``,
    ``multi-turn``, ``trace`` (``path=``) or ``sharegpt`` (``path=``)."""
    kind = kind.replace("_", "-")
    builders = {"synthetic": synthetic, "random": synthetic, "shared-prefix": shared_prefix,
                "multi-turn": multi_turn, "trace": from_trace, "sharegpt": sharegpt}
    if kind not in builders:
        raise ValueError(f"workload={kind!r}: choose from {sorted(builders)}")
    f = builders[kind]
    if kind in ("trace", "sharegpt"):
        path = kw.pop("path", None)
        if not path:
            raise ValueError(f"workload={kind!r}: give the file (--dataset PATH)")
        return f(path, tokenizer=tokenizer, seed=seed, **kw)
    return f(tokenizer=tokenizer, seed=seed, **kw)


def items_requests(items: Iterable[Item]) -> int:
    return sum(it.requests for it in items)
