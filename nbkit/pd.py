"""Prefill/decode split: prefill replicas compute the prompt's KV cache, a KV connector moves it,
decode replicas generate. nbkit runs the two-phase flow in its router, so the client and the
endpoint serve a PD pair as one model::

    from nbkit import Cluster
    from nbkit.pd import pd_specs
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
(:attr:`~nbkit.metrics.EngineMetrics.external_kv_tokens`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Mapping

from .forward import Forwarder, Upstream
from .plan import ReplicaSpec, SpecError
from .policies import RequestInfo

PD_PATHS = ("/v1/completions", "/v1/chat/completions")
CONNECTORS = {"example": "ExampleConnector", "nixl": "NixlConnector"}


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
        from .plan import discover, resolve_device
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


def pd_connector(target) -> str | None:
    """The KV connector of a Cluster planned as a PD split ('example'/'nixl'), else None."""
    roles = {getattr(r, "role", "both") for r in getattr(target, "ranks", [])}
    if not {"prefill", "decode"} <= roles:
        return None
    for plan in getattr(target, "plans", []):
        if "--kv-transfer-config" in plan.argv:
            cfg = json.loads(plan.argv[plan.argv.index("--kv-transfer-config") + 1])
            return {v: k for k, v in CONNECTORS.items()}.get(cfg.get("kv_connector"), "example")
    return "example"


class PDForwarder:
    """Two-phase forwarding: prefill on a prefill rank (``max_tokens=1``), then decode on a decode rank.

    Requests on other paths, and every request when the router has no prefill/decode ranks,
    go through unchanged.
    """

    def __init__(self, forwarder: Forwarder, connector: str = "example"):
        if connector not in CONNECTORS:
            raise SpecError("connector", connector, f"expected one of {sorted(CONNECTORS)}")
        self.fwd, self.connector = forwarder, connector

    @property
    def router(self):
        return self.fwd.router

    def _has_split(self) -> bool:
        roles = {getattr(s.rank, "role", "both") for s in self.fwd.router.states}
        return "prefill" in roles and "decode" in roles

    async def open(self, method: str, path: str, *, content: bytes | None = None,
                   headers: Mapping[str, str] | None = None, info: RequestInfo | None = None, rank=None,
                   stream: bool = False, timeout=None) -> Upstream:
        if method != "POST" or path.split("?")[0] not in PD_PATHS or not content or rank is not None \
                or not self._has_split():
            return await self.fwd.open(method, path, content=content, headers=headers, info=info, rank=rank,
                                       stream=stream, timeout=timeout)
        body = json.loads(content)
        pbody = dict(body, max_tokens=1, stream=False)
        pbody.pop("stream_options", None)
        if "max_completion_tokens" in pbody:
            pbody["max_completion_tokens"] = 1
        if self.connector == "nixl":
            pbody["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False,
                                           "remote_engine_id": None, "remote_block_ids": None,
                                           "remote_host": None, "remote_port": None}
        pinfo = RequestInfo(prompt_tokens=info.prompt_tokens if info else 0, max_tokens=1,
                            prefix=info.prefix if info else None, session=info.session if info else None)
        t0 = time.perf_counter()
        first = await self.fwd.open("POST", path, content=json.dumps(pbody).encode(), headers=headers, info=pinfo,
                                    stream=False, timeout=timeout, roles=frozenset({"prefill"}))
        prefill_s = time.perf_counter() - t0
        if first.status_code >= 400:
            return first
        dbody = dict(body)
        if self.connector == "nixl":
            try:
                dbody["kv_transfer_params"] = json.loads(first.body).get("kv_transfer_params")
            except ValueError:
                pass
        up = await self.fwd.open("POST", path, content=json.dumps(dbody).encode(), headers=headers, info=info,
                                 stream=stream, timeout=timeout, roles=frozenset({"decode"}))
        # TTFT and E2E count from the start of the prefill phase: what the caller waits for
        if up.stream:
            up.lease._t0 -= prefill_s
        else:
            if up.record.ttft_s is not None:
                up.record.ttft_s += prefill_s
            if up.record.e2e_s is not None:
                up.record.e2e_s += prefill_s
        up.record.prefill_rank, up.record.prefill_s = first.lease.rank.name, prefill_s
        up.record.reason = f"pd: prefill on {first.lease.rank.name} ({prefill_s:.3f} s), decode {up.record.reason}"
        return up
