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
