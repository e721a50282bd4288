"""The simulator's bookkeeping per request: a :class:`Job` is one logical request across engines
(a prefill/decode request has two :class:`~nbkit.sim.request.Req`), a :class:`Session` an agentic
conversation's progress, a :class:`Unit` the lockstep ranks of one data-parallel group."""

from __future__ import annotations

from typing import Any

from nbkit.policies import RequestInfo
from nbkit.policies.kv_index import KVIndex
from nbkit.policies.tenants import parse_priority
from nbkit.sim.request import Req

__all__ = ["Job", "Session", "Unit", "feed_kv_index", "job_info", "vllm_priority"]


class Unit:
    """Ranks of one dp_group: they step together."""

    __slots__ = ("members", "busy")

    def __init__(self, members):
        self.members = members
        self.busy = False

    @staticmethod
    def assign(engines) -> None:
        """Give each engine of a dp_group with more than one rank its group's Unit (``e.unit``)."""
        groups: dict[str, list] = {}
        for e in engines:
            if e.setup.dp_group is not None:
                groups.setdefault(e.setup.dp_group, []).append(e)
        for members in groups.values():
            if len(members) > 1:
                u = Unit(members)
                for e in members:
                    e.unit = u


def feed_kv_index(engines, policies) -> KVIndex:
    """One exact KV index fed by every engine's own KV-cache events, read by the policies that
    use one (kv_aware), as the live router's index is fed by the replicas' ZMQ events."""
    index = KVIndex()
    for p in policies:
        if p is not None and p.uses_kv_index:
            p.kv_index = index
    for e in engines:
        index.mark_empty(e.key)
        e.kv_events = lambda events, key=e.key: index.apply_batch(key, None, events)
    return index


class Job:
    """One logical request across engines (a PD request has a prefill and a decode ``Req``)."""

    __slots__ = ("rid", "arrival", "prompt", "output", "ids", "session", "sess", "turn", "entry", "prefill_inst",
                 "info", "choice", "tenant", "priority", "limits", "held", "lora")

    def __init__(self, rid, arrival, prompt, output, ids=None, session=None, sess=None, turn=0,
                 tenant: str = "", priority: Any = None, lora: str | None = None):
        self.lora = lora  # the LoRA adapter it names (nbkit.sim.lora)
        self.rid, self.arrival, self.prompt, self.output = rid, arrival, prompt, output
        self.ids, self.session, self.sess, self.turn = ids, session, sess, turn
        #: the trace's tenant and priority; with admission: the tenant's limits and the slot's instance
        self.tenant, self.priority, self.limits, self.held = tenant, priority, None, None
        self.entry: Req | None = None
        self.prefill_inst: int | None = None
        self.info: RequestInfo | None = None
        self.choice = None


class Session:
    __slots__ = ("sid", "subs", "k", "context", "tenant", "priority", "lora")

    def __init__(self, sid: str, subs, tenant: str = "", priority: Any = None, lora: str | None = None):
        self.sid, self.subs, self.k, self.context = sid, subs, 0, 0
        self.tenant, self.priority, self.lora = tenant, priority, lora


def vllm_priority(job: Job, applies: bool = True) -> int:
    """The ``priority`` vLLM's engine would get for ``job`` (where ``applies``: its instance runs
    ``--scheduling-policy priority``; else 0): its trace priority, or its tenant's once the
    admission has classified it, as nbkit's router sets vLLM's field; none: 0."""
    if not applies or job.priority is None:
        return 0
    return parse_priority(job.priority, where=f"request {job.rid}: priority")


def session_prefix(sid: str, tokens: int) -> str:
    """A synthetic prompt text for a session's turn of ``tokens`` tokens (prefix affinity's input)."""
    return "".join(f"{hash((sid, j)) & 0xFFFF:04x}" for j in range(tokens))


def job_info(job: Job, need_prefix: bool, need_ids: bool, admission: bool) -> RequestInfo:
    """What the policy knows of ``job``: its tokens, the prefix text and token ids where the policy
    reads them, its session, its tenant and priority (with ``admission``), its LoRA adapter."""
    prefix = None
    if need_prefix:
        if job.ids is not None:
            prefix = " ".join(map(str, job.ids))
        elif job.session is not None:
            prefix = session_prefix(job.session, job.prompt)
    info = RequestInfo(job.prompt, job.output, prefix, job.session, token_ids=job.ids if need_ids else None,
                       lora=job.lora)
    if admission:
        info.tenant, info.priority = job.tenant, job.priority
    return info
