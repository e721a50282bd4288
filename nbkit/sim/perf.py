"""Step time of one engine step from what the batch holds: a roofline with efficiency factors,
fixed per-step and per-sequence costs, and the tensor-parallel all-reduces::

    >>> from nbkit.sim.config import resolve_instances, single_instance_config
    >>> from nbkit.sim.perf import StepModel
    >>> setup = resolve_instances(single_instance_config("meta-llama/Llama-3.1-8B", "H100"))[0]
    >>> m = StepModel(setup)
    >>> round(m.batch_time([(1, 1000)] * 64) * 1e3, 2)     # 64 decodes at context 1000, in ms
    11.13
    >>> m.breakdown([(2048, 0)])["bound"]                   # one 2k-token prefill chunk
    'compute'

For a batch of sequences, each computing ``n`` new tokens on top of ``c`` cached ones (decode:
``n = 1``; a prefill chunk: ``n`` up to the token budget), per device of a TP group of ``t``::

    FLOPs  = (linear_flops_per_token * T + head_flops * L + attn_flops_per_pair * P) / t
    bytes  = (weight_bytes + kv_bytes_per_token * (R + T)) / t
    step   = step_overhead + layer_overhead * layers + seq_overhead * S
           + max(FLOPs / (peak_flops * compute_eff), bytes / (mem_bw * mem_eff))
           + 2 * layers * (link_latency + 2 (t-1)/t * T * hidden * dtype_bytes / link_bw)   (t > 1)

with ``T = sum n`` (tokens), ``S`` sequences, ``L`` sampled positions (sequences that end the
step with a new token), ``P = sum (n c + n (n+1) / 2)`` attention (query, key) pairs and
``R = sum (c + n)`` KV tokens read. Memory bandwidth is the instance's ``npu_mem.mem_bw``.
"""

from __future__ import annotations

from typing import Iterable

from nbkit.sim.hardware import HardwareProfile

__all__ = ["StepModel"]


class StepModel:
    """Precomputed coefficients for one instance; :meth:`step_time` is called once per step."""

    __slots__ = ("setup", "hw", "c_tok", "c_logit", "c_pair", "m_const", "m_kv", "o_step", "o_seq",
                 "ar_const", "ar_tok", "tp")

    def __init__(self, setup, hw: HardwareProfile | None = None):
        self.setup = setup
        hw = hw or setup.hw
        self.hw = hw
        m, t, nb = setup.model, setup.tp_size, setup.dtype_bytes
        self.tp = t
        flops = hw.peak_flops * hw.compute_eff * t
        self.c_tok = m.linear_flops_per_token / flops
        self.c_logit = m.head_flops_per_logit / flops
        self.c_pair = m.attn_flops_per_pair / flops
        bw = setup.mem_bw_gbs * 1e9 * hw.mem_eff * t
        self.m_const = m.weight_bytes(nb) / bw
        self.m_kv = m.kv_bytes_per_token(nb) / bw
        self.o_step = hw.step_overhead_s + hw.layer_overhead_s * m.num_layers
        self.o_seq = hw.seq_overhead_s
        if t > 1:
            n_ar = 2 * m.num_layers
            self.ar_const = n_ar * setup.tp_link_latency_ns * 1e-9
            self.ar_tok = n_ar * 2 * (t - 1) / t * m.hidden_size * nb / (setup.tp_link_bw_gbs * 1e9)
        else:
            self.ar_const = self.ar_tok = 0.0

    def step_time(self, tokens: int, seqs: int, logits: int, pairs: float, kv_read: float) -> float:
        """Seconds for one step from the batch's aggregates (see the module doc)."""
        comp = self.c_tok * tokens + self.c_logit * logits + self.c_pair * pairs
        mem = self.m_const + self.m_kv * (kv_read + tokens)
        return (self.o_step + self.o_seq * seqs + (comp if comp > mem else mem)
                + self.ar_const + self.ar_tok * tokens)

    @staticmethod
    def aggregate(batch: Iterable[tuple[int, int]]) -> tuple[int, int, int, float, float]:
        """``[(new_tokens, cached_tokens), ...]`` -> (T, S, L, P, R); every sequence samples."""
        T = S = 0
        P = R = 0.0
        for n, c in batch:
            T += n
            S += 1
            P += n * c + n * (n + 1) / 2
            R += c + n
        return T, S, S, P, R

    def batch_time(self, batch: Iterable[tuple[int, int]]) -> float:
        """Step time of ``[(new_tokens, cached_tokens), ...]``."""
        return self.step_time(*self.aggregate(batch))

    def breakdown(self, batch: Iterable[tuple[int, int]]) -> dict:
        """The parts of :meth:`batch_time`, for explanations and tests."""
        T, S, L, P, R = self.aggregate(batch)
        comp = self.c_tok * T + self.c_logit * L + self.c_pair * P
        mem = self.m_const + self.m_kv * (R + T)
        return {"overhead_s": self.o_step + self.o_seq * S, "compute_s": comp, "memory_s": mem,
                "allreduce_s": self.ar_const + self.ar_tok * T, "bound": "compute" if comp > mem else "memory",
                "step_s": self.step_time(T, S, L, P, R)}
