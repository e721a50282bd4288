"""What a request says to the policies (:class:`~nbkit.policies.RequestInfo`), read from its
OpenAI-style body: token counts, the prompt's text or token ids, the session key.

    info = request_info({"prompt": "Hello", "max_tokens": 8})          # estimate: characters / 4
    info = request_info({"input": "Hello"})                            # embeddings: no decode tokens
    info = request_info(body, headers, tokenizer=router.tokenizer)    # exact token ids (kv_aware)
"""

from __future__ import annotations

from typing import Mapping

from nbkit.policies import RequestInfo

CHARS_PER_TOKEN = 4


def request_info(body: Mapping | None, headers: Mapping[str, str] | None = None, *, tokenizer=None) -> RequestInfo:
    """What the policies need from an OpenAI-style request body: an estimate of the prompt's tokens
    (characters / 4) and its text for prefix affinity; with a ``tokenizer``
    (:class:`~nbkit.routing.tokenize.PromptTokenizer`) also the exact token ids, as the engine
    tokenizes them, and the LoRA adapter the request names. A body with ``input`` (embeddings,
    pooling, the Responses API) is counted by its input, with no decode tokens unless it sets
    ``max_output_tokens``."""
    if not body:
        return RequestInfo(prompt_tokens=0, max_tokens=0)
    prefix = ""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prefix, tokens = prompt, len(prompt) // CHARS_PER_TOKEN + 1
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        prefix, tokens = " ".join(map(str, prompt[:4096])), len(prompt)
    elif isinstance(prompt, list):
        prefix = "".join(str(p) for p in prompt)
        tokens = len(prefix) // CHARS_PER_TOKEN + 1
    elif "input" in body and "messages" not in body:
        prefix, tokens = _input(body["input"])
    else:
        msgs = body.get("messages") or []
        parts = []
        for m in msgs:
            c = m.get("content", "") if isinstance(m, dict) else ""
            if isinstance(c, list):
                c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
            parts.append(f"{m.get('role', '') if isinstance(m, dict) else ''}:{c}\n")
        prefix = "".join(parts)
        tokens = len(prefix) // CHARS_PER_TOKEN + 4 * len(parts)
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    if not max_tokens:
        if "prompt" in body:
            max_tokens = 16  # vLLM's completions default
        elif "input" in body and "messages" not in body:  # embeddings: nothing to decode; Responses: its limit
            max_tokens = body.get("max_output_tokens") or 0
        else:
            max_tokens = 256
    session = None
    if headers:
        session = headers.get("x-session-id") or headers.get("X-Session-Id")
    session = session or body.get("user")
    token_ids = lora = None
    if tokenizer is not None:
        token_ids = tokenizer.token_ids(body)
        if token_ids is not None:
            tokens = len(token_ids)
            lora = tokenizer.lora_of(body)
    return RequestInfo(prompt_tokens=int(tokens), max_tokens=int(max_tokens), prefix=prefix or None,
                       session=str(session) if session else None, token_ids=token_ids, lora=lora)


def _input(value) -> tuple[str, int]:
    """The text and estimated tokens of an ``input`` (embeddings, pooling, the Responses API): a
    string, token ids, a batch of either, or Responses items (``{"role", "content"}`` with text or
    ``input_text`` parts)."""
    if isinstance(value, str):
        return value, len(value) // CHARS_PER_TOKEN + 1
    if not isinstance(value, list) or not value:
        return "", 0
    if all(isinstance(t, int) for t in value):
        return " ".join(map(str, value[:4096])), len(value)
    if all(isinstance(t, list) for t in value):  # a batch of token-id lists
        return "", sum(len(t) for t in value)
    parts, tokens = [], 0
    for item in value:
        if isinstance(item, dict):
            c = item.get("content", item.get("output", ""))
            if isinstance(c, list):
                c = "".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
            text = f"{item.get('role', '')}:{c}\n"
            tokens += 4  # the role's framing, as for chat messages
        else:
            text = str(item)
        parts.append(text)
    text = "".join(parts)
    return text, tokens + len(text) // CHARS_PER_TOKEN + 1
