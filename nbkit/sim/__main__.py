"""``python -m nbkit.sim``: simulate a trace on a cluster config, calibrate a profile, or serve a
live simulated replica.

    python -m nbkit.sim --cluster-config cluster.json --dtype float16 --block-size 16 \\
        --dataset trace.jsonl --output out.csv --request-routing-policy LOAD --log-interval 1.0
    python -m nbkit.sim calibrate --csv real.csv --cluster-config cpu.json --output cpu-fitted.json
    python -m nbkit.sim run ... --hardware-profile cpu-fitted.json      # use the fitted profile
    python -m nbkit.sim calibration-trace --output calib.jsonl          # a trace that calibrates well
    python -m nbkit.sim serve --port 8100 --model-spec tiny --hardware cpu   # = python -m nbkit.sim.server

The per-request CSV is written as requests finish (finish order, constant memory); its ``itl``
column stays empty unless ``--token-detail`` (nothing per token is kept otherwise).

``--request-routing-policy`` takes any name of :mod:`nbkit.policies` (``LOAD``, ``RR``, ``RAND``,
``least_outstanding``, ``power_of_two``, ``prefix_affinity``, ``session``) or ``CUSTOM`` with
``--custom-policy module:function`` (or ``path/to/file.py:function``), a function
``fn(candidates, request)`` of :class:`~nbkit.policies.CustomPolicy`. ``main(argv)`` returns the
exit status (2 for a bad config, trace or flag, with the reason on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "load_custom_policy"]


def load_custom_policy(spec: str):
    """``module:function`` or ``path/to/file.py:function`` -> the function."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"--custom-policy {spec!r}: expected module:function or file.py:function")
    if mod_name.endswith(".py") or os.path.sep in mod_name:
        path = Path(mod_name).expanduser()
        if not path.exists():
            raise ValueError(f"--custom-policy {spec!r}: no file {str(path)!r}")
        s = importlib.util.spec_from_file_location(f"_nbkit_custom_{path.stem}", path)
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"--custom-policy {spec!r}: cannot import {mod_name!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--custom-policy {spec!r}: {mod_name} has no callable {fn_name!r}")
    return fn


def _option(text: str) -> tuple[str, object]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value")
    try:
        return k, json.loads(v)
    except ValueError:
        return k, v


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster-config", required=True, help="cluster config JSON (seed format)")
    p.add_argument("--dtype", default="float16", help="float16 | bfloat16 | float32 | fp8 (bytes per value)")
    p.add_argument("--block-size", type=int, default=None,
                   help="KV block size in tokens where the config sets none (default: 16 on GPUs, 128 on cpu)")
    p.add_argument("--hardware-profile", action="append", default=[], metavar="FILE",
                   help="profile JSON (e.g. from calibrate) replacing the shipped profile of the same name; "
                        "repeatable")


def build_parser() -> argparse.ArgumentParser:
    from nbkit.policies.autoscale import AutoscaleSpec
    ap = argparse.ArgumentParser(prog="nbkit sim", description=__doc__.splitlines()[0])
    _add_common(ap)
    ap.add_argument("--dataset", "--trace", dest="dataset", required=True, help="JSONL trace (nbkit.traces)")
    ap.add_argument("--output", default=None, help="per-request CSV to write")
    ap.add_argument("--time-unit", choices=["s", "ns"], default="s",
                    help="CSV time columns in seconds (*_s, the benchmark's) or integer nanoseconds (*_ns)")
    ap.add_argument("--token-detail", action="store_true",
                    help="write each request's inter-token list in the CSV's itl column (default: empty; "
                         "the summary's ITL figures are the same either way)")
    ap.add_argument("--request-routing-policy", default="LOAD",
                    help="routing policy name (LOAD, RR, RAND, CUSTOM, or any nbkit.policies name)")
    ap.add_argument("--custom-policy", default=None, metavar="MODULE:FUNCTION",
                    help="the function for CUSTOM: fn(candidates, request) -> index | RankLoad | Choice")
    ap.add_argument("--policy-option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                    help="policy option, e.g. tokens_per_waiting=128 (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the policy's random choices")
    ap.add_argument("--log-interval", type=float, default=None,
                    help="print an [INFO] line every this many simulated seconds")
    ap.add_argument("--autoscale", type=AutoscaleSpec.argument, default=None, metavar="min=1,max=16,ttft_p90_ms=500",
                    help="copy the config's one instance up to max times and let nbkit's SLO autoscaler decide "
                         "how many serve (any AutoscaleSpec field, e.g. cold_start_s=60, window_s=30)")
    ap.add_argument("--tenants", default=None, metavar="FILE",
                    help="tenants TOML (nbkit serve's): weights, priorities and rate limits, applied by the "
                         "router's admission on simulated time to the trace's tenant/priority fields")
    ap.add_argument("--max-per-rank", type=int, default=None,
                    help="router slots per instance: requests beyond wait in the fair admission queue")
    ap.add_argument("--max-concurrency", type=int, default=None, help="router slots over all instances")
    ap.add_argument("--interactive-headroom", type=int, default=0,
                    help="slots per instance beyond --max-per-rank that only interactive requests may use")
    ap.add_argument("--summary-json", default=None, help="write the summary as JSON here")
    ap.add_argument("--quiet", action="store_true", help="no summary on stdout")
    return ap


def build_calibrate_parser() -> argparse.ArgumentParser:
    from nbkit.sim.hardware import DEFAULT_FIT, FITTABLE
    ap = argparse.ArgumentParser(prog="nbkit sim calibrate",
                                 description="fit a hardware profile to a real run's per-request CSV")
    _add_common(ap)
    ap.add_argument("--csv", required=True, help="per-request CSV of the real run (*_s or *_ns columns)")
    ap.add_argument("--dataset", "--trace", dest="dataset", default=None,
                    help="the trace that ran (default: rebuilt from the CSV's arrivals and token counts)")
    ap.add_argument("--output", required=True, help="profile JSON to write")
    ap.add_argument("--params", default=",".join(DEFAULT_FIT), help=f"comma-separated, among {', '.join(FITTABLE)}")
    ap.add_argument("--method", default="auto", choices=["auto", "linear", "nelder-mead"])
    ap.add_argument("--max-evals", type=int, default=40)
    ap.add_argument("--name", default=None, help="name of the saved profile (default: the hardware's)")
    ap.add_argument("--keep-held", action="store_true",
                    help="compare requests whose first tokens arrived in one burst too (default: left out "
                         "of the means, their TTFT is a stall on the measuring side)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="a bar of the simulations run and the best loss so far (default: on a terminal)")
    return ap


def build_trace_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nbkit sim calibration-trace",
                                 description="write a bursty trace that calibrates well")
    ap.add_argument("--output", required=True)
    ap.add_argument("--bursts", default="1,4,16,64,128", help="burst sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gap-s", type=float, default=20.0)
    ap.add_argument("--prompt", default="16,512", help="min,max prompt tokens")
    ap.add_argument("--output-tokens", default="8,64", help="min,max output tokens")
    ap.add_argument("--singles", type=int, default=16, help="lone requests before the bursts")
    ap.add_argument("--single-gap-s", type=float, default=2.0, help="seconds between the lone requests")
    ap.add_argument("--singles-between", action="store_true",
                    help="spread the lone requests over the run, some before each burst (a drifting machine)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def _profiles(paths):
    from nbkit.sim.hardware import load_profile
    out = {}
    for p in paths:
        prof = load_profile(p)
        out[prof.name] = prof
    return out


def _run(argv: list[str]) -> int:
    from nbkit.traces import iter_trace, read_trace
    from nbkit.sim.config import load_cluster_config
    from nbkit.sim.simulator import Simulator, TraceOrderError

    args = build_parser().parse_args(argv)
    if args.log_interval is not None and args.log_interval <= 0:
        raise ValueError(f"--log-interval {args.log_interval}: must be > 0")
    cfg = load_cluster_config(args.cluster_config)
    tenants = None
    if args.tenants:                # a bad file or field fails before the run
        from nbkit.policies.tenants import Tenants
        tenants = Tenants.load(args.tenants)
    from nbkit.policies.slots import check_slots
    check_slots(max_per_rank=args.max_per_rank, max_concurrency=args.max_concurrency,
                interactive_headroom=args.interactive_headroom)
    name = args.request_routing_policy
    options = dict(args.policy_option)
    if name.strip().lower() == "custom" or args.custom_policy:
        if not args.custom_policy:
            raise ValueError("--request-routing-policy CUSTOM needs --custom-policy module:function")
        policy = load_custom_policy(args.custom_policy)
    else:
        from nbkit.policies import get_policy
        get_policy(name, **options)  # a bad name or option fails before the run
        policy = name
    from nbkit.records import CsvWriter

    def run(trace):
        nonlocal writer
        sim = Simulator(cfg, policy=policy, policy_options=options, dtype=args.dtype, block_size=args.block_size,
                        hardware=_profiles(args.hardware_profile), seed=args.seed, log_interval=args.log_interval,
                        autoscale=args.autoscale, tenants=tenants, max_per_rank=args.max_per_rank,
                        max_concurrency=args.max_concurrency, interactive_headroom=args.interactive_headroom)
        writer = None
        if args.output:             # rows stream to the file as requests finish
            writer = CsvWriter(args.output, time_unit=args.time_unit, token_detail=args.token_detail)
        try:
            return sim.run(trace, rows=writer.write if writer else None, token_detail=args.token_detail,
                           keep_records=False)
        finally:
            if writer is not None:
                writer.close()
    writer = None
    try:                            # the trace read as the run goes (a file in arrival order, the usual case)
        res = run(iter_trace(args.dataset))
    except TraceOrderError:         # not in order: load and sort it, and run again
        res = run(read_trace(args.dataset))
    summary = res.summary()
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if not args.quiet:
        print(res.format_summary())
        if args.output:
            print(f"wrote {writer.rows} rows to {args.output}")
    return 0


def _calibrate(argv: list[str]) -> int:
    from nbkit.records import read_csv
    from nbkit.sim.calibrate import calibrate

    args = build_calibrate_parser().parse_args(argv)
    params = [p.strip() for p in args.params.split(",") if p.strip()]
    fit = calibrate(read_csv(args.csv), args.cluster_config, trace=args.dataset, params=params, dtype=args.dtype,
                    block_size=args.block_size, hardware=_profiles(args.hardware_profile), method=args.method,
                    max_evals=args.max_evals, name=args.name, drop_held=not args.keep_held,
                    progress=sys.stderr.isatty() if args.progress is None else args.progress)
    fit.save(args.output)
    print(fit.report())
    print(f"wrote {args.output}")
    return 0


def _calibration_trace(argv: list[str]) -> int:
    from nbkit.traces import write_trace
    from nbkit.sim.fidelity import calibration_trace

    args = build_trace_parser().parse_args(argv)

    def pair(s, flag):
        try:
            a, b = (int(x) for x in s.split(","))
        except ValueError:
            raise ValueError(f"{flag} {s!r}: expected min,max") from None
        return a, b
    bursts = [int(x) for x in args.bursts.split(",") if x.strip()]
    items = calibration_trace(bursts, args.repeats, pair(args.prompt, "--prompt"),
                              pair(args.output_tokens, "--output-tokens"), args.gap_s, args.seed,
                              singles=args.singles, single_gap_s=args.single_gap_s,
                              singles_between=args.singles_between)
    write_trace(args.output, items)
    print(f"wrote {len(items)} requests ({args.singles} alone, then {len(bursts) * args.repeats} bursts) "
          f"to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``[run] ...``, ``calibrate ...``, ``calibration-trace ...``, ``serve ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from nbkit.traces import TraceError
    from nbkit.sim.config import SimConfigError
    from nbkit.sim.hardware import UnknownHardwareError

    cmd = argv[0] if argv and not argv[0].startswith("-") else "run"
    rest = argv[1:] if argv and argv[0] == cmd else argv
    try:
        if cmd == "run":
            return _run(rest)
        if cmd == "calibrate":
            return _calibrate(rest)
        if cmd == "calibration-trace":
            return _calibration_trace(rest)
        if cmd == "serve":
            from nbkit.sim.server import main as serve_main
            return serve_main(rest)
        print(f"nbkit sim: unknown command {cmd!r} (run, calibrate, calibration-trace, serve)", file=sys.stderr)
        return 2
    except (SimConfigError, TraceError, UnknownHardwareError, ValueError, TypeError, OSError) as e:
        print(f"nbkit sim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
