"""The load generator: send a workload to a target on an arrival process, record every request.

    from nbkit import bench
    res = bench.run("http://127.0.0.1:8000", bench.shared_prefix(4, 50), request_rate=8, num_prompts=200)
    res = bench.run(cluster, w, policy="prefix_affinity", concurrency=16)    # in-kernel RoutedClient
    res = await bench.arun(client, w, request_rate=4)                         # awaitable, in a cell
    res.to_csv("results.csv"); res.summary(); print(res)

The run happens on nbkit's loop thread (so it works the same in a notebook cell, a script and
under nbmake). Requests are sent at their arrival times whatever happened to the others (open
loop), or by ``concurrency`` workers (closed loop); ``num_prompts`` caps the requests sent and
``duration_s`` stops sending after that many seconds (in-flight requests then finish, or are
cancelled ``drain_s`` later). A session (multi-turn, agentic) sends its turns one after another;
a failed turn ends its session. Every request sent is one row, failures included.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from nbkit import loop
from nbkit.records import RequestResult, parse_slos
from nbkit.routing.probes import Probe, ProbeError
from nbkit.bench.arrivals import Arrivals, make_arrivals
from nbkit.bench.results import BenchResult, metrics_delta
from nbkit.bench.targets import Call, ReplicaRef, Reply, Target, as_target
from nbkit.bench.workloads import Prompt, Workload


def run(target, workload: Workload, **kw) -> BenchResult:
    """Blocking benchmark run; see :func:`arun` for the arguments."""
    return loop.run(_arun(target, workload, **kw))


async def arun(target, workload: Workload, **kw) -> BenchResult:
    """Benchmark ``target`` with ``workload``; returns a :class:`~nbkit.bench.results.BenchResult`.

    target: a URL (any OpenAI-compatible server), an nbkit ``Endpoint``, a ``RoutedClient``, a
        ``Cluster`` (a RoutedClient with ``policy`` is made for the run) or a ``Target``.
    arrivals: an :mod:`~nbkit.bench.arrivals` process; or the knobs ``request_rate`` (req/s, open
        loop, ``arrival`` = poisson | constant | burst, ``burstiness``, ``burst_size``) and
        ``concurrency`` (closed loop alone, a cap on in-flight requests with a rate). Neither: a
        trace's own timestamps, else all at once.
    num_prompts: cap on requests sent; duration_s: stop sending after this many seconds;
        drain_s: after sending stops, cancel what is still running this much later.
    seed: the arrival process' seed (the workload has its own).
    policy: routing policy (Cluster / RoutedClient) or just the label of the rows (URL).
    label: the run's name in tables; api: "completions" or "chat"; model: the ``model`` field
        (default: the server's first model); params: extra request fields (default
        ``ignore_eos=True, temperature=0``).
    replicas: URLs (or Ranks) of the replicas to read /metrics from before and after (known by
        itself for a Cluster, RoutedClient or Endpoint); reset_prefix_cache: POST
        /reset_prefix_cache to them first (the replicas need ``VLLM_SERVER_DEV_MODE=1``).
    slos: goodput SLOs, e.g. ``{"ttft": 0.5, "tpot": 0.05}`` seconds or ``"ttft:500 tpot:50"`` ms.
    output / time_unit: also write the CSV there ("s" or "ns"); progress: a tqdm bar.

    Runs on nbkit's loop thread, except for a ``RoutedClient(local=True)``: that one is driven
    on the caller's own loop, where it lives.
    """
    if getattr(target, "local", False) and hasattr(target, "router"):
        return await _arun(target, workload, **kw)
    return await loop.wrap(_arun(target, workload, **kw))


async def _arun(target, workload: Workload, *, arrivals: Arrivals | None = None, request_rate: float | None = None,
                concurrency: int | None = None, arrival: str = "poisson", burstiness: float = 1.0,
                burst_size: int | None = None, num_prompts: int | None = None, duration_s: float | None = None,
                drain_s: float | None = None, seed: int | None = 0, policy=None, label: str | None = None,
                api: str = "completions", model: str | None = None, params: dict | None = None,
                replicas=None, reset_prefix_cache: bool = False, slos=None, output=None, time_unit: str = "s",
                progress: bool = True, timeout_s: float = 600.0, client_options: dict | None = None) -> BenchResult:
    if num_prompts is not None and num_prompts < 0:
        raise ValueError(f"num_prompts={num_prompts!r}: must be >= 0")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s={duration_s!r}: must be > 0")
    if time_unit not in ("s", "ns"):
        raise ValueError(f"time_unit={time_unit!r}: choose 's' or 'ns'")
    slo = parse_slos(slos)
    arr = arrivals or make_arrivals(request_rate, concurrency, kind=arrival, burstiness=burstiness,
                                    burst_size=burst_size, workload=workload)
    tgt = as_target(target, policy=policy, api=api, model=model, label=label, params=params, timeout_s=timeout_s,
                    replicas=replicas, client_options=client_options)
    if label:
        tgt.label = label
    refs = _replica_refs(replicas) if replicas is not None else tgt.replicas()
    try:
        await tgt.open()
        if refs and reset_prefix_cache:
            await reset_prefix_caches([r.url for r in refs])
        before = await scrape_replicas(refs) if refs else None
        started = time.time()
        rows, duration, peak = await drive(tgt, workload, arr, num_prompts=num_prompts, duration_s=duration_s,
                                           drain_s=drain_s, seed=seed, progress=progress, desc=tgt.label)
        after = await scrape_replicas(refs) if refs else None
    finally:
        await tgt.close()
    rm = None
    if before is not None and after is not None:
        names = {}
        for r in refs:
            for key in after:
                if key[0] == r.replica and (r.dp_rank is None or key[1] == str(r.dp_rank)):
                    names[key] = r.name
        rm = metrics_delta(before, after, names)
    meta: dict[str, Any] = {
        "workload": workload.describe(), "workload_params": workload.params, "tokenizer": workload.tokenizer,
        "arrivals": arr.describe(), "seed": seed, "num_prompts": num_prompts, "duration_cap_s": duration_s,
        "target": tgt.describe(), "model": getattr(tgt, "model", None), "started_at": started,
        "peak_in_flight": peak,
    }
    res = BenchResult(rows, duration, label=tgt.label, policy=tgt.policy, meta=meta, replica_metrics=rm,
                      slos=slo or None)
    if output:
        res.to_csv(output, time_unit)
    return res


def _replica_refs(replicas) -> list[ReplicaRef]:
    from nbkit.bench.targets import _replica_refs as conv
    return conv(replicas)


async def drive(target: Target, workload: Workload, arrivals: Arrivals, *, num_prompts: int | None = None,
                duration_s: float | None = None, drain_s: float | None = None, seed: int | None = 0,
                progress: bool = False, desc: str = "") -> tuple[list[RequestResult], float, int]:
    """The core loop (on the current event loop): returns (rows sorted by request id, duration s,
    peak requests in flight)."""
    items = list(workload.items)
    rows: list[RequestResult] = []
    state = {"sent": 0, "in_flight": 0, "peak": 0, "last_end": 0.0}
    total = workload.num_requests if num_prompts is None else min(workload.num_requests, num_prompts)
    bar = _progress(total, desc) if progress else None
    cap = None if arrivals.closed else arrivals.max_concurrency
    sem = asyncio.Semaphore(cap) if cap else None
    t0 = time.perf_counter()

    def may_send() -> bool:
        if num_prompts is not None and state["sent"] >= num_prompts:
            return False
        return duration_s is None or time.perf_counter() - t0 < duration_s

    keys = getattr(workload, "api_keys", None) or {}

    def who(it) -> dict:
        return {"tenant": it.tenant, "priority": it.priority, "api_key": keys.get(it.tenant)} if it.tenant else {}

    async def request(call: Call, session_id: str, turn: int, group: int | None = None) -> Reply | None:
        if sem is not None:
            await sem.acquire()
        try:
            if not may_send():
                return None
            row = RequestResult(request_id=state["sent"], policy=target.policy, input_toks=call.input_toks,
                                session_id=session_id, turn=turn, group=group, tenant=call.tenant or "")
            state["sent"] += 1
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
            start = time.perf_counter()
            row.arrival_s = start - t0
            try:
                rep = await target.send(call)
            except asyncio.CancelledError:
                row.outcome, row.error, row.e2e_s = "cancelled", "cancelled by the benchmark", time.perf_counter() - start
                rows.append(row)
                raise
            except Exception as e:  # noqa: BLE001 - a target should not raise, but if it does: one failed row
                rep = Reply(outcome="error", error=repr(e), e2e_s=time.perf_counter() - start)
            finally:
                state["in_flight"] -= 1
                state["last_end"] = max(state["last_end"], time.perf_counter() - t0)
            _fill(row, rep, target)
            rows.append(row)
            if bar is not None:
                bar.update(1)
            return rep
        finally:
            if sem is not None:
                sem.release()

    async def one_item(it) -> None:
        if isinstance(it, Prompt):
            await request(Call(prompt=it.text, messages=None if target.api != "chat" else
                               [{"role": "user", "content": it.text}], max_tokens=it.output_toks,
                               input_toks=it.input_toks, **who(it)), "", 0, it.group)
            return
        history = ""
        messages: list[dict] = []
        so_far = 0
        for k, turn in enumerate(it.turns):
            if k and turn.delay_s > 0:
                await asyncio.sleep(turn.delay_s)
            prompt = history + turn.text
            messages = messages + [{"role": "user", "content": turn.text}]
            so_far += turn.input_toks
            rep = await request(Call(prompt=prompt, messages=messages if target.api == "chat" else None,
                                     max_tokens=turn.output_toks, input_toks=so_far, session_id=it.session_id,
                                     keep_text=k + 1 < len(it.turns), **who(it)), it.session_id, k)
            if rep is None or rep.outcome != "ok":
                return  # capped, or the conversation broke: the session ends here
            history = prompt + rep.text
            messages = messages + [{"role": "assistant", "content": rep.text}]
            so_far = (rep.input_toks or so_far) + (rep.output_toks or turn.output_toks)

    tasks: list[asyncio.Task] = []
    try:
        if arrivals.closed:
            it_iter = iter(items)

            async def worker() -> None:
                for it in it_iter:  # shared: each item goes to exactly one worker
                    if not may_send():
                        return
                    await one_item(it)

            tasks = [asyncio.ensure_future(worker()) for _ in range(arrivals.concurrency)]
        else:
            times = arrivals.times(len(items), seed, items)
            for it, at in zip(items, times):
                if duration_s is not None and at >= duration_s:
                    break
                delay = t0 + float(at) - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not may_send():
                    break
                tasks.append(asyncio.ensure_future(one_item(it)))
        deadline = None
        if drain_s is not None:
            stop_at = duration_s if (arrivals.closed and duration_s is not None) else time.perf_counter() - t0
            deadline = t0 + stop_at + drain_s
        if tasks:
            timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    rows.sort(key=lambda r: r.request_id)
    duration = state["last_end"] if rows else 0.0
    return rows, duration, state["peak"]


def _fill(row: RequestResult, rep: Reply, target: Target) -> None:
    row.outcome, row.error = rep.outcome, rep.error
    row.ttft_s, row.itl_s, row.e2e_s = rep.ttft_s, list(rep.itl_s), rep.e2e_s
    if rep.input_toks is not None:
        row.input_toks = int(rep.input_toks)
    row.output_toks = int(rep.output_toks or 0)
    row.rank = rep.rank
    row.instance_id = rep.instance_id if rep.instance_id is not None and rep.instance_id >= 0 else None
    row.queue_wait_s = rep.queue_wait_s
    if rep.policy:
        row.policy = rep.policy


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc or "bench", unit="req", leave=True, dynamic_ncols=True)


# -- replicas' /metrics -----------------------------------------------------------------------------
async def scrape_replicas(refs: list[ReplicaRef], timeout: float = 10.0) -> dict | None:
    """``{(replica, engine label): EngineMetrics}`` of every replica (one GET per URL); None if one
    cannot be read."""
    by_url: dict[str, int] = {}
    for r in refs:
        by_url.setdefault(r.url, r.replica)
    out = {}
    probe = Probe(timeout=timeout)  # on this (the caller's) loop, closed below
    try:
        async def one(url: str, replica: int):
            try:
                return replica, await probe.metrics(url)
            except (ProbeError, ValueError):
                return None

        got = await asyncio.gather(*(one(u, i) for u, i in by_url.items()))
    finally:
        await probe.aclose()
    if any(g is None for g in got):
        return None
    for replica, snaps in got:
        for engine, m in snaps.items():
            out[(replica, engine)] = m
    return out


async def reset_prefix_caches(urls: list[str], timeout: float = 30.0) -> list[str]:
    """POST ``/reset_prefix_cache`` to each replica; returns the URLs where it failed (vLLM serves
    it only with ``VLLM_SERVER_DEV_MODE=1``)."""
    failed = []
    async with httpx.AsyncClient(timeout=timeout) as c:
        for u in dict.fromkeys(urls):
            try:
                r = await c.post(u + "/reset_prefix_cache")
                if r.status_code >= 400:
                    failed.append(u)
            except httpx.HTTPError:
                failed.append(u)
    return failed
