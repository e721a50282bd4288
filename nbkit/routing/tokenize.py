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

COMPLETIONS = "/v1/completions"


class PromptTokenizer:
    """The served model's tokenizer, loaded on first use (``transformers``' fast tokenizer).

    ``served_names``: the model names requests may give for the base model (the cluster's model
    path and its served name); any other ``model`` is taken as a LoRA adapter's name."""

    def __init__(self, model: str, served_names: Sequence[str] = (), *, send_ids: bool = True,
                 prefix_cache: bool = True):
        self.model = str(model)
        #: keep the ids of long shared prefixes (:class:`~nbkit.routing.token_cache.PrefixTokenCache`,
        #: exact) so a prompt that repeats a system prompt tokenizes only what follows it
        self.prefix_cache = bool(prefix_cache)
        self.cache = None
        #: forward a completion's prompt as the token ids computed here (:meth:`token_prompt`), so the
        #: replica does not tokenize it a second time; off where the replica's tokenizer may differ
        self.send_ids = bool(send_ids)
        self.served_names = {self.model, *map(str, served_names)}
        self._tok = None
        self._fast = None
        self._lock = threading.Lock()
        self.failures = 0

    @property
    def tokenizer(self):
        """The ``transformers`` tokenizer (it renders chat templates)."""
        if self._tok is None:
            with self._lock:
                if self._tok is None:
                    from transformers import AutoTokenizer
                    tok = AutoTokenizer.from_pretrained(self.model)
                    self._fast = _rust_tokenizer(tok)
                    if self._fast is not None and self.prefix_cache:
                        from nbkit.routing.token_cache import PrefixTokenCache
                        self.cache = PrefixTokenCache.maybe(self._fast)
                    self._tok = tok
        return self._tok

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``: the Rust ``tokenizers`` object directly when the model has one
        (the same ids as the ``transformers`` call, without its per-call Python overhead), through
        the prefix cache where the tokenizer allows one."""
        tok = self.tokenizer
        if self.cache is not None:
            return self.cache.encode(text, add_special_tokens)
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=add_special_tokens).ids
        return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def completion(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode(prompt, add_special_tokens)

    def chat(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True,
             continue_final_message: bool = False, add_special_tokens: bool = False,
             chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
        conversation = [_message(m) for m in messages]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final_message,
                                                  **dict(chat_template_kwargs or {}))
        return self.encode(text, add_special_tokens)

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

    def token_prompt(self, path: str, body: Mapping | None, token_ids: list[int] | None) -> dict | None:
        """A copy of a ``/v1/completions`` body whose text ``prompt`` is replaced by ``token_ids``
        (what :meth:`token_ids` gave for it), or None to send the body as it is: the replica then
        skips its own tokenization of the prompt (the router did it once; vLLM takes token-id
        prompts as they are). Left alone: chat (vLLM renders its template itself), batches,
        ``echo`` and ``prompt_logprobs`` (their answers show the prompt's text), and everything
        when ``send_ids`` is off.

            >>> tok.token_prompt("/v1/completions", {"prompt": "Hi", "max_tokens": 4}, [15, 72])
            {'prompt': [15, 72], 'max_tokens': 4}
        """
        if (not self.send_ids or token_ids is None or not body or path.split("?", 1)[0] != COMPLETIONS
                or not isinstance(body.get("prompt"), str) or body.get("echo")
                or body.get("prompt_logprobs") is not None or body.get("prompt_embeds") is not None):
            return None
        sent = dict(body)
        sent["prompt"] = token_ids
        sent.pop("add_special_tokens", None)  # applied already, and meaningless for token ids
        return sent

    def lora_of(self, body: Mapping | None) -> str | None:
        """The LoRA adapter a request names (its ``model``, when that is not the base model)."""
        name = (body or {}).get("model")
        return str(name) if name and str(name) not in self.served_names else None


def _rust_tokenizer(tok):
    """An independent copy of a fast tokenizer's ``tokenizers.Tokenizer`` with truncation and
    padding off (as ``tok(text)`` applies it), or None for a slow tokenizer."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(backend.to_str())
        fast.no_truncation()
        fast.no_padding()
        return fast
    except Exception as e:  # noqa: BLE001 - the transformers call still works
        log.info("tokenize: using the transformers tokenizer (no usable tokenizers backend: %r)", e)
        return None


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
