"""What a request says to the policies (:class:`~nbkit.policies.RequestInfo`), read from its
OpenAI-style body: token counts, the prompt's text or token ids, the session key.

    info = request_info({"prompt": "Hello", "max_tokens": 8})          # estimate: characters / 4
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
    tokenizes them, and the LoRA adapter the request names."""
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
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or (16 if "prompt" in body else 256)
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
