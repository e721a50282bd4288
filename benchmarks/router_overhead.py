"""Added latency of nbkit's in-process client and endpoint vs calling a replica directly, side by side
with sglang-router and vllm-router, over the same two minimal local HTTP backends, in one run.

    .venv/bin/python benchmarks/router_overhead.py [--quick] [--peers-venv .bench-venv]
                                                  [--paths direct,client-rr,...] [--rates 50,200]
                                                  [--gen-client httpx|aiohttp|http1]
Defaults: 2000 requests per path at 200 req/s and 500 at 50 req/s, about 4-5 minutes in all
(--max-seconds skips what would not fit); --quick: 200 per (path, rate), about a minute.

The peers live in a separate venv so they do not disturb the project's:
    python3 -m venv .bench-venv && .bench-venv/bin/pip install sglang-router==0.3.2 vllm-router==0.1.17
A peer that is missing or fails to start is reported and skipped; the others still run.

What runs (all on 127.0.0.1):
  backends   2 processes of benchmarks/mock_backend.py (uvicorn + starlette), answering at once
  direct     the generator's client (httpx.AsyncClient; --gen-client aiohttp or http1) -> backend, alternating
  client-*   nbkit.routing.client.RoutedClient in this process -> backend: the request runs on the
             generator's loop, the router (scraper, health checks) on nbkit's loop thread
  endpoint-* nbkit.routing.endpoint.Endpoint in its own process; generator -> endpoint -> backend
  sglang-*   sglang-router launch ... in its own process; generator -> router -> backend
  vllm-*     vllm-router ... in its own process; generator -> router -> backend
  (-rr round_robin, -ll least_load, -ca cache_aware: with one fixed prompt it sends all to one backend)
  nbkit paths use the http1 transport on a uvloop loop (the defaults); *-aiohttp use aiohttp's
  ClientSession (the default until 2026-11-28), *-httpx the httpx transport, and
  endpoint-rr-httpx-asyncio httpx on asyncio's loop (nbkit's first configuration);
  client-rr-local is RoutedClient(local=True): the router's tasks on the generator's loop too;
  client-rr-hop is RoutedClient(hop=True): each call crosses to nbkit's loop and back, which is
  what a call awaited in a Jupyter cell does
Load: open loop, request i is sent at t0 + i/rate whatever happened to the others, after a
warm-up that is discarded. Latency is time.perf_counter() around the call. For each (path, rate)
a direct baseline runs at the same rate in blocks alternating with the path's blocks (so drift on
a shared machine hits both); "added" = path - that baseline, at p50 and p99. CPU time per
request of this process (load generator; plus nbkit's loop thread for the client path) and of the
router process is recorded too: on a busy machine it is steadier than the latencies.
Prints a table and the issue's goals, and writes benchmarks/results/router_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Awaitable, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BODY = {"model": "m", "prompt": "hi", "max_tokens": 1}
BODY_BYTES = json.dumps(BODY).encode()
HEADERS = {"content-type": "application/json"}
nan = float("nan")
REQUEST_TIMEOUT_S = 5.0  # a request slower than this counts as an error (the run is overloaded)

GOAL_CLIENT_P50_MS = 0.2
GOAL_ENDPOINT_P99_MS = 1.0
GOAL_RATE = 200.0

# name -> (kind, policy), in the order they run: the main comparison first, so that what
# --max-seconds may skip on a slow machine is the extra policies
ALL_PATHS = {
    "direct": ("direct", None, None),
    "client-rr": ("client", "round_robin", None),
    "endpoint-rr": ("endpoint", "round_robin", None),
    "sglang-rr": ("sglang", "round_robin", None),
    "vllm-rr": ("vllm", "round_robin", None),
    "client-ll": ("client", "least_load", None),
    "endpoint-ll": ("endpoint", "least_load", None),
    # nbkit's earlier transport side by side: httpx (on uvloop), and httpx on asyncio's loop
    "client-rr-local": ("client", "round_robin", "local"),
    "client-rr-hop": ("client", "round_robin", "hop"),
    "client-rr-aiohttp": ("client", "round_robin", "aiohttp"),
    "endpoint-rr-aiohttp": ("endpoint", "round_robin", "aiohttp"),
    "client-rr-httpx": ("client", "round_robin", "httpx"),
    "endpoint-rr-httpx": ("endpoint", "round_robin", "httpx"),
    "endpoint-rr-httpx-asyncio": ("endpoint", "round_robin", "httpx+asyncio"),
    "sglang-ca": ("sglang", "cache_aware", None),
}
LABELS = {
    "direct": "direct",
    "client": "nbkit client",
    "endpoint": "nbkit endpoint",
    "sglang": "sglang-router",
    "vllm": "vllm-router",
}


# -- small helpers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_xs:
        return float("nan")
    k = (len(sorted_xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"cpu_model": cpu or platform.processor(), "cores_online": os.cpu_count(), "cores_usable": affinity,
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_at_start": list(os.getloadavg())}


def announce_machine() -> dict:
    """:func:`machine`, printed, with a note when the machine is already busy."""
    info = machine()
    print(f"machine: {info['cpu_model']}, {info['cores_usable']} usable cores, python {info['python']}, "
          f"loadavg {info['loadavg_at_start']}", flush=True)
    if info["loadavg_at_start"][0] > 0.5 * (info["cores_usable"] or 1):
        print("note: the machine is busy (loadavg above); latencies will be noisier than on an idle machine",
              flush=True)
    return info


def versions(peers_venv: Path | None) -> dict:
    from importlib import metadata
    out = {}
    for pkg in ("nbkit", "httpx", "httpcore", "aiohttp", "uvicorn", "starlette", "httptools", "uvloop"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    py = peers_venv / "bin" / "python" if peers_venv else None
    for pkg in ("sglang-router", "vllm-router"):
        out[pkg] = None
        if py and py.exists():
            try:
                r = subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version({pkg!r}))"],
                                   capture_output=True, text=True, timeout=30)
                out[pkg] = r.stdout.strip() or None
            except (OSError, subprocess.SubprocessError):
                pass
    return out


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the processes of process group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                st = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # after "comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        if int(st[2]) == pgid:
            total += int(st[11]) + int(st[12])
    return total / tick


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# -- child processes -------------------------------------------------------------------------------
class Children:
    """Processes this benchmark started: each in its own session (process group), logged to a file,
    killed by process group at the end; with setpriv (util-linux) they also get SIGKILL if this
    process dies without cleaning up."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self._setpriv = shutil.which("setpriv")

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        full = ([self._setpriv, "--pdeathsig", "KILL", "--"] if self._setpriv else []) + argv
        with open(log, "wb") as f:
            p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True, env=env, cwd=str(ROOT))
        self.procs.append((name, p, log))
        return p

    def log_tail(self, p: subprocess.Popen, chars: int = 1500) -> str:
        for _, q, log in self.procs:
            if q is p:
                try:
                    return log.read_text(errors="replace")[-chars:]
                except OSError:
                    return ""
        return ""

    def stop(self, p: subprocess.Popen, grace: float = 5.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # the group may hold more than the leader (a launcher's children): kill what is left
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.procs = [t for t in self.procs if t[1] is not p]

    def stop_all(self) -> None:
        for _, p, _ in list(reversed(self.procs)):
            self.stop(p)


async def wait_ready(client, url: str, proc: subprocess.Popen | None, timeout: float) -> str | None:
    """Poll a real completion through ``url`` until it answers 200; None when ready, else why not."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            r = await client.post(url + "/v1/completions", content=BODY_BYTES, headers=HEADERS, timeout=2.0)
            if r.status_code == 200:
                return None
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except Exception as e:  # noqa: BLE001 - still starting
            last = repr(e)
        await asyncio.sleep(0.2)
    return f"not ready after {timeout:.0f} s (last: {last})"


# -- load generation -------------------------------------------------------------------------------
async def open_loop(send: Callable[[int], Awaitable[bool]], rate: float, n: int,
                    max_in_flight: int | None = None) -> dict:
    """Send ``n`` requests at ``rate``/s, open loop; per-request latency around ``send``.

    With more than ``max_in_flight`` requests unanswered (default: one second's worth) the path
    cannot keep up with ``rate``: sending stops there and the run is marked ``overloaded``.
    """
    lat: list[float] = []
    lag: list[float] = []
    errors: list[str] = []
    in_flight = 0
    cap = max_in_flight or max(50, int(rate))

    async def one(i: int) -> None:
        nonlocal in_flight
        t = time.perf_counter()
        try:
            ok = await send(i)
            err = "" if ok is True else str(ok)
        except Exception as e:  # noqa: BLE001 - counted as an error
            err = repr(e)
        finally:
            in_flight -= 1
        dt = time.perf_counter() - t
        if err:
            errors.append(err)
        else:
            lat.append(dt)

    tasks = []
    sent = 0
    t0 = time.perf_counter() + 0.002
    for i in range(n):
        target = t0 + i / rate
        d = target - time.perf_counter()
        if d > 0:
            await asyncio.sleep(d)
        if in_flight > cap:
            break
        lag.append(time.perf_counter() - target)
        in_flight += 1  # counted here: a late generator creates tasks before any of them runs
        tasks.append(asyncio.ensure_future(one(i)))
        sent += 1
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 1)
        for t in pending:
            t.cancel()
            errors.append("no answer (cancelled)")
    return {"n": sent, "lat": lat, "lag": lag, "errors": errors, "wall": time.perf_counter() - t0,
            "overloaded": sent < n, "unsent": n - sent}


def summarize(parts: list[dict]) -> dict:
    """Pool the runs of one path (blocks) into percentiles, in ms."""
    lat = sorted(x for p in parts for x in p["lat"])
    lag = sorted(x for p in parts for x in p["lag"])
    errors = [e for p in parts for e in p["errors"]]
    n = sum(p["n"] for p in parts)
    wall = sum(p["wall"] for p in parts)
    return {
        "n": n, "ok": len(lat), "errors": len(errors), "error_sample": sorted(set(errors))[:3],
        "overloaded": any(p.get("overloaded") for p in parts), "unsent": sum(p.get("unsent", 0) for p in parts),
        "p50_ms": percentile(lat, 50) * 1e3, "p90_ms": percentile(lat, 90) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3, "max_ms": (lat[-1] * 1e3) if lat else float("nan"),
        "mean_ms": (sum(lat) / len(lat) * 1e3) if lat else float("nan"),
        "send_lag_p99_ms": percentile(lag, 99) * 1e3, "achieved_rate": n / wall if wall else 0.0,
    }


async def backend_stats(client, backends: list[str]) -> list[dict] | None:
    try:
        return [(await client.get(u + "/_bench/stats", timeout=5.0)).json() for u in backends]
    except Exception:  # noqa: BLE001 - the numbers are a check, not the measurement
        return None


def stats_delta(before: list[dict] | None, after: list[dict] | None) -> dict | None:
    """What the backends were asked between two snapshots: completions per backend, and the
    routers' side traffic (metrics scrapes, health checks, other paths) summed."""
    if not before or not after:
        return None
    side: dict = {"metrics": 0, "health": 0, "models": 0, "other": {}}
    for b, a in zip(before, after):
        for k in ("metrics", "health", "models"):
            side[k] += a[k] - b[k]
        for k, v in a["other"].items():
            d = v - b["other"].get(k, 0)
            if d:
                side["other"][k] = side["other"].get(k, 0) + d
    return {"completions_per_backend": [a["completions"] + a["chat"] - b["completions"] - b["chat"]
                                        for b, a in zip(before, after)], "side_traffic": side}


def http_client():
    """httpx client for control calls (readiness, backend stats) and, by default, the load."""
    import httpx
    return httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S,
                             limits=httpx.Limits(max_connections=1024, max_keepalive_connections=1024))


class LoadClient:
    """The load generator's HTTP client: httpx.AsyncClient (default), aiohttp (lighter on CPU) or
    nbkit.http.http1 (the lightest, and the client path's own transport: with it the direct baseline
    and the client path differ by the router alone)."""

    def __init__(self, kind: str = "httpx"):
        self.kind = kind
        if kind == "http1":
            from nbkit.http.http1 import Http1Pool
            self._c = Http1Pool(timeout=REQUEST_TIMEOUT_S, connect_timeout=REQUEST_TIMEOUT_S)
        elif kind == "aiohttp":
            import aiohttp
            self._c = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024),
                                            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))
        else:
            self._c = http_client()

    def sender(self, urls: list[str]) -> Callable[[int], Awaitable[bool]]:
        targets = [u + "/v1/completions" for u in urls]
        c = self._c
        if self.kind == "http1":
            async def send(i: int):
                r = await c.request("POST", targets[i % len(targets)], content=BODY_BYTES, headers=HEADERS)
                body = await r.aread()
                return True if r.status_code == 200 else f"HTTP {r.status_code}: {body[:200]!r}"
            return send
        if self.kind == "aiohttp":
            async def send(i: int):
                async with c.post(targets[i % len(targets)], data=BODY_BYTES, headers=HEADERS) as r:
                    body = await r.read()
                    return True if r.status == 200 else f"HTTP {r.status}: {body[:200]!r}"
            return send

        async def send(i: int):
            r = await c.post(targets[i % len(targets)], content=BODY_BYTES, headers=HEADERS)
            return True if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
        return send

    async def aclose(self) -> None:
        if self.kind == "aiohttp":
            await self._c.close()
        elif self.kind == "http1":
            await self._c.aclose()
        else:
            await self._c.aclose()


# -- paths -----------------------------------------------------------------------------------------
class Target:
    """A measured path (started by :func:`start_path`)."""

    def __init__(self, name: str, kind: str, policy: str | None, variant: str | None = None):
        self.name, self.kind, self.policy = name, kind, policy
        # nbkit paths: variant "aiohttp", "httpx", "httpx+asyncio", "local" or "hop" (default:
        # the default transport, http1, on uvloop)
        from nbkit.http.transport import DEFAULT_TRANSPORT
        self.local = variant == "local"
        self.hop = True if variant == "hop" else None
        self.transport = DEFAULT_TRANSPORT if variant in (None, "local", "hop") else variant.split("+")[0]
        self.loop = "asyncio" if variant and variant.endswith("+asyncio") else "uvloop"
        self.label = LABELS[kind] + (f" ({policy})" if policy else "") + (f" [{variant}]" if variant else "")
        self.proc: subprocess.Popen | None = None


def cpu_snapshot(ctx: dict, p: Target | None) -> dict:
    """CPU seconds so far of: this process (load generator, plus nbkit's loop thread for the client
    path), the path's router process (if any), and the two backends."""
    snap = {"generator_process": self_cpu_s(),
            "backends": sum(group_cpu_s(q.pid) for q in ctx["backend_procs"])}
    if p is not None and p.proc is not None:
        snap["router_process"] = group_cpu_s(p.proc.pid)
    return snap


async def start_path(p: Target, ctx: dict) -> tuple[Callable | None, Callable[[], Awaitable[None]] | None, str | None]:
    """Start a path. Returns (send, stop, error)."""
    backends: list[str] = ctx["backends"]
    children: Children = ctx["children"]
    startup_timeout = ctx["startup_timeout"]

    if p.kind == "direct":
        return ctx["direct_send"], None, None

    if p.kind == "client":
        from nbkit.routing.client import RoutedClient
        from nbkit.routing.rank import Rank
        ranks = [Rank(replica=i, dp_rank=0, url=u, name=f"replica{i}") for i, u in enumerate(backends)]
        rc = RoutedClient(ranks, policy=p.policy, model="m", timeout=REQUEST_TIMEOUT_S, transport=p.transport,
                          local=p.local, hop=p.hop)

        async def send(i: int):
            out = await rc.complete("hi", max_tokens=1, model="m")
            return True if out.get("choices") else f"bad body: {str(out)[:200]}"

        async def stop():
            await rc.aclose()

        try:
            await rc.__aenter__()
            await send(0)
        except Exception as e:  # noqa: BLE001
            await stop()
            return None, None, f"RoutedClient failed: {e!r}"
        return send, stop, None

    port = free_port()
    if p.kind == "endpoint":
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-endpoint", "--port", str(port),
                "--policy", p.policy, "--parent-pid", str(os.getpid()), "--transport", p.transport,
                "--urls", *backends]
        env = dict(os.environ, PYTHONUNBUFFERED="1", NBKIT_LOOP=p.loop)
    else:
        venv: Path | None = ctx["peers_venv"]
        exe = venv / "bin" / ("sglang-router" if p.kind == "sglang" else "vllm-router") if venv else None
        if exe is None or not exe.exists():
            return None, None, (f"{exe or p.kind + '-router'} not found; install with: python3 -m venv .bench-venv && "
                                ".bench-venv/bin/pip install sglang-router==0.3.2 vllm-router==0.1.17 "
                                "and pass --peers-venv .bench-venv")
        prom = str(free_port())
        common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *backends, "--policy", p.policy,
                  "--prometheus-host", "127.0.0.1", "--prometheus-port", prom,
                  "--worker-startup-check-interval", "1", "--worker-startup-timeout-secs", str(int(startup_timeout))]
        if p.kind == "sglang":
            argv = [str(exe), "launch", *common, "--log-level", "warn"]
        else:
            argv = [str(exe), *common, "--log-level", "warning"]
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    proc = p.proc = children.start(p.name, argv, env=env)
    url = f"http://127.0.0.1:{port}"
    err = await wait_ready(ctx["control_client"], url, proc, startup_timeout)
    if err:
        tail = children.log_tail(proc)
        children.stop(proc)
        return None, None, f"{' '.join(argv[:2])} ...: {err}\n--- log tail ---\n{tail}"

    client = LoadClient(ctx["gen_client"])

    async def stop_proc():
        await client.aclose()
        children.stop(proc)

    return client.sender([url]), stop_proc, None


# -- nbkit endpoint in its own process -------------------------------------------------------------
def policy_of(spec: str):
    """``name`` or ``name:option=value,...`` (e.g. ``prefix_affinity:affinity_weight=0.5``) -> a Policy."""
    from nbkit.policies import get_policy

    try:
        return get_policy(spec)
    except ValueError as e:
        raise SystemExit(f"--policy {spec!r}: {e}") from None


def kv_sources_of(specs: list[str] | None) -> list[tuple[str, int]]:
    """``--kv-sources TOPIC=REPLAY_PORT ...`` -> [(topic, replay port)]."""
    out = []
    for spec in specs or []:
        topic, sep, port = spec.rpartition("=")
        if not sep or not topic or not port.isdigit():
            raise SystemExit(f"--kv-sources {spec!r}: expected TOPIC=REPLAY_PORT (e.g. replica0=8702)")
        out.append((topic, int(port)))
    return out


def serve_endpoint(args) -> None:
    """nbkit's Endpoint in this process over ``--urls``. A policy that reads the KV-event index
    (kv_aware) gets one fed from ``--kv-events-port``: the SUB socket is bound there on 127.0.0.1
    (that port or an error: the replicas' engines connect to it), each ``--kv-sources`` topic is
    followed with its replay (the replicas started earlier: their history comes first), the i-th
    source is the i-th URL's rank (named by its topic, as a Cluster names it), and ``--model`` is
    the served model whose tokenizer the router uses. Same wiring as a Cluster's own endpoints:
    nbkit.cluster.kv.ClusterKV's index and tokenizer handed to the Endpoint."""
    from nbkit.routing.endpoint import Endpoint
    from nbkit.routing.rank import Rank

    policy = policy_of(args.policy)
    sources = kv_sources_of(args.kv_sources)
    if sources and len(sources) != len(args.urls):
        raise SystemExit(f"--kv-sources: {len(sources)} given for {len(args.urls)} --urls (one per URL, same order)")
    names = [t for t, _ in sources] or [f"replica{i}" for i in range(len(args.urls))]
    ranks = [Rank(replica=i, dp_rank=0, url=u, name=names[i]) for i, u in enumerate(args.urls)]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    kv = None
    kv_note = ""
    if policy.uses_kv_index and args.kv_events_port:
        from nbkit.cluster.kv import ClusterKV
        if not args.model:
            raise SystemExit("--kv-events-port needs --model (the served model: its tokenizer)")
        kv = ClusterKV(args.model, port=args.kv_events_port, dp_ports=1)
        kv.listen(move=False)
        for topic, replay_port in sources:
            kv.follow(topic, replay_port=replay_port)
        _ = kv.tokenizer.tokenizer  # load it now, not on the first request
        t = time.perf_counter()
        done = kv.wait_replayed(args.kv_replay_timeout)
        ranks_ = kv.snapshot()["ranks"]
        kv_note = (f" kv_events=127.0.0.1:{kv.port} replayed={'yes' if done else 'NO'} in "
                   f"{time.perf_counter() - t:.2f} s: " + ", ".join(
                       f"{k} {v['blocks']} blocks {'warm' if v['warm'] else 'cold (' + v['cold'] + ')'}"
                       for k, v in ranks_.items()))
    elif policy.uses_kv_index:
        kv_note = " kv_events=none (no --kv-events-port): the policy falls back to prefix_affinity"
    try:
        ep = Endpoint(ranks, port=args.port, policy=policy, log_level="warning", transport=args.transport,
                      migration_limit=args.migration_limit,
                      kv_index=kv.index if kv else None, tokenizer=kv.tokenizer if kv else None)
        ep.start()
        import gc
        gc.freeze()  # as `nbkit serve` does: long-lived objects leave the collector's scans
        from nbkit.loop import loop_kind
        print(f"nbkit endpoint on {ep.url} policy={args.policy} transport={args.transport} loop={loop_kind()}"
              + kv_note, flush=True)
        try:
            while not stop.wait(0.5):
                if args.parent_pid:
                    try:
                        os.kill(args.parent_pid, 0)
                    except ProcessLookupError:
                        break
        finally:
            ep.stop()
    finally:
        if kv is not None:
            kv.close()


# -- main ------------------------------------------------------------------------------------------
def note(r: dict) -> str:
    out = []
    if r["overloaded"]:
        out.append(f"OVERLOADED: could not sustain the rate, sent {r['n']} of {r['requested']}")
    if r["baseline"]["overloaded"] and r["kind"] != "direct":
        out.append("direct baseline overloaded: machine too busy, inconclusive")
    if r["errors"]:
        out.append(f"e.g. {r['error_sample'][0][:80]}")
    return "; ".join(out)


def fmt(x: float | None, width: int = 8) -> str:
    if x is None or x != x:
        return " " * (width - 1) + "-"
    return f"{x:{width}.3f}"


async def measure(path: Target, send, direct_send, rate: float, n: int, args, ctx: dict) -> dict:
    """One (path, rate): warm both up, then alternate direct and path blocks at the same rate, so
    that drift on a shared machine hits the baseline and the path alike; pool each side's blocks."""
    is_direct = path.kind == "direct"
    blocks = max(1, args.blocks)
    nb = 0 if is_direct else max(50, int(n * args.baseline_frac))
    if not is_direct:
        await open_loop(direct_send, rate, max(1, int(rate * args.warmup_s / 4)))
    await open_loop(send, rate, max(1, int(rate * args.warmup_s)))
    backends, client = ctx["backends"], ctx["control_client"]
    parts: list[dict] = []
    base_parts: list[dict] = []
    cpu = {}
    base_cpu = {}
    split = None
    for b in range(blocks):
        if nb:
            k = nb // blocks + (1 if b < nb % blocks else 0)
            c0 = cpu_snapshot(ctx, None)
            base_parts.append(await open_loop(direct_send, rate, k))
            c1 = cpu_snapshot(ctx, None)
            for key in c0:
                base_cpu[key] = base_cpu.get(key, 0.0) + c1[key] - c0[key]
        k = n // blocks + (1 if b < n % blocks else 0)
        before = await backend_stats(client, backends)
        c0 = cpu_snapshot(ctx, path)
        parts.append(await open_loop(send, rate, k))
        c1 = cpu_snapshot(ctx, path)
        d = stats_delta(before, await backend_stats(client, backends))
        for key in c0:
            cpu[key] = cpu.get(key, 0.0) + c1[key] - c0[key]
        overloaded = parts[-1]["overloaded"]
        if d is not None:
            if split is None:
                split = d
            else:
                split = {"completions_per_backend": [x + y for x, y in zip(split["completions_per_backend"],
                                                                           d["completions_per_backend"])],
                         "side_traffic": _add_side(split["side_traffic"], d["side_traffic"])}
        if overloaded or (base_parts and base_parts[-1]["overloaded"]):
            break  # this path (or even direct) cannot sustain the rate here: stop, and say so
    res = summarize(parts)
    res["backends"] = split
    res["cpu_ms_per_request"] = {k: v * 1e3 / max(1, res["n"]) for k, v in cpu.items()}
    if is_direct:
        base = {k: res[k] for k in ("n", "errors", "overloaded", "p50_ms", "p90_ms", "p99_ms", "mean_ms")}
        base["cpu_ms_per_request"] = res["cpu_ms_per_request"]
    else:
        b = summarize(base_parts)
        base = {k: b[k] for k in ("n", "errors", "overloaded", "p50_ms", "p90_ms", "p99_ms", "mean_ms")}
        base["cpu_ms_per_request"] = {k: v * 1e3 / max(1, b["n"]) for k, v in base_cpu.items()}
    return {"path": path.name, "label": path.label, "kind": path.kind, "policy": path.policy, "rate": rate,
            "requested": n, "blocks": blocks, **res, "baseline": base, "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "added_p50_ms": res["p50_ms"] - base["p50_ms"], "added_p99_ms": res["p99_ms"] - base["p99_ms"]}


def _add_side(a: dict, b: dict) -> dict:
    out = {k: a[k] + b[k] for k in ("metrics", "health", "models")}
    out["other"] = dict(a["other"])
    for k, v in b["other"].items():
        out["other"][k] = out["other"].get(k, 0) + v
    return out


def requests_for(rate: float, args) -> int:
    """Requests per (path, rate): --requests, else 200 with --quick, else 2000 at 200/s, 500 at 50/s."""
    if args.requests:
        return args.requests
    if args.quick:
        return 200
    return 2000 if rate >= 200 else 500 if rate <= 50 else int(rate * 10)


async def run(args, children: "Children") -> dict:
    log_dir = children.log_dir
    # SIGTERM cancels the run like Ctrl-C does, so the finally clauses below stop what was started
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    deadline = time.monotonic() + args.max_seconds
    rows: list[dict] = []
    failures: dict[str, str] = {}
    started = time.time()
    control = direct = None
    try:
        ports = [free_port(), free_port()]
        backends = [f"http://127.0.0.1:{p}" for p in ports]
        procs = [children.start(f"backend{i}", [sys.executable, str(HERE / "mock_backend.py"), "--port", str(p),
                                                 "--parent-pid", str(os.getpid())])
                 for i, p in enumerate(ports)]
        control = http_client()
        for url, proc in zip(backends, procs):
            err = await wait_ready(control, url, proc, 30)
            if err:
                raise RuntimeError(f"backend {url}: {err}\n{children.log_tail(proc)}")
        print(f"backends: {' '.join(backends)}  (logs in {log_dir})", flush=True)
        ctx = {"backends": backends, "children": children, "peers_venv": args.peers_venv,
               "startup_timeout": args.startup_timeout, "control_client": control,
               "backend_procs": procs, "gen_client": args.gen_client}
        direct = LoadClient(args.gen_client)
        direct_send = ctx["direct_send"] = direct.sender(backends)

        def n_for(rate: float) -> int:
            return requests_for(rate, args)

        for name in args.paths:
            path = Target(name, *ALL_PATHS[name])
            est = min(n_for(r) * (1 + args.baseline_frac) / r + 2 * args.warmup_s for r in args.rates)
            if time.monotonic() + est > deadline:
                failures[path.label] = f"skipped: would pass --max-seconds {args.max_seconds:.0f}"
                print(f"[{path.label}] {failures[path.label]}", flush=True)
                continue
            t = time.perf_counter()
            send, stop, err = await start_path(path, ctx)
            if err:
                failures[path.label] = err
                print(f"[{path.label}] FAILED TO START: {err}", flush=True)
                continue
            print(f"[{path.label}] ready in {time.perf_counter() - t:.1f} s", flush=True)
            try:
                for rate in args.rates:
                    if time.monotonic() + n_for(rate) * (1 + args.baseline_frac) / rate > deadline:
                        failures[f"{path.label} @ {rate:g} req/s"] = \
                            f"skipped: would pass --max-seconds {args.max_seconds:.0f}"
                        continue
                    row = await measure(path, send, direct_send, rate, n_for(rate), args, ctx)
                    rows.append(row)
                    res, base = row, row["baseline"]
                    print(f"  {rate:5.0f} req/s  n={row['n']:5d}  p50 {res['p50_ms']:.3f}  p99 {res['p99_ms']:.3f}  "
                          f"(direct p50 {base['p50_ms']:.3f} p99 {base['p99_ms']:.3f})  errors {res['errors']}"
                          + (f"  [{note(row)}]" if note(row) else "")
                          + (f"  split {res['backends']['completions_per_backend']}" if res["backends"] else "")
                          + "  cpu ms/req " + " ".join(f"{k.split('_')[0]} {v:.2f}"
                                                       for k, v in res["cpu_ms_per_request"].items())
                          + f" (direct: generator {base['cpu_ms_per_request'].get('generator_process', nan):.2f})"
                          + (f"  [generator late: p99 {res['send_lag_p99_ms']:.1f} ms]"
                             if res["send_lag_p99_ms"] > 2 else ""), flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on with the others
                failures[path.label] = f"failed while measuring: {e!r}"
                print(f"[{path.label}] {failures[path.label]}", flush=True)
            finally:
                if stop is not None:
                    try:
                        await stop()
                    except Exception as e:  # noqa: BLE001
                        print(f"[{path.label}] stop: {e!r}", flush=True)
    finally:
        for c in (direct, control):
            if c is not None:
                await c.aclose()
        children.stop_all()
    return {"rows": rows, "failures": failures, "elapsed_s": time.time() - started, "log_dir": str(log_dir)}


def report(out: dict, args, info: dict) -> list[str]:
    lines = []
    hdr = (f"{'path':<30} {'rate':>5} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'base p50':>8} {'base p99':>8} "
           f"{'+p50 ms':>8} {'+p99 ms':>8} {'errors':>6} {'cpu/req':>8} {'rtr cpu':>8}  note")
    lines += [hdr, "-" * len(hdr)]
    for r in out["rows"]:
        direct = r["kind"] == "direct"
        lines.append(f"{r['label']:<30} {r['rate']:5.0f} {r['n']:5d} {fmt(r['p50_ms'])} {fmt(r['p99_ms'])} "
                     f"{fmt(r['baseline']['p50_ms'])} {fmt(r['baseline']['p99_ms'])} "
                     f"{fmt(None if direct else r['added_p50_ms'])} {fmt(None if direct else r['added_p99_ms'])} "
                     f"{r['errors']:6d} {fmt(r['cpu_ms_per_request'].get('generator_process'))} "
                     f"{fmt(r['cpu_ms_per_request'].get('router_process'))}  {note(r)}")
    lines.append("(ms; base = direct at the same rate, alternating with the path; + = added vs base; cpu/req = "
                 "CPU ms per request of the load-generating process, which holds the nbkit client's loop "
                 "thread; rtr cpu = of the router process)")
    for label, why in out["failures"].items():
        first = why.splitlines()[0] if why else ""
        lines.append(f"{label:<30} not measured: {first}")
    lines.append("")
    goals = []
    for r in out["rows"]:
        if r["rate"] != GOAL_RATE:
            continue
        if r["kind"] == "client":
            v, goal, what = r["added_p50_ms"], GOAL_CLIENT_P50_MS, "added p50"
        elif r["kind"] == "endpoint":
            v, goal, what = r["added_p99_ms"], GOAL_ENDPOINT_P99_MS, "added p99"
        else:
            continue
        ok = r["errors"] == 0 and not r["overloaded"] and v <= goal
        why = " (overloaded)" if r["overloaded"] else " (errors)" if r["errors"] else ""
        if r["baseline"]["overloaded"]:
            why += " (inconclusive: the direct baseline was overloaded)"
        goals.append({"path": r["label"], "metric": what, "value_ms": v, "goal_ms": goal, "pass": ok,
                      "note": why.strip()})
        lines.append(f"{r['label']} {what} at {GOAL_RATE:.0f} req/s: {v:.3f} ms (goal <= {goal:g} ms): "
                     f"{'PASS' if ok else 'FAIL'}{why}")
    if not goals:
        lines.append(f"goals not checked: no nbkit row at {GOAL_RATE:.0f} req/s")
    cores = info.get("cores_usable") or 1
    busy = max(info["loadavg_at_start"][0], info["loadavg_at_end"][0])
    if busy > 0.5 * cores:
        lines.append(f"WARNING: load average up to {busy:.1f} on {cores} cores during this run (other work): "
                     "the latencies above are not those of an idle machine; re-run when it is idle")
    out["goals"] = goals
    return lines


def _finite(x):
    """NaN/inf -> None, so the JSON is strict; floats rounded to 4 decimals."""
    if isinstance(x, float):
        return round(x, 4) if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="200 requests per (path, rate): for development")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per (path, rate) (default 2000 at 200 req/s, 500 at 50 req/s)")
    ap.add_argument("--rates", default="50,200", help="comma-separated req/s (default 50,200)")
    ap.add_argument("--paths", default=",".join(ALL_PATHS),
                    help=f"comma-separated, from {','.join(ALL_PATHS)} (default all)")
    ap.add_argument("--peers-venv", type=Path, default=ROOT / ".bench-venv",
                    help="venv with sglang-router and vllm-router (default .bench-venv)")
    ap.add_argument("--baseline-frac", type=float, default=0.5,
                    help="size of the direct baseline run before each (path, rate), as a fraction of n")
    ap.add_argument("--blocks", type=int, default=4,
                    help="alternate direct and path in this many blocks per (path, rate) (default 4)")
    ap.add_argument("--warmup-s", type=float, default=1.0, help="seconds of discarded warm-up load per run")
    ap.add_argument("--startup-timeout", type=float, default=60.0, help="seconds a router may take to be ready")
    ap.add_argument("--max-seconds", type=float, default=280.0,
                    help="skip paths that would not finish within this many seconds (default 280)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "router_overhead.json")
    ap.add_argument("--gen-client", choices=("httpx", "aiohttp", "http1"), default="httpx",
                    help="the load generator's HTTP client (default httpx; aiohttp takes less CPU, http1 the least and matches the client path)")
    ap.add_argument("--uvloop", action="store_true", help="run the load generator on uvloop (default: asyncio)")
    # internal: the nbkit endpoint's own process
    ap.add_argument("--serve-endpoint", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    ap.add_argument("--transport", default="http1", help=argparse.SUPPRESS)
    ap.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--urls", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--kv-events-port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kv-sources", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--kv-replay-timeout", type=float, default=20.0, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--migration-limit", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in args.paths if p not in ALL_PATHS]
    if bad:
        ap.error(f"--paths: unknown {bad}; choose from {list(ALL_PATHS)}")
    if args.quick:
        args.warmup_s = min(args.warmup_s, 0.5)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve_endpoint:
        serve_endpoint(args)
        return 0

    info = announce_machine()
    children = Children(Path(tempfile.mkdtemp(prefix="nbkit-router-bench-")))
    try:
        if args.uvloop:
            import uvloop
            out = uvloop.run(run(args, children))
        else:
            out = asyncio.run(run(args, children))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: stopping the processes this benchmark started", file=sys.stderr, flush=True)
        return 130
    finally:
        children.stop_all()  # idempotent: run() stops them too
    if out["failures"] and not all(v.startswith("skipped") for v in out["failures"].values()):
        print(f"logs of the processes: {children.log_dir}")
    else:
        shutil.rmtree(children.log_dir, ignore_errors=True)
    info["loadavg_at_end"] = list(os.getloadavg())
    lines = report(out, args, info)
    print()
    print("\n".join(lines))
    result = {
        "benchmark": "router_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "versions": versions(args.peers_venv),
        "workload": {"body": BODY, "endpoint": "/v1/completions", "backends": 2,
                     "backend": "benchmarks/mock_backend.py (uvicorn+starlette, fixed body, answers at once)",
                     "arrivals": "open loop, constant rate", "rates": args.rates,
                     "requests": {f"{r:g}": requests_for(r, args) for r in args.rates},
                     "warmup_s": args.warmup_s, "baseline_frac": args.baseline_frac, "blocks": args.blocks,
                     "generator_loop": "uvloop" if args.uvloop else "asyncio", "generator_client": args.gen_client,
                     "quick": args.quick, "overload": "sending stops once a second's worth of requests is unanswered",
                     "added": "path minus a direct baseline at the same rate, in blocks alternating with the path's"},
        "goals": out["goals"], "rows": out["rows"], "not_measured": out["failures"],
        "elapsed_s": round(out["elapsed_s"], 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_finite(result), indent=1) + "\n")
    print(f"\nwrote {args.out} ({out['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
