"""Re-record the SSE fixtures of tests/test_migrate.py from one real vLLM replica (about a minute).

    .venv/bin/python tests/data/migrate/record.py     # writes NAME.sse + NAME.json next to itself

One replica of the tiny model on port 8700, stopped in a ``finally``. Besides the fixtures it
checks the continuation arithmetic on the real server and logs a summary (JSON): a completions
continuation with ``prompt = prompt ids + generated ids`` and the remaining ``max_tokens``
generates exactly the remaining count, with greedy decoding the same tokens.
"""

import json
import logging
import sys
import time
from pathlib import Path

import httpx

from nbkit import Cluster

OUT = Path(__file__).resolve().parent
log = logging.getLogger("record")
summary = {}


def events(raw: bytes):
    out = []
    for ev in raw.split(b"\n\n"):
        if ev.startswith(b"data: ") and ev != b"data: [DONE]":
            out.append(json.loads(ev[6:]))
    return out


def rec(client, url, path, body, name):
    with client.stream("POST", url + path, json=body, timeout=60) as r:
        status = r.status_code
        raw = b"".join(r.iter_raw())
    if name:
        (OUT / f"{name}.sse").write_bytes(raw)
        (OUT / f"{name}.json").write_text(json.dumps({"path": path, "body": body}, indent=1) + "\n")
    log.info("%s: HTTP %d, %d bytes", name, status, len(raw))
    return status, raw


logging.basicConfig(level=logging.INFO, stream=sys.stderr)
c = Cluster.replicas(n=1, port_start=8700)
t0 = time.time()
try:
    c.start()
    log.info("started in %.0f s", time.time() - t0)
    url = c.urls[0]
    cl = httpx.Client()
    model = cl.get(url + "/v1/models").json()["data"][0]["id"]
    summary["model"] = model
    base = {
        "model": model,
        "max_tokens": 8,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    P = "/v1/completions"
    C = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "Tell me about the cat."}]
    rec(cl, url, P, {**base, "prompt": "The cat sat on the"}, "cmpl_text")
    _, raw = rec(cl, url, P, {**base, "prompt": "The cat sat on the", "return_token_ids": True}, "cmpl_text_ids")
    ev = events(raw)
    prompt_ids = ev[0]["choices"][0]["prompt_token_ids"]
    gen = [t for e in ev for ch in e["choices"] for t in (ch.get("token_ids") or [])]
    summary["cmpl_prompt_ids"] = prompt_ids
    summary["cmpl_gen"] = gen
    rec(
        cl,
        url,
        P,
        {
            **base,
            "prompt": "The cat sat on the",
            "return_token_ids": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
        "cmpl_text_ids_cont",
    )
    rec(cl, url, P, {**base, "prompt": prompt_ids, "return_token_ids": True}, "cmpl_tokens_ids")
    # continuation after k=3 tokens
    k = 3
    _, raw = rec(
        cl,
        url,
        P,
        {**base, "prompt": prompt_ids + gen[:k], "max_tokens": 8 - k, "return_token_ids": True},
        "cmpl_cont_k3",
    )
    ev = events(raw)
    cgen = [t for e in ev for ch in e["choices"] for t in (ch.get("token_ids") or [])]
    summary["cmpl_cont_gen"] = cgen
    summary["cmpl_cont_usage"] = ev[-1].get("usage")
    summary["cmpl_cont_equal_greedy"] = cgen == gen[k:]
    rec(
        cl,
        url,
        P,
        {
            **base,
            "prompt": prompt_ids + gen[:k],
            "max_tokens": 8 - k,
            "return_token_ids": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
        "cmpl_cont_k3_cont",
    )
    # a longer one: 40 tokens, continue after 17, count exact
    _, raw = rec(cl, url, P, {**base, "prompt": "Once upon a time", "max_tokens": 40, "return_token_ids": True}, None)
    ev = events(raw)
    p2 = ev[0]["choices"][0]["prompt_token_ids"]
    g2 = [t for e in ev for ch in e["choices"] for t in (ch.get("token_ids") or [])]
    _, raw = rec(cl, url, P, {**base, "prompt": p2 + g2[:17], "max_tokens": 23, "return_token_ids": True}, None)
    ev = events(raw)
    c2 = [t for e in ev for ch in e["choices"] for t in (ch.get("token_ids") or [])]
    summary["long"] = {
        "orig": len(g2),
        "cont": len(c2),
        "equal": c2 == g2[17:],
        "usage": ev[-1].get("usage"),
        "plen": len(p2),
    }
    # chat
    cb = {**base, "messages": msgs}
    rec(cl, url, C, cb, "chat")
    _, raw = rec(cl, url, C, {**cb, "return_token_ids": True}, "chat_ids")
    ev = events(raw)
    text = [ch["delta"].get("content", "") for e in ev for ch in e["choices"]]
    summary["chat_text_chunks"] = text
    rec(
        cl,
        url,
        C,
        {**cb, "return_token_ids": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        "chat_ids_cont",
    )
    sofar = "".join(text[: 1 + k])  # role chunk "" + 3 token chunks
    cont_body = {
        **cb,
        "messages": msgs + [{"role": "assistant", "content": sofar}],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_tokens": 8 - k,
        "return_token_ids": True,
    }
    st, raw = rec(cl, url, C, cont_body, "chat_cont_k3")
    ev = events(raw)
    summary["chat_cont"] = {
        "status": st,
        "n": sum(len(ch.get("token_ids") or []) for e in ev for ch in e["choices"]),
        "usage": ev[-1].get("usage") if ev else None,
    }
    rec(
        cl,
        url,
        C,
        {**cont_body, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        "chat_cont_k3_cont",
    )
    # the original used continue_final_message itself
    rec(
        cl,
        url,
        C,
        {
            **cb,
            "messages": msgs + [{"role": "assistant", "content": "The cat"}],
            "continue_final_message": True,
            "add_generation_prompt": False,
            "return_token_ids": True,
        },
        "chat_cfm_ids",
    )
    # what vLLM says to both flags on
    st, raw = rec(cl, url, C, {**cont_body, "add_generation_prompt": True}, None)
    summary["both_flags"] = [st, raw[:300].decode(errors="replace")]
    summary["elapsed"] = time.time() - t0
finally:
    c.stop()
    log.info("stopped after %.0f s; summary: %s", time.time() - t0, json.dumps(summary))
