"""nbkit.sim.server: a live simulated replica answers OpenAI-style requests (streamed chat with
usage), paced by the engine, and serves vLLM-named /metrics that nbkit's parser reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from nbkit.routing.metrics import parse_metrics


def start(port: int, *extra: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "nbkit.sim.server", "--host", "127.0.0.1", "--port", str(port),
                          "--model", "tiny", "--model-spec", "tiny", "--hardware", "cpu",
                          "--parent-pid", str(os.getpid()), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if p.poll() is not None:
            raise AssertionError(f"server exited: {p.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            time.sleep(0.2)
    p.kill()
    raise AssertionError("server did not become healthy")


@pytest.fixture(scope="module")
def server():
    port = free_port(18760)
    p = start(port, "--max-num-seqs", "8", "--enforce-eager")   # a vLLM flag: accepted, ignored
    yield f"http://127.0.0.1:{port}"
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()


def sse_events(lines):
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_and_health(server):
    m = httpx.get(f"{server}/v1/models").json()
    assert m["data"][0]["id"] == "tiny" and m["data"][0]["max_model_len"] == 4096


def test_streamed_chat_with_usage(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "The scheduler routes the batch quickly."}],
            "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter() - t0)
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and
               c["choices"][0]["delta"].get("content")]
    assert len(content) == 12
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 12
    assert usage["prompt_tokens"] > 5 and usage["total_tokens"] == usage["prompt_tokens"] + 12
    # paced by the cpu profile: ~2 ms per decode step at batch 1, so 10 more tokens take > 15 ms
    assert arrivals[-1] - arrivals[1] > 0.015


def test_completion_not_streamed(server):
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "hello world", "max_tokens": 5},
                   timeout=30)
    assert r.status_code == 200
    d = r.json()
    assert d["usage"]["completion_tokens"] == 5 and d["choices"][0]["finish_reason"] == "length"
    assert d["choices"][0]["text"].strip()


def test_too_long_is_a_400(server):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 100_000}, timeout=10)
    assert r.status_code == 400 and "maximum context length" in r.json()["message"]
    r = httpx.post(f"{server}/v1/completions", content=b"{nope", timeout=10)
    assert r.status_code == 400


def test_tokenize(server):
    d = httpx.post(f"{server}/tokenize", json={"prompt": "hello world"}).json()
    assert d["count"] == len(d["tokens"]) > 0


def test_metrics_parse_and_count(server):
    import concurrent.futures as cf

    def one(i):
        return httpx.post(f"{server}/v1/completions",
                          json={"prompt": "the same long prefix " * 40 + str(i), "max_tokens": 40}, timeout=60)

    before = parse_metrics(httpx.get(f"{server}/metrics").text)["0"]
    max_running = max_queued = 0.0
    with cf.ThreadPoolExecutor(12) as ex:
        futs = [ex.submit(one, i) for i in range(12)]
        while not all(f.done() for f in futs):
            mid = parse_metrics(httpx.get(f"{server}/metrics").text)["0"]
            max_running = max(max_running, mid.running)
            max_queued = max(max_queued, mid.running + mid.waiting)
            time.sleep(0.02)
        assert all(f.result().status_code == 200 for f in futs)
    text = httpx.get(f"{server}/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:prefix_cache_queries",
                 "vllm:prefix_cache_hits", "vllm:time_to_first_token_seconds"):
        assert name in fams, name
    s = fams["vllm:num_requests_running"].samples[0]
    assert s.labels == {"engine": "0", "model_name": "tiny"}
    after = parse_metrics(text)["0"]
    # max_num_seqs 8: at most 8 run, the rest wait
    assert max_running == 8 and max_queued >= 9
    assert after.generation_tokens - before.generation_tokens == 12 * 40
    assert after.requests_finished - before.requests_finished == 12
    assert after.prefix_cache_hits > before.prefix_cache_hits           # the shared prefix was cached
    assert after.running == 0 and after.waiting == 0


def test_data_parallel_engines_by_header():
    port = free_port(18790)
    p = start(port, "serve", "tiny", "--data-parallel-size", "2", "--speed", "5")
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(3):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3},
                           headers={"X-data-parallel-rank": "1"}, timeout=30)
            assert r.status_code == 200
        m = parse_metrics(httpx.get(f"{url}/metrics").text)
        assert set(m) == {"0", "1"}
        assert m["1"].requests_finished == 3 and m["0"].requests_finished == 0
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, headers={"X-data-parallel-rank": "5"})
        assert r.status_code == 400
    finally:
        p.terminate()
        p.wait(10)


def test_many_replicas_in_one_process():
    port = free_port(18820)
    p = start(port, "--replicas", "3", "--speed", "5")
    try:
        for k in range(3):
            url = f"http://127.0.0.1:{port + k}"
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
            # each replica has its own engine and metrics
            assert parse_metrics(httpx.get(f"{url}/metrics").text)["0"].requests_finished == 1
    finally:
        p.terminate()
        p.wait(10)


# ------------------------------------------- the migration dialect, in-process (vLLM 0.32's fields)
def run_app(fn, *extra: str):
    """``fn(client)`` against an in-process replica (the tiny model's tokenizer, a fast clock)."""
    import asyncio

    from nbkit.sim.replica import SimReplica
    from nbkit.sim.server import build_app
    replica = SimReplica.from_args(["--model-spec", "tiny", "--hardware", "cpu", "--speed", "20", *extra])

    async def main():
        await replica.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(replica)),
                                         base_url="http://sim", timeout=30) as client:
                return await fn(client, replica)
        finally:
            await replica.stop()

    return asyncio.run(main())


async def post_sse(client, path: str, body: dict) -> list:
    r = await client.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    return sse_events(r.text.splitlines())


def test_prompt_as_token_ids_and_return_token_ids_not_streamed():
    async def fn(client, replica):
        text = (await client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 6,
                                                           "return_token_ids": True})).json()
        ids = text["choices"][0]["prompt_token_ids"]
        assert ids == replica.tokens.completion("hello world") and text["usage"]["prompt_tokens"] == len(ids)
        gen = text["choices"][0]["token_ids"]
        assert len(gen) == 6 == text["usage"]["completion_tokens"]
        # the text is the generated tokens' text
        assert text["choices"][0]["text"] == replica.tokens.tok.decode(gen)
        for prompt in (ids, [ids]):   # the same prompt as token ids: the same answer
            d = (await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6,
                                                            "return_token_ids": True})).json()
            assert d["choices"][0]["prompt_token_ids"] == ids and d["choices"][0]["token_ids"] == gen
            assert d["choices"][0]["text"] == text["choices"][0]["text"] and d["usage"] == text["usage"]
        # without return_token_ids, no ids (as vLLM's fields are then null / absent)
        plain = (await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 3})).json()
        assert not plain["choices"][0].get("token_ids") and not plain["choices"][0].get("prompt_token_ids")
        bad = await client.post("/v1/completions", json={"prompt": [1, 2, 10**6], "max_tokens": 3})
        assert bad.status_code == 400 and "out of vocabulary" in bad.json()["message"]
        bad = await client.post("/v1/completions", json={"prompt": [[1, 2], [3]], "max_tokens": 3})
        assert bad.status_code == 400
        chat = (await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "return_token_ids": True})).json()
        assert chat["prompt_token_ids"] == replica.tokens.chat([{"role": "user", "content": "Hi"}])
        assert len(chat["choices"][0]["token_ids"]) == 4 == chat["usage"]["completion_tokens"]
        assert chat["choices"][0]["message"]["content"] == replica.tokens.tok.decode(chat["choices"][0]["token_ids"])

    run_app(fn)


def test_return_token_ids_streamed_in_vllms_places():
    async def fn(client, replica):
        ids = replica.tokens.completion("the stream begins")
        ev = await post_sse(client, "/v1/completions", {"prompt": "the stream begins", "max_tokens": 9,
                                                        "return_token_ids": True, "ignore_eos": True,
                                                        "stream_options": {"include_usage": True}})
        assert ev[-1] == "[DONE]"
        chunks = [c for c in ev[:-1] if c["choices"]]
        # prompt_token_ids in the first chunk's choice, null after; token_ids: each chunk's new tokens
        assert chunks[0]["choices"][0]["prompt_token_ids"] == ids
        assert all(c["choices"][0]["prompt_token_ids"] is None for c in chunks[1:])
        gen = [t for c in chunks for t in c["choices"][0]["token_ids"]]
        assert len(gen) == 9 == ev[-2]["usage"]["completion_tokens"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == replica.tokens.tok.decode(gen)
        # stable: the same prompt, the same tokens (not streamed too)
        d = (await client.post("/v1/completions", json={"prompt": "the stream begins", "max_tokens": 9,
                                                        "return_token_ids": True})).json()
        assert d["choices"][0]["token_ids"] == gen
        # chat: prompt_token_ids at the top of the first (role) chunk, token_ids in the choices
        msgs = [{"role": "user", "content": "Hi"}]
        ev = await post_sse(client, "/v1/chat/completions", {"messages": msgs, "max_tokens": 5,
                                                             "return_token_ids": True})
        assert ev[0]["prompt_token_ids"] == replica.tokens.chat(msgs) and ev[0]["choices"][0]["delta"]["role"]
        content = [c for c in ev[1:-1] if c["choices"][0]["delta"].get("content")]
        assert [len(c["choices"][0]["token_ids"]) for c in content] == [1] * 5
        assert all("prompt_token_ids" not in c for c in ev[1:-1])
        assert content[-1]["choices"][0]["finish_reason"] == "length"

    run_app(fn)


def test_a_resent_stream_continues_as_it_would_have():
    """Prompt ids + the first k generated ids, with the remaining max_tokens: the rest of the tokens
    the uninterrupted request gets (what a router's stream migration sends)."""
    async def fn(client, replica):
        whole = (await client.post("/v1/completions", json={"prompt": "migrate me", "max_tokens": 40,
                                                            "return_token_ids": True})).json()["choices"][0]
        ids, gen = whole["prompt_token_ids"], whole["token_ids"]
        for k in (1, 7, 23):
            ev = await post_sse(client, "/v1/completions", {"prompt": ids + gen[:k], "max_tokens": 40 - k,
                                                            "return_token_ids": True, "ignore_eos": True})
            rest = [t for c in ev[:-1] for t in c["choices"][0]["token_ids"]]
            assert rest == gen[k:]
            assert whole["text"] == replica.tokens.tok.decode(gen[:k]) + "".join(
                c["choices"][0]["text"] for c in ev[:-1])

    run_app(fn)


def test_chat_continue_final_message():
    async def fn(client, replica):
        msgs = [{"role": "user", "content": "Tell me"}]
        first = (await client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 20,
                                                                 "return_token_ids": True})).json()
        said = first["choices"][0]["message"]["content"]
        part = replica.tokens.tok.decode(first["choices"][0]["token_ids"][:8])
        cont = msgs + [{"role": "assistant", "content": part}]
        body = {"messages": cont, "max_tokens": 12, "continue_final_message": True,
                "add_generation_prompt": False, "return_token_ids": True}
        d = (await client.post("/v1/chat/completions", json=body)).json()
        want = replica.tokens.chat(cont, add_generation_prompt=False, continue_final_message=True)
        # the assistant's partial message is prompt, left open (no end of turn)
        assert d["prompt_token_ids"] == want and d["usage"]["prompt_tokens"] == len(want)
        rendered = replica.tokens.render(cont, add_generation_prompt=False, continue_final_message=True)
        assert rendered.endswith(part) and len(want) > len(replica.tokens.chat(msgs))
        assert d["usage"]["completion_tokens"] == 12
        assert part + d["choices"][0]["message"]["content"] == said      # it goes on where it was cut
        ev = await post_sse(client, "/v1/chat/completions", body)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in ev[:-1]) == \
            d["choices"][0]["message"]["content"]
        both = await client.post("/v1/chat/completions", json={**body, "add_generation_prompt": True})
        assert both.status_code == 400 and "continue_final_message" in both.json()["message"]

    run_app(fn)


def test_ignore_eos_accepted():
    async def fn(client, replica):
        for path, extra in (("/v1/completions", {"prompt": "hi"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = await client.post(path, json={**extra, "max_tokens": 5, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        r = await client.post("/v1/completions", json={"prompt": "hi", "ignore_eos": "yes"})
        assert r.status_code == 400

    run_app(fn)


def test_priority_scheduling_serves_the_lowest_priority_value_first(server):
    """``--scheduling-policy priority``: with one sequence at a time, a priority-0 request sent
    behind a queue of priority-10 ones is served before them (vLLM's order); a replica without the
    flag refuses a priority as vLLM does (400), and a non-integer priority is a 400 naming it."""
    import asyncio

    r = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 2, "priority": 5}, timeout=10)
    assert r.status_code == 400 and "Priority scheduling is not enabled" in r.json()["message"]
    port = free_port(18790)
    p = start(port, "--max-num-seqs", "1", "--scheduling-policy", "priority")
    url = f"http://127.0.0.1:{port}"
    try:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "priority": "high"}, timeout=10)
        assert r.status_code == 400 and "priority='high'" in r.json()["message"]

        async def main():
            done: list[str] = []
            async with httpx.AsyncClient(timeout=60) as c:
                async def one(name, prio, delay):
                    await asyncio.sleep(delay)
                    r = await c.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 150,
                                                                    "ignore_eos": True, "priority": prio})
                    assert r.status_code == 200, r.text
                    done.append(name)
                await asyncio.gather(*(one(f"batch{i}", 10, 0.05 * i) for i in range(4)), one("urgent", 0, 0.3))
            return done

        order = asyncio.run(main())
        assert order.index("urgent") <= 1, order  # at most the batch request already running finishes first
    finally:
        p.terminate()
        p.wait(10)
