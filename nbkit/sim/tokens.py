"""A simulated replica's prompt tokens, the same ids vLLM's OpenAI server (and the router's
``PromptTokenizer``, :mod:`nbkit.routing.tokenize`) produce for the model, so the KV-cache events
it publishes name the blocks the router looks up::

    tok = Tokens("/path/to/model/tokenizer.json")
    tok.completion("Hello")                            # /v1/completions: special tokens added
    tok.chat([{"role": "user", "content": "Hi"}])      # /v1/chat/completions: the model's chat template

As vLLM 0.32: a completion prompt is the tokenizer's encoding with ``add_special_tokens``
(default True); a chat request is rendered with the model's chat template (``chat_template.jinja``
or ``tokenizer_config.json``'s ``chat_template`` next to the tokenizer; ``add_generation_prompt``
default True, ``continue_final_message``, ``chat_template_kwargs``; the text parts of a list
``content`` joined by newlines) by transformers' own renderer (what ``apply_chat_template`` calls),
then encoded with ``add_special_tokens`` default False. The encoding is the ``tokenizers`` library's
(no transformers tokenizer: its import costs seconds per replica process); the renderer
(``transformers.utils.chat_template_utils``, about 2 s, no torch) is imported on the first chat
request. Without a tokenizer: about one token per 4 characters, stable pseudo ids; without a chat
template (or without jinja2, which transformers renders with): ``<s>role: content</s>`` lines.

Generated tokens (:meth:`Tokens.filler`) cycle through the tokens of one filler sentence
(:data:`FILLER`), each with its own id and text (the tokenizer's decoding of that id; without a
tokenizer, one word per token with a stable pseudo id). Like a greedy model, what comes next depends
only on the context's last token (:meth:`Tokens.filler_start`): a prompt that ends inside the cycle
continues it, so a stream resent as prompt + generated ids goes on exactly as the first replica would.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["FILLER", "Tokens", "render_fallback_chat"]

#: the text generated tokens are made of, cycled
FILLER = " the replica serves many tokens quickly, and every router balances its load."

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def render_fallback_chat(messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
    """The chat rendering of a model without a template (the tiny model's template does the same)."""
    parts = [f"<s>{m['role']}: {m.get('content') or ''}</s>\n" for m in messages]
    return "".join(parts) + ("<s>assistant:" if add_generation_prompt else "")


def _messages(messages: Any) -> list[dict]:
    """Messages as vLLM hands them to the template: list content's text parts joined by newlines."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError("each message needs a role")
        m = dict(m)
        c = m.get("content")
        if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
            m["content"] = "\n".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
        out.append(m)
    return out


class Tokens:
    """Prompt tokens: the model's tokenizer and chat template when there are, else estimates."""

    def __init__(self, path: str | None = None):
        self.tok = None
        self.template = None          # the chat template's source
        self.special: dict[str, str] = {}
        self._render = None           # transformers' renderer once loaded; False: not available
        self._filler: tuple[tuple[int, ...], tuple[str, ...], dict[int, int]] | None = None
        if path:
            try:
                from tokenizers import Tokenizer
                self.tok = Tokenizer.from_file(path)
            except Exception:  # noqa: BLE001 - any failure: fall back to the estimate
                self.tok = None
            self._read_config(Path(path).parent)

    def _read_config(self, folder: Path) -> None:
        cfg: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            try:
                d = json.loads((folder / name).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(d, dict):
                cfg.update(d)
        for k in _SPECIAL:
            v = cfg.get(k)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                self.special[k] = v
        tpl = None
        try:
            tpl = (folder / "chat_template.jinja").read_text()
        except OSError:
            t = cfg.get("chat_template")
            if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
                t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
            tpl = t if isinstance(t, str) else None
        self.template = tpl

    # -- text -> ids -------------------------------------------------------------------------------
    def ids(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """``text``'s token ids (the tokenizer's, or ~4 characters per token)."""
        if self.tok is not None:
            return self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        return [zlib.crc32(text[i:i + 4].encode("utf-8", "surrogatepass")) & 0xFFFFFF
                for i in range(0, len(text), 4)] or [0]

    @property
    def vocab_size(self) -> int | None:
        """The tokenizer's vocabulary size (token ids must be below it); None without a tokenizer."""
        return self.tok.get_vocab_size() if self.tok is not None else None

    def filler(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The cycle of generated tokens: their ids and texts (``FILLER``'s tokens, each id once)."""
        if self._filler is None:
            if self.tok is not None:
                ids = list(dict.fromkeys(self.tok.encode(FILLER, add_special_tokens=False).ids))
                texts = [self.tok.decode([i], skip_special_tokens=False) for i in ids]
            else:
                texts = list(dict.fromkeys(re.findall(r"\s*[^\s,.]+|[,.]", FILLER)))
                ids = [zlib.crc32(w.encode()) & 0xFFFFFF for w in texts]
            self._filler = (tuple(ids), tuple(texts), {i: k for k, i in enumerate(ids)})
        return self._filler[0], self._filler[1]

    def filler_start(self, context: Sequence[int]) -> int:
        """Where in :meth:`filler`'s cycle the tokens after ``context`` (token ids) begin: after the
        context's last token if it is one of the cycle's, else at its start."""
        self.filler()
        if context:
            k = self._filler[2].get(context[-1])
            if k is not None:
                return (k + 1) % len(self._filler[0])
        return 0

    def completion(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """A /v1/completions prompt's ids (special tokens added unless asked not to)."""
        return self.ids(prompt, add_special_tokens)

    def render(self, messages: Any, *, add_generation_prompt: bool = True, continue_final_message: bool = False,
               chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The chat request's prompt text (ValueError if the messages or the template refuse)."""
        conversation = _messages(messages)
        render = self._renderer() if self.template is not None else None
        if render is None:
            return render_fallback_chat(conversation, add_generation_prompt and not continue_final_message)
        try:
            out, _ = render(conversations=[conversation], chat_template=self.template,
                            add_generation_prompt=add_generation_prompt,
                            continue_final_message=continue_final_message,
                            **{**self.special, **dict(chat_template_kwargs or {})})
        except ImportError:  # transformers renders with jinja2, which it does not require
            self._render = False
            return render_fallback_chat(conversation, add_generation_prompt and not continue_final_message)
        except Exception as e:  # noqa: BLE001 - jinja2's TemplateError, transformers' ValueError: a 400
            raise ValueError(f"chat template: {e}") from None
        return out[0]

    def chat(self, messages: Any, *, add_generation_prompt: bool = True, continue_final_message: bool = False,
             add_special_tokens: bool = False, chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
        """A /v1/chat/completions request's ids: the rendered template, special tokens not added."""
        return self.ids(self.render(messages, add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message,
                                    chat_template_kwargs=chat_template_kwargs), add_special_tokens)

    def _renderer(self):
        """transformers' own template renderer (what ``apply_chat_template`` calls: its sandboxed Jinja
        environment, ``continue_final_message``), imported on the first chat request (about 2 s, no
        torch); None without it (or without jinja2): the fallback rendering."""
        if self._render is None:
            try:
                from transformers.utils.chat_template_utils import render_jinja_template
                self._render = render_jinja_template
            except ImportError:
                self._render = False
        return self._render or None
