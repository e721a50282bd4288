"""Model shapes for the performance model: what a forward pass costs in FLOPs and bytes.

A :class:`ModelSpec` holds the transformer's shape (decoder-only, Llama-like: GQA attention, a
gated MLP of three matrices). The simulator needs nothing else from a model::

    >>> from nbkit.sim.models import get_model_spec
    >>> spec = get_model_spec("meta-llama/Llama-3.1-8B")
    >>> round(spec.num_params / 1e9, 2), spec.kv_bytes_per_token(2)      # params, KV bytes/token
    (8.03, 131072)
    >>> get_model_spec("Llama-3.1-8B-Instruct").name                      # same shape, by family
    'meta-llama/Llama-3.1-8B'

``get_model_spec`` takes a shipped name (:data:`SHIPPED`, matched case-insensitively, with or
without the ``org/`` prefix and an ``-Instruct`` suffix), ``"tiny"`` (nbkit's generated model, see
:mod:`nbkit.tiny`), or a path to a Hugging Face ``config.json`` (or to the folder holding one).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ModelSpec", "SHIPPED", "get_model_spec", "from_config_json", "UnknownModelError"]


class UnknownModelError(ValueError):
    """No shipped spec and no readable config.json for a model name."""


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer (Llama-style: GQA attention + gated MLP)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def params_per_layer(self) -> int:
        """Matrix parameters of one layer: q, k, v, o projections and the three MLP matrices."""
        h = self.hidden_size
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        mlp = 3 * h * self.intermediate_size
        return attn + mlp

    @property
    def num_params(self) -> int:
        """All parameters (norms neglected); the LM head counts once if tied to the embedding."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * self.params_per_layer + embed + head

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.num_params * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.kv_dim * dtype_bytes

    # -- FLOPs ------------------------------------------------------------------------------------
    @property
    def linear_flops_per_token(self) -> int:
        """Matrix FLOPs of one token through all layers (2 per multiply-add), LM head excluded."""
        return 2 * self.num_layers * self.params_per_layer

    @property
    def head_flops_per_logit(self) -> int:
        """FLOPs of the LM head for one sampled position."""
        return 2 * self.vocab_size * self.hidden_size

    @property
    def attn_flops_per_pair(self) -> int:
        """Attention FLOPs per (query token, key token) pair over all layers: QK^T and PV."""
        return 4 * self.num_layers * self.q_dim

    def to_dict(self) -> dict:
        return asdict(self)


def _spec(name, layers, hidden, heads, kv_heads, head_dim, inter, vocab, tie=False, maxpos=131072):
    return ModelSpec(name, layers, hidden, heads, kv_heads, head_dim, inter, vocab, tie, maxpos)


#: Shapes shipped with nbkit (from the models' config.json).
SHIPPED: dict[str, ModelSpec] = {s.name: s for s in [
    _spec("meta-llama/Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 128256),
    _spec("meta-llama/Llama-3.1-70B", 80, 8192, 64, 8, 128, 28672, 128256),
    _spec("Qwen/Qwen2.5-7B", 28, 3584, 28, 4, 128, 18944, 152064, maxpos=32768),
    # nbkit.tiny: LlamaConfig(hidden 256, intermediate 512, 2 layers, 4 heads, 2 KV heads), vocab 512
    _spec("tiny", 2, 256, 4, 2, 64, 512, 512, maxpos=4096),
]}

_SUFFIXES = ("-instruct", "-chat", "-base")


def _norm(name: str) -> str:
    n = name.strip().lower().rstrip("/")
    n = n.rsplit("/", 1)[-1]
    for s in _SUFFIXES:
        if n.endswith(s):
            n = n[: -len(s)]
    return n


_BY_NORM = {_norm(k): v for k, v in SHIPPED.items()}
_BY_NORM.update({"tiny-llama": SHIPPED["tiny"], "nbkit-tiny": SHIPPED["tiny"]})


def from_config_json(path: str | os.PathLike, name: str | None = None) -> ModelSpec:
    """Read a Hugging Face ``config.json`` (or the folder holding one) into a :class:`ModelSpec`."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UnknownModelError(f"cannot read model config {str(p)!r}: {e}") from None
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return ModelSpec(
            name=name or str(cfg.get("_name_or_path") or p.parent.name),
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 131072),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UnknownModelError(f"model config {str(p)!r} lacks or mangles {e}") from None


def get_model_spec(name: str) -> ModelSpec:
    """A shipped spec by name (see module doc), or the shape read from a config.json path."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}")
    if name in SHIPPED:
        return SHIPPED[name]
    p = Path(name).expanduser()
    if p.exists():
        return from_config_json(p, name=name)
    hit = _BY_NORM.get(_norm(name))
    if hit is not None:
        return hit
    raise UnknownModelError(f"unknown model {name!r}: not a shipped spec ({', '.join(SHIPPED)}) "
                            f"and no config.json at that path")
