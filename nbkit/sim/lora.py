"""LoRA adapters on simulated instances: each holds an LRU of at most ``max_loras`` adapters, and a
request for one that is not resident on the instance its policy chose waits ``lora_load_s`` for
the load (loads on one instance go one after another; requests for an adapter being loaded wait
for that load), as the live router waits for ``/v1/load_lora_adapter``. The policy's LoRA affinity
(:mod:`nbkit.policies.lora`) reads the same table through ``RankLoad.loras``.

The instance fields (cluster JSON)::

    {"model_name": "llama-3.1-8b", "hardware": "H100", "npu_mem": {...},
     "lora_modules": ["sql"], "max_loras": 4, "lora_load_s": 0.1}

and a trace request names its adapter: ``{"input_toks": 128, "output_toks": 64,
"arrival_time_ns": 0, "lora": "sql"}``. Any name is loadable (the simulator has no files). In a
prefill/decode split only the entry (prefill) instances hold adapters.

    >>> from types import SimpleNamespace as S
    >>> a = SimAdapters([S(max_loras=1, lora_modules=("sql",), lora_load_s=0.5)])
    >>> a.ready(0, "sql", 10.0), a.ready(0, "chat", 10.0), a.ready(0, "chat", 10.2), a.loads
    (10.0, 10.5, 10.5, 1)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

__all__ = ["SimAdapters"]


class SimAdapters:
    """The adapters of every instance, in config order (``setups``: their ``InstanceSetup``)."""

    def __init__(self, setups: Sequence):
        self.cap = [s.max_loras for s in setups]
        self.load_s = [s.lora_load_s for s in setups]
        self.held: list[OrderedDict] = [OrderedDict((a, 0.0) for a in s.lora_modules) for s in setups]
        self.free_at = [0.0] * len(setups)   # when the instance's last load ends
        self.loads = 0                        # adapter loads made during the run
        self.per_instance = [0] * len(setups)

    @classmethod
    def of(cls, setups: Sequence) -> "SimAdapters | None":
        """The table, or None when no instance serves LoRA (requests' adapters are then ignored)."""
        return cls(setups) if any(s.max_loras for s in setups) else None

    def annotate(self, views) -> None:
        """``RankLoad.loras`` of each candidate (``index`` is the instance id): its resident adapters."""
        held = self.held
        for v in views:
            v.loras = frozenset(held[v.index])

    def ready(self, index: int, name: str, t: float) -> float:
        """When adapter ``name`` is ready on instance ``index`` for a request routed there at ``t``:
        ``t`` if resident and loaded, else when its load ends (one starts now if none is on its way,
        evicting the least recently used adapter beyond ``max_loras``)."""
        lru = self.held[index]
        at = lru.get(name)
        if at is not None:
            lru.move_to_end(name)
            return max(t, at)
        start = max(t, self.free_at[index])
        done = self.free_at[index] = start + self.load_s[index]
        lru[name] = done
        while len(lru) > max(1, self.cap[index]):
            lru.popitem(last=False)
        self.loads += 1
        self.per_instance[index] += 1
        return done
