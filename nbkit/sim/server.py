"""A live simulated vLLM replica: an OpenAI-compatible server whose answers are paced in real time
by the simulator's engine and performance model, with vLLM's /metrics names. No vLLM, no model
weights: the panel, router, notebooks and load tests run unchanged against it, at 32+ replicas
on a laptop::

    python -m nbkit.sim.server --port 8100 --model tiny --model-spec tiny --hardware cpu
    python -m nbkit.sim.server serve meta-llama/Llama-3.1-8B --port 8101 --hardware H100 \\
        --tensor-parallel-size 2 --data-parallel-size 2 --speed 10

The second form takes ``vllm serve``'s command line (``serve MODEL --host --port
--tensor-parallel-size --data-parallel-size --max-model-len --max-num-seqs
--max-num-batched-tokens --block-size --gpu-memory-utilization --served-model-name ...``; other
vLLM flags such as ``--enforce-eager`` are accepted and ignored), so a launcher can swap
``nbkit.cluster.vllm_entry`` for ``nbkit.sim.server``. On the cpu profile ``VLLM_CPU_KVCACHE_SPACE`` (GiB)
sets the KV cache as it does for vLLM-CPU. A request reaches its engine the profile's
``request_overhead_s`` after it was accepted (HTTP and tokenization), so TTFT includes it.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST
/v1/chat/completions`` (both with ``stream`` and ``stream_options.include_usage``), ``POST
/tokenize``, ``GET /metrics``, ``GET /version``. The prompt's tokens are those vLLM would make
(:mod:`nbkit.sim.tokens`): the model folder's tokenizer (``tokenizer.json``: the tiny model's, or
``--tokenizer``) with special tokens for completions, its chat template for chat requests; without
a tokenizer, one token per 4 characters (with stable pseudo ids, so the prefix cache works);
``max_tokens`` tokens of filler text come back (default 16; chat: up to the context limit, at most
``--default-max-tokens``). With ``--data-parallel-size N`` there are N engines, labelled
``engine="0"..`` in /metrics and chosen by the ``X-data-parallel-rank`` header or by least load.
``--speed k`` runs the clock k times faster than real time.

The fields a router uses to move a stream from one replica to another are vLLM 0.32's: a
completion ``prompt`` may be token ids (``[1, 2, 3]`` or ``[[1, 2, 3]]``, checked against the
vocabulary); ``return_token_ids: true`` adds the ids as vLLM does (completions: ``prompt_token_ids``
and ``token_ids`` in the choice, streamed: ``prompt_token_ids`` in the first chunk's choice and
``null`` after it, each chunk's ``token_ids`` its new tokens; chat: ``prompt_token_ids`` at the top
of the response or of the first, role-only chunk, ``token_ids`` in the choice); chat's
``continue_final_message: true`` with ``add_generation_prompt: false`` continues the last
(assistant) message, whose tokens count as prompt (both true: vLLM's 400); ``ignore_eos`` is
accepted (the simulated replica never stops before ``max_tokens``). The generated tokens are
:meth:`Tokens.filler <nbkit.sim.tokens.Tokens.filler>`'s: each chunk's text is its token's, and,
like greedy decoding, a context that ends inside the filler continues it, so prompt + generated ids
resent to another replica give the same next tokens.

``--kv-events-config`` is vLLM's (``{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://127.0.0.1:5557", "topic": "replica0", "replay_endpoint":
"tcp://127.0.0.1:5600"}``): each engine publishes its prefix cache's ``BlockStored`` /
``BlockRemoved`` events with vLLM's wire format, DP rank ``r`` on the ports + ``r``, and answers
replays (:mod:`nbkit.sim.kv_publish`), so the router's ``kv_aware`` policy runs on a simulated
cluster as on a real one.

In-process use (tests, notebooks)::

    from nbkit.sim.replica import SimReplica
    from nbkit.sim.server import build_app
    replica = SimReplica.from_args(["--model-spec", "tiny", "--hardware", "cpu"])
    app = build_app(replica)          # a Starlette app; serve it with uvicorn

The engines, their real-time drivers and the metrics are :mod:`nbkit.sim.replica`'s; this module
is the HTTP side and the command line.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from nbkit.sim.config import SimConfigError
from nbkit.sim.models import UnknownModelError
from nbkit.sim.replica import SimReplica, TokenStream, build_parser

__all__ = ["build_app", "main"]

# ------------------------------------------------------------------------------------------- HTTP


def build_app(replica: SimReplica):
    """The Starlette app serving ``replica``."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(status: int, message: str, kind: str = "BadRequestError") -> JSONResponse:
        return JSONResponse({"object": "error", "message": message, "type": kind, "param": None,
                             "code": status}, status_code=status)

    async def health(request: Request):
        return Response(status_code=200)

    async def version(request: Request):
        return JSONResponse({"version": "nbkit-sim"})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{
            "id": replica.model_name, "object": "model", "created": replica.created, "owned_by": "nbkit-sim",
            "root": replica.model_name, "parent": None, "max_model_len": replica.max_model_len}]})

    async def metrics(request: Request):
        return Response(replica.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise ValueError("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ValueError("request body must be a JSON object")
        return body

    def chat_ids(body: dict) -> list[int]:
        return replica.tokens.chat(body.get("messages"),
                                   add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                                   continue_final_message=bool(body.get("continue_final_message", False)),
                                   add_special_tokens=bool(body.get("add_special_tokens", False)),
                                   chat_template_kwargs=body.get("chat_template_kwargs"))

    def prompt_ids(body: dict, prompt: Any) -> list[int]:
        return replica.tokens.completion(prompt, bool(body.get("add_special_tokens", True)))

    async def tokenize(request: Request):
        try:
            body = await body_of(request)
            if "messages" in body:
                ids = chat_ids(body)
            else:
                prompt = body.get("prompt", "")
                if not isinstance(prompt, str):
                    raise ValueError("prompt must be a string")
                ids = prompt_ids(body, prompt)
        except ValueError as e:
            return error(400, str(e))
        return JSONResponse({"count": len(ids), "max_model_len": replica.max_model_len, "tokens": ids})

    def token_prompt(prompt: list) -> list[int]:
        ids = list(prompt)
        vocab = replica.tokens.vocab_size
        if vocab is not None and any(not 0 <= t < vocab for t in ids):
            bad = max(ids) if max(ids) >= vocab else min(ids)
            raise ValueError(f"Token id {bad} is out of vocabulary")
        return ids

    def completion_ids(body: dict) -> list[int]:
        prompt = body.get("prompt", "")

        def is_ids(x) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in x)
        if isinstance(prompt, str):
            return prompt_ids(body, prompt)
        if is_ids(prompt):
            return token_prompt(prompt)
        if isinstance(prompt, list) and len(prompt) == 1:
            if isinstance(prompt[0], str):
                return prompt_ids(body, prompt[0])
            if is_ids(prompt[0]):
                return token_prompt(prompt[0])
        if isinstance(prompt, list) and len(prompt) > 1:
            raise ValueError("only one prompt per request is supported by the simulated replica")
        raise ValueError("prompt must be a string or a list of token ids")

    async def generate(request: Request, chat: bool):
        try:
            body = await body_of(request)
            if chat:
                if body.get("continue_final_message") and body.get("add_generation_prompt"):
                    raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` "
                                     "to True.")
                ids = chat_ids(body)
            else:
                ids = completion_ids(body)
            mt = body.get("max_completion_tokens", body.get("max_tokens"))
            if mt is None:
                mt = min(replica.default_max_tokens, max(1, replica.max_model_len - len(ids))) if chat else 16
            if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
                raise ValueError(f"max_tokens={mt!r}: must be an integer >= 1")
            if body.get("n", 1) != 1:
                raise ValueError("n > 1 is not supported by the simulated replica")
            for flag in ("return_token_ids", "ignore_eos", "continue_final_message", "add_generation_prompt"):
                if body.get(flag) is not None and not isinstance(body[flag], bool):
                    raise ValueError(f"{flag}={body[flag]!r}: must be a boolean")
            prio = body.get("priority", 0)
            if isinstance(prio, bool) or not isinstance(prio, int):
                raise ValueError(f"priority={prio!r}: must be an integer")
            engine = replica.pick_engine(request.headers.get("x-data-parallel-rank"))
            s = replica.submit(ids, mt, engine, priority=prio)
        except ValueError as e:
            return error(400, str(e))
        rid = ("chatcmpl-" if chat else "cmpl-") + s.req.rid
        created = int(time.time())
        model = replica.model_name
        n_in = len(ids)
        out = _Output(replica, ids, bool(body.get("return_token_ids")))
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            usage_chunk = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
            return StreamingResponse(_sse(replica, s, rid, created, model, chat, out, mt, usage_chunk),
                                     media_type="text/event-stream")
        try:
            k = 0
            async for n in replica.token_counts(s):
                k += n
        except asyncio.CancelledError:
            replica.abort(s)
            raise
        gen_ids, pieces = out.tokens(0, k)
        text_out = "".join(pieces)
        usage = {"prompt_tokens": n_in, "completion_tokens": k, "total_tokens": n_in + k}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text_out}, "logprobs": None,
                      "finish_reason": "length"}
            d = {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
                 "usage": usage}
            if out.return_ids:
                choice.update(stop_reason=None, token_ids=gen_ids)
                d["prompt_token_ids"] = ids
            return JSONResponse(d)
        choice = {"index": 0, "text": text_out, "logprobs": None, "finish_reason": "length"}
        if out.return_ids:
            choice.update(stop_reason=None, token_ids=gen_ids, prompt_token_ids=ids)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": [choice], "usage": usage})

    async def completions(request: Request):
        return await generate(request, chat=False)

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @asynccontextmanager
    async def lifespan(app):
        await replica.start()
        try:
            yield
        finally:
            await replica.stop()

    routes = [Route("/health", health), Route("/version", version), Route("/v1/models", models),
              Route("/metrics", metrics), Route("/tokenize", tokenize, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


class _Output:
    """One request's generated tokens: the filler cycle from where the prompt leaves it."""

    __slots__ = ("ids", "texts", "start", "prompt", "return_ids")

    def __init__(self, replica: SimReplica, prompt: list[int], return_ids: bool):
        self.ids, self.texts = replica.tokens.filler()
        self.start = replica.tokens.filler_start(prompt)
        self.prompt = prompt
        self.return_ids = return_ids

    def tokens(self, a: int, b: int) -> tuple[list[int], list[str]]:
        """Generated tokens ``a..b-1``: their ids and texts."""
        n = len(self.ids)
        ks = [(self.start + k) % n for k in range(a, b)]
        return [self.ids[k] for k in ks], [self.texts[k] for k in ks]


async def _sse(replica: SimReplica, s: TokenStream, rid: str, created: int, model: str, chat: bool,
               out: _Output, max_tokens: int, usage_chunk: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"
    n_in = len(out.prompt)

    def chunk(choice: dict, usage=None, **top) -> bytes:
        d = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if usage is not None or usage_chunk:
            d["usage"] = usage
        d.update(top)
        return b"data: " + json.dumps(d, separators=(",", ":")).encode() + b"\n\n"

    k = 0
    try:
        if chat:
            top = {"prompt_token_ids": out.prompt} if out.return_ids else {}
            yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}, **top)
        async for n in replica.token_counts(s):
            for _ in range(n):
                (tid,), (piece,) = out.tokens(k, k + 1)
                k += 1
                last = k >= max_tokens
                if chat:
                    c = {"index": 0, "delta": {"content": piece}, "logprobs": None,
                         "finish_reason": "length" if last else None}
                    if out.return_ids:
                        if last:
                            c["stop_reason"] = None
                        c["token_ids"] = [tid]
                else:
                    c = {"index": 0, "text": piece, "logprobs": None, "finish_reason": "length" if last else None}
                    if out.return_ids:
                        c.update(stop_reason=None, prompt_token_ids=out.prompt if k == 1 else None,
                                 token_ids=[tid])
                yield chunk(c)
        if usage_chunk:
            d = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                 "usage": {"prompt_tokens": n_in, "completion_tokens": k, "total_tokens": n_in + k}}
            yield b"data: " + json.dumps(d, separators=(",", ":")).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
    finally:
        if not s.done:
            replica.abort(s)


# -------------------------------------------------------------------------------------------- CLI


async def _idle(parent_pid: int | None) -> None:
    if parent_pid:
        await _watch_parent(parent_pid)
    else:
        await asyncio.Event().wait()


async def _watch_parent(pid: int) -> None:
    while True:
        await asyncio.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        print(f"nbkit.sim.server: ignoring {' '.join(unknown)}", file=sys.stderr)
    if args.headless:
        print("nbkit.sim.server: --headless: the head process simulates this node's ranks; idling",
              file=sys.stderr, flush=True)
        asyncio.run(_idle(args.parent_pid))
        return 0
    try:
        replica = SimReplica._from_namespace(args)
    except (SimConfigError, UnknownModelError, ValueError) as e:
        print(f"nbkit.sim.server: error: {e}", file=sys.stderr)
        return 2
    if args.replicas < 1:
        print("nbkit.sim.server: error: --replicas must be >= 1", file=sys.stderr)
        return 2
    if args.replicas > 1 and replica.kv_events is not None:
        print("nbkit.sim.server: error: --kv-events-config needs --replicas 1 (one topic and replay endpoint "
              "per replica)", file=sys.stderr)
        return 2
    replicas = [replica] + [SimReplica._from_namespace(args) for _ in range(args.replicas - 1)]
    if args.startup_s > 0:
        time.sleep(args.startup_s)
    s0 = replica.setups[0]
    ports = [args.port + i for i in range(args.replicas)]
    print(f"nbkit.sim.server: {replica.model_name} ({s0.model.name} on {s0.hw.name} x{s0.tp_size}, "
          f"{len(replica.engines)} engine(s), {s0.num_blocks} blocks of {s0.block_size}) at "
          + ", ".join(f"http://{args.host}:{p}" for p in ports), file=sys.stderr, flush=True)
    asyncio.run(_serve(replicas, args.host, ports, args.log_level, args.parent_pid))
    return 0


async def _serve(replicas: list[SimReplica], host: str, ports: list[int], log_level: str,
                 parent_pid: int | None) -> None:
    import uvicorn

    servers = [uvicorn.Server(uvicorn.Config(build_app(r), host=host, port=p, log_level=log_level,
                                             access_log=False, lifespan="on"))
               for r, p in zip(replicas, ports)]
    watch = asyncio.create_task(_watch_parent(parent_pid)) if parent_pid else None
    try:
        await asyncio.gather(*(s.serve() for s in servers))
    finally:
        if watch is not None:
            watch.cancel()


if __name__ == "__main__":
    sys.exit(main())
