"""Decode-only steps, one at a time and in runs planned ahead, for :class:`~nbkit.sim.engine.Engine`
(a mixin).

The usual step has only decodes, nobody waiting and the free pool holding the decodes' new blocks:
:meth:`PlannedRuns._decode_step` schedules it without the queues' bookkeeping (the same allocation,
batch and time as the scheduler proper). When nobody waits and every running request decodes from
the next step on (the step just scheduled may finish prompts: those requests decode after it), the
steps after it are known: each one's batch is the same decodes with one more token of context,
until a request finishes or a decode would need a block the free pool lacks. The engine then plans
the run and the cluster's event loop needs one event for it instead of one per step::

    dt = eng.schedule(now)           # with eng.macro: eng.plan_end is the run's end (None: one step)
    eng.sync(t)                      # at any t: the state routing reads, as step by step
    end = eng.truncate(t)            # a request arrives at t: the run ends with the step in progress
    done = eng.finish_step(end)      # at the run's (new) end, as for any step

The step times are computed as step-by-step scheduling computes them (the same floats, added in the
same order), the blocks each step allocates from the decodes' block phases, V0's scheduling steps
(``num_scheduler_steps``) in closed form. :meth:`PlannedRuns.sync` applies what the steps that ended
by ``t`` changed: the step count ``g`` (pending decode tokens, each request's tokens so far), the free
blocks and, once the first step ended, its prompts' first tokens (``Engine.dirty`` is ``STEPS`` when
only the first two changed); the run's log (``step_ends``, ``steps``, ``gen_tokens``,
``busy_time``) is written when it ends. The results are the same to the bit (``busy_time``, a run's
steps summed as one span, up to rounding).
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

from nbkit.sim.perf import StepModel
from nbkit.sim.request import DECODE

__all__ = ["PlannedRuns", "INF", "STEPS"]

INF = float("inf")
#: ``Engine.dirty`` when only planned steps were applied since the driver last read it: of what
#: routing reads, only the step count (pending decode tokens) and the free blocks changed
STEPS = 2


class PlannedRuns:
    """The planning half of the engine (its ``macro`` flag turns it on)."""

    __slots__ = ("macro", "plan_end", "_plan", "_p_i", "_p_last", "_p_g", "_p_t0", "_p_D", "_p_head", "_p_sg",
                 "ev", "_plan_cap", "next_sync")

    PLAN_STEPS = 512

    def _init_runs(self) -> None:
        #: plan runs of steps ahead (set by the cluster simulator; see the module doc)
        self.macro = False
        self.plan_end: float | None = None   # end of the planned run the last schedule() made
        self._plan: list[float] | None = None  # the run's step end times (step 0: the one scheduled)
        self._p_i = 0                   # the step in progress
        self._p_last = 0                # the run's last step (earlier when truncated)
        self._p_g = 0                   # g of its step 0
        self._p_t0 = 0.0                # when step 0 began
        self._p_D = 0                   # decodes in the steps after step 0
        self._p_head = False            # step 0 finishes prompts or starts decodes: settle it when it ends
        self._p_sg = 0                  # _sched_g when the run began (V0 multi-step)
        self.ev = -1                    # the driver's id of this engine's pending step event
        self._plan_cap = 64             # steps a run is planned for at most (grows while runs are not cut)
        self.next_sync = INF            # when the planned run's step in progress ends (sync due)

    def _decode_step(self, now: float) -> float | None:
        """What :meth:`Engine.schedule` does when only decodes run (nobody waits or prefills) and the
        free pool holds their new blocks, the usual step: the same allocation, batch and time (and
        the run planned after it), without the queues' bookkeeping. None (nothing done) otherwise."""
        if not self.D or self.prefilling or self.waiting:
            return None
        g = self.g
        need = self.bucket[(-g) % self.bs]
        if need > self.free_plain:
            return None
        self.dirty = True
        self.plan_end = None
        self.free_plain -= need
        self._dec_alloc = True
        D = self.D
        if self.sched_every > 1 and g - self._sched_g >= self.sched_every:
            self._sched_g = g
        P = float(self.B + D * g + D)
        self._step_D = D
        self._in_step = True
        self._t_start = now
        if self.collect:
            self.last_batch = [r for r in self.running if r.state == DECODE]
        if self.record_steps:
            self.step_log.append((now, D, D, D, P, P))
        dt = self.model.step_time(D, D, D, P, P)
        if self.macro and not self.record_steps and not self.collect:
            self._make_plan(now, dt)
        return dt

    def _plannable(self, chunks: list, preempted: bool) -> bool:
        """Whether the steps after the one just scheduled (``chunks`` its prefill chunks) are a run:
        nobody waits, each prefill finishes its prompt in this step and goes on decoding."""
        if not self.macro or preempted or self.waiting or self.record_steps or self.collect:
            return False
        if len(chunks) != len(self.prefilling):
            return False
        for r, n, c in chunks:
            if c + n != r.prompt + r.generated or r.generated + 1 >= r.output:
                return False
        return True

    def _make_plan(self, now: float, dt: float) -> None:
        """Plan the run that starts with the step just scheduled (``now`` to ``now + dt``): as long as
        no request finishes, no block would have to be evicted, and no longer than runs lately lasted
        before a request cut them (a cut run's remaining steps were planned for nothing)."""
        D, B, bs, g = self.D, self.B, self.bs, self.g
        fin = self.fin
        k_max = min(fin[0][0] - g + 1, self._plan_cap) if fin else self._plan_cap
        bucket = self.bucket
        chunks = self._chunks
        if chunks:                      # prompts done in step 0: decodes from step 1 on
            bucket = bucket[:]
            g1 = g + 1
            for r, n, c in chunks:
                c0 = c + n
                D += 1
                B += c0 - g1
                bucket[(c0 - g1) % bs] += 1
                k = r.output - r.generated   # it finishes in step k - 1
                if k < k_max:
                    k_max = k
        if k_max < 2:
            return
        # step j >= 1 allocates bucket[(-(g + j)) % bs] blocks, D in every bs steps: the first step
        # that cannot ends the run
        free = self.free_plain
        k = k_max
        if free < ((k_max - 2) // bs + 1) * D:      # not plenty for k_max steps: find that one
            p0 = (-(g + 1)) % bs
            cum = list(accumulate(bucket[p0::-1] + bucket[:p0:-1], initial=0))   # of a cycle's first steps
            q, rem = divmod(free, D)
            r_ = 1
            while cum[r_] <= rem:
                r_ += 1
            k = min(k_max, q * bs + r_)
            if k < 2:
                return
        t = now + dt
        P1, Pn = B + D * (g + 2), B + D * (g + k)   # step j's attention pairs: B + D (g + j + 1)
        m = self.model
        if type(m) is StepModel:
            # StepModel.step_time(D, D, D, P, P) term by term, in its order (the same floats)
            a = m.c_tok * D + m.c_logit * D
            head = m.o_step + m.o_seq * D
            cp, mc, mk, arc, ar = m.c_pair, m.m_const, m.m_kv, m.ar_const, m.ar_tok * D
            xs = range(P1 + D, Pn + D + 1, D)       # P + D: the KV read plus the new tokens
            c1, m1, c2, m2 = a + cp * P1, mc + mk * (P1 + D), a + cp * Pn, mc + mk * (Pn + D)
            if m1 > c1 * (1 + 1e-9) and m2 > c2 * (1 + 1e-9):     # memory-bound all along
                dts = [head + (mc + mk * x) for x in xs]
            elif c1 > m1 * (1 + 1e-9) and c2 > m2 * (1 + 1e-9):   # compute-bound all along
                dts = [head + (a + cp * (x - D)) for x in xs]
            else:
                dts = [head + (c if (c := a + cp * (x - D)) > (y := mc + mk * x) else y) for x in xs]
            if arc or ar:
                dts = [d + arc + ar for d in dts]
        else:
            step_time = m.step_time
            dts = [step_time(D, D, D, P, P) for P in range(P1, Pn + 1, D)]
        ends = list(accumulate(dts, initial=t))
        self._plan = ends
        self._p_i = 0
        self._p_last = k - 1
        self._p_g = g
        self._p_t0 = now
        self._p_D = D
        self._p_head = bool(chunks or self._new_dec)
        self._p_sg = self._sched_g
        self.plan_end = ends[-1]
        self.next_sync = t

    def sync(self, now: float) -> None:
        """Apply the planned steps that ended by ``now`` (and start the next), as if each had been
        driven on its own: what routing reads at ``now`` is the step-by-step state."""
        plan = self._plan
        if plan is None:
            return
        i, last = self._p_i, self._p_last
        if i >= last or plan[i] > now:
            return
        if self._p_head:                # step 0 ended: its prompts' first tokens, its new decodes'
            self._p_head = False
            self._step_tokens(plan[0], self._p_g, [])
            self.dirty = True
        i0, i = i, i + 1
        if i < last and plan[i] <= now:
            i = bisect_right(plan, now, i + 1, last)
        self._p_i = i
        g0 = self._p_g
        g = g0 + i
        self.g = g
        bucket, bs = self.bucket, self.bs
        if i == i0 + 1:                 # the step begun since (usually one): its decodes' new blocks
            self.free_plain -= bucket[(-g) % bs]
        else:
            self.free_plain -= sum(bucket[(-j) % bs] for j in range(g0 + i0 + 1, g + 1))
        if self.sched_every > 1:        # V0: a scheduling step every N steps (steps 1..i were scheduled)
            n, sg = self.sched_every, self._p_sg
            first = max(self._p_g + 1, sg + n)
            self._sched_g = sg if first > g else first + (g - first) // n * n
        self.next_sync = plan[i] if i < last else INF
        if not self.dirty:
            self.dirty = STEPS

    def truncate(self, now: float) -> float | None:
        """A request arrives at ``now``: the planned run ends with the step in progress. Its end
        time if that moved the run's end (the driver's event), else None."""
        if self._plan is None:
            return None
        self.sync(now)
        i = self._p_i
        if i == self._p_last:
            return None
        self._plan_cap = max(32, (i + 1) * 3)   # an event (a run cut short) costs as much as ~50 steps planned
        self._p_last = i
        self.next_sync = INF
        return self._plan[i]

    def _end_run(self, now: float) -> None:
        """The run's last step ends at ``now``: the steps before it ended, and their log is written;
        the last one ends as any step does (:meth:`Engine.finish_step`)."""
        self.sync(now)
        plan, last = self._plan, self._p_last
        if last:
            self.step_ends.fromlist(plan[:last])
            self.steps += last
            self.gen_tokens += self._step_D + self._p_D * (last - 1)
            self.busy_time += plan[last - 1] - self._p_t0
            self._t_start = plan[last - 1]
            self._step_D = self._p_D
        if last == len(plan) - 1:       # not cut: plan longer runs
            self._plan_cap = min(self._plan_cap * 2, self.PLAN_STEPS)
        self._plan = None
        self.next_sync = INF
