"""Prefill/decode split: prefill replicas compute the prompt's KV cache, a KV connector moves it,
decode replicas generate. nbkit runs the two-phase flow in its router, so the client and the
endpoint serve a PD pair as one model::

    from nbkit import Cluster
    from nbkit.cluster.pd import pd_specs
    cluster = Cluster(pd_specs(model, prefill=1, decode=1))   # roles prefill/decode, KV connector set
    cluster.start()
    client = cluster.client(pd=True)          # (the default when the cluster has both roles)
    await client.complete(long_prompt, max_tokens=64)   # prefill (max_tokens=1), then decode
    endpoint = cluster.endpoint(port=8000)     # the same flow behind one OpenAI-compatible port

Connectors: on CPU ``ExampleConnector`` with a shared folder (the prefill replica saves KV blocks
there, the decode replica loads them; the CPU block size is 128 tokens, so only whole blocks move);
on GPUs ``NixlConnector``, where the prefill answer's ``kv_transfer_params`` are passed to the
decode request (as vLLM's own toy proxy does). Proof that KV moved: the decode replica's
``vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}``
(:attr:`~nbkit.routing.metrics.EngineMetrics.external_kv_tokens`).
"""

from __future__ import annotations

import json
import os
import tempfile

from nbkit.cluster.spec import ReplicaSpec, SpecError
from nbkit.routing.pd_forward import CONNECTORS



def kv_transfer_config(connector: str, shared_dir: str | None = None) -> dict:
    """The ``--kv-transfer-config`` of a PD replica (both roles use ``kv_both``)."""
    if connector not in CONNECTORS:
        raise SpecError("connector", connector, f"expected one of {sorted(CONNECTORS)} (or 'auto')")
    cfg: dict = {"kv_connector": CONNECTORS[connector], "kv_role": "kv_both"}
    if connector == "example":
        if not shared_dir:
            raise SpecError("shared_dir", shared_dir, "ExampleConnector needs a folder both replicas can reach")
        cfg["kv_connector_extra_config"] = {"shared_storage_path": str(shared_dir)}
    return cfg


def pd_specs(model: str, *, prefill: int = 1, decode: int = 1, connector: str = "auto",
             shared_dir: str | None = None, device: str = "auto", **common) -> list[ReplicaSpec]:
    """``prefill`` prefill replicas then ``decode`` decode replicas, with a KV connector configured.

    ``connector="auto"`` picks ``nixl`` on GPUs and ``example`` (shared folder) on CPU. Other
    keyword arguments are :class:`ReplicaSpec` fields common to all.
    """
    for name, n in (("prefill", prefill), ("decode", decode)):
        if not isinstance(n, int) or n < 1:
            raise SpecError(name, n, "a PD split needs at least one replica of each role")
    if connector == "auto":
        from nbkit.cluster.spec import discover, resolve_device
        connector = "nixl" if resolve_device(device, discover()) == "gpu" else "example"
    if connector == "example" and shared_dir is None:
        shared_dir = tempfile.mkdtemp(prefix="nbkit-kv-")
    if shared_dir is not None:
        os.makedirs(shared_dir, exist_ok=True)
    flag = ("--kv-transfer-config", json.dumps(kv_transfer_config(connector, shared_dir)))
    extra = tuple(common.pop("extra_args", ()))
    if connector == "example":
        # ExampleConnector stores a prompt's KV from its first scheduled chunk only: with chunked
        # prefill a long prompt batched beside others is saved short and the decode replica then
        # crashes loading it (shape mismatch). Prefill whole prompts in one step instead.
        common.setdefault("max_model_len", 4096)
        flag += ("--no-enable-chunked-prefill", "--max-num-batched-tokens", str(common["max_model_len"]))
    specs = []
    for role, n in (("prefill", prefill), ("decode", decode)):
        for k in range(n):
            specs.append(ReplicaSpec(model=model, role=role, device=device, name=f"{role}{k}",
                                     extra_args=flag + extra, **common))
    return specs
