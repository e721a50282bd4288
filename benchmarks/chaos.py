"""Fault tolerance under load: `nbkit serve` with two replicas, one of them SIGKILLed every
--kill-every seconds while an OpenAI client sends a steady mix of requests through the endpoint.

    .venv/bin/python benchmarks/chaos.py [--requests 2000] [--duration 300] [--concurrency 16]
                                        [--kill-every 60] [--seed 0] [--engine sim] [--model M]
                                        [--serve-arg=--policy --serve-arg=least_load] [--out-name NAME]
A quick rehearsal on simulated replicas (no vLLM, about a minute):
    .venv/bin/python benchmarks/chaos.py --engine sim --requests 200 --duration 40 --kill-every 15

What runs (all on 127.0.0.1)
  serve   `python -m nbkit.cli serve MODEL --num-instances 2 --port P --port-start Q` (the tiny model by
          default; --engine sim passes `--engine sim`; each --serve-arg is passed on), in its own session,
          its output in a log file (the path is printed). The run starts once the endpoint's /health
          lists 2 healthy ranks; each rank's first start time is from launch to that listing.
  load    the OpenAI Python SDK (AsyncOpenAI, base_url endpoint/v1, api_key "EMPTY", max_retries=0 so
          the SDK's own retries hide nothing), --requests requests over --duration seconds at Poisson
          arrivals (seeded), at most --concurrency in flight: half streamed /v1/completions with
          ignore_eos and stream_options.include_usage, half not streamed (completions and chat, half
          each, ignore_eos too); max_tokens uniform in --max-tokens (16:64), seeded.
  faults  every --kill-every seconds a random replica (seeded) is SIGKILLed with its process group
          (os.killpg): found with psutil among the serve process's descendants, a session leader whose
          argv has `--port <its port>` (found again before each kill: restarts change pids; the
          watchdog child is never a target). A kill waits until both ranks are healthy (at most
          --kill-every seconds more; the wait is reported): the benchmark measures failover, not a
          total outage. A fault window lasts from the kill until that replica is listed healthy again
          (it must have left the healthy list or changed pid first); /health is polled every 0.5 s.
Per request: kind, streamed, start/end, ok or failed with the error, content chunks and
usage.completion_tokens against max_tokens, and whether it overlapped a fault window. At the end
the endpoint's /metrics give nbkit_restarts_total, nbkit_migrations_total and nbkit_requests_total.

Prints, and writes benchmarks/results/chaos.json + chaos.txt (--out-name changes the stem): answered,
failed by kind, non-streamed lost, streams complete with the exact token count, streams migrated,
restarts, each killed replica's time to healthy, p50/p99 latency without and with an overlapping
fault, and the goals: 0 non-streamed requests lost, >= 99 % of streams complete with the right token
count, every killed replica healthy again within its first start time + 10 s.
Everything it started is stopped at the end, on Ctrl-C and on errors (SIGTERM to the serve process,
which stops its replicas; then any process group it had is checked and killed if still there); the
whole run is bounded by --hard-timeout (default: startup + duration + 300 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from router_overhead import _finite, announce_machine, percentile

GOAL_STREAMS_EXACT = 0.99        # share of streams complete with the right token count
GOAL_RETURN_SLACK_S = 10.0       # a killed replica is healthy again within its first start + this
CANCELLED = "cancelled: the run was stopped"   # not counted (a partial run's requests in flight)
PROMPTS = ("The replica serves many tokens", "A router balances the load of every request",
           "Our notebook watches the cluster", "The scheduler prefills the prompt", "Each core decodes the batch",
           "The endpoint answers a user", "This GPU caches a long answer", "The model streams the prompt")


# -- ports and processes ---------------------------------------------------------------------------
def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_block(n: int, rng: random.Random) -> int:
    """The first of ``n`` consecutive free ports (random start, so parallel runs rarely collide)."""
    for _ in range(200):
        base = rng.randrange(20000, 60000)
        if all(_bindable(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports found")


def _argv_port(cmd: list[str]) -> int | None:
    for i, a in enumerate(cmd):
        if a == "--port" and i + 1 < len(cmd):
            try:
                return int(cmd[i + 1])
            except ValueError:
                return None
        if a.startswith("--port="):
            try:
                return int(a.split("=", 1)[1])
            except ValueError:
                return None
    return None


class Serve:
    """The `nbkit serve` process and the process groups of its children (replicas, watchdog)."""

    def __init__(self, argv: list[str], log: Path):
        self.argv, self.log = argv, log
        self.groups: dict[int, tuple[float, str]] = {}      # pgid -> (create_time, what), all seen
        setpriv = shutil.which("setpriv")     # SIGTERM to the serve if this process dies without cleaning up
        full = ([setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []) + argv
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=str(ROOT))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self, chars: int | None = None) -> str:
        try:
            t = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return t[-chars:] if chars else t

    def replicas(self) -> dict[int, object]:
        """port -> psutil.Process of each replica session leader among the serve's descendants (the
        watchdog excluded); remembers every session leader's group for the cleanup."""
        import psutil
        out = {}
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return out
        for k in kids:
            try:
                if os.getpgid(k.pid) != k.pid:
                    continue
                cmd = k.cmdline()
                ct = k.create_time()
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
            what = "watchdog" if "nbkit.cluster.watchdog" in cmd else "replica"
            self.groups.setdefault(k.pid, (ct, what))
            if what == "watchdog":
                continue
            port = _argv_port(cmd)
            if port is not None:
                out[port] = k
        return out

    def stop(self, grace: float = 30.0) -> list[str]:
        """SIGTERM to the serve (it stops its replicas); then any group it had that is still there
        is killed. Returns what had to be killed."""
        import psutil
        self.replicas()                      # a last look at the groups
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        killed = []
        stuck = self.proc.poll() is None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)     # the serve's own group: it and anything it left
            if stuck:
                killed.append(f"serve group {self.proc.pid} (did not stop within {grace:.0f} s of SIGTERM)")
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 15.0
        left = dict(self.groups)
        while left and time.monotonic() < deadline:
            for pgid, (ct, what) in list(left.items()):
                try:
                    if abs(psutil.Process(pgid).create_time() - ct) > 0.01:
                        left.pop(pgid)           # that pid is someone else's now
                except psutil.Error:
                    left.pop(pgid)
            if left:
                time.sleep(0.5)
        for pgid, (ct, what) in left.items():
            try:
                os.killpg(pgid, signal.SIGKILL)
                killed.append(f"{what} group {pgid} (still there 15 s after the serve stopped)")
            except (ProcessLookupError, PermissionError):
                pass
        return killed


# -- health ----------------------------------------------------------------------------------------
@dataclass
class Kill:
    rank: str
    port: int
    pid: int
    t: float                              # seconds since the load began
    waited_s: float = 0.0                 # postponed until both ranks were healthy
    t_down: float | None = None           # first poll without it (or with a new pid)
    t_healthy: float | None = None        # listed healthy again
    new_pid: int | None = None
    wall: float = 0.0                     # time.time() of the kill (to read the replica's log against)

    @property
    def to_healthy_s(self) -> float | None:
        return None if self.t_healthy is None else self.t_healthy - self.t


class Health:
    """Polls the endpoint's /health: who is healthy now, when each rank first came up, kill returns."""

    def __init__(self, http, url: str, serve: Serve, t0: float, period: float = 0.5):
        self.http, self.url, self.serve, self.t0, self.period = http, url, serve, t0, period
        self.healthy: set[str] = set()
        self.ranks = 0
        self.first_up: dict[str, float] = {}       # seconds since the serve was launched
        self.launched = time.monotonic()
        self.kills: list[Kill] = []
        self.errors = 0
        self.polls = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def poll_once(self) -> None:
        try:
            r = await self.http.get(self.url + "/health", timeout=2.0)
            d = r.json()
            self.healthy = set(d.get("healthy") or [])
            self.ranks = int(d.get("ranks") or 0)
        except Exception:  # noqa: BLE001 - the endpoint is starting or busy: no news
            self.errors += 1
            return
        self.polls += 1
        t = time.monotonic()
        for name in self.healthy:
            self.first_up.setdefault(name, t - self.launched)
        if not self.kills:
            return
        pids = None
        for k in self.kills:
            if k.t_healthy is not None:
                continue
            if k.t_down is None:
                if pids is None:
                    pids = {port: p.pid for port, p in (await asyncio.to_thread(self.serve.replicas)).items()}
                if k.rank not in self.healthy or pids.get(k.port, k.pid) != k.pid:
                    k.t_down = self.now()
            if k.t_down is not None and k.rank in self.healthy:
                if pids is None:
                    pids = {port: p.pid for port, p in (await asyncio.to_thread(self.serve.replicas)).items()}
                k.t_healthy = self.now()
                k.new_pid = pids.get(k.port)

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.period)

    def windows(self, t_end: float) -> list[tuple[float, float]]:
        return [(k.t, k.t_healthy if k.t_healthy is not None else t_end) for k in self.kills]


def rank_ports(log: str, ranks: list[str], port_start: int) -> dict[str, int]:
    """Each rank's port, from the serve's startup lines (``  replica0: http://127.0.0.1:PORT ...``);
    ranks it does not name: sorted ranks on port_start, port_start + 1, ..."""
    out = {}
    for m in re.finditer(r"^\s+(\S+): https?://[^\s:/]+:(\d+)", log, re.MULTILINE):
        if m.group(1) in ranks:
            out[m.group(1)] = int(m.group(2))
    for i, name in enumerate(sorted(ranks)):
        out.setdefault(name, port_start + i)
    return out


# -- load ------------------------------------------------------------------------------------------
@dataclass
class Rec:
    i: int
    kind: str                     # completions | chat
    streamed: bool
    max_tokens: int
    t_arrival: float
    t_start: float = 0.0
    t_end: float = 0.0
    ok: bool = False
    error: str = ""
    chunks: int = 0               # chunks with a choice (the usage-only chunk not counted)
    completion_tokens: int | None = None
    finish_reason: str | None = None
    fault: bool = False

    @property
    def exact(self) -> bool:
        return self.ok and self.completion_tokens == self.max_tokens

    @property
    def latency(self) -> float:
        return self.t_end - self.t_start


def plan(args) -> list[Rec]:
    rng = random.Random(args.seed)
    lo, hi = args.max_tokens
    rate = args.requests / args.duration
    t, out = 0.0, []
    for i in range(args.requests):
        t += rng.expovariate(rate)
        streamed = i % 2 == 0
        kind = "completions" if streamed or i % 4 == 1 else "chat"
        out.append(Rec(i, kind, streamed, rng.randint(lo, hi), t))
    return out


async def one(client, model: str, rec: Rec, sem: asyncio.Semaphore, t0: float, timeout: float) -> None:
    prompt = PROMPTS[rec.i % len(PROMPTS)] + f" (request {rec.i})"
    await asyncio.sleep(max(0.0, t0 + rec.t_arrival - time.monotonic()))
    async with sem:
        rec.t_start = time.monotonic() - t0
        try:
            if rec.streamed:
                stream = await client.completions.create(
                    model=model, prompt=prompt, max_tokens=rec.max_tokens, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, timeout=timeout)
                async for c in stream:
                    if c.choices:
                        rec.chunks += 1
                        if c.choices[0].finish_reason:
                            rec.finish_reason = c.choices[0].finish_reason
                    if c.usage is not None:
                        rec.completion_tokens = c.usage.completion_tokens
                rec.ok = rec.finish_reason is not None and rec.completion_tokens is not None
                if not rec.ok:
                    rec.error = f"stream ended without {'a finish_reason' if rec.finish_reason is None else 'usage'}"
            elif rec.kind == "chat":
                r = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=rec.max_tokens,
                    extra_body={"ignore_eos": True}, timeout=timeout)
                rec.chunks = 1
                rec.finish_reason = r.choices[0].finish_reason
                rec.completion_tokens = r.usage.completion_tokens if r.usage else None
                rec.ok = True
            else:
                r = await client.completions.create(model=model, prompt=prompt, max_tokens=rec.max_tokens,
                                                    extra_body={"ignore_eos": True}, timeout=timeout)
                rec.chunks = 1
                rec.finish_reason = r.choices[0].finish_reason
                rec.completion_tokens = r.usage.completion_tokens if r.usage else None
                rec.ok = True
        except asyncio.CancelledError:
            rec.error = CANCELLED
            raise
        except Exception as e:  # noqa: BLE001 - every failure is a figure
            rec.ok = False
            rec.error = f"{type(e).__name__}: {e}"[:300]
        finally:
            rec.t_end = time.monotonic() - t0


async def killer(args, serve: Serve, health: Health, ports: dict[str, int], stop: asyncio.Event) -> None:
    rng = random.Random(args.seed + 1)
    names = sorted(ports)
    n = 0
    while not stop.is_set():
        n += 1
        due = n * args.kill_every
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, due - health.now()))
            return
        except TimeoutError:
            pass
        t_due = health.now()
        while not stop.is_set() and len(health.healthy & set(names)) < len(names) \
                and health.now() - t_due < args.kill_every:
            await asyncio.sleep(0.2)
        if stop.is_set():
            return
        if len(health.healthy & set(names)) < len(names):
            print(f"  [{health.now():6.1f} s] kill {n} skipped: not every rank healthy after waiting "
                  f"{args.kill_every:.0f} s", flush=True)
            continue
        name = rng.choice(names)
        port = ports[name]
        procs = await asyncio.to_thread(serve.replicas)
        p = procs.get(port)
        if p is None:
            print(f"  [{health.now():6.1f} s] kill {n}: no process found for {name} (port {port}); skipped",
                  flush=True)
            continue
        k = Kill(name, port, p.pid, health.now(), waited_s=round(health.now() - t_due, 2), wall=time.time())
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            print(f"  [{k.t:6.1f} s] kill {n}: {name} pid {p.pid} was already gone; skipped", flush=True)
            continue
        health.kills.append(k)
        print(f"  [{k.t:6.1f} s] SIGKILL {name} (port {port}, process group {p.pid})"
              + (f" after waiting {k.waited_s:.1f} s for both ranks" if k.waited_s > 0.5 else ""), flush=True)


async def progress(recs: list[Rec], health: Health, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 10.0)
        except TimeoutError:
            done = [r for r in recs if r.t_end]
            print(f"  [{health.now():6.1f} s] {len(done)}/{len(recs)} done, {sum(not r.ok for r in done)} failed, "
                  f"healthy {sorted(health.healthy)}", flush=True)


# -- metrics ---------------------------------------------------------------------------------------
def metric_sums(text: str) -> dict:
    """nbkit_* series of the endpoint's /metrics: totals per name, and requests by (path, outcome)."""
    out: dict = {"restarts": 0.0, "migrations": 0.0, "healthy_ranks": None, "requests": {}, "found": []}
    for line in text.splitlines():
        m = re.match(r"^(nbkit_[a-zA-Z0-9_:]+)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        name, labels, v = m.group(1), m.group(2) or "", float(m.group(3))
        if name not in out["found"]:
            out["found"].append(name)
        if name == "nbkit_restarts_total":
            out["restarts"] += v
        elif name == "nbkit_migrations_total":
            out["migrations"] += v
        elif name == "nbkit_healthy_ranks":
            out["healthy_ranks"] = v
        elif name == "nbkit_requests_total":
            lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            key = f"{lab.get('path', '?')} {lab.get('outcome', '?')}"
            out["requests"][key] = out["requests"].get(key, 0.0) + v
    return out


# -- the run ---------------------------------------------------------------------------------------
async def run(args, serve: Serve, ports_base: tuple[int, int], model: str, out: dict) -> None:
    import httpx
    from openai import AsyncOpenAI

    port, port_start = ports_base
    url = f"http://127.0.0.1:{port}"
    out["endpoint"] = url
    async with httpx.AsyncClient() as http:
        health = Health(http, url, serve, time.monotonic())
        out["_health"] = health
        t_launch = time.monotonic()
        while True:
            if not serve.alive():
                raise RuntimeError(f"nbkit serve exited with code {serve.proc.returncode}:\n{serve.log_text(3000)}")
            await health.poll_once()
            if len(health.healthy) >= 2:
                break
            if time.monotonic() - t_launch > args.startup_timeout:
                raise RuntimeError(f"/health did not list 2 healthy ranks within {args.startup_timeout:.0f} s "
                                   f"(last: {sorted(health.healthy)}):\n{serve.log_text(3000)}")
            await asyncio.sleep(0.5)
        out["startup_s"] = round(time.monotonic() - t_launch, 1)
        ranks = sorted(health.healthy)
        await asyncio.sleep(1.0)                         # let the startup lines reach the log
        ports = rank_ports(serve.log_text(), ranks, port_start)
        logs_in = re.search(r"\(logs in ([^)]+)\)", serve.log_text())
        out["log_dir"] = Path(logs_in.group(1)) if logs_in else None  # the replicas' own logs
        procs = await asyncio.to_thread(serve.replicas)
        out["ranks"] = {r: {"port": ports[r], "first_start_s": round(health.first_up.get(r, out["startup_s"]), 1),
                            "pid": procs[ports[r]].pid if ports[r] in procs else None} for r in ranks}
        print(f"2 ranks healthy in {out['startup_s']} s: "
              + ", ".join(f"{r} port {v['port']} pid {v['pid']} (up at {v['first_start_s']} s)"
                          for r, v in out["ranks"].items()), flush=True)
        missing = [r for r in ranks if ports[r] not in procs]
        if missing:
            print(f"WARNING: no replica process found for {missing} among the serve's children "
                  f"(ports {sorted(procs)}): kills of them are skipped", flush=True)

        recs = plan(args)
        out["_recs"] = recs
        client = AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=args.request_timeout,
                             http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=args.concurrency * 2,
                                                                               max_keepalive_connections=args.concurrency)))
        sem = asyncio.Semaphore(args.concurrency)
        stop = asyncio.Event()
        health.t0 = time.monotonic()
        poller = asyncio.create_task(health.run())
        kill_task = asyncio.create_task(killer(args, serve, health, ports, stop))
        prog = asyncio.create_task(progress(recs, health, stop))
        print(f"sending {len(recs)} requests over {args.duration:.0f} s, at most {args.concurrency} in flight; "
              f"a kill every {args.kill_every:.0f} s", flush=True)
        try:
            await asyncio.gather(*(one(client, model, r, sem, health.t0, args.request_timeout) for r in recs))
            out["load_s"] = round(health.now(), 1)
            stop.set()
            await kill_task
            # let the last killed replica come back (bounded), so its return is timed
            t_wait = time.monotonic()
            while any(k.t_healthy is None for k in health.kills) and time.monotonic() - t_wait < args.return_wait:
                await asyncio.sleep(0.5)
        finally:
            stop.set()
            for t in (poller, kill_task, prog):
                t.cancel()
            await asyncio.gather(poller, kill_task, prog, return_exceptions=True)
            out["t_end"] = health.now()
            try:
                r = await http.get(url + "/metrics", timeout=5.0)
                out["metrics"] = metric_sums(r.text)
            except Exception as e:  # noqa: BLE001
                out["metrics"] = {"error": repr(e)}
            await client.close()


def p_ms(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(percentile(xs, q) * 1000, 1) if xs else None


_START = re.compile(r"^=== nbkit (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) start ")
_LISTEN = re.compile(r"INFO (\d\d-\d\d \d\d:\d\d:\d\d)\S* \[[^]]*\] Starting vLLM server on")


def restart_breakdown(log_dir: Path | None, rank: str, kill_wall: float, back_s: float | None) -> dict | None:
    """Where a restart's time went, from the replica's own log (nbkit writes a dated line at each
    spawn, vLLM one when its server listens; both to the second): kill -> spawn (nbkit: noticing,
    backoff, stopping what was left), spawn -> listening (vLLM's start), listening -> back in routing."""
    if log_dir is None or not (log_dir / f"{rank}.log").exists():
        return None
    year = time.strftime("%Y", time.localtime(kill_wall))
    spawn = listen = None
    for line in (log_dir / f"{rank}.log").read_text(errors="replace").splitlines():
        m = _START.match(line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
            if spawn is None and t >= kill_wall - 1:
                spawn = t
            continue
        m = _LISTEN.search(line)
        if m and spawn is not None and listen is None:
            t = time.mktime(time.strptime(f"{year}-{m.group(1)}", "%Y-%m-%d %H:%M:%S"))
            if t >= spawn - 1:
                listen = t
    if spawn is None:
        return None
    out = {"kill_to_spawn_s": round(max(0.0, spawn - kill_wall), 1)}
    if listen is not None:
        out["spawn_to_listening_s"] = round(listen - spawn, 1)
        if back_s is not None:
            out["listening_to_routed_s"] = round(max(0.0, kill_wall + back_s - listen), 1)
    return out


def report(args, out: dict) -> tuple[list[str], dict]:
    recs: list[Rec] = out.get("_recs") or []
    health: Health | None = out.get("_health")
    kills = health.kills if health else []
    t_end = out.get("t_end", 0.0)
    windows = health.windows(t_end) if health else []
    cancelled = [r for r in recs if r.error == CANCELLED]
    sent = [r for r in recs if (r.t_start or r.t_end) and r.error != CANCELLED]
    for r in sent:
        r.fault = any(r.t_start <= b and r.t_end >= a for a, b in windows)
    ok = [r for r in sent if r.ok]
    failed = [r for r in sent if not r.ok]
    streams = [r for r in sent if r.streamed]
    nonstream = [r for r in sent if not r.streamed]
    exact = [r for r in streams if r.exact]
    chunks_exact = [r for r in streams if r.ok and r.chunks == r.max_tokens]
    lost = [r for r in nonstream if not r.ok]
    by_kind: dict[str, int] = {}
    for r in failed:
        k = f"{r.kind}{' streamed' if r.streamed else ''}"
        by_kind[k] = by_kind.get(k, 0) + 1
    errors: dict[str, int] = {}
    for r in failed:
        e = re.sub(r"\d+", "N", r.error)[:120]
        errors[e] = errors.get(e, 0) + 1
    m = out.get("metrics") or {}
    ranks = out.get("ranks") or {}
    returns = []
    for k in kills:
        first = ranks.get(k.rank, {}).get("first_start_s")
        limit = None if first is None else first + GOAL_RETURN_SLACK_S
        returns.append({"rank": k.rank, "killed_at_s": round(k.t, 1), "pid": k.pid, "new_pid": k.new_pid,
                        "breakdown": restart_breakdown(out.get("log_dir"), k.rank, k.wall, k.to_healthy_s),
                        "waited_for_both_s": k.waited_s,
                        "left_healthy_after_s": None if k.t_down is None else round(k.t_down - k.t, 1),
                        "to_healthy_s": None if k.to_healthy_s is None else round(k.to_healthy_s, 1),
                        "limit_s": limit, "ok": k.to_healthy_s is not None and limit is not None
                        and k.to_healthy_s <= limit})
    lat_clean = [r.latency for r in ok if not r.fault]
    lat_fault = [r.latency for r in ok if r.fault]
    share = len(exact) / len(streams) if streams else None
    goals = {
        "non_streamed_lost_0": {"value": len(lost), "ok": len(lost) == 0 and bool(nonstream)},
        "streams_exact_ge_99pct": {"value": share, "ok": share is not None and share >= GOAL_STREAMS_EXACT},
        "replicas_back_within_first_start_plus_10s": {
            "value": [x["to_healthy_s"] for x in returns], "ok": bool(returns) and all(x["ok"] for x in returns)},
    }
    summary = {
        "sent": len(sent), "planned": len(recs), "cancelled_in_flight": len(cancelled), "answered": len(ok), "failed": len(failed),
        "failed_by_kind": by_kind, "errors": errors, "non_streamed": len(nonstream), "non_streamed_lost": len(lost),
        "streams": len(streams), "streams_exact_tokens": len(exact),
        "streams_exact_pct": None if share is None else round(100 * share, 2),
        "streams_exact_chunks": len(chunks_exact), "streams_with_fault": sum(r.fault for r in streams),
        "non_streamed_wrong_tokens": sum(1 for r in nonstream if r.ok and r.completion_tokens != r.max_tokens),
        "migrations": m.get("migrations"), "restarts": m.get("restarts"), "endpoint_requests": m.get("requests"),
        "kills": len(kills), "returns": returns,
        "latency_ms": {"no_fault": {"n": len(lat_clean), "p50": p_ms(lat_clean, 50), "p99": p_ms(lat_clean, 99)},
                       "fault": {"n": len(lat_fault), "p50": p_ms(lat_fault, 50), "p99": p_ms(lat_fault, 99)}},
        "goals": goals,
    }

    def yes(b: bool) -> str:
        return "MET" if b else "NOT MET"

    lines = [
        f"requests: {len(sent)} sent of {len(recs)} planned"
        + (f" (and {len(cancelled)} in flight when the run was stopped, not counted)" if cancelled else "")
        + f", {len(ok)} answered, {len(failed)} failed"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(by_kind.items()))})" if by_kind else ""),
        f"non-streamed: {len(nonstream)}, lost {len(lost)}; with a wrong token count "
        + str(summary["non_streamed_wrong_tokens"]),
        f"streams: {len(streams)}, complete with the exact token count {len(exact)}"
        + (f" ({100 * share:.2f} %)" if share is not None else "")
        + f"; exact content-chunk count {len(chunks_exact)}; {summary['streams_with_fault']} overlapped a fault",
        f"endpoint /metrics: migrations {m.get('migrations')}, restarts {m.get('restarts')}, "
        f"healthy ranks {m.get('healthy_ranks')}" + ("" if m.get("found") else f"  ({m.get('error', 'no nbkit_ series')})"),
    ]
    if m.get("requests"):
        lines.append("  nbkit_requests_total: " + ", ".join(f"{k} {v:g}" for k, v in sorted(m["requests"].items())))
    if errors:
        lines.append("errors:")
        lines += [f"  {v:5d} x {e}" for e, v in sorted(errors.items(), key=lambda x: -x[1])[:8]]
    lines.append(f"kills: {len(kills)}; first start " + ", ".join(f"{r} {v['first_start_s']} s" for r, v in ranks.items()))
    for x in returns:
        lines.append(f"  {x['rank']} killed at {x['killed_at_s']:6.1f} s (pid {x['pid']}): left /health after "
                     f"{x['left_healthy_after_s']} s, healthy again after {x['to_healthy_s']} s (limit {x['limit_s']}; "
                     f"new pid {x['new_pid']})" + (f"; kill waited {x['waited_for_both_s']} s" if x["waited_for_both_s"] > 0.5 else ""))
        if x.get("breakdown"):
            b = x["breakdown"]
            lines.append(f"    of which: kill -> spawn {b['kill_to_spawn_s']} s (nbkit: noticed, backoff, remnants "
                         f"stopped); spawn -> vLLM listening {b.get('spawn_to_listening_s', '?')} s; listening -> "
                         f"back in routing {b.get('listening_to_routed_s', '?')} s")
    lat = summary["latency_ms"]
    lines.append(f"latency ms, no fault overlapping: n {lat['no_fault']['n']}, p50 {lat['no_fault']['p50']}, "
                 f"p99 {lat['no_fault']['p99']}; with a fault: n {lat['fault']['n']}, p50 {lat['fault']['p50']}, "
                 f"p99 {lat['fault']['p99']}")
    lines.append("goals:")
    lines.append(f"  0 non-streamed requests lost: {len(lost)} lost -> {yes(goals['non_streamed_lost_0']['ok'])}")
    lines.append(f"  >= 99 % of streams complete with the right token count: "
                 f"{'-' if share is None else f'{100 * share:.2f} %'} -> {yes(goals['streams_exact_ge_99pct']['ok'])}")
    lines.append(f"  each killed replica healthy again within its first start + {GOAL_RETURN_SLACK_S:.0f} s: "
                 f"{[x['to_healthy_s'] for x in returns]} -> "
                 f"{yes(goals['replicas_back_within_first_start_plus_10s']['ok'])}")
    return lines, summary


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path or id (default: the tiny model)")
    ap.add_argument("--engine", default="vllm", choices=["vllm", "sim"], help="sim: `nbkit serve --engine sim`")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for `nbkit serve` (repeat; e.g. --serve-arg=--policy "
                         "--serve-arg=least_load)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds over which the requests arrive")
    ap.add_argument("--concurrency", type=int, default=16, help="most requests in flight")
    ap.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills")
    ap.add_argument("--max-tokens", default="16:64", help="max_tokens drawn uniformly from LO:HI")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds until 2 ranks are healthy")
    ap.add_argument("--return-wait", type=float, default=120.0,
                    help="after the load, wait this long at most for the last killed replica's return")
    ap.add_argument("--hard-timeout", type=float, default=None,
                    help="seconds for the whole run (default: startup + duration + return wait + 300)")
    ap.add_argument("--out-name", default="chaos", help="stem of benchmarks/results/<NAME>.json/.txt")
    args = ap.parse_args(argv)
    lo, _, hi = args.max_tokens.partition(":")
    args.max_tokens = (int(lo), int(hi or lo))
    if args.requests < 1 or args.duration <= 0 or args.concurrency < 1 or args.kill_every <= 0 \
            or not 1 <= args.max_tokens[0] <= args.max_tokens[1]:
        ap.error("--requests, --concurrency >= 1; --duration, --kill-every > 0; --max-tokens 1 <= LO <= HI")
    if args.hard_timeout is None:
        args.hard_timeout = args.startup_timeout + args.duration + args.return_wait + 300.0
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Ctrl-C (even where a shell started this in the background with SIGINT ignored) and SIGTERM
    # both stop the run the same way: the figures so far, then everything this started is stopped
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    info = announce_machine()
    from nbkit.tiny import tiny_model
    model = args.model or str(tiny_model())
    rng = random.Random()
    port = free_block(1, rng)
    port_start = free_block(4, rng)
    while port_start <= port < port_start + 4:
        port_start = free_block(4, rng)
    argv = [sys.executable, "-m", "nbkit.cli", "serve", model, "--num-instances", "2", "--port", str(port),
            "--port-start", str(port_start)] + (["--engine", "sim"] if args.engine == "sim" else []) + args.serve_arg
    log = Path(tempfile.mkdtemp(prefix="nbkit-chaos-")) / "serve.log"
    print(f"$ {' '.join(argv[1:])}\n  (log: {log})", flush=True)
    serve = Serve(argv, log)
    out: dict = {}
    status = 0
    t0 = time.monotonic()
    try:
        asyncio.run(asyncio.wait_for(run(args, serve, (port, port_start), model, out), args.hard_timeout))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: stopping what this benchmark started", file=sys.stderr, flush=True)
        status = 130
    except TimeoutError:
        print(f"\nthe hard timeout ({args.hard_timeout:.0f} s) ran out: stopping; the figures are partial",
              file=sys.stderr, flush=True)
        status = 3
    except Exception as e:  # noqa: BLE001
        print(f"\nerror: {e}", file=sys.stderr, flush=True)
        status = 1
    finally:
        killed = serve.stop()
        for k in killed:
            print(f"WARNING: killed {k}", file=sys.stderr, flush=True)
        out["cleanup_killed"] = killed
    if not out.get("_recs"):
        return status or 1
    lines, summary = report(args, out)
    restarted = re.findall(r"nbkit: (\S+) restarted", serve.log_text())
    info["loadavg_at_end"] = list(os.getloadavg())
    header = (f"chaos, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: engine {args.engine}, {args.requests} requests over "
              f"{args.duration:.0f} s, {args.concurrency} in flight, a kill every {args.kill_every:.0f} s, seed "
              f"{args.seed}; {info['cpu_model']}, {info['cores_usable']} cores, loadavg "
              f"{info['loadavg_at_start'][0]:.1f} -> {info['loadavg_at_end'][0]:.1f}")
    if status:
        lines.insert(0, f"PARTIAL RUN (exit status {status})")
    print("\n" + header + "\n" + "\n".join(lines), flush=True)
    result = {
        "benchmark": "chaos", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
        "setup": {"engine": args.engine, "model": args.model or "nbkit tiny model (random weights)",
                  "serve_argv": argv[1:], "requests": args.requests, "duration_s": args.duration,
                  "concurrency": args.concurrency, "kill_every_s": args.kill_every, "max_tokens": args.max_tokens,
                  "seed": args.seed, "request_timeout_s": args.request_timeout, "client": "openai AsyncOpenAI, "
                  "max_retries=0", "mix": "1/2 streamed completions, 1/4 completions, 1/4 chat; ignore_eos"},
        "status": status, "startup_s": out.get("startup_s"), "ranks": out.get("ranks"),
        "load_s": out.get("load_s"), "elapsed_s": round(time.monotonic() - t0, 1), "summary": summary,
        "serve_log_restarts": restarted, "cleanup_killed": killed,
        "requests": [{**asdict(r), "fault": r.fault} for r in out["_recs"]],
    }
    dest = HERE / "results" / f"{args.out_name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(_finite(result), indent=1) + "\n")
    dest.with_suffix(".txt").write_text(header + "\n" + "\n".join(lines) + "\n")
    print(f"\nwrote {dest} and {dest.with_suffix('.txt')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
