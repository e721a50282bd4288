"""The model behind a live simulated vLLM replica (:mod:`nbkit.sim.server` serves it over HTTP):
the engines of one server (one per data-parallel rank), driven in real time, their requests'
token streams, and vLLM's /metrics series::

    import asyncio
    from nbkit.sim.replica import SimReplica
    replica = SimReplica.from_args(["--model-spec", "tiny", "--hardware", "cpu"])   # vllm serve's flags

    async def main():
        await replica.start()                       # one driver task per engine
        s = replica.submit(replica.tokens.completion("Hello there"), max_tokens=4)
        async for n in replica.token_counts(s):     # tokens as the engine makes them, batch by batch
            print(n)
        print(replica.metrics_text().decode()[:200])
        await replica.stop()

    asyncio.run(main())

A request reaches its engine the profile's ``request_overhead_s`` after :meth:`SimReplica.submit`
(HTTP and tokenization) and its tokens 2..n come ``decode_overhead_s`` later than the engine makes
them. The command line (:func:`build_parser`) is ``vllm serve``'s, plus the simulator's own flags
(``--model-spec``, ``--hardware``, ``--speed``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from nbkit.sim.config import InstanceSetup, load_cluster_config, resolve_instances
from nbkit.sim.engine import Engine
from nbkit.sim.hardware import get_hardware, load_profile
from nbkit.sim.kv_publish import parse_kv_events_config
from nbkit.sim.models import UnknownModelError, get_model_spec
from nbkit.sim.request import DONE, Req
from nbkit.sim.tokens import Tokens

__all__ = ["SimReplica", "TokenStream", "build_parser"]


class TokenStream:
    """One request's token feed from the engine to the HTTP handler (:meth:`SimReplica.submit`)."""

    __slots__ = ("req", "engine", "queue", "sent", "t_arrival", "t_first", "t_last", "done", "prompt", "admitted")

    def __init__(self, engine: int, prompt: int):
        self.engine = engine
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sent = 0
        self.t_arrival = time.monotonic()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.done = False
        self.prompt = prompt
        self.req: Req | None = None
        self.admitted = True


class SimReplica:
    """The engines of one simulated server and their real-time drivers."""

    def __init__(self, setups: list[InstanceSetup], model_name: str, *, tokenizer: str | None = None,
                 speed: float = 1.0, max_model_len: int | None = None, default_max_tokens: int = 256,
                 kv_events: dict | str | None = None):
        if speed <= 0:
            raise ValueError(f"speed={speed!r}: must be > 0")
        self.setups = setups
        self.engines = [Engine(s) for s in setups]
        for e in self.engines:
            e.collect = True
        self.model_name = model_name
        self.tokens = Tokens(tokenizer)
        #: vLLM's ``--kv-events-config`` (parsed; None: no KV-cache events), published from start()
        self.kv_events = parse_kv_events_config(kv_events) if kv_events else None
        self.kv_publishers: list = []               # one per engine (DP rank) while started
        self._kv_pending: list[list[dict]] = [[] for _ in self.engines]
        self.speed = speed
        self._api_free: dict[int, float] = {}   # per engine: simulated time its API server is free (api_serial_s)
        s0 = setups[0]
        cap = s0.num_blocks * s0.block_size
        self.max_model_len = min(max_model_len or s0.model.max_position_embeddings, cap)
        self.default_max_tokens = default_max_tokens
        self.t0 = time.monotonic()
        self.created = int(time.time())
        self._wake: list[asyncio.Event] = []
        self._tasks: list[asyncio.Task] = []
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        reg = self.registry = CollectorRegistry()
        lab = ["model_name", "engine"]
        self.m_running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                               lab, registry=reg)
        self.m_waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                               lab, registry=reg)
        self.m_kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lab,
                          registry=reg)
        self.m_prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lab, registry=reg)
        self.m_gen = Counter("vllm:generation_tokens", "Number of generation tokens processed.", lab,
                             registry=reg)
        self.m_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                 [*lab, "finished_reason"], registry=reg)
        self.m_pq = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried "
                            "tokens.", lab, registry=reg)
        self.m_ph = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                            lab, registry=reg)
        self.m_preempt = Counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                                 lab, registry=reg)
        buckets = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
        self.h_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in "
                                "seconds.", lab, buckets=buckets, registry=reg)
        self.h_itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                               lab, buckets=buckets, registry=reg)
        self.h_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in "
                               "seconds.", lab, buckets=buckets, registry=reg)
        self._seen = [(0, 0, 0) for _ in self.engines]   # prefix queries, hits, preemptions exported

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "SimReplica":
        args, _ = build_parser().parse_known_args(argv or [])
        return cls._from_namespace(args)

    @classmethod
    def _from_namespace(cls, args) -> "SimReplica":
        model = args.model or args.model_pos or "tiny"
        spec_name = args.model_spec or model
        try:
            get_model_spec(spec_name)
        except UnknownModelError:
            if args.model_spec:
                raise
            spec_name = "tiny"
        hw = load_profile(args.hardware_profile) if args.hardware_profile else get_hardware(args.hardware)
        kv = args.kv_cache_gb
        if kv is None and hw.kv_cache_gb is not None and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv = float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 2**30 / 1e9
        inst: dict[str, Any] = {
            "model_name": model, "model_spec": spec_name, "hardware": hw.name, "tp_size": args.tensor_parallel_size,
            "npu_mem": {"mem_size": args.mem_size_gb or hw.mem_size_gb, "mem_bw": hw.mem_bw_gbs, "mem_latency": 0},
            "enable_prefix_caching": args.enable_prefix_caching,
            "gpu_memory_utilization": args.gpu_memory_utilization, "scheduling_policy": args.scheduling_policy}
        # unset: vLLM's defaults for the hardware (the config resolves them)
        if args.max_num_seqs:
            inst["max_num_seqs"] = args.max_num_seqs
        if args.max_num_batched_tokens:
            inst["max_num_batched_tokens"] = args.max_num_batched_tokens
        if args.block_size:
            inst["block_size"] = args.block_size
        if kv is not None:
            inst["kv_cache_gb"] = kv
        n = args.data_parallel_size
        cfg = load_cluster_config({"num_nodes": 1, "link_bw": 16, "link_latency": 20000,
                                   "nodes": [{"num_instances": n, "instances": [dict(inst) for _ in range(n)]}]})
        setups = resolve_instances(cfg, dtype=args.dtype if args.dtype != "auto" else "bfloat16",
                                   hardware={hw.name: hw})
        setups = [replace(s, key=str(i)) for i, s in enumerate(setups)]
        tok = args.tokenizer
        if tok is None:
            for folder in (Path(model).expanduser(), ):
                if (folder / "tokenizer.json").is_file():
                    tok = str(folder / "tokenizer.json")
            if tok is None and spec_name == "tiny":
                from nbkit.tiny import default_path
                cand = default_path() / "tokenizer.json"
                if cand.is_file():
                    tok = str(cand)
        name = args.served_model_name or model
        return cls(setups, name, tokenizer=tok, speed=args.speed, max_model_len=args.max_model_len,
                   default_max_tokens=args.default_max_tokens, kv_events=args.kv_events_config)

    # -- clock and drivers ---------------------------------------------------------------------------
    def now(self) -> float:
        """Simulated seconds since start (wall seconds times ``speed``)."""
        return (time.monotonic() - self.t0) * self.speed

    async def start(self) -> None:
        if self.kv_events is not None and not self.kv_publishers:
            self._start_kv_events()
        self._wake = [asyncio.Event() for _ in self.engines]
        self._tasks = [asyncio.create_task(self._drive(k)) for k in range(len(self.engines))]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks = []
        self._stop_kv_events()

    # -- KV-cache events -----------------------------------------------------------------------------
    def _start_kv_events(self) -> None:
        """One publisher per engine (DP rank ``k`` on the endpoints' ports + ``k``, as vLLM); each
        engine's events are gathered during a step and published as one batch after it."""
        from nbkit.sim.kv_publish import KVEventPublisher
        try:
            for k in range(len(self.engines)):
                self.kv_publishers.append(KVEventPublisher(self.kv_events, data_parallel_rank=k))
        except BaseException:
            self._stop_kv_events()
            raise
        for k, e in enumerate(self.engines):
            e.kv_events = self._kv_pending[k].extend

    def _stop_kv_events(self) -> None:
        for k, e in enumerate(self.engines):
            self._flush_kv(k)
            e.kv_events = None
        pubs, self.kv_publishers = self.kv_publishers, []
        for p in pubs:
            p.shutdown()

    def _flush_kv(self, k: int) -> None:
        pending = self._kv_pending[k]
        if pending and k < len(self.kv_publishers):
            self.kv_publishers[k].publish(list(pending))
        pending.clear()

    async def _drive(self, k: int) -> None:
        e = self.engines[k]
        wake = self._wake[k]
        while True:
            if not e.has_work():
                wake.clear()
                await wake.wait()
                continue
            t = self.now()
            dt = e.schedule(t)
            if dt is None:          # nothing can run until something is freed or arrives
                self._flush_kv(k)
                wake.clear()
                await wake.wait()
                continue
            batch = e.last_batch
            await asyncio.sleep(dt / self.speed)
            t_end = max(t + dt, self.now())
            e.finish_step(t_end)
            self._flush_kv(k)       # one batch per step, as vLLM publishes
            self._emit(k, e, batch)

    def _emit(self, k: int, e: Engine, batch: list[Req]) -> None:
        wall = time.monotonic()
        lab = (self.model_name, str(k))
        gen = 0
        for r in batch:
            s: TokenStream = r.data
            if s is None or s.done:
                continue
            have = e.generated_now(r)
            new = have - s.sent
            if new > 0:
                if s.t_first is None:
                    s.t_first = wall
                    self.h_ttft.labels(*lab).observe(wall - s.t_arrival)
                    self.m_prompt.labels(*lab).inc(s.prompt)
                elif s.t_last is not None:
                    self.h_itl.labels(*lab).observe(wall - s.t_last)
                s.t_last = wall
                s.sent = have
                gen += new
                s.queue.put_nowait(new)
            if r.state == DONE:
                s.done = True
                self.h_e2e.labels(*lab).observe(wall - s.t_arrival)
                self.m_success.labels(*lab, "length").inc()
                s.queue.put_nowait(None)
        if gen:
            self.m_gen.labels(*lab).inc(gen)

    # -- requests ------------------------------------------------------------------------------------
    def pick_engine(self, header: str | None) -> int:
        n = len(self.engines)
        if header is not None:
            try:
                k = int(header)
            except ValueError:
                raise ValueError(f"X-data-parallel-rank={header!r}: not an integer") from None
            if not 0 <= k < n:
                raise ValueError(f"X-data-parallel-rank={k}: out of range 0..{n - 1}")
            return k
        # vLLM's internal DP balancing: waiting * 4 + running
        return min(range(n), key=lambda i: (len(self.engines[i].waiting) * 4 + len(self.engines[i].running), i))

    def submit(self, ids: list[int], max_tokens: int, engine: int = 0, priority: int = 0) -> TokenStream:
        """Queue a request of prompt token ``ids``; tokens arrive on the returned stream's queue
        (counts, then ``None`` at the end). ``priority``: vLLM's (lower first), which only a replica
        started with ``--scheduling-policy priority`` takes, as vLLM does. Raises ValueError if it
        cannot fit, or for a priority the replica does not schedule by."""
        if priority and not self.engines[engine].by_priority:
            raise ValueError(f"Got priority {priority} but Priority scheduling is not enabled.")
        n_in = len(ids)
        if n_in + max_tokens > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {n_in + max_tokens} tokens ({n_in} in the messages, {max_tokens} in "
                             f"the completion). Please reduce the length of the messages or completion.")
        e = self.engines[engine]
        s = TokenStream(engine, n_in)
        r = Req(uuid.uuid4().hex, n_in, max_tokens, ids=tuple(ids), data=s, priority=priority)
        s.req = r
        if not e.fits(n_in, max_tokens):
            e.rejected += 1
            raise ValueError(f"request of {n_in} + {max_tokens} tokens does not fit this replica's KV cache")
        now = self.now()
        at, self._api_free[engine] = e.setup.hw.admission(now, self._api_free.get(engine, 0.0))
        delay = (at - now) / self.speed
        loop = None
        if delay > 0 and self._wake:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        s.admitted = False      # until it reaches the engine (abort() before that only marks it done)
        if loop is not None:    # the hardware's fixed per-request latency (HTTP, tokenization)
            loop.call_later(delay, self._admit, s)
        else:
            self._admit(s)
        return s

    def _admit(self, s: TokenStream) -> None:
        if s.done or s.admitted:
            return
        s.admitted = True
        self.engines[s.engine].add(s.req, self.now())
        if self._wake:
            self._wake[s.engine].set()

    async def token_counts(self, s: TokenStream):
        """The stream's new tokens, batch by batch, until it ends; tokens 2..n come the profile's
        ``decode_overhead_s`` later than the engine makes them."""
        late = self.engines[s.engine].setup.hw.decode_overhead_s / self.speed
        first = True
        while True:
            n = await s.queue.get()
            if n is None:
                return
            if not first and late > 0:
                await asyncio.sleep(late)
                late = 0.0
            first = False
            yield n

    def abort(self, s: TokenStream) -> None:
        if not s.admitted:          # still in its request overhead: never reached the engine
            s.done = True
            return
        if s.req is not None and not s.done:
            self.engines[s.engine].abort(s.req)
            self._flush_kv(s.engine)
            s.done = True
            if self._wake:
                self._wake[s.engine].set()

    def metrics_text(self) -> bytes:
        from prometheus_client import generate_latest
        for k, e in enumerate(self.engines):
            lab = (self.model_name, str(k))
            self.m_running.labels(*lab).set(len(e.running))
            self.m_waiting.labels(*lab).set(len(e.waiting))
            self.m_kv.labels(*lab).set(e.kv_usage())
            q, h, p = self._seen[k]
            if e.prefix_queries > q:
                self.m_pq.labels(*lab).inc(e.prefix_queries - q)
            if e.prefix_hits > h:
                self.m_ph.labels(*lab).inc(e.prefix_hits - h)
            if e.preemptions > p:
                self.m_preempt.labels(*lab).inc(e.preemptions - p)
            # make sure every series exists from the first scrape on
            self.m_pq.labels(*lab)
            self.m_ph.labels(*lab)
            self.m_prompt.labels(*lab)
            self.m_gen.labels(*lab)
            self._seen[k] = (e.prefix_queries, e.prefix_hits, e.preemptions)
        return generate_latest(self.registry)


def build_parser() -> argparse.ArgumentParser:
    """``python -m nbkit.sim.server``'s command line: ``vllm serve``'s flags and the simulator's."""
    ap = argparse.ArgumentParser(prog="python -m nbkit.sim.server",
                                 description="A live simulated vLLM replica: an OpenAI-compatible server "
                                             "paced by the simulator's engine.")
    ap.add_argument("cmd", nargs="?", choices=["serve"], help="optional, as in `vllm serve MODEL`")
    ap.add_argument("model_pos", nargs="?", default=None, metavar="MODEL")
    ap.add_argument("--model", default=None, help="model name or path (served as this name)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--model-spec", default=None,
                    help="shape for the performance model: tiny, a shipped name, or a config.json path "
                         "(default: from --model, else tiny)")
    ap.add_argument("--hardware", default="cpu", help="hardware profile name (cpu, H100, ...)")
    ap.add_argument("--hardware-profile", default=None, help="profile JSON (e.g. from calibrate)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--tensor-parallel-size", "--tp", "-tp", type=int, default=1)
    ap.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache per device, GB")
    ap.add_argument("--mem-size-gb", type=float, default=None, help="device memory (default: the profile's)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                    help="as vLLM's: priority serves waiting requests by their body's priority (lower first)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer.json for prompt token counts")
    ap.add_argument("--default-max-tokens", type=int, default=256, help="chat answers without max_tokens")
    ap.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second")
    ap.add_argument("--startup-s", type=float, default=0.0, help="wait this long before listening (like a "
                                                                  "model load)")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    ap.add_argument("--replicas", type=int, default=1,
                    help="serve this many independent replicas from one process, on ports PORT, PORT+1, ... "
                         "(router load tests at 32+ replicas)")
    ap.add_argument("--log-level", default="warning")
    ap.add_argument("--kv-events-config", default=None,
                    help="vLLM's KV-cache events config (JSON: enable_kv_cache_events, publisher zmq, endpoint, "
                         "topic, replay_endpoint, ...): each engine publishes BlockStored/BlockRemoved as vLLM does")
    # vLLM flags a launcher passes that take a value: accepted and ignored (the data-parallel
    # ranks of every node are all served by the process without --headless)
    for flag in ("--data-parallel-size-local", "--data-parallel-start-rank", "--data-parallel-address",
                 "--data-parallel-rpc-port", "--kv-transfer-config", "--seed", "--swap-space",
                 "--distributed-executor-backend", "--uvicorn-log-level", "--api-key", "--chat-template",
                 "--generation-config", "--trust-remote-code-revision"):
        ap.add_argument(flag, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--headless", action="store_true",
                    help="a DP node without an API server: idles (the head process simulates every rank)")
    return ap
