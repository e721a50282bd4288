"""Replica specs, device discovery, validation and pinning: specs in, launch plans out.

Everything here is a pure function of its inputs (the inventory of devices and a "is this port
free" probe can be passed in), so GPU layouts are planned and tested on a machine without GPUs::

    from nbkit.plan import Inventory, GPU, ReplicaSpec, plan_replicas
    inv = Inventory(cores=tuple(range(16)), gpus=tuple(GPU(i, "H100", 80.0) for i in range(8)))
    plans = plan_replicas([ReplicaSpec(model="m", tp_size=2)] * 4, inv)
    plans[3].env["CUDA_VISIBLE_DEVICES"]        # '6,7'

Pinning rules
- GPU: ``CUDA_VISIBLE_DEVICES`` per replica. A replica needs ``tp_size * dp_size_local`` GPUs;
  replicas that need one GPU may share it (then ``--gpu-memory-utilization`` is split, 0.92/N
  per replica on a GPU shared by N, unless given); a TP/DP group never shares a GPU.
- CPU: ``VLLM_CPU_OMP_THREADS_BIND`` lists the cores of each rank of the replica, ranks
  separated by ``|`` (``"0|1"`` for TP=2 on cores 0 and 1); ``VLLM_CPU_KVCACHE_SPACE`` sets the
  KV cache in GiB. Replicas never share cores.

Bad input raises :class:`SpecError` (a ``ValueError``) naming the field and value, before
anything is launched.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DeviceKind = Literal["cpu", "gpu", "sim"]

#: Per-replica share of one GPU's memory when N replicas share it: SHARED_GPU_BUDGET / N.
SHARED_GPU_BUDGET = 0.92
#: Below this fraction of a GPU a replica cannot hold weights plus a useful KV cache.
MIN_GPU_MEMORY_UTILIZATION = 0.05
#: Sum of memory fractions on one GPU may not pass this.
MAX_GPU_MEMORY_TOTAL = 0.95
#: Resident memory of one vLLM CPU process besides its KV cache (measured: ~2.9 GB).
CPU_RUNTIME_GIB = 3.0
#: Default first port for replicas whose port is not given.
DEFAULT_PORT_START = 8100

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class SpecError(ValueError):
    """A replica spec that cannot be launched. ``field`` and ``value`` name the culprit."""

    def __init__(self, field: str, value: object, message: str):
        self.field, self.value = field, value
        super().__init__(f"{field}={value!r}: {message}")


@dataclass(frozen=True)
class GPU:
    index: int
    name: str = "GPU"
    memory_gib: float = 0.0


@dataclass(frozen=True)
class Inventory:
    """What this machine offers: usable CPU cores (the process's affinity), GPUs, memory."""

    cores: tuple[int, ...]
    gpus: tuple[GPU, ...] = ()
    memory_gib: float = 0.0

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus)


def discover_gpus() -> tuple[GPU, ...]:
    """GPUs visible through NVML (nvidia-ml-py); empty when there is no driver or no GPU."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except Exception:
        return ()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            gpus.append(GPU(i, name, pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            keep = {int(x) for x in visible.split(",") if x.strip().isdigit()}
            gpus = [g for g in gpus if g.index in keep]
        return tuple(gpus)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def discover() -> Inventory:
    """The inventory of this machine: CPU affinity, NVML GPUs, total memory."""
    import psutil

    cores = tuple(sorted(os.sched_getaffinity(0)))
    return Inventory(cores=cores, gpus=discover_gpus(), memory_gib=psutil.virtual_memory().total / 2**30)


def resolve_device(device: str, inventory: Inventory, field: str = "device") -> DeviceKind:
    """``auto`` -> ``gpu`` when the inventory has GPUs, else ``cpu``."""
    if device == "auto":
        return "gpu" if inventory.gpus else "cpu"
    if device == "gpu":
        if not inventory.gpus:
            raise SpecError(field, device, "no GPU is visible (NVML found none); use device='cpu' or 'auto'")
        return "gpu"
    if device == "cpu":
        return "cpu"
    raise SpecError(field, device, "unknown device kind; expected 'auto', 'cpu' or 'gpu'")


class ReplicaSpec(BaseModel):
    """One vLLM server process: a replica, a native data-parallel group, or a headless DP node.

    >>> ReplicaSpec(model="/models/tiny", cores=(0,))                      # doctest: +SKIP
    >>> ReplicaSpec(model="meta-llama/Llama-3.1-8B", tp_size=2, devices=(0, 1))  # doctest: +SKIP

    ``extra_args`` go to ``vllm serve`` verbatim, after nbkit's own flags.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    tp_size: int = Field(1, ge=1)
    dp_size: int = Field(1, ge=1, description="native vLLM data-parallel size of the group")
    dp_size_local: int | None = Field(None, ge=1, description="DP ranks run by this process (default: all)")
    dp_start_rank: int = Field(0, ge=0)
    dp_address: str | None = None
    dp_rpc_port: int | None = Field(None, ge=1, le=65535)
    headless: bool = False
    device: str = "auto"
    devices: tuple[int, ...] | None = None
    cores: tuple[int, ...] | None = None
    port: int | None = Field(None, ge=1, le=65535)
    host: str = "127.0.0.1"
    role: Literal["both", "prefill", "decode"] = "both"
    env: dict[str, str] = Field(default_factory=dict)
    extra_args: tuple[str, ...] = ()
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    kv_cache_gib: int = Field(1, ge=1, description="CPU only: VLLM_CPU_KVCACHE_SPACE in GiB")
    max_model_len: int | None = Field(None, ge=16)
    name: str | None = None
    engine: Literal["vllm", "sim"] = Field("vllm", description="vllm, or sim: nbkit.sim.server (no vLLM, no device)")
    sim_hardware: str = Field("cpu", description="engine='sim': the hardware profile it imitates (cpu, H100, ...)")

    @field_validator("model")
    @classmethod
    def _model_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model must not be empty")
        return v

    @field_validator("devices", "cores")
    @classmethod
    def _ids(cls, v):
        if v is None:
            return v
        if len(v) == 0:
            raise ValueError("must list at least one id (or be None for automatic placement)")
        if any(i < 0 for i in v):
            raise ValueError(f"ids must be >= 0, got {list(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"ids must be unique, got {list(v)}")
        return tuple(v)

    @model_validator(mode="after")
    def _consistent(self):
        local = self.ranks_local
        if local > self.dp_size:
            raise ValueError(f"dp_size_local={local} exceeds dp_size={self.dp_size}")
        if self.dp_start_rank + local > self.dp_size:
            raise ValueError(f"dp_start_rank={self.dp_start_rank} + dp_size_local={local} exceeds dp_size={self.dp_size}")
        if self.headless and (self.dp_size < 2 or self.dp_start_rank == 0):
            raise ValueError("headless needs dp_size >= 2 and dp_start_rank >= 1 (rank 0 lives with the API server)")
        if self.headless and not self.dp_address:
            raise ValueError("headless needs dp_address (the head node's address)")
        if self.devices is not None and self.cores is not None:
            raise ValueError("give devices (GPU) or cores (CPU), not both")
        return self

    @property
    def ranks_local(self) -> int:
        """DP ranks this process runs."""
        return self.dp_size_local if self.dp_size_local is not None else self.dp_size

    @property
    def workers(self) -> int:
        """Devices (GPU) or rank core-groups (CPU) this process needs: tp_size x local DP ranks."""
        return self.tp_size * self.ranks_local


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start one vLLM process, and how to reach it afterwards."""

    index: int
    name: str
    argv: tuple[str, ...]
    env: dict[str, str]
    device: DeviceKind
    host: str
    port: int
    model: str
    tp_size: int = 1
    dp_size: int = 1
    dp_ranks: tuple[int, ...] = (0,)
    headless: bool = False
    role: str = "both"
    devices: tuple[int, ...] = ()
    cores: tuple[int, ...] = ()
    gpu_memory_utilization: float | None = None
    spec: ReplicaSpec | None = field(default=None, compare=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def http_ranks(self) -> tuple[int, ...]:
        """DP ranks reachable through this process's HTTP server (all of the group for the head)."""
        if self.headless:
            return ()
        return tuple(range(self.dp_size))

    @property
    def pinning(self) -> str:
        if self.device == "gpu":
            return "gpu " + ",".join(map(str, self.devices))
        if self.device == "sim":
            return "sim " + (self.spec.sim_hardware if self.spec else "")
        return "cores " + self.env.get("VLLM_CPU_OMP_THREADS_BIND", "")

    def same_process(self, other: "LaunchPlan") -> bool:
        """True if ``other`` would start the very same process (argv and env)."""
        return self.argv == other.argv and self.env == other.env


def port_is_free(host: str, port: int) -> bool:
    """True if a TCP server could bind ``host:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_model(model: str, field: str = "model") -> None:
    """A local path must exist and hold a config.json; anything else must look like a hub id."""
    expanded = os.path.expanduser(model)
    looks_local = model.startswith(("/", ".", "~")) or os.path.exists(expanded)
    if looks_local:
        if not os.path.isdir(expanded):
            raise SpecError(field, model, "no such model folder")
        if not os.path.exists(os.path.join(expanded, "config.json")):
            raise SpecError(field, model, "folder holds no config.json (not a Hugging Face model folder)")
    elif not _HUB_ID.match(model):
        raise SpecError(field, model, "neither an existing folder nor a model id like 'org/name'")


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
               gpu_memory_utilization: float | None = None) -> tuple[str, ...]:
    """The ``vllm serve`` command line of one process (no shell involved); for ``engine="sim"`` the
    same command line served by :mod:`nbkit.sim.server`."""
    entry = "nbkit.sim.server" if spec.engine == "sim" else "nbkit.vllm_entry"
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
    if gpu_memory_utilization is not None and not _flag_given(extra, "--gpu-memory-utilization"):
        argv += ["--gpu-memory-utilization", f"{gpu_memory_utilization:g}"]
    return tuple(argv + extra)


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
) -> list[LaunchPlan]:
    """Validate ``specs`` together and pin each to devices/cores and a port.

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

    ports = _assign_ports(specs, port_start, port_free)
    plans = []
    for i, s in enumerate(specs):
        kind = kinds[i]
        env = _base_env(s)
        if kind == "gpu":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, assigned[i]))
        elif kind == "sim":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(s.kv_cache_gib)  # the cpu profile's KV cache, as in vLLM-CPU
        else:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind(assigned[i], s.workers)
            env["VLLM_CPU_KVCACHE_SPACE"] = str(s.kv_cache_gib)
            env["VLLM_TARGET_DEVICE"] = "cpu"
        env.update(s.env)
        plans.append(LaunchPlan(
            index=i, name=s.name or f"replica{i}", argv=build_argv(s, kind, ports[i], python=python,
                                                                    gpu_memory_utilization=mem_util.get(i)),
            env=env, device=kind, host=s.host, port=ports[i], model=s.model, tp_size=s.tp_size,
            dp_size=s.dp_size,
            dp_ranks=tuple(range(s.dp_start_rank, s.dp_start_rank + s.ranks_local)), headless=s.headless,
            role=s.role, devices=assigned[i] if kind == "gpu" else (),
            cores=assigned[i] if kind == "cpu" else (), gpu_memory_utilization=mem_util.get(i), spec=s,
        ))
    return plans


def _check_sim(s: ReplicaSpec, i: int) -> None:
    """A simulated replica needs a model shape and a hardware profile the simulator knows."""
    from .sim.hardware import UnknownHardwareError, get_hardware
    from .sim.models import UnknownModelError, get_model_spec
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


def _place_gpus(specs, idx, inv: Inventory) -> dict[int, tuple[int, ...]]:
    have = set(inv.gpu_indices)
    out: dict[int, tuple[int, ...]] = {}
    for s, i in zip(specs, idx):
        if s.devices is None:
            continue
        missing = [d for d in s.devices if d not in have]
        if missing:
            raise SpecError(f"replicas[{i}].devices", list(s.devices),
                            f"GPU {missing} does not exist (visible: {sorted(have)})")
        if len(s.devices) != s.workers:
            raise SpecError(f"replicas[{i}].devices", list(s.devices),
                            f"tp_size={s.tp_size} x dp_size_local={s.ranks_local} needs {s.workers} GPUs")
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
        missing = [c for c in s.cores if c not in have]
        if missing:
            raise SpecError(f"replicas[{i}].cores", list(s.cores),
                            f"core {missing} is not available to this process (affinity: {_ranges(sorted(have))})")
        if len(s.cores) < s.workers:
            raise SpecError(f"replicas[{i}].cores", list(s.cores),
                            f"tp_size={s.tp_size} x dp_size_local={s.ranks_local} needs at least {s.workers} cores")
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


def _assign_ports(specs, port_start: int, port_free) -> list[int]:
    ports: list[int | None] = [s.port for s in specs]
    taken: set[int] = set()
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


def data_parallel_specs(model: str, *, dp_size: int, nodes: int, address: str = "127.0.0.1",
                        rpc_port: int | None = None, **common) -> list[ReplicaSpec]:
    """The multi-node DP layout: a head (API server + first ranks) and ``nodes - 1`` headless nodes.

    Each node runs ``dp_size // nodes`` ranks. On real machines run spec 0 on the head node and
    spec k on node k; locally all run on this machine (a rehearsal of the real commands).
    """
    if nodes < 1 or dp_size % nodes:
        raise SpecError("nodes", nodes, f"dp_size={dp_size} must split evenly over the nodes")
    local = dp_size // nodes
    if rpc_port is None:  # the first free port from 13345 (on this machine: the head's, when rehearsing)
        rpc_port = next(p for p in range(13345, 14345) if port_is_free("127.0.0.1", p))
    specs = []
    for k in range(nodes):
        specs.append(ReplicaSpec(model=model, dp_size=dp_size, dp_size_local=local, dp_start_rank=k * local,
                                 dp_address=address, dp_rpc_port=rpc_port, headless=k > 0,
                                 name=f"dp-node{k}", **common))
    return specs
