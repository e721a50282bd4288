"""Hardware profiles: peak compute and memory of one device, and the efficiency factors and fixed
costs that turn a roofline into step times. ``nbkit sim calibrate`` fits the factors from a real
run and saves a profile as JSON::

    >>> from nbkit.sim.hardware import get_hardware
    >>> h100 = get_hardware("H100")
    >>> h100.peak_flops / 1e12, h100.mem_bw_gbs
    (989.0, 3350)
    >>> cpu = get_hardware("cpu")            # this 2-core AMD EPYC (AVX-512/AVX2) running vLLM-CPU
    >>> fitted = cpu.replace(compute_eff=0.31, step_overhead_s=0.006)
    >>> save_profile(fitted, "/tmp/cpu-fitted.json")                       # doctest: +SKIP
    >>> get_hardware("/tmp/cpu-fitted.json").step_overhead_s               # doctest: +SKIP
    0.006

Units: FLOP/s, GB/s (1e9 bytes/s), GB (1e9 bytes), seconds, nanoseconds for link latencies.
The numbers are data-sheet peaks (dense 16-bit tensor FLOP/s, HBM bandwidth) with default
efficiencies; ``cpu`` (one core of a 2-core EPYC per vLLM-CPU replica) holds values fitted to a
real run of the tiny model (~2 ms per decode step at low load, ~19 ms at 64 running requests) and
is best recalibrated for other models or machines.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

__all__ = ["HardwareProfile", "PROFILES", "get_hardware", "save_profile", "load_profile",
           "UnknownHardwareError", "FITTABLE", "DEFAULT_FIT"]

#: Fields ``calibrate`` may fit.
FITTABLE = ("compute_eff", "mem_eff", "step_overhead_s", "seq_overhead_s", "request_overhead_s", "decode_overhead_s",
            "api_serial_s")
#: What ``nbkit sim calibrate`` fits unless told otherwise.
DEFAULT_FIT = ("compute_eff", "mem_eff", "step_overhead_s", "seq_overhead_s", "request_overhead_s", "decode_overhead_s")


class UnknownHardwareError(ValueError):
    """Neither a known profile name nor a readable profile JSON."""


@dataclass(frozen=True)
class HardwareProfile:
    """One device (one GPU, or the CPU cores given to one replica) and its step-time model.

    step time = step_overhead_s + layer_overhead_s * layers + seq_overhead_s * sequences
              + max(FLOPs / (peak_flops * compute_eff), bytes / (mem_bw * mem_eff))   (per device)
              + all-reduce time (TP > 1)

    ``layer_overhead_s`` is fixed device time per model layer and step: at decode batch sizes each
    of a layer's dozen kernels (norms, rotary, attention, activation, the all-reduce's launch) costs a
    few microseconds whatever its size, CUDA graphs or not, and tensor parallelism does not divide
    it, so an 80-layer model pays 2.5x a 32-layer one's and a TP4 instance the same as TP1. On the
    GPU profiles 0.5 ms per step + 47 us per layer is the 2 ms a step of a 32-layer model had
    before (which matched vLLM's H200 latency test for Llama-3.1-8B, -3.8 %); the 80-layer rows of
    ``benchmarks/sim_published.py`` test the split.
    ``request_overhead_s`` is a fixed latency per request outside the engine (HTTP, tokenization,
    the API server handing the request to the engine core and the first token back): a request
    reaches the engine that long after it arrives, so TTFT and E2E include it once.
    ``decode_overhead_s`` is a fixed time per request between its first token and the rest: on
    vLLM-CPU the first decode steps after a prefill are slower and the stream's first chunks cost
    the API server more, so short outputs show a higher TPOT (lone requests of 8-14 tokens ran at
    ~3.4 ms per token, of 50-60 tokens at ~1.9 ms). The client sees tokens 2..n that much later.
    ``api_serial_s`` is CPU time per request in front of the engine that requests take one at a
    time (vLLM's API server parses and tokenizes on one event loop): requests arriving together
    reach the engine that far apart, so a burst's last request waits for all the others.
    """

    name: str
    peak_flops: float                 # dense 16-bit FLOP/s per device
    mem_bw_gbs: float                 # device memory bandwidth, GB/s
    mem_size_gb: float                # device memory, GB
    compute_eff: float = 0.6          # achieved fraction of peak_flops
    mem_eff: float = 0.8              # achieved fraction of mem_bw
    step_overhead_s: float = 0.002    # fixed cost per engine step (scheduling, launch, sampling)
    layer_overhead_s: float = 0.0     # fixed device time per model layer per step (small kernels)
    seq_overhead_s: float = 0.0       # extra cost per scheduled sequence per step
    request_overhead_s: float = 0.0   # fixed latency per request before it reaches the engine
    decode_overhead_s: float = 0.0    # fixed extra time per request between its first token and the rest
    api_serial_s: float = 0.0         # per-request time in front of the engine, one request at a time
    tp_link_bw_gbs: float | None = None     # device-to-device link for TP; None: the cluster's link
    tp_link_latency_ns: float | None = None
    kv_cache_gb: float | None = None  # fixed KV-cache size (vLLM-CPU: VLLM_CPU_KVCACHE_SPACE); None: from memory
    reserve_gb: float = 1.5           # memory kept for activations / graphs per device
    block_size: int = 16              # vLLM's default KV block size on this device
    max_num_batched_tokens: int = 8192  # vLLM's default token budget per step for its API server here
    max_num_seqs: int = 256           # ... and sequences per step
    batch_per_tp: bool = False        # both defaults are per TP rank (vLLM-CPU), not per instance
    notes: str = ""

    def admission(self, now: float, api_free_at: float) -> tuple[float, float]:
        """When a request arriving at ``now`` reaches the engine, and when the API server is free
        again, given that it was busy until ``api_free_at`` (simulated seconds): it first waits its
        ``api_serial_s`` turn, then ``request_overhead_s`` more."""
        if self.api_serial_s > 0:
            api_free_at = max(now, api_free_at) + self.api_serial_s
            start = api_free_at
        else:
            start = now
        return start + self.request_overhead_s, api_free_at

    def replace(self, **changes) -> "HardwareProfile":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


_GPU = {"step_overhead_s": 0.0005, "layer_overhead_s": 4.7e-5}   # see HardwareProfile
PROFILES: dict[str, HardwareProfile] = {p.name: p for p in [
    HardwareProfile("H100", 989e12, 3350, 80, tp_link_bw_gbs=450, tp_link_latency_ns=8000, **_GPU,
                    notes="H100 SXM 80GB, NVLink 4"),
    HardwareProfile("H200", 989e12, 4800, 141, tp_link_bw_gbs=450, tp_link_latency_ns=8000, **_GPU,
                    notes="H200 SXM 141GB, NVLink 4"),
    HardwareProfile("A100-80G", 312e12, 2039, 80, tp_link_bw_gbs=300, tp_link_latency_ns=10000, **_GPU,
                    notes="A100 SXM 80GB, NVLink 3"),
    HardwareProfile("L40S", 362e12, 864, 48, **_GPU, notes="PCIe only: TP uses the cluster link"),
    HardwareProfile("RTXPRO6000", 500e12, 1597, 96, **_GPU,
                    notes="RTX PRO 6000 Blackwell 96GB, PCIe only: TP uses the cluster link"),
    # cpu: fitted (``nbkit sim calibrate``) on a real bursty run (bursts of 1-64 requests, prompts
    # 16-512, outputs 8-64) of the tiny model on one core of this machine, then rounded: a decode
    # step of a few sequences takes ~2 ms, 64 running sequences ~19 ms, a 950-token prompt's first
    # token ~36 ms after it is sent (prefill ~30 us/token); the fit gave compute_eff 0.41,
    # step 2.1 ms, 0.2 ms per sequence, 10-12 ms per request; mem_eff went to its bound (the tiny
    # model's weights stay in cache) and is kept just under it.
    HardwareProfile("cpu", 2.0e11, 20, 23, compute_eff=0.41, mem_eff=0.9, step_overhead_s=0.0021,
                    seq_overhead_s=0.0002, request_overhead_s=0.011, tp_link_bw_gbs=10,
                    tp_link_latency_ns=20000, kv_cache_gb=1.073741824, reserve_gb=0.0, block_size=128,
                    # vLLM's CPU defaults for the API server (EngineArgs: 2048 x TP size, 128 x TP size):
                    # a burst of long prompts is prefilled over several steps, not one
                    max_num_batched_tokens=2048, max_num_seqs=128, batch_per_tp=True,
                    notes="2-core AMD EPYC (Zen 4, AVX-512 BF16) running vLLM-CPU, one core per replica; "
                          "defaults from a calibration run of the tiny model; refit with "
                          "`nbkit sim calibrate` for other models or machines"),
]}

_ALIASES = {"h100-sxm": "H100", "h100-80g": "H100", "h200-sxm": "H200", "a100": "A100-80G",
            "a100-80gb": "A100-80G", "rtx-pro-6000": "RTXPRO6000", "rtxpro6000": "RTXPRO6000",
            "cpu": "cpu", "epyc": "cpu"}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


_BY_KEY = {_key(k): k for k in PROFILES}
_BY_KEY.update(_ALIASES)


def load_profile(path: str | os.PathLike) -> HardwareProfile:
    """Read a profile saved by :func:`save_profile` (unknown keys are an error)."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UnknownHardwareError(f"cannot read hardware profile {str(p)!r}: {e}") from None
    if not isinstance(data, dict):
        raise UnknownHardwareError(f"hardware profile {str(p)!r}: expected a JSON object")
    data = dict(data)
    data.pop("nbkit_sim_profile", None)
    data.pop("fit", None)  # calibration report, informative only
    known = {f.name for f in fields(HardwareProfile)}
    extra = sorted(set(data) - known)
    if extra:
        raise UnknownHardwareError(f"hardware profile {str(p)!r}: unknown key(s) {', '.join(extra)}")
    try:
        return HardwareProfile(**data)
    except TypeError as e:
        raise UnknownHardwareError(f"hardware profile {str(p)!r}: {e}") from None


def save_profile(profile: HardwareProfile, path: str | os.PathLike, fit: dict | None = None) -> Path:
    """Write ``profile`` as JSON (plus an optional ``fit`` report); returns the path."""
    p = Path(path).expanduser()
    data = {"nbkit_sim_profile": 1, **profile.to_dict()}
    if fit is not None:
        data["fit"] = fit
    p.write_text(json.dumps(data, indent=2) + "\n")
    return p


def get_hardware(name: str, overrides: dict[str, HardwareProfile] | None = None) -> HardwareProfile:
    """A profile by name (case-insensitive, aliases such as ``A100``), from ``overrides`` first
    (name -> profile, e.g. calibrated ones), or from a JSON file path."""
    if isinstance(name, HardwareProfile):
        return name
    if not isinstance(name, str) or not name.strip():
        raise UnknownHardwareError(f"hardware must be a non-empty string, got {name!r}")
    if overrides:
        for k, v in overrides.items():
            if _key(k) == _key(name) or _BY_KEY.get(_key(name)) == k:
                return v
    std = _BY_KEY.get(_key(name))
    if std is not None:
        return PROFILES[std]
    if name.endswith(".json") or os.path.sep in name:
        return load_profile(name)
    raise UnknownHardwareError(f"unknown hardware {name!r}; known: {', '.join(PROFILES)} "
                               f"(or a profile JSON path)")
