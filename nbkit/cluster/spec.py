"""Replica specs, device discovery and launch plans: what a replica is, before it is placed.

Placement and validation (specs in, plans out) live in :mod:`nbkit.cluster.placement`.

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
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nbkit.http.ports import port_is_free

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


def check_port(field: str, value: object) -> int:
    """``value`` if it is a TCP port a server can listen on (1-65535), else :class:`SpecError` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise SpecError(field, value, "must be a TCP port number, 1-65535")
    return value


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
    kv_events: bool = Field(True, description="publish vLLM's KV-cache events to the cluster's router (kv_aware)")
    engine: Literal["vllm", "sim"] = Field("vllm", description="vllm, or sim: nbkit.sim.server (no vLLM, no device)")
    sim_hardware: str = Field("cpu", description="engine='sim': the hardware profile it imitates (cpu, H100, ...)")
    fast_start: bool = Field(True, description="CPU: the replica is forked from a fork server that imported vLLM "
                                               "once, its engine cores and workers are forked, not spawned (pinned all "
                                               "the same), and one rank runs inside the engine core; a third of the start time")
    lora_modules: dict[str, str] = Field(default_factory=dict, description="LoRA adapters served from the start, "
                                         "{name: folder}: --enable-lora --lora-modules (nbkit.cluster.lora)")
    enable_lora: bool = Field(False, description="serve LoRA with no adapter named yet (runtime loads only)")
    max_loras: int | None = Field(None, ge=1, description="adapters held at once per rank (default 4)")
    max_lora_rank: int | None = Field(None, ge=1, description="default: the named adapters' largest r")

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
    kv_topic: str | None = None           # KV-cache events: this replica's topic (None: not published)
    kv_replay_port: int | None = None     # ... and its replay endpoint on 127.0.0.1 (+ DP rank)
    preload: bool = False                 # forked from the fork server that imported vLLM once (fast_start, CPU)
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
