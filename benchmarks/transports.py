"""CPU per exchange of nbkit's three HTTP transports (http1, aiohttp, httpx), whole and streamed.

    .venv/bin/python benchmarks/transports.py [--rounds 5] [--exchanges 1500] [--stream-exchanges 200]
                                              [--concurrency 1,16] [--stream-chunks 16]
                                              [--chunk-interval-ms 1] [--output benchmarks/results/transports.json]

About 3-4.5 minutes with the defaults on a 2-core VM (3.2 at load average 3, 4.5 at 4). Writes
the JSON named by --output and a human-readable .txt next to it (same name), and prints the same
tables.

What runs (all on 127.0.0.1): one process of benchmarks/mock_backend.py (uvicorn + starlette)
that answers ``POST /v1/completions`` at once, either a small JSON body (non-streamed) or, when
the body says ``"stream": true``, ``text/event-stream`` with --stream-chunks SSE ``data:`` chunks
then ``data: [DONE]``, each its own body chunk, --chunk-interval-ms apart (so each chunk reaches
the client as its own read, as a replica's tokens do; 0 sends them back to back and lets reads
coalesce, which flatters whichever client is slower). In this process, on one uvloop loop
(``nbkit.loop.new_loop()``, as nbkit uses), each transport is made with
``nbkit.http.transport.make_transport(name, timeout=30)`` and driven exactly as nbkit's Forwarder
drives it: ``resp = await t.send("POST", url, content=body, headers=...)``, then
``await resp.aread()`` (non-streamed) or ``async for chunk in resp.aiter_bytes()`` to the end
(streamed), then ``await resp.aclose()``.

Load generator (the same for every transport and for the baseline): a closed loop of C workers
(--concurrency, one case per value) on that loop, each doing one exchange after another until the
round's --exchanges (--stream-exchanges for streamed cases) are done. Cases: non-streamed and
streamed, for each C. Each case runs --rounds rounds; in each round every transport (and the
baseline) gets a warm-up (not measured; it also reopens keep-alive connections the server closed
while the others ran) and then its measured exchanges, in an order rotated each round, so drift
on a shared machine (another process's load) spreads over all of them.

Figures, per case and transport:
  cpu ms/ex    the primary figure: CPU seconds of this whole process (``time.process_time()``,
               all threads, user + system) during the measured exchanges / exchanges. This is what
               the transport costs a router; being CPU time, not wall time, it is not inflated by
               waiting for a CPU that another process holds (contention still costs a little via
               caches, so rounds are interleaved and the median is reported, with every round).
  ratio        median over rounds of (transport's cpu ms/ex / http1's in the same round).
  above raw    cpu ms/ex minus the baseline's: what the transport costs above the minimum.
  raw          the baseline: the same load generator over pre-opened keep-alive sockets with a
               bare ``asyncio.Protocol``: write the pre-encoded request bytes, wake the worker on
               each read, stop at the end of the response (content-length reached, or the
               chunked terminator). It is the floor every transport pays (syscalls, loop
               wake-ups, the worker's own bookkeeping); it parses nothing and is not a client.
  ex/s         wall exchanges per second (median over rounds); secondary, contended by the
               backend (a core of its own at best) and anything else on the machine.
  p50/p99 ms   wall latency of one exchange (send to aclose), over all measured rounds; secondary.
  reads/ex     items the caller got per exchange (aiter_bytes items; 1 for aread; for raw, socket
               reads). http1 and httpx yield one item per HTTP chunk (17 = 16 + [DONE]) however the
               bytes arrived; aiohttp's iter_any joins chunks that arrived together, so fewer items
               (fewer wake-ups) when the client falls behind, as at concurrency 16.
  backend ms   CPU of the backend process per exchange: a check that every transport asked about
               the same of it (no connection churn). httpx's is higher: it writes a request's head
               and body in two writes (two reads for the server), and at concurrency 16 it is slow
               enough that the backend batches less.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil

from nbkit.http.transport import make_transport
from nbkit.loop import new_loop

TRANSPORTS = ("http1", "aiohttp", "httpx")
BASELINE = "raw"
PATH = "/v1/completions"
HEADERS = {"content-type": "application/json"}
DONE = b"data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------------
# backend

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_backend(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(HERE / "mock_backend.py"), "--host", "127.0.0.1",
                             "--port", str(port), "--parent-pid", str(os.getpid())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mock backend exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    stop_backend(proc)
    raise RuntimeError("mock backend did not answer /health within 60 s")


def stop_backend(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------
# the baseline: a bare protocol on pre-opened keep-alive sockets

class _RawConn(asyncio.Protocol):
    def __init__(self):
        self.transport = None
        self.chunks: list[bytes] = []
        self.waiter: asyncio.Future | None = None
        self.lost = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.chunks.append(data)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def connection_lost(self, exc):
        self.lost = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class RawBaseline:
    """Not a client: the least any transport must do for one exchange (write, one wake-up per read)."""

    name = BASELINE

    def __init__(self, port: int, body: bytes, stream: bool):
        self.port, self.stream = port, stream
        self.request = (f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
                        f"content-length: {len(body)}\r\n\r\n").encode() + body
        self.idle: list[_RawConn] = []

    async def _get(self) -> _RawConn:
        while self.idle:
            c = self.idle.pop()
            if not c.lost:
                return c
        _, c = await asyncio.get_running_loop().create_connection(_RawConn, "127.0.0.1", self.port)
        return c

    async def exchange(self) -> tuple[int, int, bool]:
        """-> (reads, body bytes incl. framing, ok)"""
        c = await self._get()
        loop = asyncio.get_running_loop()
        c.transport.write(self.request)
        buf = b""
        reads = 0
        end = -1                      # index of the body's end, once known (non-streamed)
        while True:
            if not c.chunks:
                if c.lost:
                    raise ConnectionError("server closed the connection")
                c.waiter = loop.create_future()
                await c.waiter
                c.waiter = None
                continue
            buf += b"".join(c.chunks) if len(c.chunks) > 1 else c.chunks[0]
            c.chunks.clear()
            reads += 1
            if self.stream:
                if buf.endswith(b"\r\n0\r\n\r\n"):
                    break
            else:
                if end < 0:
                    h = buf.find(b"\r\n\r\n")
                    if h >= 0:
                        i = buf.find(b"content-length: ", 0, h)
                        end = h + 4 + int(buf[i + 16:buf.find(b"\r\n", i)])
                if 0 <= end <= len(buf):
                    break
        self.idle.append(c)
        ok = buf.startswith(b"HTTP/1.1 200") and (DONE in buf[-40:] if self.stream else True)
        return reads, len(buf), ok

    async def aclose(self):
        for c in self.idle:
            if c.transport is not None:
                c.transport.close()
        self.idle.clear()


class TransportRunner:
    """One nbkit transport, driven as the Forwarder drives it."""

    def __init__(self, name: str, url: str, body: bytes, stream: bool):
        self.name, self.url, self.body, self.stream = name, url, body, stream
        self.t = make_transport(name, timeout=30)

    async def exchange(self) -> tuple[int, int, bool]:
        resp = await self.t.send("POST", self.url, content=self.body, headers=HEADERS)
        if self.stream:
            reads = size = 0
            last = b""
            async for chunk in resp.aiter_bytes():
                reads += 1
                size += len(chunk)
                last = chunk
            ok = last.endswith(DONE)
        else:
            data = await resp.aread()
            reads, size, ok = 1, len(data), data.startswith(b"{")
        await resp.aclose()
        return reads, size, ok and resp.status_code == 200

    async def aclose(self):
        await self.t.aclose()


# ------------------------------------------------------------------------------------------------
# load generator

async def run_load(runner, n: int, concurrency: int, lat: list[float] | None, tolerate_errors: bool):
    """n exchanges over ``concurrency`` closed-loop workers -> (reads, errors)."""
    left = n
    reads = 0
    errors = 0
    perf = time.perf_counter
    errs = tuple(getattr(getattr(runner, "t", None), "errors", ())) + (ConnectionError,)

    async def worker():
        nonlocal left, reads, errors
        while left > 0:
            left -= 1
            t0 = perf()
            try:
                r, _, ok = await runner.exchange()
            except errs:
                if not tolerate_errors:
                    raise
                errors += 1
                continue
            if lat is not None:
                lat.append(perf() - t0)
            reads += r
            if not ok:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return reads, errors


def _backend_cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


async def measure(runner, n: int, concurrency: int, backend: psutil.Process) -> dict:
    lat: list[float] = []
    gc.collect()
    b0 = _backend_cpu(backend)
    w0 = time.perf_counter()
    c0 = time.process_time()
    reads, errors = await run_load(runner, n, concurrency, lat, tolerate_errors=False)
    c1 = time.process_time()
    w1 = time.perf_counter()
    b1 = _backend_cpu(backend)
    return {"cpu_ms": (c1 - c0) * 1e3 / n, "ex_per_s": n / (w1 - w0), "backend_cpu_ms": (b1 - b0) * 1e3 / n,
            "reads_per_ex": reads / n, "errors": errors, "lat": lat}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def run_case(port: int, stream: bool, chunks: int, interval_ms: float, concurrency: int,
                   exchanges: int, rounds: int, names: list[str], backend: psutil.Process, log) -> dict:
    body_d = {"model": "m", "prompt": "hi", "max_tokens": chunks if stream else 1}
    if stream:
        body_d.update(stream=True, chunk_interval_ms=interval_ms)
    body = json.dumps(body_d).encode()
    url = f"http://127.0.0.1:{port}{PATH}"
    runners = {n: (RawBaseline(port, body, stream) if n == BASELINE else TransportRunner(n, url, body, stream))
               for n in names}
    warm = max(4 * concurrency, min(200, exchanges // 10))
    per: dict[str, list[dict]] = {n: [] for n in names}
    try:
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                await run_load(runners[n], warm, concurrency, None, tolerate_errors=True)
                per[n].append(await measure(runners[n], exchanges, concurrency, backend))
            log(f"    round {r + 1}/{rounds}: " + "  ".join(f"{n} {per[n][-1]['cpu_ms']:.3f}" for n in names)
                + " cpu ms/ex")
    finally:
        for x in runners.values():
            await x.aclose()
    ref = "http1" if "http1" in names else names[0]
    base = per.get(BASELINE)
    out = {}
    for n in names:
        rs = per[n]
        cpu = [x["cpu_ms"] for x in rs]
        lat = [v for x in rs for v in x["lat"]]
        d = {
            "cpu_ms_per_exchange": {"median": statistics.median(cpu), "rounds": cpu},
            "ratio_vs_http1": {"median": statistics.median(a["cpu_ms"] / b["cpu_ms"] for a, b in zip(rs, per[ref])),
                               "rounds": [a["cpu_ms"] / b["cpu_ms"] for a, b in zip(rs, per[ref])]},
            "exchanges_per_s": {"median": statistics.median(x["ex_per_s"] for x in rs),
                                "rounds": [x["ex_per_s"] for x in rs]},
            "latency_ms": {"p50": _pct(lat, 0.50) * 1e3, "p99": _pct(lat, 0.99) * 1e3},
            "reads_per_exchange": statistics.mean(x["reads_per_ex"] for x in rs),
            "backend_cpu_ms_per_exchange": statistics.median(x["backend_cpu_ms"] for x in rs),
            "errors": sum(x["errors"] for x in rs),
        }
        if base is not None:
            above = [a["cpu_ms"] - b["cpu_ms"] for a, b in zip(rs, base)]
            d["above_raw_ms"] = {"median": statistics.median(above), "rounds": above}
        out[n] = d
    if base is not None and "http1" in out:
        h = out["http1"]["above_raw_ms"]["median"]
        for n in names:
            if n != BASELINE:
                out[n]["above_raw_ratio_vs_http1"] = out[n]["above_raw_ms"]["median"] / h if h > 0 else None
    return {"stream": stream, "chunks": chunks if stream else 0, "chunk_interval_ms": interval_ms if stream else 0,
            "concurrency": concurrency, "exchanges_per_round": exchanges, "warmup_per_round": warm,
            "results": out}


# ------------------------------------------------------------------------------------------------
# report

def case_title(c: dict) -> str:
    kind = (f"streamed, {c['chunks']} SSE chunks + [DONE], {c['chunk_interval_ms']:g} ms apart"
            if c["stream"] else "non-streamed (small JSON body, read whole)")
    return f"{kind}; concurrency {c['concurrency']}; {c['exchanges_per_round']} exchanges/round"


def table(c: dict) -> str:
    res = c["results"]
    lines = [case_title(c),
             (f"  {'transport':<9} {'cpu ms/ex':>9} {'ratio':>6} {'above raw':>9} {'(ratio)':>7} "
              f"{'ex/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'reads/ex':>8} {'backend':>7}   cpu ms/ex each round")]
    for n, d in res.items():
        ab = d.get("above_raw_ms", {}).get("median")
        abr = d.get("above_raw_ratio_vs_http1")
        lines.append(
            f"  {n:<9} {d['cpu_ms_per_exchange']['median']:>9.3f} {d['ratio_vs_http1']['median']:>6.2f} "
            f"{'' if ab is None or n == BASELINE else f'{ab:.3f}':>9} {'' if abr is None else f'{abr:.2f}':>7} "
            f"{d['exchanges_per_s']['median']:>7.0f} {d['latency_ms']['p50']:>7.2f} {d['latency_ms']['p99']:>7.2f} "
            f"{d['reads_per_exchange']:>8.1f} {d['backend_cpu_ms_per_exchange']:>7.3f}   "
            + " ".join(f"{x:.3f}" for x in d["cpu_ms_per_exchange"]["rounds"])
            + (f"  ERRORS {d['errors']}" if d["errors"] else ""))
    return "\n".join(lines)


LEGEND = """\
cpu ms/ex: CPU of this process (time.process_time) per exchange, median over rounds (each round at the right)
ratio:     median over rounds of cpu ms/ex / http1's in the same round
above raw: cpu ms/ex minus the raw baseline's (bare asyncio.Protocol on pre-opened sockets: the floor);
           (ratio): that excess / http1's excess
ex/s, p50/p99 ms: wall figures, secondary (the backend and other processes share the CPUs)
reads/ex:  chunks handed to the caller per exchange; backend: the backend process's CPU ms per exchange"""


def summary(cases: list[dict]) -> str:
    """One line per case: each transport's CPU ratio to http1, and of its excess over raw."""
    names = [n for n in cases[0]["results"] if n != BASELINE] if cases else []
    lines = ["summary: cpu per exchange relative to http1 (in brackets: excess over raw relative to http1's excess)",
             f"  {'case':<36}" + "".join(f"{n:>26}" for n in names)]
    for c in cases:
        label = (f"streamed {c['chunks']} chunks" if c["stream"] else "non-streamed") + f", concurrency {c['concurrency']}"
        cells = []
        for n in names:
            d = c["results"][n]
            r = d["ratio_vs_http1"]["median"]
            a = d.get("above_raw_ratio_vs_http1")
            ms = d["cpu_ms_per_exchange"]["median"]
            cells.append(f"{ms:.3f} ms {r:5.2f}x" + (f" ({a:5.1f}x)" if a is not None else " " * 9))
        lines.append(f"  {label:<36}" + "".join(f"{x:>26}" for x in cells))
    return "\n".join(lines)


def versions() -> dict:
    out = {}
    for m in ("aiohttp", "httpx", "httpcore", "h11", "httptools", "uvloop", "uvicorn", "starlette", "multidict"):
        try:
            out[m] = metadata.version(m)
        except metadata.PackageNotFoundError:
            out[m] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--exchanges", type=int, default=1500, help="per round per transport, non-streamed cases")
    ap.add_argument("--stream-exchanges", type=int, default=200,
                    help="per round per transport, streamed cases (each lasts ~17 chunk intervals)")
    ap.add_argument("--concurrency", default="1,16", help="comma-separated worker counts, one case each")
    ap.add_argument("--stream-chunks", type=int, default=16, help="SSE data chunks per streamed exchange; 0: no streamed cases")
    ap.add_argument("--chunk-interval-ms", type=float, default=1.0, help="gap the backend leaves between SSE chunks")
    ap.add_argument("--transports", default=",".join((BASELINE,) + TRANSPORTS))
    ap.add_argument("--output", default=str(HERE / "results" / "transports.json"))
    args = ap.parse_args()
    conc = [int(x) for x in args.concurrency.split(",") if x.strip()]
    names = [x.strip() for x in args.transports.split(",") if x.strip()]
    for n in names:
        if n not in (BASELINE,) + TRANSPORTS:
            ap.error(f"--transports: unknown {n!r}")
    stream_ex = args.stream_exchanges
    out_json = Path(args.output)
    out_txt = out_json.with_suffix(".txt")

    def log(msg):
        print(msg, flush=True)

    port = free_port()
    proc = start_backend(port)
    backend = psutil.Process(proc.pid)
    started = time.time()
    load0 = os.getloadavg()
    loop = new_loop()
    cases = []
    try:
        plan = [(False, c) for c in conc] + ([(True, c) for c in conc] if args.stream_chunks > 0 else [])
        for stream, c in plan:
            log(f"case: {'streamed' if stream else 'non-streamed'}, concurrency {c}")
            cases.append(loop.run_until_complete(run_case(
                port, stream, args.stream_chunks, args.chunk_interval_ms, c,
                stream_ex if stream else args.exchanges, args.rounds, names, backend, log)))
            log(table(cases[-1]))
    finally:
        loop.close()
        stop_backend(proc)
    elapsed = time.time() - started
    load1 = os.getloadavg()

    machine = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
               "processor": platform.processor() or platform.machine(), "loop": type(loop).__module__,
               "loadavg_start": load0, "loadavg_end": load1, "versions": versions()}
    cmd = " ".join([".venv/bin/python", "benchmarks/transports.py"] + sys.argv[1:])
    doc = {
        "benchmark": "benchmarks/transports.py", "command": cmd,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)), "elapsed_s": round(elapsed, 1),
        "machine": machine,
        "settings": {"rounds": args.rounds, "exchanges": args.exchanges, "stream_exchanges": stream_ex,
                     "concurrency": conc, "stream_chunks": args.stream_chunks,
                     "chunk_interval_ms": args.chunk_interval_ms, "transports": names,
                     "make_transport": "make_transport(name, timeout=30)",
                     "backend": "benchmarks/mock_backend.py (uvicorn + starlette), one process"},
        "method": [
            ("cpu_ms_per_exchange: time.process_time() delta of this process over the measured exchanges / "
             "exchanges (all threads, user+system); median and each round"),
            "rounds interleave the transports in an order rotated each round; each has a warm-up first",
            "ratio_vs_http1: median over rounds of the per-round ratio to http1",
            ("raw: bare asyncio.Protocol over pre-opened keep-alive sockets, one wake-up per read, no parsing: "
             "the floor of the load generator; above_raw_ms = transport - raw"),
            "exchanges_per_s and latency_ms are wall figures (secondary); latency over all measured rounds",
        ],
        "cases": [{k: v for k, v in c.items()} for c in cases],
    }
    for c in doc["cases"]:
        c["title"] = case_title(c)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1) + "\n")
    v = machine["versions"]
    head = (f"benchmarks/transports.py, {doc['date']}, {elapsed:.0f} s\ncommand: {cmd}\n"
            f"machine: {machine['cpu_count']} CPUs, Python {machine['python']}, {machine['loop']} loop, "
            f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end\n"
            f"versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x) + "\n"
            f"settings: {args.rounds} rounds; {args.exchanges} non-streamed / {stream_ex} streamed exchanges "
            f"per round per transport; concurrency {conc}; backend: benchmarks/mock_backend.py\n")
    text = (head + "\n" + LEGEND + "\n\n" + "\n\n".join(table(c) for c in cases) + "\n\n"
            + summary(cases) + "\n")
    out_txt.write_text(text)
    log("\n" + summary(cases))
    log(f"\nwrote {out_json} and {out_txt}")


if __name__ == "__main__":
    main()
