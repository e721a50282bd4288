"""One simulated vLLM replica: a v1-like scheduler over paged KV blocks with prefix caching.

An :class:`Engine` is driven from outside, one step at a time, by the cluster's event loop
(:mod:`nbkit.sim.simulator`) or in real time by the live replica (:mod:`nbkit.sim.replica`)::

    from nbkit.sim.config import resolve_instances, single_instance_config
    from nbkit.sim.engine import Engine
    from nbkit.sim.request import Req
    eng = Engine(resolve_instances(single_instance_config("tiny", "cpu"))[0])
    eng.add(Req("a", prompt=100, output=8), now=0.0)
    t = 0.0
    while eng.has_work():
        dt = eng.schedule(t)            # build the next batch; None if nothing can run
        t += dt
        for req in eng.finish_step(t):  # requests that finished in this step
            print(req.rid, req.first_token, req.finish_time)

Scheduling, per step (vLLM v1 with chunked prefill; V0's where the setup says so: new requests
join only every ``num_scheduler_steps``, and without ``chunked_prefill`` a prompt is prefilled whole
in a step of its own, the decodes waiting: its time adds to theirs):

1. every running request in decode takes one token of the ``max_num_batched_tokens`` budget
   (``max_num_seqs <= max_num_batched_tokens``, so they always fit); a decode that crosses into a
   new KV block allocates it;
2. running requests part-way through their prompt continue their chunked prefill with what is
   left of the budget;
3. if nothing was preempted in this step, waiting requests are admitted in FIFO order (with
   ``scheduling_policy: "priority"``: (priority, arrival) order) while the
   budget lasts and fewer than ``max_num_seqs`` run; a new request first reuses the cached blocks
   of its longest cached prefix (chained block hashes of its token ids), then allocates the rest.

When a step needs more free blocks than there are, the newest running request (by priority: the
last in that order) is preempted
(recompute: its blocks are freed, it goes back to the head of the queue and later recomputes
prompt + generated tokens, partly from the prefix cache). Freed blocks that hold a hash stay
cached and are evicted least-recently-freed first when plain free blocks run out.

Decoding requests are kept as aggregates (count, context sum, a bucket per block phase and a heap
of finishing steps), so a step costs O(prefill chunks + finishing requests), not O(batch): that is
what makes 10,000 requests over 8 replicas simulate in seconds.
"""

from __future__ import annotations

import heapq
from array import array
from collections import OrderedDict, deque

from nbkit.sim.perf import StepModel
from nbkit.sim.request import (ABORTED, DECODE, DONE, PREFILL, WAITING, Req, block_hashes, enqueue_by_priority,
                               priority_key, stored_events)
from nbkit.sim.runs import PlannedRuns

__all__ = ["Engine"]


class Engine(PlannedRuns):
    """One instance's scheduler, KV block pool and counters (see the module doc)."""

    # slots: the event loop reads and writes these all the time (others may still be set)
    __slots__ = ("setup", "key", "index", "model", "bs", "num_blocks", "max_seqs", "budget", "caching", "sched_every",
                 "chunked", "_sched_g", "max_len", "prefill_only", "hold_handoff", "kv_bytes_per_token", "waiting",
                 "running", "prefilling", "D", "B", "A", "bucket", "fin", "_seq", "g", "step_ends", "free_plain",
                 "cached", "evictable", "handoff", "kv_events", "in_flight", "pend_prefill", "pend_dec_other",
                 "prompt_tokens", "gen_tokens", "prefix_queries", "prefix_hits", "preemptions", "finished", "rejected",
                 "steps", "busy_time", "_in_step", "_dec_alloc", "_chunks", "_new_dec", "_step_D", "_t_start", "busy",
                 "dirty", "unit", "collect", "record_steps", "step_log", "last_batch", "__dict__")

    def __init__(self, setup, model: StepModel | None = None, *, prefill_only: bool | None = None,
                 hold_handoff: bool = True):
        self.setup = setup
        self.key = setup.key
        self.index = setup.index
        self.model = model or StepModel(setup)
        self.bs = setup.block_size
        self.num_blocks = setup.num_blocks
        self.max_seqs = setup.max_num_seqs
        self.budget = setup.max_num_batched_tokens
        self.caching = setup.enable_prefix_caching
        self.by_priority = setup.scheduling_policy == "priority"  # --scheduling-policy
        self.sched_every = setup.num_scheduler_steps
        self.chunked = setup.chunked_prefill
        self._sched_g = -setup.num_scheduler_steps   # the step at which new requests last could join
        self.max_len = setup.max_model_len
        self.prefill_only = setup.pd_type == "prefill" if prefill_only is None else prefill_only
        self.hold_handoff = hold_handoff and self.prefill_only
        self.kv_bytes_per_token = setup.model.kv_bytes_per_token(setup.dtype_bytes)
        # queues
        self.waiting: deque[Req] = deque()
        self.running: dict[Req, None] = {}
        self.prefilling: list[Req] = []
        # decode aggregates
        self.D = 0
        self.B = 0          # sum of (c0 - g0): context sum = B + D * g
        self.A = 0          # sum of (output - q0 + g0): remaining decode tokens = A - D * g
        self.bucket = [0] * self.bs
        self.fin: list[tuple[int, int, Req]] = []
        self._seq = 0
        self.g = 0          # steps executed
        self.step_ends = array("d")   # end time of every step (8 bytes a step)
        # KV pool
        self.free_plain = self.num_blocks
        self.cached: dict[int, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.handoff: dict[Req, None] = {}   # prefill-only: finished, KV not yet sent
        #: vLLM's KV-cache events of this engine's prefix cache (``BlockStored`` when a block gets a
        #: hash, ``BlockRemoved`` when it is evicted): ``kv_events(list of event maps)``; None: off
        self.kv_events = None
        # accounting for routing
        self.in_flight = self.pend_prefill = self.pend_dec_other = 0
        # counters
        self.prompt_tokens = 0          # prefill tokens computed (recomputation included)
        self.gen_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.finished = self.rejected = self.steps = 0
        self.busy_time = 0.0
        # step in progress
        self._in_step = False
        self._dec_alloc = False
        self._chunks: list[tuple[Req, int, int]] = []
        self._new_dec: list[Req] = []
        self._step_D = 0
        self._t_start = 0.0
        self.busy = False               # a step is in progress (set by the driver)
        self.dirty = True               # routing-visible state changed since the driver last read it (runs.STEPS)
        self._init_runs()
        self.unit = None                # the lockstep DP group, if any (set by the simulator)
        self.collect = False            # keep last_batch (the live server streams from it)
        self.record_steps = False       # keep (start, T, S, L, P, R) per step (calibration)
        self.step_log: list[tuple] = []
        self.last_batch: list[Req] = []

    # -- state for routing and metrics ---------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def free_blocks(self) -> int:
        return self.free_plain + len(self.evictable)

    def used_blocks(self) -> int:
        return self.num_blocks - self.free_plain - len(self.evictable)

    def kv_usage(self) -> float:
        return (self.num_blocks - self.free_plain - len(self.evictable)) / self.num_blocks

    def pending_decode(self) -> int:
        return self.pend_dec_other + self.A - self.D * self.g

    def fits(self, prompt: int, output: int) -> bool:
        """Whether a request can ever run here (vLLM rejects what exceeds max_model_len)."""
        total = prompt + (1 if self.prefill_only else output)
        if self.max_len is not None and total > self.max_len:
            return False
        return -(-total // self.bs) <= self.num_blocks

    # -- requests in ----------------------------------------------------------------------------
    def add(self, req: Req, now: float) -> bool:
        """Queue ``req``; False (and nothing queued) if it can never fit."""
        if not self.fits(req.prompt, req.output):
            self.rejected += 1
            req.state = ABORTED
            return False
        if self.prefill_only:
            req.output = 1
        req.arrival = now
        req.state = WAITING
        if self.caching and req.hashes is None:
            if req.ids is not None:
                req.hashes = block_hashes(req.ids, self.bs, req.lora)
            elif req.session is not None:
                req.hashes = []
        enqueue_by_priority(self.waiting, req) if self.by_priority else self.waiting.append(req)
        self.in_flight += 1
        self.dirty = True
        if req.first_token is None and req.generated == 0:
            self.pend_prefill += req.prompt
        self.pend_dec_other += req.output - req.generated
        return True

    def abort(self, req: Req) -> None:
        """Drop a request in any state (a client went away); its blocks are freed."""
        st = req.state
        if st in (DONE, ABORTED):
            return
        if st == WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
            self.pend_dec_other -= req.output - req.generated
        elif st == PREFILL:
            self.running.pop(req, None)
            if req in self.prefilling:
                self.prefilling.remove(req)
            self._release(req)
            self.pend_dec_other -= req.output - req.generated
        elif st == DECODE:
            self.running.pop(req, None)
            self._leave_decode(req)
            self._release(req)
            self.pend_dec_other -= req.output - req.generated
        if req.first_token is None and req.generated == 0:
            self.pend_prefill -= req.prompt
        req.state = ABORTED
        self.in_flight -= 1
        self.dirty = True

    # -- KV blocks --------------------------------------------------------------------------------
    def _alloc(self, k: int) -> None:
        fp = self.free_plain
        if k <= fp:
            self.free_plain = fp - k
            return
        self.free_plain = 0
        k -= fp
        ev, cached = self.evictable, self.cached
        gone = [ev.popitem(last=False)[0] for _ in range(k)]
        for h in gone:
            del cached[h]
        if self.kv_events is not None and gone:
            self.kv_events([{"type": "BlockRemoved", "block_hashes": gone, "medium": "GPU"}])

    def clear_cache(self) -> None:
        """Drop every unreferenced cached block: an idle engine restarts cold (autoscaling)."""
        for h in self.evictable:
            del self.cached[h]
        self.free_plain += len(self.evictable)
        self.evictable.clear()
        if self.kv_events is not None:
            self.kv_events([{"type": "AllBlocksCleared"}])

    def _session_hashes(self, req: Req, n: int) -> None:
        hs = req.hashes
        if len(hs) < n:
            sid = req.session if req.lora is None else (req.session, req.lora)  # an adapter's KV is its own
            hs.extend(hash((sid, k)) for k in range(len(hs), n))

    def _register(self, req: Req, upto: int) -> None:
        """Give hashes to ``req``'s full blocks [registered, upto) (they become cacheable)."""
        hs = req.hashes
        if req.session is not None:
            self._session_hashes(req, upto)
        elif upto > len(hs):
            upto = len(hs)
        k = req.registered
        if k >= upto:
            return
        cached, held = self.cached, req.held
        new = [] if self.kv_events is not None else None
        while k < upto:
            h = hs[k]
            if h not in cached:
                cached[h] = 1
                held.append(h)
                if new is not None:
                    new.append(k)
            k += 1
        req.registered = k
        if new:
            self.kv_events(stored_events(req, new, self.bs))

    def _release(self, req: Req) -> None:
        """Free ``req``'s blocks; hashed ones stay cached (evictable) once unreferenced."""
        if req.hashes is not None and req.computed >= self.bs:
            # full blocks not hashed yet (decoded ones; KV that arrived from a prefill instance)
            self._register(req, min(req.computed // self.bs, req.n_blocks))
        held = req.held
        self.free_plain += req.n_blocks - len(held)
        if held:
            cached, ev = self.cached, self.evictable
            for h in reversed(held):
                rc = cached[h] - 1
                cached[h] = rc
                if rc == 0:
                    ev[h] = None
            req.held = []
        req.n_blocks = 0
        req.registered = 0

    def release_handoff(self, req: Req) -> None:
        """A prefill-only engine: the decode side has the KV now; free the blocks."""
        if self.handoff.pop(req, 0) is None:
            self._release(req)
            self.dirty = True

    # -- decode aggregates -----------------------------------------------------------------------
    def _enter_decode(self, req: Req, g0: int) -> None:
        req.state = DECODE
        c0 = req.computed
        q0 = req.generated
        req.g0, req.c0, req.q0 = g0, c0, q0
        req.fin_g = g0 + req.output - q0 - 1
        self.bucket[(c0 - g0) % self.bs] += 1
        self.D += 1
        self.B += c0 - g0
        self.A += req.output - q0 + g0
        self.pend_dec_other -= req.output - q0
        self._seq += 1
        heapq.heappush(self.fin, (req.fin_g, self._seq, req))

    def _leave_decode(self, req: Req) -> None:
        """Take a decode request out of the aggregates, settling computed/generated/blocks."""
        steps = self.g - req.g0
        c0, g0 = req.c0, req.g0
        self.bucket[(c0 - g0) % self.bs] -= 1
        self.D -= 1
        self.B -= c0 - g0
        self.A -= req.output - req.q0 + g0
        req.computed = c0 + steps
        req.generated = req.q0 + steps
        self.pend_dec_other += req.output - req.generated
        alloc_tokens = req.computed + (1 if self._dec_alloc and req.g0 <= self.g else 0)
        req.n_blocks = -(-alloc_tokens // self.bs)
        if steps > 0:
            req.segs.append((g0, g0 + steps))
        req.fin_g = -1

    def _preempt_newest(self) -> Req:
        victim = max(self.running, key=priority_key) if self.by_priority else next(reversed(self.running))
        del self.running[victim]
        if victim.state == DECODE:
            self._leave_decode(victim)
        else:
            if victim in self.prefilling:
                self.prefilling.remove(victim)
        victim.sched_g = -1
        self._release(victim)
        victim.computed = 0
        victim.state = WAITING
        victim.preemptions += 1
        self.preemptions += 1
        enqueue_by_priority(self.waiting, victim) if self.by_priority else self.waiting.appendleft(victim)
        return victim

    # -- one step ----------------------------------------------------------------------------------
    def schedule(self, now: float) -> float | None:
        """Build the next batch at time ``now``; its duration in seconds, or None if empty."""
        dt = self._decode_step(now)         # decodes only, the usual step (nbkit.sim.runs)
        if dt is not None:
            return dt
        dt = self._schedule(now)
        if dt is None and self.waiting and not self.running:
            dt = self._schedule(now)  # everything was preempted: admit from the queue now
        return dt

    def _schedule(self, now: float) -> float | None:
        self.dirty = True
        self.plan_end = None
        bs = self.bs
        g = self.g
        budget = self.budget
        preempted = False
        self._dec_alloc = False
        self._new_dec = []
        # 1. decodes
        if self.D:
            key = (-g) % bs
            need = self.bucket[key]
            while need > self.free_plain + len(self.evictable):
                self._preempt_newest()
                preempted = True
                need = self.bucket[key]      # a preempted decode leaves its bucket
            if need:
                self._alloc(need)
            budget -= self.D
        self._dec_alloc = True
        # 2. running prefills (chunked)
        chunks: list[tuple[Req, int, int]] = []
        if self.prefilling:
            for r in list(self.prefilling):
                if budget <= 0:
                    break
                if r.state != PREFILL:
                    continue  # preempted by an earlier request of this loop
                c = r.computed
                n = r.prompt + r.generated - c
                if n > budget:
                    n = budget
                need = -(-(c + n) // bs) - r.n_blocks
                ok = True
                while need > self.free_plain + len(self.evictable):
                    v = self._preempt_newest()
                    preempted = True
                    if v is r:
                        ok = False
                        break
                if not ok:
                    continue
                self._alloc(need)
                r.n_blocks += need
                r.sched_g = g
                chunks.append((r, n, c))
                budget -= n
        # 3. waiting (V0 multi-step: only at a scheduling step; V0 without chunking: the full budget)
        if self.sched_every > 1 and (not self.D or g - self._sched_g >= self.sched_every):
            self._sched_g = g
        if not self.chunked:
            budget = self.budget
        if not preempted and self.waiting and (self.sched_every == 1 or self._sched_g == g):
            waiting, running = self.waiting, self.running
            cached = self.cached
            max_seqs = self.max_seqs
            while waiting and budget > 0 and len(running) < max_seqs:
                r = waiting[0]
                target = r.prompt + r.generated
                c = r.computed
                hits = 0
                evict_hits = 0
                hs = r.hashes
                if hs is not None and c == 0:
                    max_hit = (target - 1) // bs
                    if r.session is not None:
                        self._session_hashes(r, max_hit)
                    while hits < max_hit and hits < len(hs):
                        rc = cached.get(hs[hits])
                        if rc is None:
                            break
                        if rc == 0:
                            evict_hits += 1
                        hits += 1
                    c = hits * bs
                n = target - c
                # one token left and its KV is the only thing missing: a decode from the start
                decode_now = n == 1 and (r.generated > 0 or r.ext > 0)
                if n > budget:
                    if not self.chunked and chunks:
                        break
                    n = budget
                need = -(-(c + n) // bs) - hits
                if need > self.free_plain + len(self.evictable) - evict_hits:
                    break
                waiting.popleft()
                if hs is not None and r.computed == 0:
                    self.prefix_queries += target
                    self.prefix_hits += hits * bs
                    if hits:
                        held = r.held
                        ev = self.evictable
                        for k in range(hits):
                            h = hs[k]
                            rc = cached[h]
                            if rc == 0:
                                del ev[h]
                            cached[h] = rc + 1
                            held.append(h)
                        r.registered = hits
                        r.cached_tokens = max(r.cached_tokens, c)
                        r.n_blocks = hits
                    r.computed = c
                self._alloc(need)
                r.n_blocks += need
                running[r] = None
                if r.first_sched is None:
                    r.first_sched = now
                if decode_now:
                    self._enter_decode(r, g)
                    self._new_dec.append(r)
                    budget -= 1
                else:
                    r.state = PREFILL
                    r.sched_g = g
                    self.prefilling.append(r)
                    chunks.append((r, n, c))
                    budget -= n
        # the batch
        D = self.D
        if not D and not chunks:
            self._chunks = chunks
            self._dec_alloc = False
            return None
        ctx = self.B + D * g
        T = L = S = 0
        P = R = 0.0
        for r, n, c in chunks:
            T += n
            P += n * c + n * (n + 1) * 0.5
            R += c + n
            if c + n == r.prompt + r.generated:
                L += 1
        dt0 = 0.0
        if not self.chunked and D and chunks:   # the prefill step of its own, then the decodes'
            dt0 = self.model.step_time(T, len(chunks), L, P, R)
            T = L = 0
            P = R = 0.0
        else:
            S = len(chunks)
        T += D
        L += D
        P += ctx + D
        R += ctx + D
        self._chunks = chunks
        self._step_D = D
        self._in_step = True
        self._t_start = now
        if self.collect:
            self.last_batch = [r for r in self.running if r.state == DECODE] + [c[0] for c in chunks]
        if self.record_steps:
            self.step_log.append((now, T, D + S, L, P, R))
        dt = self.model.step_time(T, D + S, L, P, R) + dt0
        if self.macro and self._plannable(chunks, preempted):
            self._make_plan(now, dt)
        return dt

    def finish_step(self, now: float) -> list[Req]:
        """End the step scheduled last at time ``now``: emit tokens; returns finished requests."""
        if self._plan is not None:  # the last step of a planned run: the ones before it first
            self._end_run(now)
        g = self.g
        self.dirty = True
        self.step_ends.append(now)
        self.g = g + 1
        self.steps += 1
        self.busy_time += now - self._t_start
        self._in_step = False
        done: list[Req] = []
        self.gen_tokens += self._step_D
        # decodes that emitted their last token
        self._dec_alloc = False
        fin = self.fin
        while fin and fin[0][0] <= g:
            fg, _, r = heapq.heappop(fin)
            if r.state != DECODE or r.fin_g != fg:
                continue
            del self.running[r]
            self._leave_decode(r)
            self._finish(r, now, done)
        self._step_tokens(now, g, done)
        return done

    def _step_tokens(self, now: float, g: int, done: list) -> None:
        """Step ``g`` ended at ``now``: the first tokens of the requests that started decoding in it,
        and its prefill chunks (a prompt done: its first token, then decode or finish)."""
        for r in self._new_dec:
            if r.first_token is None:
                r.first_token = now
                self.pend_prefill -= r.prompt
        bs = self.bs
        for r, n, c in self._chunks:
            if r.state != PREFILL or r.sched_g != g:
                continue
            c += n
            r.computed = c
            self.prompt_tokens += n
            if r.hashes is not None and c >= bs:
                self._register(r, c // bs)
            if c == r.prompt + r.generated:
                r.generated += 1
                self.gen_tokens += 1
                self.pend_dec_other -= 1
                r.segs.append((g, g + 1))
                if r.first_token is None:
                    r.first_token = now
                    self.pend_prefill -= r.prompt
                self.prefilling.remove(r)
                if r.generated >= r.output:
                    del self.running[r]
                    self._finish(r, now, done)
                else:
                    self._enter_decode(r, g + 1)
        self._chunks = self._new_dec = ()   # (nothing, until the next step is scheduled)

    def _finish(self, r: Req, now: float, done: list) -> None:
        r.state = DONE
        r.finish_time = now
        if self.hold_handoff:
            self.handoff[r] = None
        else:
            self._release(r)
        self.in_flight -= 1
        self.finished += 1
        done.append(r)

    def generated_now(self, req: Req) -> int:
        """Tokens ``req`` has produced so far (decodes are kept as aggregates)."""
        if req.state == DECODE:
            return req.q0 + self.g - req.g0
        return req.generated

    # -- results -------------------------------------------------------------------------------
    def token_times(self, req: Req) -> list[float]:
        """End times of the steps in which ``req`` got its tokens, in order."""
        ends = self.step_ends
        out: list[float] = []
        for a, b in req.segs:
            out.extend(ends[a:b])
        return out
