"""Placement and validation: replica specs in, launch plans (argv, env, pinning, port) out.

Everything here is a pure function of its inputs (the inventory of devices and a "is this port
free" probe can be passed in), so GPU layouts are planned and tested on a machine without GPUs::

    from nbkit.cluster.spec import Inventory, GPU, ReplicaSpec
    from nbkit.cluster.placement import plan_replicas
    inv = Inventory(cores=tuple(range(16)), gpus=tuple(GPU(i, "H100", 80.0) for i in range(8)))
    plans = plan_replicas([ReplicaSpec(model="m", tp_size=2)] * 4, inv)
    plans[3].env["CUDA_VISIBLE_DEVICES"]        # '6,7'

The pinning rules are in :mod:`nbkit.cluster.spec`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Sequence

from nbkit.cluster.spec import (DEFAULT_PORT_START, MAX_GPU_MEMORY_TOTAL, MIN_GPU_MEMORY_UTILIZATION,
                                SHARED_GPU_BUDGET, CPU_RUNTIME_GIB, DeviceKind, Inventory, LaunchPlan, ReplicaSpec,
                                SpecError, check_model, discover, resolve_device)
from nbkit.cluster.lora import check_lora, lora_args, lora_env
from nbkit.cluster.metrics_filter import MIDDLEWARE as METRICS_MIDDLEWARE
from nbkit.http.ports import port_is_free


def _ranges(ids: Sequence[int]) -> str:
    """[0,1,2,5] -> '0-2,5' (the format VLLM_CPU_OMP_THREADS_BIND takes)."""
    out, ids = [], sorted(ids)
    start = prev = ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def cpu_bind(cores: Sequence[int], ranks: int) -> str:
    """Split ``cores`` evenly over ``ranks`` (TP x local DP) as ``VLLM_CPU_OMP_THREADS_BIND``.

    >>> cpu_bind([0, 1], 2), cpu_bind([0, 1, 2, 3], 2), cpu_bind([4, 5, 6], 1)
    ('0|1', '0-1|2-3', '4-6')
    """
    if len(cores) < ranks:
        raise ValueError(f"{len(cores)} cores cannot hold {ranks} ranks")
    per = len(cores) // ranks
    cores = sorted(cores)
    return "|".join(_ranges(cores[r * per:(r + 1) * per]) for r in range(ranks))


def _flag_given(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def build_argv(spec: ReplicaSpec, device: DeviceKind, port: int, *, python: str = sys.executable,
               gpu_memory_utilization: float | None = None, kv_events: dict | None = None) -> tuple[str, ...]:
    """The ``vllm serve`` command line of one process (no shell involved); for ``engine="sim"`` the
    same command line served by :mod:`nbkit.sim.server`."""
    entry = "nbkit.sim.server" if spec.engine == "sim" else "nbkit.cluster.vllm_entry"
    argv = [python, "-m", entry, "serve", spec.model]
    extra = list(spec.extra_args)
    if spec.engine == "sim":
        argv += ["--hardware", spec.sim_hardware, "--parent-pid", str(os.getpid())]
    if not spec.headless:
        argv += ["--host", spec.host, "--port", str(port)]
    if spec.tp_size > 1:
        argv += ["--tensor-parallel-size", str(spec.tp_size)]
    if spec.dp_size > 1:
        argv += ["--data-parallel-size", str(spec.dp_size)]
        if spec.ranks_local != spec.dp_size:
            argv += ["--data-parallel-size-local", str(spec.ranks_local)]
        if spec.dp_start_rank:
            argv += ["--data-parallel-start-rank", str(spec.dp_start_rank)]
        if spec.dp_address:
            argv += ["--data-parallel-address", spec.dp_address]
        if spec.dp_rpc_port:
            argv += ["--data-parallel-rpc-port", str(spec.dp_rpc_port)]
        if spec.headless:
            argv += ["--headless"]
    if spec.max_model_len is not None and not _flag_given(extra, "--max-model-len"):
        argv += ["--max-model-len", str(spec.max_model_len)]
    if device == "cpu":
        if not _flag_given(extra, "--dtype"):
            argv += ["--dtype", "bfloat16"]
        if not _flag_given(extra, "--enforce-eager"):
            argv += ["--enforce-eager"]
        if _runs_in_engine_core(spec):
            argv += ["--distributed-executor-backend", "uni"]
        if _forks(spec) and spec.dp_size > 1 and not spec.headless and not _flag_given(extra, "--api-server-count"):
            argv += ["--api-server-count", "1"]  # vLLM's default: one per DP rank, each importing vLLM again
    if gpu_memory_utilization is not None and not _flag_given(extra, "--gpu-memory-utilization"):
        argv += ["--gpu-memory-utilization", f"{gpu_memory_utilization:g}"]
    if kv_events is not None:
        argv += ["--kv-events-config", json.dumps(kv_events, separators=(",", ":"))]
    if spec.engine != "sim" and not spec.headless:  # /metrics?name[]= renders only those series
        argv += ["--middleware", METRICS_MIDDLEWARE]      # (nbkit.cluster.metrics_filter)
    if not spec.headless:
        argv += lora_args(spec)  # --enable-lora --lora-modules name=path ... (nbkit.cluster.lora)
    return tuple(argv + extra)


def _forks(spec: ReplicaSpec) -> bool:
    """A CPU vLLM process that forks its engine cores and workers instead of spawning them."""
    return spec.fast_start and spec.engine == "vllm"


def _runs_in_engine_core(spec: ReplicaSpec) -> bool:
    """A CPU process with one local rank (TP 1; a replica or one node of a DP group) whose model runs
    in its engine-core process (see :func:`cpu_env`)."""
    return _forks(spec) and spec.workers == 1 and not _flag_given(spec.extra_args, "--distributed-executor-backend")


def cpu_env(spec: ReplicaSpec, cores: Sequence[int]) -> dict[str, str]:
    """The environment that pins a CPU replica to ``cores``.

    vLLM-CPU's default spawns an engine-core process per DP rank and a worker process per TP rank,
    each importing vLLM (~15 s apiece on a busy 2-core machine), and pins each worker's OpenMP
    threads. With ``fast_start`` :mod:`nbkit.cluster.vllm_entry` forks them instead
    (``NBKIT_FORK_ENGINE``), so vLLM is imported once, and pins each forked worker to its cores;
    a one-rank replica also runs its model inside the engine core (uni executor), with OpenMP pinned
    the way vLLM's multiprocessing executor pins its worker (``OMP_PLACES``, ``OMP_PROC_BIND``).
    Measured on 2 cores: 2 replicas up in 27-32 s instead of 57-64 s and 2-3x the tokens/s; a TP-2
    replica up in 30 s instead of 67 s and a DP-2 group in 54-60 s instead of 109-111 s, at the same
    tokens/s.

    >>> cpu_env(ReplicaSpec(model="m"), [1])["OMP_PLACES"]
    '{1}'
    >>> cpu_env(ReplicaSpec(model="m", tp_size=2), [0, 1])["NBKIT_FORK_ENGINE"]
    '1'
    """
    env = {"VLLM_CPU_OMP_THREADS_BIND": cpu_bind(cores, spec.workers), "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib),
           "VLLM_TARGET_DEVICE": "cpu"}
    if _forks(spec):
        env["NBKIT_FORK_ENGINE"] = "1"
    if _runs_in_engine_core(spec):
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=str(len(cores)),
                   OMP_PLACES="{" + ",".join(map(str, sorted(cores))) + "}", OMP_PROC_BIND="true")
    return env


def _base_env(spec: ReplicaSpec) -> dict[str, str]:
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    if os.path.isdir(os.path.expanduser(spec.model)):
        env["HF_HUB_OFFLINE"] = "1"
    if spec.dp_size > 1 and spec.dp_address in (None, "127.0.0.1", "localhost"):
        env["VLLM_HOST_IP"] = "127.0.0.1"
    return env


def plan_replicas(
    specs: Sequence[ReplicaSpec],
    inventory: Inventory | None = None,
    *,
    port_start: int = DEFAULT_PORT_START,
    port_free: Callable[[str, int], bool] = port_is_free,
    check_models: bool = True,
    python: str = sys.executable,
    kv_events_port: int | None = None,
    kv_replay_ports: dict[int, int] | None = None,
) -> list[LaunchPlan]:
    """Validate ``specs`` together and pin each to devices/cores and a port.

    ``kv_events_port``: where the router's SUB socket listens on 127.0.0.1 (DP rank ``d`` of a
    replica publishes to the port + ``d``, as vLLM offsets it). Each vLLM replica that publishes
    (``kv_events``, not headless, no ``--kv-events-config`` of its own) gets its own topic (its
    name) and a replay endpoint on a free port (see :func:`kv_events_config`); ``kv_replay_ports``
    keeps the ones of replicas that run already (``{index: port}``).

    Raises :class:`SpecError` naming ``replicas[i].<field>`` and the value on the first problem.
    """
    if not specs:
        raise SpecError("replicas", [], "at least one replica is needed")
    inventory = inventory if inventory is not None else discover()
    kinds = ["sim" if s.engine == "sim" else resolve_device(s.device, inventory, f"replicas[{i}].device")
             for i, s in enumerate(specs)]
    for i, s in enumerate(specs):
        if s.engine == "sim":
            _check_sim(s, i)
    for i, (s, k) in enumerate(zip(specs, kinds)):
        if k == "cpu" and s.devices is not None:
            raise SpecError(f"replicas[{i}].devices", list(s.devices),
                            "GPU ids given, but this replica runs on CPU (no GPU visible, or device='cpu'); use cores=")
        if k == "gpu" and s.cores is not None:
            raise SpecError(f"replicas[{i}].cores", list(s.cores), "cores are for CPU replicas; this one runs on GPU")
    if check_models:
        for i, s in enumerate(specs):
            if s.engine != "sim":
                check_model(s.model, f"replicas[{i}].model")
    for i, s in enumerate(specs):
        check_lora(s, i, files=check_models)

    assigned: dict[int, tuple[int, ...]] = {}
    gpu_idx = [i for i, k in enumerate(kinds) if k == "gpu"]
    cpu_idx = [i for i, k in enumerate(kinds) if k == "cpu"]
    if gpu_idx:
        assigned.update(_place_gpus([specs[i] for i in gpu_idx], gpu_idx, inventory))
    if cpu_idx:
        assigned.update(_place_cores([specs[i] for i in cpu_idx], cpu_idx, inventory))
    mem_util = _gpu_memory_split(specs, gpu_idx, assigned) if gpu_idx else {}
    if cpu_idx and inventory.memory_gib:
        need = sum(specs[i].kv_cache_gib + CPU_RUNTIME_GIB * specs[i].ranks_local for i in cpu_idx)
        if need > inventory.memory_gib:
            i = cpu_idx[-1]
            raise SpecError(f"replicas[{i}].kv_cache_gib", specs[i].kv_cache_gib,
                            f"{len(cpu_idx)} CPU replicas need ~{need:.0f} GiB (KV cache + ~{CPU_RUNTIME_GIB:g} GiB "
                            f"runtime each), the machine has {inventory.memory_gib:.0f} GiB")

    kept = {q for i, p0 in (kv_replay_ports or {}).items() if i < len(specs)
            for q in range(p0, p0 + specs[i].ranks_local)}
    ports = _assign_ports(specs, port_start, port_free, kept)
    replay = _assign_replay_ports(specs, kinds, ports, kv_events_port, port_free, kv_replay_ports or {}) \
        if kv_events_port else {}
    plans = []
    for i, s in enumerate(specs):
        kind = kinds[i]
        env = _base_env(s)
        if kind == "gpu":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, assigned[i]))
        elif kind == "sim":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(s.kv_cache_gib)  # the cpu profile's KV cache, as in vLLM-CPU
        else:
            env.update(cpu_env(s, assigned[i]))
        env.update(lora_env(s))  # VLLM_ALLOW_RUNTIME_LORA_UPDATING: /v1/load_lora_adapter
        env.update(s.env)
        name = s.name or f"replica{i}"
        kv = kv_events_config(kv_events_port, name, replay[i]) if i in replay else None
        plans.append(LaunchPlan(
            index=i, name=name, argv=build_argv(s, kind, ports[i], python=python, gpu_memory_utilization=mem_util.get(i),
                                                kv_events=kv),
            kv_topic=name if kv else None, kv_replay_port=replay.get(i),
            env=env, device=kind, host=s.host, port=ports[i], model=s.model, tp_size=s.tp_size,
            dp_size=s.dp_size,
            dp_ranks=tuple(range(s.dp_start_rank, s.dp_start_rank + s.ranks_local)), headless=s.headless,
            role=s.role, devices=assigned[i] if kind == "gpu" else (),
            cores=assigned[i] if kind == "cpu" else (), gpu_memory_utilization=mem_util.get(i), spec=s,
            preload=kind == "cpu" and _forks(s),
        ))
    return plans


def _check_sim(s: ReplicaSpec, i: int) -> None:
    """A simulated replica needs a model shape and a hardware profile the simulator knows."""
    from nbkit.sim.hardware import UnknownHardwareError, get_hardware
    from nbkit.sim.models import UnknownModelError, get_model_spec
    try:
        get_model_spec(s.model)
    except (UnknownModelError, ValueError, OSError) as e:
        raise SpecError(f"replicas[{i}].model", s.model, f"engine='sim' needs a known model shape: {e}") from None
    try:
        get_hardware(s.sim_hardware)
    except (UnknownHardwareError, ValueError, OSError) as e:
        raise SpecError(f"replicas[{i}].sim_hardware", s.sim_hardware, str(e)) from None
    if s.devices is not None or s.cores is not None:
        raise SpecError(f"replicas[{i}].{'devices' if s.devices is not None else 'cores'}",
                        list(s.devices or s.cores), "a simulated replica (engine='sim') is not pinned")


def _check_given(s: ReplicaSpec, i: int, field: str, have: set[int], unavailable: str, *, exact: bool) -> None:
    """An explicit pinning (``devices`` or ``cores``): every id is there, and there are enough of
    them for the replica's ranks (GPUs: exactly one per rank; cores: at least one per rank)."""
    given = getattr(s, field)
    unit = "GPU" if field == "devices" else "core"
    missing = [d for d in given if d not in have]
    if missing:
        raise SpecError(f"replicas[{i}].{field}", list(given), f"{unit} {missing} {unavailable}")
    if len(given) != s.workers if exact else len(given) < s.workers:
        raise SpecError(f"replicas[{i}].{field}", list(given), f"tp_size={s.tp_size} x dp_size_local={s.ranks_local} "
                        f"needs {'' if exact else 'at least '}{s.workers} {unit}s")


def _place_gpus(specs, idx, inv: Inventory) -> dict[int, tuple[int, ...]]:
    have = set(inv.gpu_indices)
    out: dict[int, tuple[int, ...]] = {}
    for s, i in zip(specs, idx):
        if s.devices is None:
            continue
        _check_given(s, i, "devices", have, f"does not exist (visible: {sorted(have)})", exact=True)
        out[i] = s.devices
    auto = [(s, i) for s, i in zip(specs, idx) if s.devices is None]
    if auto:
        free = [g for g in sorted(have) if g not in {d for v in out.values() for d in v}]
        need = sum(s.workers for s, _ in auto)
        if need <= len(free):
            pos = 0
            for s, i in auto:
                out[i] = tuple(free[pos:pos + s.workers])
                pos += s.workers
        elif all(s.workers == 1 for s, _ in auto) and free:
            for k, (s, i) in enumerate(auto):  # several replicas per GPU, round robin
                out[i] = (free[k % len(free)],)
        else:
            s, i = auto[-1]
            raise SpecError(f"replicas[{i}].tp_size", s.tp_size,
                            f"{len(auto)} replicas x {s.workers} GPUs each need {need} GPUs, "
                            f"{len(free)} free (visible: {sorted(have)})")
    # TP/DP groups never share a GPU; single-GPU replicas may.
    owner: dict[int, list[int]] = {}
    for i, devs in out.items():
        for d in devs:
            owner.setdefault(d, []).append(i)
    for d, users in owner.items():
        if len(users) > 1:
            for i in users:
                if len(out[i]) > 1:
                    raise SpecError(f"replicas[{i}].devices", list(out[i]),
                                    f"GPU {d} is also used by replicas {[u for u in users if u != i]}; "
                                    f"a tensor/data-parallel group cannot share GPUs")
    return out


def _gpu_memory_split(specs, gpu_idx, assigned) -> dict[int, float]:
    sharing: dict[int, list[int]] = {}
    for i in gpu_idx:
        for d in assigned[i]:
            sharing.setdefault(d, []).append(i)
    util: dict[int, float] = {}
    for i in gpu_idx:
        s = specs[i]
        if s.gpu_memory_utilization is not None:
            util[i] = s.gpu_memory_utilization
            continue
        share = []
        for d in assigned[i]:
            users = sharing[d]
            if len(users) < 2:
                continue
            given = sum(specs[u].gpu_memory_utilization or 0.0 for u in users)
            unset = sum(1 for u in users if specs[u].gpu_memory_utilization is None)
            # 0.92/N each, or what the explicit shares leave if that is less
            share.append(min(SHARED_GPU_BUDGET / len(users), (MAX_GPU_MEMORY_TOTAL - given) / unset))
        if share:
            util[i] = round(min(share), 4)
    for d, users in sharing.items():
        for i in users:
            u = util.get(i, 0.9)
            if u < MIN_GPU_MEMORY_UTILIZATION:
                raise SpecError(f"replicas[{i}].gpu_memory_utilization", u,
                                f"below the floor of {MIN_GPU_MEMORY_UTILIZATION} ({len(users)} replicas share GPU {d})")
        total = sum(util.get(i, 0.9) for i in users)
        if len(users) > 1 and total > MAX_GPU_MEMORY_TOTAL + 1e-3:
            i = users[-1]
            raise SpecError(f"replicas[{i}].gpu_memory_utilization", util.get(i, 0.9),
                            f"replicas {users} on GPU {d} ask for {total:.2f} of its memory in total "
                            f"(at most {MAX_GPU_MEMORY_TOTAL})")
    return util


def _place_cores(specs, idx, inv: Inventory) -> dict[int, tuple[int, ...]]:
    have = set(inv.cores)
    out: dict[int, tuple[int, ...]] = {}
    used: dict[int, int] = {}
    for s, i in zip(specs, idx):
        if s.cores is None:
            continue
        _check_given(s, i, "cores", have, f"is not available to this process (affinity: {_ranges(sorted(have))})",
                     exact=False)
        for c in s.cores:
            if c in used:
                raise SpecError(f"replicas[{i}].cores", list(s.cores),
                                f"core {c} is already pinned to replica {used[c]}; CPU replicas cannot share cores")
            used[c] = i
        out[i] = s.cores
    auto = [(s, i) for s, i in zip(specs, idx) if s.cores is None]
    if auto:
        free = [c for c in sorted(have) if c not in used]
        ranks = sum(s.workers for s, _ in auto)
        if ranks > len(free):
            s, i = auto[-1]
            raise SpecError(f"replicas[{i}].tp_size", s.tp_size,
                            f"{len(auto)} CPU replicas need {ranks} cores (one per TP/DP rank), "
                            f"{len(free)} free (affinity: {_ranges(sorted(have))})")
        per_rank = len(free) // ranks
        pos = 0
        for s, i in auto:
            n = per_rank * s.workers
            out[i] = tuple(free[pos:pos + n])
            pos += n
    return out


def kv_events_config(port: int, topic: str, replay_port: int) -> dict:
    """vLLM's ``--kv-events-config`` for one replica: its engine's PUB socket CONNECTS to the router's
    SUB socket on 127.0.0.1 (an endpoint without ``*`` connects; with ``*`` vLLM would bind on every
    interface), and it binds its replay endpoint on 127.0.0.1 only.

    >>> kv_events_config(5557, "replica0", 5600)["endpoint"]
    'tcp://127.0.0.1:5557'
    """
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{port}",
            "replay_endpoint": f"tcp://127.0.0.1:{replay_port}", "topic": topic}


def publishes_kv_events(s: ReplicaSpec, kind: str) -> bool:
    return s.kv_events and not s.headless and not _flag_given(s.extra_args, "--kv-events-config")


def _assign_replay_ports(specs, kinds, http_ports: list[int], kv_port: int, port_free,
                         keep: dict[int, int]) -> dict[int, int]:
    """A block of ``ranks_local`` free consecutive ports per publishing replica (vLLM offsets the
    replay endpoint by the DP rank), clear of the HTTP ports and of the router's SUB ports; the
    replicas in ``keep`` keep theirs."""
    max_dp = max((s.ranks_local for s in specs), default=1)
    taken = set(http_ports) | set(range(kv_port, kv_port + max_dp))
    out: dict[int, int] = {}
    for i, p in keep.items():
        if i < len(specs) and publishes_kv_events(specs[i], kinds[i]):
            out[i] = p
            taken.update(range(p, p + specs[i].ranks_local))
    nxt = max(http_ports) + 1
    for i, s in enumerate(specs):
        if not publishes_kv_events(s, kinds[i]) or i in out:
            continue
        while any(p in taken or not port_free("127.0.0.1", p) for p in range(nxt, nxt + s.ranks_local)):
            nxt += 1
        out[i] = nxt
        taken.update(range(nxt, nxt + s.ranks_local))
        nxt += s.ranks_local
    return out


def _assign_ports(specs, port_start: int, port_free, reserved: set[int] = frozenset()) -> list[int]:
    """HTTP ports: the given ones (checked), then the first free ones from ``port_start`` (not
    ``reserved``: replay ports kept by running replicas)."""
    ports: list[int | None] = [s.port for s in specs]
    taken: set[int] = set(reserved)
    for i, s in enumerate(specs):
        if s.port is None:
            continue
        if s.port in taken:
            raise SpecError(f"replicas[{i}].port", s.port, "given to two replicas")
        if not s.headless and not port_free(s.host, s.port):
            raise SpecError(f"replicas[{i}].port", s.port, f"already in use on {s.host}")
        taken.add(s.port)
    rpc = {s.dp_rpc_port for s in specs if s.dp_rpc_port}
    for i, s in enumerate(specs):
        if s.port is not None and s.port in rpc and not s.headless:
            raise SpecError(f"replicas[{i}].port", s.port, "is also a dp_rpc_port of this cluster")
    nxt = port_start
    for i, s in enumerate(specs):
        if ports[i] is not None:
            continue
        while nxt in taken or nxt in rpc or not port_free(s.host, nxt):
            nxt += 1
            if nxt > 65535:
                raise SpecError(f"replicas[{i}].port", None, f"no free port from {port_start} up")
        ports[i] = nxt
        taken.add(nxt)
        nxt += 1
    return ports  # type: ignore[return-value]
