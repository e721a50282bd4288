"""Router-side tokenization, exactly as vLLM's OpenAI server does it, so the router can look a
prompt's blocks up in the KV-cache index before sending it.

    tok = PromptTokenizer("/path/to/model")                     # the served model's tokenizer (fast path)
    tok.completion("Hello")                                      # /v1/completions: special tokens added
    tok.chat([{"role": "user", "content": "Hi"}])                # /v1/chat/completions: the chat template
    tok.token_ids(body)                                          # either, from a request body; None if unsure

vLLM 0.32 (``vllm/renderers``): a completion prompt is ``tokenizer(prompt,
add_special_tokens=request.add_special_tokens)`` (default True); a chat request is rendered with
the model's chat template (``add_generation_prompt`` default True, ``continue_final_message``,
``chat_template_kwargs``; text parts of a list ``content`` joined by newlines) and the text is then
tokenized with ``add_special_tokens`` default False. ``tests/test_kv_cpu.py`` checks the result
against a real replica's own ``/tokenize``. Requests this cannot reproduce (images, tools, a
request's own ``chat_template``, prompt embeddings) give None, and the policy falls back.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)


class PromptTokenizer:
    """The served model's tokenizer, loaded on first use (``transformers``' fast tokenizer).

    ``served_names``: the model names requests may give for the base model (the cluster's model
    path and its served name); any other ``model`` is taken as a LoRA adapter's name."""

    def __init__(self, model: str, served_names: Sequence[str] = ()):
        self.model = str(model)
        self.served_names = {self.model, *map(str, served_names)}
        self._tok = None
        self._lock = threading.Lock()
        self.failures = 0

    @property
    def tokenizer(self):
        if self._tok is None:
            with self._lock:
                if self._tok is None:
                    from transformers import AutoTokenizer
                    self._tok = AutoTokenizer.from_pretrained(self.model)
        return self._tok

    def completion(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def chat(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True,
             continue_final_message: bool = False, add_special_tokens: bool = False,
             chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
        conversation = [_message(m) for m in messages]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final_message,
                                                  **dict(chat_template_kwargs or {}))
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def token_ids(self, body: Mapping | None) -> list[int] | None:
        """The prompt's token ids as the engine will see them, or None when that is not certain."""
        if not body:
            return None
        try:
            prompt = body.get("prompt")
            if prompt is not None:
                if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                    return list(prompt)
                if isinstance(prompt, str) and not body.get("prompt_embeds"):
                    return self.completion(prompt, bool(body.get("add_special_tokens", True)))
                return None  # a batch of prompts, or embeddings
            messages = body.get("messages")
            if not isinstance(messages, list) or body.get("tools") or body.get("chat_template"):
                return None
            if not all(_text_only(m) for m in messages):
                return None
            return self.chat(messages, add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                             continue_final_message=bool(body.get("continue_final_message", False)),
                             add_special_tokens=bool(body.get("add_special_tokens", False)),
                             chat_template_kwargs=body.get("chat_template_kwargs"))
        except Exception as e:  # noqa: BLE001 - a request the template rejects: the replica will say why
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.warning("tokenize: cannot tokenize a request router-side (%d so far): %r", self.failures, e)
            return None

    def lora_of(self, body: Mapping | None) -> str | None:
        """The LoRA adapter a request names (its ``model``, when that is not the base model)."""
        name = (body or {}).get("model")
        return str(name) if name and str(name) not in self.served_names else None


def _text_only(m: Any) -> bool:
    if not isinstance(m, Mapping):
        return False
    c = m.get("content")
    if c is None or isinstance(c, str):
        return True
    return isinstance(c, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in c)


def _message(m: Mapping) -> dict:
    """A message as vLLM hands it to the template: list content joined into one string."""
    out = dict(m)
    c = out.get("content")
    if isinstance(c, list):
        out["content"] = "\n".join(str(p.get("text", "")) for p in c)
    return out
