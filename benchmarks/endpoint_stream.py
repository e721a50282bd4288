"""CPU that nbkit's endpoint spends per streamed request, over two mock backends, in one run.

    .venv/bin/python benchmarks/endpoint_stream.py [--requests 800] [--rounds 3] [--tokens 32]
                                                   [--concurrency 16] [--gap-ms 5] [--prompt-chars 4000]
                                                   [--policies least_load,prefix_affinity]

On a machine whose replicas share the router's cores, every CPU millisecond the router spends per
request is taken from the replicas, and shows up in their time to first token: this is the
figure to drive down, measured without vLLM so that a change's effect is seen in a minute.

What runs (all on 127.0.0.1): 2 x benchmarks/mock_backend.py, which stream ``--tokens`` vLLM-like
SSE events ``--gap-ms`` apart (with the token ids, and the prompt's ids in the first event, when a
request asks ``return_token_ids``, as nbkit's endpoint does for streams it can move); nbkit's
endpoint in its own process (router_overhead.py --serve-endpoint, http1 transport, as
compare_routers runs it); a closed-loop generator in this process (aiohttp, ``--concurrency`` in
flight) sending ``/v1/completions`` streams with a ``--prompt-chars`` text prompt. Per round and
policy: the endpoint process's CPU (user + system, from /proc through psutil) divided by the
requests, the generator's own CPU per request, and the client-side TTFT p50. Rounds interleave the
policies. Prints a table; writes benchmarks/results/endpoint_stream.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_up(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t = time.monotonic()
    async with aiohttp.ClientSession() as s:
        while time.monotonic() - t < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args[:3]} exited with {proc.returncode}")
            try:
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"{url} did not come up in {timeout:.0f} s")


async def one_round(url: str, pid: int, args, prompt: str) -> dict:
    proc = psutil.Process(pid)
    body = {"model": "m", "prompt": prompt, "max_tokens": args.tokens, "stream": True,
            "chunk_interval_ms": args.gap_ms}
    ttfts: list[float] = []
    errors = 0
    sent = 0

    async def worker(s: aiohttp.ClientSession):
        nonlocal sent, errors
        while sent < args.requests:
            sent += 1
            t = time.perf_counter()
            first = None
            try:
                async with s.post(url + "/v1/completions", json=body) as r:
                    async for line in r.content:
                        if first is None and line.startswith(b"data: {"):
                            first = time.perf_counter() - t
                    if r.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            if first is not None:
                ttfts.append(first)

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as s:
        c0, g0, w0 = proc.cpu_times(), time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(args.concurrency)))
        c1, g1, w1 = proc.cpu_times(), time.process_time(), time.perf_counter()
    n = args.requests
    return {"requests": n, "errors": errors, "wall_s": w1 - w0,
            "endpoint_cpu_ms": 1000 * ((c1.user - c0.user) + (c1.system - c0.system)) / n,
            "endpoint_user_ms": 1000 * (c1.user - c0.user) / n,
            "endpoint_sys_ms": 1000 * (c1.system - c0.system) / n,
            "generator_cpu_ms": 1000 * (g1 - g0) / n,
            "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else None}


async def main_async(args) -> dict:
    children: list[subprocess.Popen] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out: dict = {"benchmark": "endpoint_stream", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "loadavg_at_start": list(os.getloadavg())},
                 "settings": {k: getattr(args, k) for k in ("requests", "rounds", "tokens", "concurrency", "gap_ms",
                                                            "prompt_chars", "policies")},
                 "rounds": []}
    try:
        backends = []
        for _ in range(2):
            port = free_port()
            children.append(subprocess.Popen([sys.executable, str(HERE / "mock_backend.py"), "--port", str(port),
                                              "--parent-pid", str(os.getpid())], env=env,
                                             stdout=subprocess.DEVNULL))
            backends.append(f"http://127.0.0.1:{port}")
        for b, p in zip(backends, children):
            await wait_up(b, p)
        endpoints = {}
        for policy in args.policies.split(","):
            port = free_port()
            p = subprocess.Popen([sys.executable, str(HERE / "router_overhead.py"), "--serve-endpoint",
                                  "--port", str(port), "--policy", policy, "--parent-pid", str(os.getpid()),
                                  "--transport", "http1", "--urls", *backends], env=env, stdout=subprocess.DEVNULL)
            children.append(p)
            await wait_up(f"http://127.0.0.1:{port}", p)
            endpoints[policy] = (f"http://127.0.0.1:{port}", p.pid)
        prompt = ("You are a careful assistant. " * (args.prompt_chars // 29 + 1))[:args.prompt_chars]
        for url, pid in endpoints.values():  # warm-up: connections, caches, first-call costs
            await one_round(url, pid, argparse.Namespace(**{**vars(args), "requests": 50}), prompt)
        for rnd in range(args.rounds):
            for policy, (url, pid) in endpoints.items():
                r = await one_round(url, pid, args, prompt)
                r.update(policy=policy, round=rnd)
                out["rounds"].append(r)
                print(f"round {rnd} {policy:16s} endpoint {r['endpoint_cpu_ms']:.3f} ms/req "
                      f"(user {r['endpoint_user_ms']:.3f}, sys {r['endpoint_sys_ms']:.3f}), generator "
                      f"{r['generator_cpu_ms']:.3f} ms/req, TTFT p50 {r['ttft_p50_ms']:.2f} ms, "
                      f"errors {r['errors']}, {r['requests'] / r['wall_s']:.0f} req/s", flush=True)
    finally:
        for p in children:
            p.terminate()
        for p in children:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    out["machine"]["loadavg_at_end"] = list(os.getloadavg())
    out["summary"] = {}
    for policy in args.policies.split(","):
        rows = [r for r in out["rounds"] if r["policy"] == policy]
        out["summary"][policy] = {k: statistics.median(r[k] for r in rows)
                                  for k in ("endpoint_cpu_ms", "endpoint_user_ms", "endpoint_sys_ms",
                                            "generator_cpu_ms", "ttft_p50_ms")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=800, help="streamed requests per round and policy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32, help="SSE events per stream")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--gap-ms", type=float, default=5.0, help="between a stream's events")
    ap.add_argument("--prompt-chars", type=int, default=4000)
    ap.add_argument("--policies", default="least_load,prefix_affinity")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "endpoint_stream.json")
    args = ap.parse_args(argv)
    from nbkit.loop import new_loop
    lp = new_loop()  # the generator on uvloop too, where it is installed
    try:
        out = lp.run_until_complete(main_async(args))
    finally:
        lp.close()
    print("median over rounds, per request:")
    for policy, s in out["summary"].items():
        print(f"  {policy:16s} endpoint CPU {s['endpoint_cpu_ms']:.3f} ms (user {s['endpoint_user_ms']:.3f}, "
              f"sys {s['endpoint_sys_ms']:.3f}); generator {s['generator_cpu_ms']:.3f} ms; TTFT p50 "
              f"{s['ttft_p50_ms']:.2f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
