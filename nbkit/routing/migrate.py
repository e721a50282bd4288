"""Stream migration: continue a broken streamed completion on another replica, invisibly.

When a replica dies after it has streamed some tokens of a ``/v1/completions`` or
``/v1/chat/completions`` response, the router sends a *continuation* of the request to another
replica and splices its SSE stream onto the first one, so that the client reads ONE stream with
one ``id``/``created``, one role chunk and usage that counts every token once. This module is the
pure, I/O-free part (no sockets, no retries, nothing else of nbkit); the router does the sending::

    prepared = migrate.prepare(path, body)
    if prepared is None:                       # not migratable: forward untouched
        ...
    body_to_send, state = prepared
    replica = pick()
    while True:
        try:
            async for chunk in send(replica, body_to_send):
                await client.write(state.feed(chunk))
        except (ConnectionError, ...):
            pass                               # the replica died mid-stream
        if state.done:                         # "data: [DONE]" went out: finished
            break
        body_to_send = state.continuation()    # None: cannot continue
        replica = pick(exclude=replica) if body_to_send is not None else None
        if replica is None or state.migrations >= 2:
            await client.write(state.closing(state.error or "replica lost"))
            break
        state.resumed()                        # the next bytes fed are a new response

How it counts: :func:`prepare` adds ``"return_token_ids": true`` (vLLM 0.32 has it on both
paths), so every content chunk carries the ids of the tokens it holds and the first chunk the
prompt's ids; :meth:`StreamState.feed` counts them (``tokens`` is exact) and strips them again
unless the caller asked for them. A mid-stream error event from the replica
(``data: {"error": ...}``: vLLM's stream generators turn any exception, an engine that died
included, into one, then send ``[DONE]``) is withheld with the ``[DONE]`` after it (its message
is kept in ``state.error``): the stream then ends without ``done``, so a caller must treat a
stream that ended without ``state.done`` as broken, and can migrate it like a lost connection.

What vLLM 0.32 sends (recorded in ``tests/data/migrate/``): a completions chunk carries
``prompt_token_ids`` and ``token_ids`` inside its choice (the prompt's ids on the first chunk
only, ``null`` after; both ``null`` without ``return_token_ids``); a chat stream starts with a
role-only chunk (``delta: {"role": "assistant", "content": ""}``) whose ``prompt_token_ids`` sit
at the top level of the chunk, and then carries ``token_ids`` in each choice. A token whose bytes
are an incomplete UTF-8 character arrives with ``"text": ""`` but its id, so text is no measure.

Continuations: completions send ``prompt = prompt ids + generated ids`` (a token-id prompt: the
replica resumes exactly where the first stopped; greedy decoding reproduces the rest token for
token) with ``max_tokens``/``min_tokens`` reduced by what was generated. Chat re-renders the
conversation with the text so far as a final assistant message (``continue_final_message``),
which is exact in count (``max_tokens`` reduced) but not token-exact: the chat template and the
re-tokenization of the text decide what the second replica sees.

Not migrated (see :func:`why_not`): besides what the API itself cannot continue (n > 1, best_of,
echo, batch prompts, prompt_logprobs, beam search, tools), stop strings (vLLM holds back text
that might start one: migrating would lose it), structured output (the grammar would restart),
completions logprobs (``text_offset`` would restart at 0), disaggregated-prefill requests; and,
found while streaming, chat output with reasoning or tool calls, or chunks without token ids
(a server that hides them: reasoning parsers with ``include_reasoning=false``).

Cost of ``feed()`` per event, measured on the project's 2-core CPU machine (Python 3.11, msgspec
0.23; CPU time, best of 7, while another test run shared the cores) on the recorded ~250-byte
events, one event per call: 3.8-4.1 us passed through (the caller asked for token ids: decode
and count only), 4.3-4.5 us stripped (decode, edit, encode), 6.1 us for a continuation's event
(id, created, usage rewritten); a whole stream per call 3.2-4.0 us per event. Of that, msgspec's
decode is 1.7 us and its encode 0.8 us (the stdlib's json.loads/dumps: 8.2 / 8.8 us).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import msgspec

log = logging.getLogger(__name__)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest.max_tokens default (chat has none)

_DATA = b"data: "
_DONE = b"[DONE]"
_DONE_EVENT = b"data: [DONE]\n\n"
_NOT_TEXT = ("reasoning", "reasoning_content", "tool_calls", "function_call")  # chat output we cannot continue
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class _Drop(Exception):
    """A chunk of a continuation that the client must not see (its second role chunk)."""


def why_not(path: str, body: Any) -> str | None:
    """Why this request cannot be migrated, or None when it can (see :func:`prepare`)."""
    path = path.split("?", 1)[0]
    if path not in (COMPLETIONS, CHAT):
        return f"path {path}"
    if not isinstance(body, dict):
        return "body is not a JSON object"
    if not body.get("stream"):
        return "not a stream"
    if (body.get("n") or 1) != 1:
        return "n > 1"
    if (body.get("best_of") or 1) != 1:
        return "best_of > 1"
    if body.get("echo"):
        return "echo"
    if body.get("prompt_logprobs") is not None:
        return "prompt_logprobs"
    if body.get("use_beam_search"):
        return "beam search"
    if body.get("stop"):  # vLLM holds text back to match stop strings: it would be lost
        return "stop strings"
    if body.get("structured_outputs") is not None or any(k.startswith("guided_") for k in body):
        return "structured output (the grammar would restart)"
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type", "text") == "text"):
        return "response_format"
    if body.get("kv_transfer_params") is not None:
        return "kv_transfer_params (disaggregated prefill)"
    if body.get("return_token_offsets"):
        return "return_token_offsets"
    if path == COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return "batch prompt"
        elif not isinstance(prompt, str):
            return "prompt is neither text nor token ids"
        if body.get("prompt_embeds") is not None:
            return "prompt_embeds"
        if body.get("suffix"):
            return "suffix"
        if body.get("logprobs") is not None:  # text_offset would restart at 0
            return "logprobs in completions"
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no messages"
    if body.get("tools"):
        return "tools"
    if body.get("tool_choice") not in (None, "none"):
        return "tool_choice"
    if body.get("truncate_prompt_tokens") is not None:
        return "truncate_prompt_tokens in chat"
    if body.get("continue_final_message"):
        last = messages[-1]
        if not (isinstance(last, dict) and last.get("role") == "assistant"
                and isinstance(last.get("content"), str)):
            return "continue_final_message without a final assistant text message"
    return None


def prepare(path: str, body: dict) -> tuple[dict, StreamState] | None:
    """Called before a streamed request is sent: ``(body_to_send, state)``, or None if this request
    cannot be migrated (forward it untouched; the reason is logged at debug level).

    ``body_to_send`` is a shallow copy of ``body`` with ``"return_token_ids": True``; unless the
    caller set that itself, the state strips the ids again from what the client sees."""
    reason = why_not(path, body)
    if reason is not None:
        log.debug("stream not migratable: %s", reason)
        return None
    sent = dict(body)
    sent["return_token_ids"] = True
    return sent, StreamState(path.split("?", 1)[0] == CHAT, body, sent,
                             strip=body.get("return_token_ids") is not True)


class StreamState:
    """One streamed response as the client sees it, across migrations (made by :func:`prepare`).

    Attributes: ``tokens`` (completion tokens the client has been sent, exact), ``finished`` (a
    finish_reason was seen), ``done`` (``data: [DONE]`` was passed on), ``migrations`` (how many
    continuations were started), ``error`` (the message of a withheld upstream error event)."""

    def __init__(self, chat: bool, body: dict, sent: dict, strip: bool):
        self.chat = chat
        self.body = body            # what the client asked
        self.sent = sent            # what went to the first replica
        self.strip = strip          # remove the token ids we asked for
        self.tokens = 0
        self.finished = False
        self.done = False
        self.migrations = 0
        self.error: str | None = None
        self.exact = True           # every content chunk carried its token ids
        self.unmigratable: str | None = None
        self.usage_sent = False
        self._buf = b""
        self._cont = False          # feeding a continuation
        self._base = 0              # tokens before the current continuation
        self._id: Any = None
        self._created: Any = None
        self._model: Any = None
        self._prompt_ids: list[int] | None = None
        self._prompt_seen = False   # the client got (or would have got) the prompt's ids
        self._role_sent = False
        self._gen: list[int] = []   # generated token ids (completions)
        self._text: list[str] = []  # generated text (chat)
        opts = body.get("stream_options")
        self._include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))

    # -- the response ------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """Raw response bytes -> the bytes to pass to the client now (complete events only)."""
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        out = []
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            piece = self._event(buf, start, end)
            if piece:
                out.append(piece)
            start = end + 2
        self._buf = buf[start:]
        return b"".join(out)

    def _event(self, buf: bytes, start: int, end: int) -> bytes | None:
        if not buf.startswith(_DATA, start) or buf.find(b"\n", start, end) >= 0:
            return buf[start:end + 2]  # a comment, another field or several lines: as it is
        payload = buf[start + 6:end]
        if payload == _DONE:
            if self.error is not None:
                return None  # the end of a withheld error: the stream is broken, not done
            self.done = True
            return _DONE_EVENT
        if self.done:
            return None
        try:
            d = _decode(payload)
        except msgspec.DecodeError:
            log.warning("undecodable SSE event passed on: %.80r", payload)
            return buf[start:end + 2]
        if not isinstance(d, dict):
            return buf[start:end + 2]
        if "choices" not in d and isinstance(err := d.get("error"), dict):
            self.error = str(err.get("message"))
            log.info("upstream error event withheld (%s tokens sent): %s", self.tokens, self.error)
            return None
        try:
            edit = self._rewrite(d)
        except _Drop:
            return None
        return b"data: " + _encode(d) + b"\n\n" if edit else buf[start:end + 2]

    def _rewrite(self, d: dict) -> bool:
        """Account for one chunk and edit ``d`` in place: True to re-encode it, False to pass its
        bytes as they came; raises _Drop for a chunk the client must not see."""
        cont = self._cont
        edit = cont  # a first response's event is re-encoded only when a field we added is taken out
        if self._id is None:
            self._id, self._created, self._model = d.get("id"), d.get("created"), d.get("model")
        elif cont:
            d["id"] = self._id
            if "created" in d:
                d["created"] = self._created
            if "model" in d and self._model is not None:
                d["model"] = self._model
        choices = d.get("choices") or ()
        if self.chat:  # chat: the prompt's ids at the top of the chunk
            edit = self._prompt_ids_in(d, cont) or edit
        for c in choices:
            if self.chat:
                delta = c.get("delta") or {}
                if "role" in delta:
                    if (self._role_sent and not delta.get("content") and len(choices) == 1
                            and c.get("finish_reason") is None and not c.get("token_ids")):
                        raise _Drop  # the continuation's role chunk: the client has one
                    self._role_sent = True
                    if "token_ids" not in c:
                        continue
                if len(delta) > ("content" in delta) + ("role" in delta) and any(delta.get(k) for k in _NOT_TEXT):
                    self.unmigratable = "reasoning or tool-call output"
                text = delta.get("content")
                if isinstance(text, str) and text:
                    self._text.append(text)
            else:  # completions: in the choice
                edit = self._prompt_ids_in(c, cont) or edit
            ids = c.get("token_ids")
            if isinstance(ids, list):
                self.tokens += len(ids)
                if not self.chat:
                    self._gen.extend(ids)
                if self.strip:
                    c["token_ids"] = None
                    edit = True
            else:
                self.exact = False
            if c.get("finish_reason") is not None:
                self.finished = True
        usage = d.get("usage")
        if isinstance(usage, dict):
            if not choices:
                self.usage_sent = True
            if cont and self._base:
                prompt = self._prompt_tokens(usage.get("prompt_tokens"))
                done = self._base + (usage.get("completion_tokens") or 0)
                usage["prompt_tokens"] = prompt
                usage["completion_tokens"] = done
                usage["total_tokens"] = prompt + done
        return edit

    def _prompt_ids_in(self, d: dict, cont: bool) -> bool:
        """Note the prompt's ids where ``d`` carries them; True when they were taken out of ``d``
        (we asked for them, or the client already saw the prompt's ids of the first response)."""
        pids = d.get("prompt_token_ids")
        if pids is None:
            return False
        self._take_prompt(pids)
        seen, self._prompt_seen = self._prompt_seen, True
        if self.strip or (cont and seen):
            d["prompt_token_ids"] = None
            return True
        return False

    def _take_prompt(self, ids: list[int]) -> None:
        if self._prompt_ids is None and self._base == 0:
            self._prompt_ids = list(ids)

    def _prompt_tokens(self, fallback: int | None = None) -> int:
        if self._prompt_ids is not None:
            return len(self._prompt_ids)
        prompt = self.body.get("prompt")
        if isinstance(prompt, list):
            return len(prompt)
        return fallback or 0

    # -- migration ---------------------------------------------------------------------------

    def continuation(self) -> dict | None:
        """The body that continues the generation on another replica, or None when it cannot."""
        if self.done or self.finished:
            return None
        if self.unmigratable:
            log.info("cannot continue: %s", self.unmigratable)
            return None
        if not self.exact:
            log.info("cannot continue: chunks without token ids (the count is not exact)")
            return None
        if self.tokens == 0:
            return dict(self.sent)
        body = dict(self.sent)
        if not self._reduce(body, "min_tokens", floor=0):
            return None
        if self.chat:
            limits = [k for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
            if not all(self._reduce(body, k) for k in limits):
                return None
            text = "".join(self._text)
            messages = list(body["messages"])
            if body.get("continue_final_message"):
                last = dict(messages[-1])
                last["content"] = last["content"] + text
                messages[-1] = last
            else:
                messages.append({"role": "assistant", "content": text})
            body["messages"] = messages
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
            return body
        prompt = body.get("prompt")
        ids = list(prompt) if isinstance(prompt, list) else self._prompt_ids
        if ids is None:
            log.info("cannot continue: the prompt's token ids are not known")
            return None
        if body.get("max_tokens") is None:
            body["max_tokens"] = DEFAULT_MAX_TOKENS
        if not self._reduce(body, "max_tokens"):
            return None
        body["prompt"] = ids + self._gen
        body["echo"] = False
        body.pop("truncate_prompt_tokens", None)  # the ids are already truncated
        return body

    def _reduce(self, body: dict, key: str, floor: int | None = None) -> bool:
        """``body[key] -= tokens``; False when nothing would be left of a maximum."""
        value = body.get(key)
        if value is None:
            return True
        left = value - self.tokens
        if floor is not None:
            body[key] = max(floor, left)
            return True
        if left <= 0:
            return False
        body[key] = left
        return True

    def resumed(self) -> None:
        """The continuation's response starts now: the next fed bytes are a new SSE response."""
        if self._buf:
            log.debug("dropping %d bytes of a partial event", len(self._buf))
        self._buf = b""
        self._cont = True
        self._base = self.tokens
        self.error = None
        self.migrations += 1

    def closing(self, message: str) -> bytes:
        """The bytes that end the stream when it cannot continue: the usage chunk (if asked for and
        not sent) and ``[DONE]`` when the choice had finished, else an error event and ``[DONE]``."""
        if self.done:
            return b""
        self.done = True
        self._buf = b""
        if self.finished:
            out = b""
            if self._include_usage and not self.usage_sent:
                prompt = self._prompt_tokens()
                chunk = {"id": self._id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                         "created": self._created, "model": self._model, "choices": [],
                         "usage": {"prompt_tokens": prompt, "total_tokens": prompt + self.tokens,
                                   "completion_tokens": self.tokens}}
                out = b"data: " + _encode(chunk) + b"\n\n"
                self.usage_sent = True
            return out + _DONE_EVENT
        return error_event(message)


def error_event(message: str) -> bytes:
    """An SSE error event in OpenAI's shape (the OpenAI SDK raises APIError on it) and ``[DONE]``:
    the end of any stream that cannot go on, migratable or not."""
    err = {"error": {"message": message, "type": "ServiceUnavailable", "param": None, "code": 503}}
    return b"data: " + json.dumps(err).encode() + b"\n\n" + _DONE_EVENT
