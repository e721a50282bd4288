"""The cluster simulator: every instance's engine on one event heap, requests routed by the live
router's policy objects (:mod:`nbkit.policies`), prefill/decode handoffs over the link, agentic
sessions and data-parallel groups::

    from nbkit.sim import Simulator, load_cluster_config
    from nbkit.traces import read_trace
    sim = Simulator(load_cluster_config("cluster.json"), policy="LOAD", dtype="float16", block_size=16)
    result = sim.run(read_trace("trace.jsonl"))
    print(result.format_summary())
    result.write_csv("out.csv")                      # or time_unit="ns" for the seed format

Routing: for each arriving request the simulator builds one :class:`~nbkit.policies.RankLoad` per
candidate instance from the engines' exact state (``in_flight``, pending prefill/decode tokens as
the live router accounts them, ``running``, ``waiting``, ``kv_cache_usage``, ``stale=False``) and
calls ``policy.select`` then ``policy.on_dispatch``. ``RankLoad.index`` is the instance id (its
position in the config) and ``key`` its name (``inst0``). ``RequestInfo.prefix`` is the prompt's
token ids joined by spaces when the trace has them (a synthetic per-session string for sessions),
computed only for policies that read it (prefix_affinity, custom). A policy object gets the same
RankLoads at every decision, refreshed in place for the instances whose state changed (a custom
function gets fresh ones: it may keep them); a policy whose choice is the least of per-rank costs
(least load, least outstanding) gets its decision from the costs of the changed ranks computed
again and the others' kept (:mod:`nbkit.sim.load_view`).

Prefill/decode split: requests are routed among the ``pd_type: "prefill"`` instances; after the
first token the prompt's KV (``kv_bytes_per_token * input_toks``) crosses the cluster link in
``bytes / link_bw + link_latency``, the prefill instance frees its blocks, the request is routed
among the ``"decode"`` instances (a second instance of the same policy) and waits there like any
request, with its prompt's KV already present but the last prompt token, whose computation gives
the first token the client sees. TTFT therefore includes prefill, transfer and one decode step.

Request overhead: a request reaches its (entry) instance's engine ``hw.request_overhead_s`` after
it arrives and is routed (the API server's HTTP handling and tokenization), so its TTFT and E2E
include that once; the policy sees it as dispatched from the arrival on.

Sessions (:class:`~nbkit.traces.TraceSession`): sub-request ``k+1`` arrives ``tool_duration_ns``
after sub-request ``k`` finished; its prompt is the conversation so far plus its new input, whose
blocks are shared with earlier turns, so the prefix cache applies; ``RequestInfo.session`` is the
session id.

Records: one :class:`~nbkit.records.RequestResult` per request, in arrival order;
``request_id`` is the request's position in the trace (sorted by arrival) or ``"<session>/<k>"``
for turn ``k`` of a session (``session_id`` and ``turn`` say the same); ``instance_id`` is the
instance that produced the tokens (the decode instance of a PD pair; ``prefill_instance`` holds the
other). A request that can never fit an instance (``max_model_len``, KV capacity) gets
``outcome="http_400"``, as vLLM answers; one over its tenant's limit ``"http_429"``. At fleet
scale ``run(trace, rows=writer.write, token_detail=False)`` streams them instead (finish order,
no inter-token lists; ``python -m nbkit.sim`` does so): memory then grows with the engine steps
(12 bytes each), not with the tokens, and the summary is gathered as requests finish.

Speed: a run of decode-only steps (after the step that finishes a prompt, too) is planned ahead and
driven as one event (:mod:`nbkit.sim.runs`; the same step times to the bit); a least-cost policy's
decision scores again only the instances whose state changed (:mod:`nbkit.sim.load_view`). At fleet
scale most of the time is then the per-arrival refresh of the instances whose step ended since the
last arrival, the two runs planned per request and its record.

Admission (``tenants``, ``max_per_rank``, ``max_concurrency``): the live router's queue, fair share
and rate limits on simulated time (:mod:`nbkit.sim.admission`).

LoRA (:mod:`nbkit.sim.lora`): instances with ``lora_modules``/``max_loras`` hold adapters (an LRU); a
request naming one (the trace's ``lora``) is routed by the policy's LoRA affinity and, where the adapter
is not resident, reaches its engine ``lora_load_s`` later. ``self.adapters`` holds the table after a run.

Data parallel: instances with the same ``dp_group`` are the ranks of one deployment and step in
lockstep (a step lasts as long as its slowest rank; an idle rank waits), as vLLM's DP engines
do; each rank is a routing candidate of its own, as in the live router.
"""

from __future__ import annotations

import copy
import heapq
from array import array
import math
import time
from typing import Any, Callable, Iterable, Sequence, TextIO

from nbkit.policies import CustomPolicy, Policy, PrefixAffinityPolicy, RankLoad, get_policy
from nbkit.by_tenant import TenantSummaries
from nbkit.records import RequestResult, Summarizer
from nbkit.traces import TraceRequest, TraceSession
from nbkit.sim.config import ClusterConfig, InstanceSetup, load_cluster_config, resolve_instances
from nbkit.sim.admission import SimAdmission
from nbkit.sim.engine import Engine
from nbkit.sim.interval_log import IntervalLog, instance_stats
from nbkit.sim.load_view import LoadView
from nbkit.sim.jobs import Job, Session, Unit, feed_kv_index, job_info, vllm_priority
from nbkit.sim.lora import SimAdapters
from nbkit.sim.hardware import HardwareProfile
from nbkit.sim.perf import StepModel
from nbkit.sim.request import Req
from nbkit.policies.autoscale import AutoscaleSpec
from nbkit.sim.scaling import Fleet, scaled_setups
from nbkit.sim.results import SimResult, TraceOrderError, add_counted_gaps, count_gaps, in_order

__all__ = ["Simulator", "SimResult", "simulate", "TraceOrderError"]

_STEP, _SUB, _XFER, _LOG, _ADMIT, _SCALE, _READY, _PUMP = 0, 1, 2, 3, 4, 5, 6, 7


def _clone_policy(spec, seed):
    if isinstance(spec, Policy):
        return copy.deepcopy(spec)
    if isinstance(spec, str) or (isinstance(spec, type) and issubclass(spec, Policy)):
        return None
    return get_policy(spec, seed=seed)


class Simulator:
    """A cluster of simulated instances (see the module doc).

    ``policy``: a name (``LOAD``, ``RR``, ``RAND``, ``least_outstanding``, ``power_of_two``,
    ``prefix_affinity``, ``session``, ...), a :class:`~nbkit.policies.Policy`, a Policy class, or
    a function ``fn(candidates, request)`` (:class:`~nbkit.policies.CustomPolicy`).
    ``policy_options`` go to ``get_policy`` with ``seed``. ``hardware`` maps names to profiles
    replacing the shipped ones (calibrated profiles). ``log_interval`` (simulated seconds) prints
    one line per interval to ``log_file`` (default stdout) in the live monitor's format.
    ``autoscale`` (an :class:`~nbkit.policies.autoscale.AutoscaleSpec` or its text,
    ``"min=1,max=8,ttft_p90_ms=500"``): the config's one instance is copied ``max_replicas`` times
    and the live autoscaler decides how many serve (:mod:`nbkit.sim.scaling`; ``result.scaling``).
    ``tenants`` (a :class:`~nbkit.policies.tenants.Tenants`, its TOML shape or a TOML path),
    ``max_per_rank``, ``max_concurrency``, ``interactive_headroom``: the live router's admission
    (:mod:`nbkit.sim.admission`); ``result.tenants`` has each tenant's figures.
    """

    def __init__(self, config: ClusterConfig | dict | str, *, policy: Any = "least_load",
                 policy_options: dict | None = None, dtype: str = "float16", block_size: int | None = None,
                 hardware: dict[str, HardwareProfile] | None = None, seed: int = 0,
                 log_interval: float | None = None, log_file: TextIO | None = None,
                 setups: Sequence[InstanceSetup] | None = None, autoscale: AutoscaleSpec | str | None = None,
                 tenants: Any = None, max_per_rank: int | None = None, max_concurrency: int | None = None,
                 interactive_headroom: int = 0):
        if not isinstance(config, ClusterConfig):
            config = load_cluster_config(config)
        self.config = config
        self.setups = list(setups) if setups is not None else resolve_instances(
            config, dtype=dtype, block_size=block_size, hardware=hardware)
        self.autoscale = AutoscaleSpec.parse(autoscale) if isinstance(autoscale, str) else autoscale
        if self.autoscale is not None:
            self.setups = scaled_setups(self.setups, self.autoscale)
        self.link_bw = config.link_bw * 1e9
        self.link_latency = config.link_latency * 1e-9
        self.seed = seed
        opts = dict(policy_options or {})
        self.policy = get_policy(policy, seed=seed, **opts) if not isinstance(policy, Policy) else policy
        clone = _clone_policy(policy, seed + 1)
        self.decode_policy = clone if clone is not None else get_policy(policy, seed=seed + 1, **opts)
        self.policy_name = getattr(self.policy, "name", "") or type(self.policy).__name__
        if isinstance(self.policy, CustomPolicy):
            self.policy_name = f"custom:{self.policy.fn_name}"
        if log_interval is not None and log_interval <= 0:
            raise ValueError(f"log_interval={log_interval!r}: must be > 0")
        self.log_interval = log_interval
        self.log_file = log_file
        #: the router's admission (tenants, limits, slots, fair queue) on simulated time, where asked for
        self.admission = (SimAdmission(tenants, max_per_rank=max_per_rank, max_concurrency=max_concurrency,
                                       interactive_headroom=interactive_headroom)
                          if tenants is not None or max_per_rank is not None or max_concurrency is not None else None)
        #: keep each engine's per-step log and each request's final (engine, Req) in
        #: ``self.finals`` (calibration reads them)
        self.instrument = False
        self.finals: dict[str, tuple[Engine, Req]] = {}

    # -- helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _needs_prefix(policy: Policy) -> bool:
        return isinstance(policy, (PrefixAffinityPolicy, CustomPolicy))

    # -- the run -----------------------------------------------------------------------------------
    def run(self, trace: Iterable[TraceRequest | TraceSession], *,
            rows: Callable[[RequestResult], Any] | None = None, token_detail: bool = True,
            keep_records: bool | None = None) -> SimResult:
        """Simulate ``trace`` to completion (every request finishes or is rejected). A list (any
        sequence) is sorted by arrival first; an iterator is read as the run goes (constant
        memory) and must come in arrival order (ValueError otherwise).

        ``rows``: called with each request's record as it finishes (e.g. a
        :class:`~nbkit.records.CsvWriter`'s ``write``: rows stream to the file in finish order).
        ``keep_records`` (default: True without ``rows``) keeps them in ``result.records`` too,
        sorted by arrival. ``token_detail=False`` gives every record an empty ``itl_s``: nothing
        per token is made, and the summary's ITL figures come from the engines' step gaps, each
        counted once per request that got a token in both steps (the same percentiles; the mean
        equal up to rounding)."""
        wall0 = time.perf_counter()
        keep = rows is None if keep_records is None else keep_records
        acc = None if keep and token_detail else Summarizer()
        acc_add = acc.add if acc is not None else None
        per_inst: dict[str, int] = {}
        counted = [array("i") for _ in self.setups]   # per engine: +1/-1 where a run of counted gaps starts/ends
        raw_gaps = array("d")                         # gaps that are no step gap (preemption jumps, late first)
        engines = [Engine(s, StepModel(s)) for s in self.setups]
        self.engines = engines
        for e in engines:
            e.busy = False
            e.unit = None
            e.record_steps = self.instrument
        self.finals = {}
        finals = self.finals if self.instrument else None
        Unit.assign(engines)
        entry = [e for e in engines if e.setup.pd_type in (None, "prefill")]
        decode = [e for e in engines if e.setup.pd_type == "decode"]
        policy, dpolicy = self.policy, self.decode_policy
        policy.on_ranks_changed([e.key for e in entry])
        if decode:
            dpolicy.on_ranks_changed([e.key for e in decode])
        need_prefix = self._needs_prefix(policy) or (decode and self._needs_prefix(dpolicy))
        need_ids = policy.uses_kv_index or (decode and dpolicy.uses_kv_index)
        if need_ids:   # kv_aware: the engines' own KV-cache events feed one exact index, as the live router's
            feed_kv_index(engines, (policy, dpolicy))
        pname = self.policy_name
        self.adapters = adapters = SimAdapters.of(self.setups)  # LoRA adapters per instance (nbkit.sim.lora)
        gate = self.admission
        if gate is not None:
            gate.reset()
        by_tenant = TenantSummaries()
        pump_due = [False]
        records: list[RequestResult] = []
        heap: list = []
        counter = [0]
        api_free: dict[int, float] = {}  # per instance: when its API server is free again (api_serial_s)
        push = heapq.heappush
        link_bw, link_lat = self.link_bw, self.link_latency
        def hook(bound, base):          # None where the policy keeps the base class's, which does nothing
            return None if getattr(bound, "__func__", None) is base else bound
        release, dispatched = hook(policy.on_release, Policy.on_release), hook(policy.on_dispatch, Policy.on_dispatch)
        # what the policies see of the engines, and their decisions (nbkit.sim.load_view)
        entry_view = LoadView(entry, policy)
        decode_view = LoadView(decode, dpolicy) if decode else None
        entry_loads = entry_view
        decode_loads = decode_view
        # runs of decode-only steps take one event (Engine.sync applies them when read); not with
        # per-step logs (calibration), interval lines or lockstep DP ranks
        for e in engines:
            e.macro = e.unit is None and not self.instrument and self.log_interval is None
            e.ev = -1

        INF = math.inf
        if iter(trace) is trace:        # a stream (e.g. lines of a file): taken as it comes
            src = in_order(trace)
        else:
            src = iter(sorted(trace, key=lambda r: r.arrival_time_ns))
        nxt = next(src, None)
        t0 = nxt.arrival_time_ns * 1e-9 if nxt is not None else 0.0
        ta = t0 if nxt is not None else INF
        fleet = Fleet(entry, self.autoscale, t0) if self.autoscale is not None else None
        if fleet is not None:   # only serving replicas are candidates
            all_loads = entry_loads
            entry_loads = lambda t: [r for r in all_loads(t) if fleet.serving(r.index)]  # noqa: E731
            policy.on_ranks_changed(fleet.keys())
            counter[0] += 1
            push(heap, (t0 + self.autoscale.interval_s, counter[0], _SCALE, None))

        def kick(e: Engine, t: float) -> None:
            u = e.unit
            if u is None:
                if e.busy:
                    return
                dt = e.schedule(t)
                if dt is not None:
                    e.busy = True
                    counter[0] += 1
                    e.ev = counter[0]
                    push(heap, (t + dt if e.plan_end is None else e.plan_end, counter[0], _STEP, e))
            elif not u.busy:
                start_unit(u, t)

        def start_unit(u: Unit, t: float) -> None:
            dt = -1.0
            for m in u.members:
                d = m.schedule(t)
                m.busy = d is not None
                if d is not None and d > dt:
                    dt = d
            if dt >= 0:
                u.busy = True
                counter[0] += 1
                push(heap, (t + dt, counter[0], _STEP, u))
            else:
                u.busy = False

        def record(job: Job, e: Engine | None, r: Req | None, outcome: str = "ok") -> None:
            if job.choice is not None and release is not None:
                release(job.choice, job.info)
            if job.held is not None:    # its slot frees: the queue may move
                gate.release(job.held)
                job.held = None
                if gate.queue and not pump_due[0]:
                    pump_due[0] = True
                    counter[0] += 1
                    push(heap, (now, counter[0], _PUMP, None))
            ent = job.entry
            job.entry = None            # the request is over: no Job <-> Req cycle left to the collector
            qw = (ent.first_sched - job.arrival) if ent is not None and ent.first_sched is not None else None
            if outcome != "ok" or r is None or e is None:
                done(RequestResult(
                    str(job.rid), None if e is None else e.index, "" if e is None else e.key, pname,
                    job.arrival - t0, qw, input_toks=job.prompt, output_toks=job.output, outcome=outcome,
                    session_id=job.session or "", turn=job.turn, prefill_instance=job.prefill_inst,
                    tenant=job.tenant or ""))
                return
            ends = e.step_ends
            segs = r.segs
            late = e.setup.hw.decode_overhead_s if job.output > 1 else 0.0
            if token_detail:
                if len(segs) == 1:
                    a, b = segs[0]
                    times = ends[a:b]
                else:
                    times = []
                    for a, b in segs:
                        times.extend(ends[a:b])
                itl = [y - x for x, y in zip(times, times[1:])]
                if late > 0 and itl:   # tokens 2..n reach the client that much later (see HardwareProfile)
                    itl[0] += late
            else:
                itl = []
                count_gaps(counted[e.index], raw_gaps, ends, segs, late)
            if finals is not None:
                finals[str(job.rid)] = (e, r)
            ttft = r.first_token - job.arrival
            e2e = r.finish_time - job.arrival
            if late > 0:
                e2e += late
            done(RequestResult(
                str(job.rid), e.index, e.key, pname, job.arrival - t0, qw, ttft, itl, e2e,
                job.prompt, job.output, "ok", session_id=job.session or "", turn=job.turn,
                prefill_instance=job.prefill_inst,
                cached_tokens=(ent.cached_tokens if ent is not None else 0) + (r.cached_tokens if r is not ent else 0),
                preemptions=r.preemptions + (ent.preemptions if ent is not None and ent is not r else 0),
                tenant=job.tenant or ""))

        def done(rr: RequestResult) -> None:
            if fleet is not None and rr.ttft_s is not None:
                fleet.observe(t0 + rr.arrival_s + (rr.e2e_s or rr.ttft_s), rr.ttft_s)
            if rr.tenant:
                by_tenant.add(rr)
            if keep:
                records.append(rr)
            if acc_add is not None:
                acc_add(rr, token_detail)
                if rr.outcome == "ok":
                    per_inst[rr.rank] = per_inst.get(rr.rank, 0) + 1
            if rows is not None:
                rows(rr)

        def dispatch(job: Job, t: float) -> None:
            """A request arrives: charged to its tenant (429 over a limit), routed or queued."""
            if gate is not None and job.limits is None:
                job.limits, job.tenant, job.priority = gate.classify(job.tenant, job.priority, f"request {job.rid}")
                if not gate.charge(job.limits, job.prompt, job.output, t):
                    record(job, None, None, "http_429")
                    session_next(job, t, failed=True)
                    return
            cands = candidates(job, t)
            if gate is not None and not cands:
                gate.wait(job, job.limits, job.priority, job.prompt, job.output)
                return
            route(job, t, cands)

        def candidates(job: Job, t: float) -> list[RankLoad]:
            loads_ = entry_loads(t)
            if gate is None:
                return loads_
            p = job.priority
            return [r for r in loads_ if gate.has_room(r.index, p)] if gate.total_room(p) else []

        def pump(t: float) -> None:
            """Slots freed: grant queued requests in the queue's order (priority, fair share)."""
            pump_due[0] = False
            # room depends only on priority (headroom for <= 0), which the queue serves in order:
            # once one request finds none, none of those after it can
            for job in gate.queue:
                cands = candidates(job, t)
                if not cands:
                    break
                gate.queue.take(job)
                route(job, t, cands)

        def route(job: Job, t: float, cands: list[RankLoad]) -> None:
            info = job.info = job_info(job, need_prefix, need_ids, gate is not None)
            if adapters is not None and job.lora:  # RankLoad.loras: the policy's LoRA affinity reads them
                adapters.annotate(cands)
            choice = entry_view.select(cands, info)
            if dispatched is not None:
                dispatched(choice, info)
            job.choice = choice
            if gate is not None:
                gate.hold(choice.index)
                job.held = choice.index
            e = engines[choice.index]
            r = Req(job.rid, job.prompt, job.output, ids=job.ids, session=job.session, data=job,
                    lora=job.lora if adapters is not None else None, priority=vllm_priority(job, e.by_priority))
            job.entry = r
            if e.setup.pd_type == "prefill":
                job.prefill_inst = e.index
            t_in = adapters.ready(e.index, job.lora, t) if adapters is not None and job.lora else t  # load it first
            at, api_free[e.index] = e.setup.hw.admission(t_in, api_free.get(e.index, 0.0))
            delay = at - t
            if delay > 0:       # HTTP, tokenization: the request reaches the engine later
                counter[0] += 1
                push(heap, (t + delay, counter[0], _ADMIT, (e, r)))
                return
            admit(e, r, t)

        def cut(e: Engine, t: float) -> None:
            """A request reaches ``e`` at ``t``: its planned run ends with the step in progress."""
            end = e.truncate(t)
            if end is not None:
                counter[0] += 1
                e.ev = counter[0]
                push(heap, (end, counter[0], _STEP, e))

        def admit(e: Engine, r: Req, t: float) -> None:
            if e._plan is not None:
                cut(e, t)
            if not e.add(r, t):
                job = r.data
                record(job, e, None, "http_400")
                session_next(job, t, failed=True)
                return
            kick(e, t)

        def session_next(job: Job, t: float, failed: bool = False) -> None:
            s = job.sess
            if s is None:
                return
            sub = s.subs[s.k]
            s.context = job.prompt + job.output
            s.k += 1
            if failed or s.k >= len(s.subs):
                return
            counter[0] += 1
            push(heap, (t + sub.tool_duration_ns * 1e-9, counter[0], _SUB, s))

        def start_sub(s: Session, t: float) -> None:
            sub = s.subs[s.k]
            prompt = s.context + sub.input_toks
            job = Job(f"{s.sid}/{s.k}", t, prompt, sub.output_toks, session=s.sid, sess=s, turn=s.k,
                      tenant=s.tenant, priority=s.priority, lora=s.lora)
            dispatch(job, t)

        def on_done(e: Engine, r: Req, t: float) -> None:
            job: Job = r.data
            if e.prefill_only:
                nbytes = e.kv_bytes_per_token * job.prompt
                counter[0] += 1
                push(heap, (t + nbytes / link_bw + link_lat, counter[0], _XFER, (e, r)))
                return
            record(job, e, r)
            session_next(job, t)

        def on_xfer(e: Engine, r: Req, t: float) -> None:
            job: Job = r.data
            e.release_handoff(r)
            kick(e, t)
            info = job.info
            choice = decode_view.select(decode_loads(t), info)
            dpolicy.on_dispatch(choice, info)
            d = engines[choice.index]
            r2 = Req(job.rid, job.prompt, job.output, ids=job.ids, session=job.session,
                     computed=job.prompt - 1, data=job, lora=job.lora if self.adapters is not None else None,
                     priority=vllm_priority(job, d.by_priority))
            if d._plan is not None:
                cut(d, t)
            if not d.add(r2, t):
                record(job, d, None, "http_400")
                session_next(job, t, failed=True)
                return
            kick(d, t)

        def step_end(x, t: float) -> None:
            if type(x) is Engine:
                x.busy = False
                for r in x.finish_step(t):
                    on_done(x, r, t)
                kick(x, t)
            else:
                for m in x.members:
                    if m.busy:
                        m.busy = False
                        for r in m.finish_step(t):
                            on_done(m, r, t)
                x.busy = False
                start_unit(x, t)

        # interval lines
        interval = self.log_interval
        ilog = IntervalLog(engines, interval, self.log_file) if interval is not None else None
        if interval is not None and nxt is not None:
            counter[0] += 1
            push(heap, (t0 + interval, counter[0], _LOG, None))

        def pending() -> bool:
            """Work left besides the periodic ticks (log lines, autoscaling)."""
            return (nxt is not None or any(ev[2] != _LOG and ev[2] != _SCALE for ev in heap) or bool(gate and gate.queue)
                    or any(e.has_work() for e in engines))

        # the loop
        now = end = t0
        pop = heapq.heappop
        seq_id = 0
        while True:
            if heap and heap[0][0] <= ta:
                te, c, kind, x = pop(heap)
                if kind == _STEP:
                    if type(x) is Engine and x.ev != c:
                        continue    # a planned run's end that moved earlier
                    now = end = te
                    step_end(x, now)
                    continue
                now = te
                if kind == _SUB:
                    start_sub(x, now)
                elif kind == _ADMIT:
                    admit(x[0], x[1], now)
                elif kind == _XFER:
                    on_xfer(x[0], x[1], now)
                elif kind == _PUMP:
                    pump(now)
                if kind < _LOG or kind == _ADMIT:
                    end = now   # ticks are no work: with autoscaling the run ends with its last request's
                if kind == _SCALE:
                    started, changed = fleet.tick(now)
                    for k in started:
                        counter[0] += 1
                        push(heap, (now + self.autoscale.cold_start_s, counter[0], _READY, k))
                    if changed:
                        policy.on_ranks_changed(fleet.keys())
                    if pending() or fleet.busy():
                        counter[0] += 1
                        push(heap, (now + self.autoscale.interval_s, counter[0], _SCALE, None))
                if kind == _READY:
                    fleet.ready(x, now)
                    policy.on_ranks_changed(fleet.keys())
                if kind == _LOG:
                    ilog.tick(now)
                    if pending():
                        counter[0] += 1
                        push(heap, (now + interval, counter[0], _LOG, None))
            elif nxt is not None:
                now = ta
                it = nxt
                nxt = next(src, None)
                ta = nxt.arrival_time_ns * 1e-9 if nxt is not None else INF
                if isinstance(it, TraceSession):
                    s = Session(it.session_id, it.sub_requests, it.tenant, it.priority, it.lora)
                    start_sub(s, now)
                else:
                    job = Job(seq_id, now, it.input_toks, it.output_toks, ids=it.input_tok_ids, tenant=it.tenant,
                              priority=it.priority, lora=it.lora)
                    dispatch(job, now)
                seq_id += 1
                end = now
            else:
                break

        records.sort(key=lambda r: r.arrival_s)
        if acc is not None and not token_detail:
            add_counted_gaps(acc, [e.step_ends for e in engines], counted, raw_gaps)
        span = (end if fleet is not None else now) - t0
        return SimResult(records, instance_stats(engines), time.perf_counter() - wall0, span, pname,
                         ilog.lines if ilog is not None else [], summarizer=acc, per_instance=None if acc is None else per_inst,
                         scaling=fleet.report(end) if fleet is not None else None,
                         tenants=by_tenant.summary(span) if by_tenant else None)


def simulate(config, trace, **kwargs) -> SimResult:
    """``Simulator(config, **kwargs).run(trace)``; ``trace`` may be a path."""
    if isinstance(trace, (str, bytes)) or hasattr(trace, "__fspath__"):
        from nbkit.traces import read_trace
        trace = read_trace(trace)
    return Simulator(config, **kwargs).run(trace)
