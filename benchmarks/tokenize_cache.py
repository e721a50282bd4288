"""Router-side tokenization with and without the prefix token cache, side by side in one run.

    .venv/bin/python benchmarks/tokenize_cache.py [--rounds 5] [--prompts 600] [--out benchmarks/results/tokenize_cache]

Workloads (the tiny model's tokenizer, prompts built by nbkit.bench as compare_routers builds them):
  many-prefixes  completions: 32 system prompts of 1,024 tokens + a 32-token question each, shuffled
                 (compare_routers' many-prefixes workload)
  chat-turns     chat: 16 conversations on one system prompt, each growing by a user turn and an
                 answer per request (the rendered template repeats everything said so far)
  unique         completions of 1,056 tokens sharing nothing (the cache's cost when it cannot help)
Each round times every workload whole (``PromptTokenizer(prefix_cache=False)``) and cached (a fresh
``PromptTokenizer``, so its first prompts miss), alternating which goes first; ids are compared for
every prompt. Prints ms per prompt for each round and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def workloads(model: str, n: int) -> dict[str, list]:
    from transformers import AutoTokenizer

    from nbkit import bench
    from nbkit.bench.workloads import text_builder

    hf = AutoTokenizer.from_pretrained(model)
    w = bench.shared_prefix(32, -(-n // 32), 1024, 32, 32, seed=3, tokenizer=hf)
    many = [{"prompt": it.text} for it in w.items[:n]]
    tb, rng = text_builder(hf), np.random.default_rng(5)
    system = tb.text(512, rng)
    convs = [[{"role": "system", "content": system}] for _ in range(16)]
    chat = []
    for i in range(n):
        c = convs[i % 16]
        c.append({"role": "user", "content": tb.text(int(rng.integers(16, 64)), rng)})
        chat.append({"messages": list(c)})
        c.append({"role": "assistant", "content": tb.text(int(rng.integers(16, 64)), rng)})
    unique = [{"prompt": tb.text(1056, rng)} for _ in range(n)]
    return {"many-prefixes": many, "chat-turns": chat, "unique": unique}


def timed(tok, bodies) -> tuple[float, list]:
    t = time.perf_counter()
    ids = [tok.token_ids(b) for b in bodies]
    return (time.perf_counter() - t) * 1e3 / len(bodies), ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=600)
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    args = ap.parse_args(argv)
    from nbkit.routing.tokenize import PromptTokenizer
    from nbkit.tiny import tiny_model

    model = str(tiny_model())
    work = workloads(model, args.prompts)
    rows = {name: {"whole_ms": [], "cached_ms": [], "hit_rate": []} for name in work}
    import os
    lines = [f"tokenize_cache.py: {args.prompts} prompts per workload, {args.rounds} rounds, tiny model's tokenizer, "
             f"load average {os.getloadavg()[0]:.2f} at the start"]
    for r in range(args.rounds):
        for name, bodies in work.items():
            whole, cached = PromptTokenizer(model, prefix_cache=False), PromptTokenizer(model)
            whole.tokenizer, cached.tokenizer  # load outside the timing
            order = [("whole", whole), ("cached", cached)]
            if r % 2:
                order.reverse()
            got = {}
            for label, tok in order:
                got[label] = timed(tok, bodies)
            assert got["whole"][1] == got["cached"][1], f"{name}: cached ids differ from whole ones"
            s = cached.cache.stats()
            row = rows[name]
            row["whole_ms"].append(got["whole"][0])
            row["cached_ms"].append(got["cached"][0])
            row["hit_rate"].append(s["hits"] / max(1, s["hits"] + s["misses"]))
            lines.append(f"round {r + 1} {name:14s} whole {got['whole'][0]:.3f} ms  cached {got['cached'][0]:.3f} ms"
                         f"  ({s['hits']} hits, {s['misses']} misses, {s['saved_chars']:,} chars not tokenized again)")
    lines.append("")
    lines.append(f"{'workload':14s} {'whole ms':>9s} {'cached ms':>10s} {'ratio':>7s}   (medians over rounds; ids equal for every prompt)")
    for name, row in rows.items():
        w, c = statistics.median(row["whole_ms"]), statistics.median(row["cached_ms"])
        row.update(whole_ms_median=w, cached_ms_median=c, ratio=c / w)
        lines.append(f"{name:14s} {w:9.3f} {c:10.3f} {c / w:7.2f}")
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "prompts": args.prompts,
                                                            "rounds": args.rounds}, indent=1))
        args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
