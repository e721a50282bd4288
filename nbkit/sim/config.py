"""The cluster config of the simulator, in the seed JSON format, validated with pydantic.

    {"num_nodes": 1, "link_bw": 16, "link_latency": 20000,
     "nodes": [{"num_instances": 2,
                "cpu_mem": {"mem_size": 512, "mem_bw": 256, "mem_latency": 0},
                "instances": [{"model_name": "meta-llama/Llama-3.1-8B", "hardware": "RTXPRO6000",
                               "npu_mem": {"mem_size": 96, "mem_bw": 1597, "mem_latency": 0},
                               "pd_type": null, "tp_size": 1}, ...]}]}

Units and meaning:

- ``link_bw`` GB/s and ``link_latency`` ns: the link between devices and nodes. It carries the
  KV cache of a prefill/decode handoff, and the TP all-reduces of hardware without a faster link
  of its own (the profile's ``tp_link_bw_gbs``, NVLink on H100/H200/A100).
- ``mem_size`` GB, ``mem_bw`` GB/s, ``mem_latency`` ns. ``npu_mem`` is per device (each of the
  ``tp_size`` devices of an instance has one); its size bounds weights + KV cache and its
  bandwidth is the roofline's memory bandwidth (it overrides the hardware profile's).
  ``cpu_mem`` is validated and reported but not modelled (no KV offload).
- ``hardware``: a profile name (:mod:`nbkit.sim.hardware`: H100, H200, A100-80G, L40S,
  RTXPRO6000, cpu) or the path of a profile JSON (``nbkit sim calibrate`` writes one).
- ``model_name``: a shipped spec or a path with a config.json (:mod:`nbkit.sim.models`).
- ``pd_type``: ``null`` (serves whole requests), ``"prefill"`` or ``"decode"``.

Optional instance keys (defaults as shown): ``dp_group`` (null; instances sharing a value are the
ranks of one data-parallel deployment and step in lockstep), ``max_num_seqs`` and
``max_num_batched_tokens`` (null: vLLM's API-server defaults for the hardware, 256 and 8192, on
the cpu profile 128 and 2048, times ``tp_size`` as vLLM-CPU does), ``gpu_memory_utilization`` (0.9), ``block_size`` (null: the
``--block-size`` flag), ``enable_prefix_caching`` (true), ``kv_cache_gb`` (null: what memory
leaves after weights; per device; the cpu profile uses 1 GiB like ``VLLM_CPU_KVCACHE_SPACE=1``),
``max_model_len`` (null: no limit but the KV cache), ``model_spec`` (null: from ``model_name``),
``name`` (null: ``inst<i>``), and for older vLLM's (V0) scheduler ``num_scheduler_steps`` (1; N: new
requests are scheduled only every N steps, as ``--num-scheduler-steps`` does) and
``enable_chunked_prefill`` (true; false: a whole prompt is prefilled in a step of its own while the
running decodes wait, the token budget defaulting to ``max(max_model_len, 2048)``) and
``cpu_seq_overhead_s`` (0; host time per scheduled sequence per step that the device waits for, added
to the profile's ``seq_overhead_s``: V0's Python scheduler, sampler bookkeeping and output processing,
which V1 overlaps with the GPU's work), and ``scheduling_policy`` (``"fcfs"``; ``"priority"``: as
``--scheduling-policy priority``, waiting requests go in (priority, arrival) order, lower first, and
the running request preempted for KV blocks is the lowest in that order; a request's priority is its
trace ``priority``, or its tenant's with ``tenants=``, as nbkit's router sets vLLM's field).

Any other key, or a bad value, raises :class:`SimConfigError` naming the JSON path::

    >>> load_cluster_config({"num_nodes": 1, "link_bw": 16, "link_latency": 0, "nodes": [
    ...     {"num_instances": 1, "cpu_mem": {"mem_size": 1, "mem_bw": 1, "mem_latency": 0},
    ...      "instances": [{"model_name": "tiny", "hardware": "cpu", "tp_size": 0,
    ...                     "npu_mem": {"mem_size": 8, "mem_bw": 20, "mem_latency": 0}}]}]})
    Traceback (most recent call last):
    nbkit.sim.config.SimConfigError: nodes[0].instances[0].tp_size: Input should be greater than or equal to 1 (got 0)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nbkit.sim.hardware import HardwareProfile, UnknownHardwareError, get_hardware
from nbkit.sim.models import ModelSpec, UnknownModelError, get_model_spec

__all__ = ["SimConfigError", "MemConfig", "InstanceConfig", "NodeConfig", "ClusterConfig",
           "InstanceSetup", "load_cluster_config", "resolve_instances", "dtype_bytes",
           "single_instance_config"]


class SimConfigError(ValueError):
    """A bad cluster config; ``path`` is the JSON path of the (first) offending value."""

    def __init__(self, path: str, message: str, more: list[tuple[str, str]] | None = None):
        self.path, self.message = path, message
        self.errors = [(path, message), *(more or [])]
        text = "; ".join(f"{p}: {m}" if p else m for p, m in self.errors)
        super().__init__(text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemConfig(_Strict):
    mem_size: float = Field(gt=0, description="GB")
    mem_bw: float = Field(gt=0, description="GB/s")
    mem_latency: float = Field(0, ge=0, description="ns")


class InstanceConfig(_Strict):
    model_name: str = Field(min_length=1)
    hardware: str = Field(min_length=1)
    npu_mem: MemConfig
    pd_type: Literal["prefill", "decode"] | None = None
    tp_size: int = Field(1, ge=1, le=64)
    # optional extras
    dp_group: Union[int, str, None] = None
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    block_size: int | None = Field(None, ge=1, le=4096)
    enable_prefix_caching: bool = True
    kv_cache_gb: float | None = Field(None, gt=0)
    max_model_len: int | None = Field(None, ge=1)
    model_spec: str | None = None
    name: str | None = Field(None, min_length=1)
    # LoRA adapters (nbkit.sim.lora): resident at the start, how many at once (0: no LoRA unless some
    # are named), the seconds a load takes
    lora_modules: list[str] = Field(default_factory=list)
    max_loras: int | None = Field(None, ge=0)
    lora_load_s: float = Field(0.1, ge=0)
    # the scheduler of older vLLM (V0) runs: --num-scheduler-steps, --enable-chunked-prefill false
    num_scheduler_steps: int = Field(1, ge=1, le=64)
    enable_chunked_prefill: bool = True
    cpu_seq_overhead_s: float = Field(0.0, ge=0)   # host time per sequence per step the device waits for
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"   # vLLM's --scheduling-policy


class NodeConfig(_Strict):
    num_instances: int = Field(ge=1)
    cpu_mem: MemConfig | None = None
    instances: list[InstanceConfig] = Field(min_length=1)


class ClusterConfig(_Strict):
    num_nodes: int = Field(ge=1)
    link_bw: float = Field(gt=0, description="GB/s")
    link_latency: float = Field(0, ge=0, description="ns")
    nodes: list[NodeConfig] = Field(min_length=1)

    def instances(self) -> list[tuple[str, int, InstanceConfig]]:
        """``(json path, node index, instance)`` in config order; the index in this list is the
        instance id."""
        return [(f"nodes[{n}].instances[{j}]", n, inst)
                for n, node in enumerate(self.nodes) for j, inst in enumerate(node.instances)]


# ------------------------------------------------------------------------------------ loading


def _json_path(loc: tuple, data: Any) -> str:
    """pydantic's ``loc`` as a JSON path (``nodes[0].instances[1].tp_size``), dropping the
    union/type tags pydantic appends below a scalar."""
    out = ""
    cur = data
    for part in loc:
        if isinstance(part, int) and isinstance(cur, list):
            out += f"[{part}]"
            cur = cur[part] if 0 <= part < len(cur) else None
        elif isinstance(part, str) and (isinstance(cur, dict) or cur is None and not out):
            out += ("." if out else "") + part
            cur = cur.get(part) if isinstance(cur, dict) else None
            if not isinstance(cur, (dict, list)):
                break
        else:
            break
    return out


def _from_validation_error(e: ValidationError, data: Any) -> SimConfigError:
    items = []
    for err in e.errors():
        path = _json_path(tuple(err.get("loc", ())), data)
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        elif err.get("type") == "missing":
            msg = "missing required key"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {json.dumps(err['input'])})"
        items.append((path, msg))
    return SimConfigError(items[0][0], items[0][1], items[1:])


def load_cluster_config(source: str | os.PathLike | dict) -> ClusterConfig:
    """Parse and validate a cluster config from a path or an already-decoded dict."""
    if isinstance(source, dict):
        data = source
    else:
        p = Path(source).expanduser()
        try:
            data = json.loads(p.read_text())
        except OSError as e:
            raise SimConfigError("", f"cannot read cluster config {str(p)!r}: {e.strerror}") from None
        except ValueError as e:
            raise SimConfigError("", f"cluster config {str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SimConfigError("", f"cluster config must be a JSON object, got {type(data).__name__}")
    try:
        cfg = ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise _from_validation_error(e, data) from None
    if cfg.num_nodes != len(cfg.nodes):
        raise SimConfigError("num_nodes", f"is {cfg.num_nodes} but {len(cfg.nodes)} node(s) are listed")
    for n, node in enumerate(cfg.nodes):
        if node.num_instances != len(node.instances):
            raise SimConfigError(f"nodes[{n}].num_instances", f"is {node.num_instances} but "
                                 f"{len(node.instances)} instance(s) are listed")
        for j, inst in enumerate(node.instances):
            if (inst.max_num_batched_tokens is not None and inst.max_num_seqs is not None
                    and inst.max_num_batched_tokens < inst.max_num_seqs):
                raise SimConfigError(f"nodes[{n}].instances[{j}].max_num_batched_tokens",
                                     f"{inst.max_num_batched_tokens} must be >= max_num_seqs "
                                     f"({inst.max_num_seqs}), as vLLM requires")
    return cfg


def single_instance_config(model: str = "tiny", hardware: str = "cpu", *, tp_size: int = 1,
                           mem_size: float | None = None, mem_bw: float | None = None,
                           link_bw: float = 16, link_latency: float = 20000, n: int = 1,
                           **extra: Any) -> ClusterConfig:
    """A one-node config of ``n`` identical instances (tests, the live server, quick studies);
    ``extra`` goes into each instance (``max_num_seqs=...``)."""
    hw = get_hardware(hardware)
    inst = {"model_name": model, "hardware": hardware, "tp_size": tp_size,
            "npu_mem": {"mem_size": mem_size or hw.mem_size_gb, "mem_bw": mem_bw or hw.mem_bw_gbs,
                        "mem_latency": 0}, **extra}
    return load_cluster_config({"num_nodes": 1, "link_bw": link_bw, "link_latency": link_latency,
                                "nodes": [{"num_instances": n, "instances": [dict(inst) for _ in range(n)]}]})


# ---------------------------------------------------------------------------------- resolving

_DTYPES = {"auto": 2, "float16": 2, "half": 2, "bfloat16": 2, "fp16": 2, "bf16": 2,
           "float32": 4, "float": 4, "fp32": 4, "fp8": 1, "float8": 1}


def dtype_bytes(dtype: str) -> int:
    """Bytes per weight/KV element for a ``--dtype`` value."""
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(_DTYPES)}") from None


@dataclass(frozen=True)
class InstanceSetup:
    """One instance with everything resolved: the engine and the performance model read this."""

    index: int
    key: str                        # rank key given to policies ("inst0")
    path: str                       # JSON path, for messages
    node: int
    model: ModelSpec
    hw: HardwareProfile
    tp_size: int
    pd_type: str | None
    dp_group: str | None
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool
    max_model_len: int | None
    dtype_bytes: int
    mem_bw_gbs: float               # per device
    mem_size_gb: float              # per device
    weights_gb: float               # whole model (all devices)
    tp_link_bw_gbs: float
    tp_link_latency_ns: float
    lora_modules: tuple[str, ...] = ()  # adapters resident at the start (nbkit.sim.lora)
    max_loras: int = 0                  # adapters resident at once (0: serves no LoRA)
    lora_load_s: float = 0.0            # seconds to load one that is not resident
    num_scheduler_steps: int = 1        # new requests join only every this many steps (vLLM V0 multi-step)
    chunked_prefill: bool = True        # False: whole prompts in steps of their own (V0), decodes wait
    scheduling_policy: str = "fcfs"     # "priority": vLLM's --scheduling-policy priority (nbkit.sim.engine)

    @property
    def kv_gb(self) -> float:
        return self.num_blocks * self.block_size * self.model.kv_bytes_per_token(self.dtype_bytes) / 1e9


def _lora_fields(inst: InstanceConfig, path: str) -> dict:
    """An instance's LoRA fields: ``max_loras`` defaults to 4 (at least its named adapters) when it
    names any, else 0 (no LoRA)."""
    n = inst.max_loras if inst.max_loras is not None else (max(4, len(inst.lora_modules)) if inst.lora_modules else 0)
    if len(set(inst.lora_modules)) != len(inst.lora_modules):
        raise SimConfigError(f"{path}.lora_modules", f"{inst.lora_modules!r} names an adapter twice")
    if n < len(inst.lora_modules):
        raise SimConfigError(f"{path}.max_loras", f"{n} is fewer than the {len(inst.lora_modules)} lora_modules")
    return {"lora_modules": tuple(inst.lora_modules), "max_loras": n, "lora_load_s": inst.lora_load_s}


def resolve_instances(cfg: ClusterConfig, *, dtype: str = "float16", block_size: int | None = None,
                      hardware: dict[str, HardwareProfile] | None = None) -> list[InstanceSetup]:
    """Resolve models, hardware and KV capacity; errors name the instance's JSON path.

    ``block_size`` (the CLI's ``--block-size``) applies where an instance sets none; without
    either, the hardware's default (16 on GPUs, 128 on the cpu profile). ``hardware`` maps names
    to profiles that replace the shipped ones (e.g. calibrated).
    """
    nbytes = dtype_bytes(dtype)
    out: list[InstanceSetup] = []
    groups: dict[str, tuple[str, InstanceConfig]] = {}
    for i, (path, node, inst) in enumerate(cfg.instances()):
        try:
            model = get_model_spec(inst.model_spec or inst.model_name)
        except UnknownModelError as e:
            raise SimConfigError(f"{path}.{'model_spec' if inst.model_spec else 'model_name'}", str(e)) from None
        try:
            hw = get_hardware(inst.hardware, hardware)
        except UnknownHardwareError as e:
            raise SimConfigError(f"{path}.hardware", str(e)) from None
        if inst.cpu_seq_overhead_s:
            hw = hw.replace(seq_overhead_s=hw.seq_overhead_s + inst.cpu_seq_overhead_s)
        tp = inst.tp_size
        if model.num_heads % tp:
            raise SimConfigError(f"{path}.tp_size", f"{tp} does not divide the {model.num_heads} attention "
                                 f"heads of {model.name}")
        bs = inst.block_size or block_size or hw.block_size
        weights = model.weight_bytes(nbytes)
        kv_heads_dev = max(1, model.num_kv_heads // tp)      # KV heads are replicated when tp > heads
        kv_tok_dev = 2 * model.num_layers * kv_heads_dev * model.head_dim * nbytes
        usable_dev = inst.npu_mem.mem_size * 1e9 * inst.gpu_memory_utilization - hw.reserve_gb * 1e9
        if weights / tp > usable_dev:
            raise SimConfigError(f"{path}.npu_mem.mem_size",
                                 f"{model.name} needs {weights / tp / 1e9:.1f} GB of weights per device "
                                 f"(tp_size {tp}) but {inst.npu_mem.mem_size:g} GB x "
                                 f"gpu_memory_utilization {inst.gpu_memory_utilization:g} - "
                                 f"{hw.reserve_gb:g} GB reserve leaves {max(usable_dev, 0) / 1e9:.1f} GB")
        kv_gb = inst.kv_cache_gb if inst.kv_cache_gb is not None else hw.kv_cache_gb
        if kv_gb is not None:
            tokens = int(kv_gb * 1e9 // kv_tok_dev)
        else:
            tokens = int((usable_dev - weights / tp) // kv_tok_dev)
        blocks = tokens // bs
        if blocks < 1:
            raise SimConfigError(f"{path}.npu_mem.mem_size", f"leaves no room for one KV block of {bs} tokens")
        if inst.dp_group is not None:
            g = str(inst.dp_group)
            if g in groups:
                p0, first = groups[g]
                for f in ("model_name", "hardware", "tp_size", "pd_type"):
                    if getattr(first, f) != getattr(inst, f):
                        raise SimConfigError(f"{path}.dp_group", f"dp_group {g!r} mixes {f} "
                                             f"{getattr(first, f)!r} ({p0}) and {getattr(inst, f)!r}")
            else:
                groups[g] = (path, inst)
        # unset: vLLM's defaults for the hardware (per TP rank on CPU), keeping seqs <= tokens
        scale = tp if hw.batch_per_tp else 1
        default_seqs = hw.max_num_seqs * scale
        max_seqs = inst.max_num_seqs or min(default_seqs, inst.max_num_batched_tokens or default_seqs)
        max_tokens = inst.max_num_batched_tokens or max(hw.max_num_batched_tokens * scale, max_seqs)
        if not inst.enable_chunked_prefill and inst.max_num_batched_tokens is None:
            max_tokens = max(inst.max_model_len or model.max_position_embeddings, 2048, max_seqs)  # vLLM V0's default
        link_bw = hw.tp_link_bw_gbs if hw.tp_link_bw_gbs is not None else cfg.link_bw
        link_lat = hw.tp_link_latency_ns if hw.tp_link_latency_ns is not None else cfg.link_latency
        out.append(InstanceSetup(
            index=i, key=inst.name or f"inst{i}", path=path, node=node, model=model, hw=hw, tp_size=tp,
            pd_type=inst.pd_type, dp_group=None if inst.dp_group is None else str(inst.dp_group),
            max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens,
            block_size=bs, num_blocks=blocks, enable_prefix_caching=inst.enable_prefix_caching,
            max_model_len=inst.max_model_len, dtype_bytes=nbytes, mem_bw_gbs=inst.npu_mem.mem_bw,
            mem_size_gb=inst.npu_mem.mem_size, weights_gb=weights / 1e9, tp_link_bw_gbs=link_bw,
            tp_link_latency_ns=link_lat, num_scheduler_steps=inst.num_scheduler_steps,
            chunked_prefill=inst.enable_chunked_prefill, scheduling_policy=inst.scheduling_policy,
            **_lora_fields(inst, path)))
    keys = [s.key for s in out]
    for s in out:
        if keys.count(s.key) > 1:
            raise SimConfigError(f"{s.path}.name", f"{s.key!r} is used by more than one instance")
    roles = {s.pd_type for s in out}
    if "prefill" in roles and "decode" not in roles:
        first = next(s for s in out if s.pd_type == "prefill")
        raise SimConfigError(f"{first.path}.pd_type", "prefill instances need at least one decode instance")
    if "decode" in roles and "prefill" not in roles:
        first = next(s for s in out if s.pd_type == "decode")
        raise SimConfigError(f"{first.path}.pd_type", "decode instances need at least one prefill instance")
    if "prefill" in roles and None in roles:
        first = next(s for s in out if s.pd_type is None)
        raise SimConfigError(f"{first.path}.pd_type", "a prefill/decode split cannot mix in instances with "
                             "pd_type null")
    return out
