"""Two-phase forwarding for a prefill/decode split: the prompt goes to a prefill rank with
``max_tokens=1``, then the request to a decode rank, whose replica loads the prompt's KV cache
through the KV connector. The replicas' side (roles, connector flags) is
:func:`nbkit.cluster.pd.pd_specs`.
"""

from __future__ import annotations

import json
import time
from typing import Mapping

from nbkit.policies import RequestInfo
from nbkit.routing.forward import Forwarder, Upstream

PD_PATHS = ("/v1/completions", "/v1/chat/completions")
#: nbkit's connector names -> vLLM's ``kv_connector``
CONNECTORS = {"example": "ExampleConnector", "nixl": "NixlConnector"}


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
            raise ValueError(f"connector={connector!r}: expected one of {sorted(CONNECTORS)}")
        self.fwd, self.connector = forwarder, connector

    @property
    def router(self):
        return self.fwd.router

    def _has_split(self) -> bool:
        roles = {getattr(s.rank, "role", "both") for s in self.fwd.router.states}
        return "prefill" in roles and "decode" in roles

    async def open(self, method: str, path: str, *, content: bytes | None = None,
                   headers: Mapping[str, str] | None = None, info: RequestInfo | None = None, rank=None,
                   stream: bool = False, timeout=None, body: dict | None = None) -> Upstream:
        """As :meth:`Forwarder.open`; a split request's streams do not migrate (its KV lives on one
        decode rank)."""
        if method != "POST" or path.split("?")[0] not in PD_PATHS or not content or rank is not None \
                or not self._has_split():
            return await self.fwd.open(method, path, content=content, headers=headers, info=info, rank=rank,
                                       stream=stream, timeout=timeout, body=body)
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
            up.lease.backdate(prefill_s)
        else:
            if up.record.ttft_s is not None:
                up.record.ttft_s += prefill_s
            if up.record.e2e_s is not None:
                up.record.e2e_s += prefill_s
        up.record.prefill_rank, up.record.prefill_s = first.lease.rank.name, prefill_s
        up.record.reason = f"pd: prefill on {first.lease.rank.name} ({prefill_s:.3f} s), decode {up.record.reason}"
        return up
