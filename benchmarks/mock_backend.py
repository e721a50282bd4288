"""A minimal OpenAI-ish HTTP backend that answers at once, for measuring router overhead.

    .venv/bin/python benchmarks/mock_backend.py --port 18001 [--host 127.0.0.1] [--parent-pid PID]

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (a small fixed JSON body with
``usage``), ``GET /health`` (200), ``GET /v1/models``, ``GET /metrics`` (a tiny vLLM-style
Prometheus text, all gauges 0), and any other GET -> 200 ``{}`` (peers probe paths such as
``/get_server_info``); any other POST -> the completion body. A ``/v1/completions`` body with
``"stream": true`` is answered ``text/event-stream``: ``max_tokens`` (default 16) SSE ``data:``
chunks then ``data: [DONE]``, each sent as its own body chunk, ``chunk_interval_ms`` (default 0)
apart (a non-zero gap makes each chunk arrive as its own read, as a replica's tokens do). ``GET /_bench/stats`` counts what
was asked (completions, metrics scrapes, health checks, other paths). Bodies are pre-encoded bytes, so the
backend's own cost is as small as uvicorn + starlette allow. With ``--parent-pid`` it exits when
that process is gone (no orphan if the benchmark is killed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

JSON = "application/json"

COMPLETION = json.dumps({
    "id": "cmpl-mock", "object": "text_completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "text": "!", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}).encode()

CHAT = json.dumps({
    "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "!"}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}).encode()

MODELS = json.dumps({"object": "list", "data": [
    {"id": "m", "object": "model", "created": 0, "owned_by": "mock", "root": "m", "max_model_len": 2048}]}).encode()

_LABELS = '{engine="0",model_name="m"}'
METRICS = (
    "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
    "# TYPE vllm:num_requests_running gauge\n"
    f"vllm:num_requests_running{_LABELS} 0.0\n"
    "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
    "# TYPE vllm:num_requests_waiting gauge\n"
    f"vllm:num_requests_waiting{_LABELS} 0.0\n"
    "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
    "# TYPE vllm:kv_cache_usage_perc gauge\n"
    f"vllm:kv_cache_usage_perc{_LABELS} 0.0\n"
).encode()


#: what this backend was asked, for the benchmark to check how a router spread the load
STATS = {"completions": 0, "chat": 0, "metrics": 0, "health": 0, "models": 0, "other": {}}


SSE_CHUNK = b"data: " + json.dumps({
    "id": "cmpl-mock", "object": "text_completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "text": "!", "logprobs": None, "finish_reason": None}],
}).encode() + b"\n\n"
SSE_DONE = b"data: [DONE]\n\n"


def _ids_chunk(i: int, first: bool, prompt_ids) -> bytes:
    """A vLLM-like SSE event of a request that asked ``return_token_ids``: the token's id in the
    choice, the prompt's ids in the first event (as vLLM sends them)."""
    choice = {"index": 0, "text": "!", "logprobs": None, "finish_reason": None, "stop_reason": None,
              "token_ids": [i % 500], "prompt_token_ids": prompt_ids if first else None}
    return b"data: " + json.dumps({"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": "m",
                                   "choices": [choice], "usage": None}, separators=(",", ":")).encode() + b"\n\n"


def _stream_params(body: bytes) -> tuple[int, float, object] | None:
    """(chunks, seconds between them, prompt ids or None) when ``body`` asks for a stream, else
    None. The prompt ids are given when the body asks ``return_token_ids``: then every event
    carries its token's id, as vLLM's do."""
    if b"stream" not in body:          # the common case costs one bytes search, no JSON parse
        return None
    try:
        d = json.loads(body)
    except ValueError:
        return None
    if not isinstance(d, dict) or d.get("stream") is not True:
        return None
    n = d.get("max_tokens")
    n = 16 if not isinstance(n, int) or isinstance(n, bool) or n < 0 else n
    gap = d.get("chunk_interval_ms", 0)
    gap = float(gap) / 1000.0 if isinstance(gap, (int, float)) and gap > 0 else 0.0
    ids = None
    if d.get("return_token_ids") is True:
        prompt = d.get("prompt")
        ids = prompt if isinstance(prompt, list) else list(range(len(str(prompt)) // 4))
    return n, gap, ids


async def _sse(n: int, gap: float, ids=None):
    for i in range(n):
        if gap:
            await asyncio.sleep(gap)
        yield SSE_CHUNK if ids is None else _ids_chunk(i, i == 0, ids)
    if gap:
        await asyncio.sleep(gap)
    yield SSE_DONE


async def completions(request: Request) -> Response:
    body = await request.body()
    STATS["completions"] += 1
    stream = _stream_params(body)
    if stream is not None:
        return StreamingResponse(_sse(*stream), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})
    return Response(COMPLETION, media_type=JSON)


async def chat(request: Request) -> Response:
    await request.body()
    STATS["chat"] += 1
    return Response(CHAT, media_type=JSON)


async def health(request: Request) -> Response:
    STATS["health"] += 1
    return Response(b"", status_code=200)


async def models(request: Request) -> Response:
    STATS["models"] += 1
    return Response(MODELS, media_type=JSON)


async def metrics(request: Request) -> Response:
    STATS["metrics"] += 1
    return Response(METRICS, media_type="text/plain; version=0.0.4; charset=utf-8")


async def stats(request: Request) -> Response:
    return Response(json.dumps(STATS).encode(), media_type=JSON)


async def other(request: Request) -> Response:
    key = f"{request.method} {request.url.path}"
    STATS["other"][key] = STATS["other"].get(key, 0) + 1
    if request.method == "POST":
        await request.body()
        return Response(COMPLETION, media_type=JSON)
    return Response(b"{}", media_type=JSON)


def build_app(parent_pid: int | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.ensure_future(_watch_parent(parent_pid)) if parent_pid else None
        yield
        if task is not None:
            task.cancel()

    return Starlette(lifespan=lifespan, routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/_bench/stats", stats, methods=["GET"]),
        Route("/{path:path}", other, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
    ])


async def _watch_parent(pid: int) -> None:
    while True:
        await asyncio.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, default=None)
    args = ap.parse_args()

    app = build_app(args.parent_pid)
    # uvloop + httptools when installed (uvicorn's "auto"); no access log.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                lifespan="on")


if __name__ == "__main__":
    main()
