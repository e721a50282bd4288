"""``nbkit`` command line: ``tiny-model``, ``serve``, ``demo``, ``bench``, ``sim``.

    nbkit tiny-model ~/models/tiny
    nbkit serve ~/models/tiny --num-instances 2 --port-start 8100 -- --max-num-seqs 64
    nbkit demo --requests 300
    nbkit bench --url http://127.0.0.1:8000 --workload shared-prefix --request-rate 6 --output results.csv
    nbkit sim --cluster-config cluster.json --dataset trace.jsonl --output out.csv --request-routing-policy LOAD
    nbkit sim calibrate --csv real.csv --cluster-config cpu.json --output fitted.json
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        k = argv.index("--")
        return argv[:k], argv[k + 1:]
    return argv, []


def _port(text: str) -> int:
    """argparse type: a TCP port a server can listen on (so a bad --port fails before anything starts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nbkit", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("tiny-model", help="build the tiny random-weight Llama (cached)")
    t.add_argument("path", nargs="?", default=None, help="target folder (default: ~/.cache/nbkit/tiny-llama)")
    t.add_argument("--force", action="store_true", help="rebuild even if present")

    s = sub.add_parser("serve", help="start N replicas and keep them up until SIGINT/SIGTERM",
                       epilog="Everything after -- goes to every `vllm serve` verbatim.")
    s.add_argument("model", nargs="?", default=None, help="model path or id (default: the tiny model on CPU)")
    s.add_argument("--num-instances", "-n", type=int, default=1)
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel size of each instance")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    s.add_argument("--port", type=_port, default=8000,
                   help="with one instance the replica serves here; with more, the routed "
                        "OpenAI-compatible endpoint, and the replicas use --port-start")
    s.add_argument("--port-start", type=_port, default=None, help="first port of the replicas (default: port+1)")
    s.add_argument("--host", default="127.0.0.1", help="address of the endpoint and replicas")
    s.add_argument("--policy", default="least_load", help="routing policy of the endpoint (N > 1): a name, or name:option=value,... "
                        "(e.g. prefix_affinity:affinity_weight=0.5)")
    s.add_argument("--enable-request-affinity", action="store_true",
                   help="sticky routing: requests with the same X-Session-Id header or `user` field go to "
                        "the same instance (policy 'session', least_load for requests without a key)")
    s.add_argument("--kv-cache-gib", type=int, default=1, help="CPU: VLLM_CPU_KVCACHE_SPACE per instance")
    s.add_argument("--startup-timeout", type=float, default=600.0)
    s.add_argument("--restart", default="on-failure", choices=["on-failure", "never"],
                   help="a replica that exits or stops answering is restarted on its port and pinning (default), "
                        "or left failed; either way the endpoint keeps serving on the others")
    s.add_argument("--max-restarts", type=int, default=5,
                   help="restarts per replica within --restart-window, then it stays failed (default 5)")
    s.add_argument("--restart-window", type=float, default=600.0, help="seconds (default 600)")
    s.add_argument("--engine", default="vllm", choices=["vllm", "sim"],
                   help="vllm, or sim: simulated replicas (nbkit.sim.server; no vLLM, for rehearsals)")
    s.add_argument("--max-per-rank", type=int, default=None,
                   help="the endpoint admits at most this many requests per rank; more wait in its FIFO queue")
    s.add_argument("--max-queue", type=int, default=None,
                   help="requests the admission queue may hold; beyond it the endpoint answers 429 + Retry-After")
    s.add_argument("--queue-timeout", type=float, default=None,
                   help="seconds a request may wait for admission; then 503 + Retry-After")
    s.add_argument("--migration-limit", type=int, default=3,
                   help="times one stream may move to another replica when its own dies (0: never)")
    s.add_argument("--log-interval", type=float, default=None,
                   help="print a load line per interval, e.g. '[INFO] step=20 inst0_batch=6 ... decode_t=820 tok/s'")

    d = sub.add_parser("demo", help="replicas up, routed load, per-replica summary, clean stop")
    d.add_argument("--instances", "-n", type=int, default=2)
    d.add_argument("--requests", type=int, default=300)
    d.add_argument("--concurrency", type=int, default=32)
    d.add_argument("--max-tokens", type=int, default=32)
    d.add_argument("--model", default=None)

    from nbkit.bench.cli import add_parser as add_bench_parser
    add_bench_parser(sub)
    sub.add_parser("sim", add_help=False, help="the simulator: run | calibrate | calibration-trace | serve "
                                               "(`nbkit sim --help`; same as python -m nbkit.sim)")
    return ap


def _serve(args, passthrough: list[str]) -> int:
    from nbkit.cluster.cluster import Cluster

    n = args.num_instances
    spec_kwargs = dict(tp=args.tp, device=args.device, host=args.host, extra_args=tuple(passthrough),
                       kv_cache_gib=args.kv_cache_gib)
    if args.engine == "sim":
        spec_kwargs["engine"] = "sim"
    if n == 1:
        spec_kwargs["port"] = args.port
    port_start = args.port_start if args.port_start is not None else args.port + 1
    from nbkit.policies import get_policy
    policy = "session" if args.enable_request_affinity else args.policy
    get_policy(policy)  # fail on a bad name before launching anything
    endpoint_options = dict(max_per_rank=args.max_per_rank, max_queue=args.max_queue,
                            queue_timeout=args.queue_timeout, migration_limit=args.migration_limit)
    from nbkit.routing.router import check_admission
    check_admission(max_per_rank=args.max_per_rank, max_queue=args.max_queue, queue_timeout=args.queue_timeout)
    if args.migration_limit < 0:
        raise ValueError(f"--migration-limit {args.migration_limit}: must be >= 0")
    if n > 1:
        from nbkit.http.ports import port_is_free
        if not port_is_free(args.host, args.port):
            raise ValueError(f"port={args.port!r}: already in use on {args.host}")
    cluster = Cluster.replicas(args.model, n=n, port_start=port_start, startup_timeout=args.startup_timeout,
                               log_interval=args.log_interval, restart=args.restart, max_restarts=args.max_restarts,
                               restart_window=args.restart_window, **spec_kwargs)
    stop = threading.Event()
    endpoint = None

    def on_signal(signum, _frame):
        stop.set()

    def on_fault(event: str, i: int, detail: str) -> None:
        name = cluster.plans[i].name
        if event == "exited":
            todo = "restarting" if args.restart == "on-failure" else "not restarted (--restart never)"
            print(f"nbkit: {name} {detail}; {todo}; serving on the others", file=sys.stderr, flush=True)
        elif event == "restarted":
            print(f"nbkit: {name} restarted (pid {detail}, restart {cluster.restarts_of(i)})", flush=True)
        elif event == "failed":
            print(f"nbkit: {name} stays failed: {detail}\n{cluster.logs(i)}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t = time.perf_counter()
    print(f"nbkit: starting {n} instance(s) of {cluster.model} (logs in {cluster.run_dir})", flush=True)
    try:
        cluster.start()
        cluster.add_fault_listener(on_fault)
        print(f"nbkit: {n} instance(s) healthy in {time.perf_counter() - t:.1f} s", flush=True)
        for st in cluster.status(probe=False):
            print(f"  {st.name}: {st.url}  {st.pinning}  pid {st.pid}", flush=True)
        if n > 1:
            endpoint = cluster.endpoint(port=args.port, host=args.host, policy=policy, **endpoint_options)
            print(f"nbkit: endpoint {endpoint.url} (OpenAI-compatible, policy {policy}) over {n} instances",
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sim":  # the simulator parses its own command line
        from nbkit.sim.__main__ import main as sim_main
        return sim_main(argv[1:])
    own, passthrough = _split_passthrough(argv)
    args = build_parser().parse_args(own)
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
            return 0
        if args.cmd == "serve":
            return _serve(args, passthrough)
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
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
