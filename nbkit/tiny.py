"""The tiny random-weight Llama that nbkit serves when no GPU (and no real model) is at hand.

Nothing is downloaded: a byte-level BPE tokenizer is trained on a few hundred generated
sentences, wrapped as a ``PreTrainedTokenizerFast`` with a chat template, and paired with a
2-layer Llama of random weights (head_dim 64; vLLM's CPU attention needs head_dim >= 32).
The result is about 3 MB and is built once, then reused::

    from nbkit.tiny import tiny_model
    path = tiny_model()              # ~/.cache/nbkit/tiny-llama (or $NBKIT_CACHE/tiny-llama)
    path = tiny_model("/tmp/tiny")   # or any folder

or from a shell: ``nbkit tiny-model PATH``.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

#: Bumped whenever the recipe changes, so stale caches are rebuilt.
RECIPE_VERSION = 1
MARKER = "nbkit-tiny.json"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<s>{{ message['role'] }}: {{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)

_SUBJECTS = ["the replica", "a router", "the kernel", "our notebook", "the scheduler", "a user",
             "the cluster", "this GPU", "each core", "the endpoint", "a request", "the model"]
_VERBS = ["serves", "routes", "measures", "starts", "stops", "watches", "balances", "streams",
          "caches", "prefills", "decodes", "answers"]
_OBJECTS = ["many tokens", "the prompt", "a long answer", "every request", "the batch",
            "its queue", "the KV cache", "a short reply", "the metrics", "one more session",
            "hello world", "the load"]
_TAILS = ["quickly.", "again.", "on time.", "in parallel.", "without errors.", "today.",
          "for everyone.", "one by one.", "with care.", "at scale."]


def default_path() -> Path:
    """Where the cached tiny model lives: ``$NBKIT_CACHE/tiny-llama`` or ``~/.cache/nbkit/tiny-llama``."""
    root = os.environ.get("NBKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nbkit")
    return Path(root) / "tiny-llama"


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Deterministic training sentences for the tokenizer."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines.append(" ".join([rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS),
                               rng.choice(_TAILS)]).capitalize())
    lines += [f"{i} + {i} = {2 * i}" for i in range(50)]
    return lines


def is_tiny_model(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a complete tiny model built by the current recipe."""
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text()).get("recipe") == RECIPE_VERSION
    except (OSError, ValueError):
        return False


def tiny_model(path: str | os.PathLike | None = None, *, force: bool = False, seed: int = 0) -> Path:
    """Build the tiny model at ``path`` (default :func:`default_path`) unless it is already there.

    Safe to call from several processes at once (a file lock serialises the build, and the
    folder appears atomically). Returns the model folder.
    """
    target = Path(path) if path is not None else default_path()
    target = target.expanduser().resolve()
    if not force and is_tiny_model(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_tiny_model(target):
            return target
        if target.exists() and any(target.iterdir()) and not is_tiny_model(target) \
                and not (target / "config.json").exists():
            raise FileExistsError(f"path={str(target)!r}: folder exists, is not empty and holds no model")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _build(tmp, seed=seed)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(out: Path, *, seed: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"recipe": RECIPE_VERSION, "seed": seed}))


#: Attention projections a tiny adapter adapts (PEFT's names; vLLM packs q/k/v into qkv_proj itself).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_lora(path: str | os.PathLike, base: str | os.PathLike | None = None, *, r: int = 8,
              lora_alpha: int = 16, seed: int = 1, scale: float = 0.5) -> Path:
    """A random LoRA adapter for the tiny model (or any Llama-shaped ``base`` folder) in PEFT's
    layout: ``adapter_config.json`` and ``adapter_model.safetensors`` with
    ``base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight``. Unlike PEFT's
    initialisation (B = 0) both matrices are random, so the adapter changes what the model says.

        >>> path = tiny_lora("/tmp/sql-lora")                     # doctest: +SKIP
        >>> Cluster.replicas(n=2, lora_modules={"sql": str(path)})  # doctest: +SKIP

    Rebuilt only when missing; returns the folder."""
    base = Path(base) if base is not None else tiny_model()
    out = Path(path).expanduser().resolve()
    if (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists():
        return out
    cfg = json.loads((base / "config.json").read_text())
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads", heads) * head_dim
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (heads * head_dim, hidden)}  # (in, out)
    rng = random.Random(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for mod in LORA_TARGETS:
            n_in, n_out = shapes[mod]
            stem = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            tensors[f"{stem}.lora_A.weight"] = ((r, n_in), scale / n_in ** 0.5)
            tensors[f"{stem}.lora_B.weight"] = ((n_out, r), scale)
    out.mkdir(parents=True, exist_ok=True)
    _write_safetensors(out / "adapter_model.safetensors", tensors, rng)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora_alpha, "lora_dropout": 0.0,
        "bias": "none", "target_modules": list(LORA_TARGETS), "base_model_name_or_path": str(base),
        "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None}, indent=1))
    return out


def _write_safetensors(path: Path, tensors: dict, rng: random.Random) -> None:
    """``{name: (shape, std)}`` as float32 normal noise in the safetensors format (an 8-byte header
    length, a JSON header of dtypes, shapes and offsets, the raw little-endian data)."""
    import struct

    header, blobs, offset = {}, [], 0
    for name, (shape, std) in tensors.items():
        n = shape[0] * shape[1]
        blob = struct.pack(f"<{n}f", *(rng.gauss(0.0, std) for _ in range(n)))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
