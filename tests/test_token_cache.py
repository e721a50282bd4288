"""The router's prefix token cache gives exactly the tokenizer's ids: random texts full of the
characters the pre-tokenizer regexes treat specially (newlines before letters, contractions,
digits, whitespace runs, unicode, special tokens with strip flags), sharing prefixes the way
system prompts and conversations do, for both regex families it accepts; and it refuses the
tokenizers it cannot cut exactly."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import AddedToken, Tokenizer

from nbkit.routing.token_cache import GPT2_PATTERN, LLAMA3_PATTERN, PrefixTokenCache, unsupported

PIECES = ["the", "The", " cat", "sat", " on", "mat", "ünï", "cödé", "日本語", "🙂", "ß", "Ωmega", " ", "  ", "\t",
          "\n", "\n", "\n\n", " \n", "\r\n", "'s", "'ll", "'T", "'re", "'", "12345", "7", " 42", "!", "?!", ".", ",",
          "(", ")", "{", "--", "…", "<s>", "</s>", "<|eot_id|>", "<|x|>", " <|x|>", "<|r|>", "\nA", "\nb"]


WHITESPACE_MERGES = [("Ċ", "Ġ"), ("Ġ", "Ġ"), ("Ċ", "Ċ"), ("ĠĠ", "Ġ"), ("ĊĠ", "Ġ"), ("Ġ", "Ċ"), ("ĉ", "Ġ"),
                     ("Ġ", "ĉ"), ("!", "?"), ("1", "2"), ("12", "3"), ("'", "l"), ("'l", "l"), ("ĊĊ", "Ċ"), ("č", "Ċ")]


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(n))


def variant(tiny_model_path: str, pattern: str | None, trim: bool = False, bare: bool = False) -> Tokenizer:
    """The tiny model's byte-level BPE, with GPT-2's regex (as built) or a Llama-3-style
    Split + ByteLevel pre-tokenizer and a BOS post-processor; plus merges of whitespace runs and
    digits (so a cut a piece does not end at changes the ids) and added tokens with strip flags."""
    cfg = json.load(open(f"{tiny_model_path}/tokenizer.json"))
    vocab, merges = cfg["model"]["vocab"], cfg["model"]["merges"]
    for a, b in WHITESPACE_MERGES:   # merges a wrong cut would miss: runs of newlines, spaces, digits
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append([a, b])
    if pattern is not None:
        cfg["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        cfg["post_processor"] = {"type": "TemplateProcessing",
                                 "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                            {"Sequence": {"id": "A", "type_id": 0}}],
                                 "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                                 "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    if trim:   # GPT-2's own post-processor: offsets trimmed of whitespace
        cfg["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if bare:   # no added tokens at all: the cache keeps the least margin after a cut
        cfg["added_tokens"] = []
        return Tokenizer.from_str(json.dumps(cfg))
    tok = Tokenizer.from_str(json.dumps(cfg))
    tok.add_special_tokens([AddedToken("<|eot_id|>", special=True), AddedToken("<|x|>", lstrip=True, special=True),
                            AddedToken("<|r|>", rstrip=True, special=True)])
    return tok


@pytest.mark.parametrize("pattern,trim", [(None, False), (None, True), (LLAMA3_PATTERN, False)],
                         ids=["gpt2-regex", "gpt2-regex-trimmed-offsets", "llama3-regex"])
def test_cached_ids_equal_the_tokenizers_on_random_shared_prefix_texts(tiny_model_path, pattern, trim):
    tok = variant(tiny_model_path, pattern, trim)
    cache = PrefixTokenCache(tok, min_chars=16, max_chars=200_000)
    rng = random.Random(7)
    checked = 0
    for _ in range(40):
        system = text(rng, rng.randint(20, 300))
        convo = system
        for _ in range(6):
            for special in (True, False):   # other questions after the same system prompt
                t = system + rng.choice(["\n", "\nQ", "", " ", "<|eot_id|>", "\n\n"]) + text(rng, rng.randint(1, 40))
                assert cache.encode(t, special) == tok.encode(t, add_special_tokens=special).ids, repr(t)
                checked += 1
            convo += rng.choice(["\nUser", "<|eot_id|>", "<s>", "\nassistant", "\n"]) + text(rng, rng.randint(1, 60))
            assert cache.encode(convo, True) == tok.encode(convo, add_special_tokens=True).ids, repr(convo)  # a growing conversation
            checked += 1
    s = cache.stats()
    assert checked == 40 * 6 * 3
    assert s["hits"] > checked // 3, s          # the cache was really used, not bypassed
    assert s["saved_chars"] > 0 and 0 < s["chars"] <= 200_000


@pytest.mark.parametrize("pattern,trim,bare", [(None, False, False), (None, True, False), (LLAMA3_PATTERN, False, False),
                                               (None, False, True), (LLAMA3_PATTERN, False, True)],
                         ids=["gpt2-regex", "gpt2-regex-trimmed-offsets", "llama3-regex", "gpt2-no-added-tokens",
                              "llama3-no-added-tokens"])
def test_every_safe_boundary_splits_the_ids_whatever_follows_the_shared_part(tiny_model_path, pattern, trim, bare):
    """The claim the cache rests on, checked at every boundary it would pick: for a text shared up
    to ``limit``, the ids before the cut ``c`` are the same whatever comes after ``limit``, and the
    ids after it are those of ``text[c:]`` alone."""
    tok = variant(tiny_model_path, pattern, trim, bare)
    cache = PrefixTokenCache(tok, min_chars=1)
    rng = random.Random(11)
    cuts = 0
    for _ in range(60):
        shared = text(rng, rng.randint(10, 60))
        for limit in range(2, len(shared) + 1):
            c = cache.safe_cut(shared, limit)
            if not c:
                continue
            cuts += 1
            for _ in range(2):
                t = shared[:limit] + text(rng, rng.randint(0, 6))
                enc = tok.encode(t, add_special_tokens=False)
                k = sum(1 for _, e in enc.offsets if e <= c)
                assert enc.ids == enc.ids[:k] + tok.encode(t[c:], add_special_tokens=False).ids, (t[:c], t[c:])
                other = tok.encode(shared[:limit] + text(rng, 4), add_special_tokens=False)
                assert other.ids[:sum(1 for _, e in other.offsets if e <= c)] == enc.ids[:k], (t[:c], t[c:])
    assert cuts > 1000


def test_a_system_prompt_is_tokenized_once(tiny_model_path):
    tok = variant(tiny_model_path, None)
    cache = PrefixTokenCache(tok)
    system = "You are a careful assistant. " + "Rules and facts follow, word after word, " * 60
    for i in range(20):
        t = f"{system}question {i}: what is {i} + {i}?"
        assert cache.encode(t, True) == tok.encode(t, add_special_tokens=True).ids
    s = cache.stats()
    assert (s["hits"], s["misses"]) == (18, 2)   # an opening is remembered the first time, its prompt the second
    assert s["saved_chars"] >= 18 * (len(system) - 20)   # all but its last words ("word, ")


def test_each_conversation_continues_from_its_own_last_turn(tiny_model_path):
    """Many conversations on one system prompt, interleaved: each new turn is matched with the
    same conversation's previous one (the longest common prefix), not just the system prompt."""
    tok = variant(tiny_model_path, None)
    cache = PrefixTokenCache(tok)
    rng = random.Random(3)
    system = "<s>system: You help with code, and answer briefly. " + "Style rules, one after another. " * 40 + "</s>\n"
    convs = [system] * 24
    tail = []
    for turn in range(6):
        for i in range(24):
            convs[i] += f"<s>user: {text(rng, 30)}</s>\n<s>assistant: {text(rng, 30)}</s>\n"
            prompt = convs[i] + "<s>assistant:"
            before = cache.saved_chars
            assert cache.encode(prompt, True) == tok.encode(prompt, add_special_tokens=True).ids
            if turn >= 2:
                tail.append(len(prompt) - (cache.saved_chars - before))
    assert max(tail) < 600   # only the new turn (about 300-500 characters) was tokenized


def test_memory_is_bounded_by_the_characters_held(tiny_model_path):
    tok = variant(tiny_model_path, None)
    cache = PrefixTokenCache(tok, max_chars=5_000, min_chars=16)
    rng = random.Random(1)
    for i in range(50):
        t = f"The same opening line.\nPrompt {i}\n" + text(rng, 200) + "\nEnd"
        assert cache.encode(t, False) == tok.encode(t, add_special_tokens=False).ids
    assert 0 < cache.stats()["chars"] <= 5_000
    assert len(cache._chunks) <= sum(len(p) for p in cache._prompts) // 16   # no index entries of dropped prompts


def test_prompts_that_share_nothing_are_not_kept(tiny_model_path):
    tok = variant(tiny_model_path, None)
    cache = PrefixTokenCache(tok, min_chars=32)
    rng = random.Random(2)
    for i in range(40):
        t = f"{i:04d} unique opening {rng.random()} " + text(rng, 100)
        assert cache.encode(t, False) == tok.encode(t, add_special_tokens=False).ids
    s = cache.stats()
    assert (s["hits"], s["prompts"], s["chars"]) == (0, 0, 0)


def test_tokenizers_it_cannot_cut_exactly_are_refused(tiny_model_path):
    cfg = json.load(open(f"{tiny_model_path}/tokenizer.json"))
    assert unsupported(cfg) is None
    for pre, why in (({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}, "Metaspace"),
                     ({"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}, "add_prefix_space"),
                     ({"type": "Sequence", "pretokenizers": [
                         {"type": "Split", "pattern": {"Regex": r"\w+|\W"}, "behavior": "Isolated", "invert": False},
                         {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
                      "sequence")):
        assert why in unsupported({**cfg, "pre_tokenizer": pre})
    assert "normalizer Lowercase" == unsupported({**cfg, "normalizer": {"type": "Lowercase"}})
    bad = Tokenizer.from_str(json.dumps({**cfg, "normalizer": {"type": "Lowercase"}}))
    with pytest.raises(ValueError, match="Lowercase"):
        PrefixTokenCache(bad)
    assert PrefixTokenCache.maybe(bad) is None
    assert GPT2_PATTERN in {(p.get("pattern") or {}).get("Regex", GPT2_PATTERN) for p in [cfg["pre_tokenizer"]]}


def test_prompt_tokenizer_uses_it_and_gives_the_same_ids(tiny_model_path):
    from nbkit.routing.tokenize import PromptTokenizer

    on, off = PromptTokenizer(tiny_model_path), PromptTokenizer(tiny_model_path, prefix_cache=False)
    system = "System rules.\n" + "Answer in one line, cite nothing.\n" * 40
    for i in range(5):
        body = {"prompt": system + f"Question {i}?"}
        assert on.token_ids(body) == off.token_ids(body)
        chat = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Q{i}"}]}
        assert on.token_ids(chat) == off.token_ids(chat)
    assert off.cache is None and on.cache.stats()["hits"] >= 6   # 3 of 5 of each kind: the first two miss
