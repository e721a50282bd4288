"""Runs of decode-only steps planned ahead, for :class:`~nbkit.sim.engine.Engine` (a mixin).

When every running request is decoding and nobody waits, the next steps are known: each step's
batch is the same requests with one more token of context, until a request finishes or a decode
would need a block the free pool lacks. The engine then plans the run (step times and block
allocations, computed exactly as step-by-step scheduling computes them) and the cluster's event
loop needs one event for it instead of one per step. :meth:`PlannedRuns.sync` applies the steps
that have ended whenever the state is read (routing, metrics), so what is read at any time is the
step-by-step state; :meth:`PlannedRuns.truncate` ends the run with the step in progress when a
request arrives. The results are the same to the bit.
"""

from __future__ import annotations

from nbkit.sim.perf import StepModel

__all__ = ["PlannedRuns", "INF"]

INF = float("inf")


class PlannedRuns:
    """The planning half of the engine (its ``macro`` flag turns it on)."""

    def _init_runs(self) -> None:
        #: plan runs of decode-only steps ahead (set by the cluster simulator; see :meth:`sync`)
        self.macro = False
        self.plan_end: float | None = None   # end of the planned run the last schedule() made
        self._plan: tuple[list, list, list] | None = None
        self._p_i = 0
        self._p_last = 0
        self.ev = -1                    # the driver's id of this engine's pending step event
        self._plan_cap = 16
        self.next_sync = INF           # when the planned run's step in progress ends (sync due)

    PLAN_STEPS = 512

    def _make_plan(self, now: float, dt: float) -> None:
        """Decodes only, nobody waiting: the next steps are known until a request finishes or a
        block would have to be evicted. Plan them (times and block allocations, computed exactly as
        step-by-step scheduling would) so the driver needs one event for the run; :meth:`sync`
        applies the steps that have ended, :meth:`truncate` stops the run when a request arrives."""
        D, B, bs, g = self.D, self.B, self.bs, self.g
        fin = self.fin
        # as long as the next request to finish, and no longer than runs lately lasted before a
        # request cut them (a cut run's remaining steps were planned for nothing)
        k_max = min(fin[0][0] - g + 1, self._plan_cap) if fin else self._plan_cap
        if k_max < 2:
            return
        bucket = self.bucket
        free = self.free_plain
        t = now + dt
        starts, ends, allocs = [now], [t], [0]
        gi = g + 1
        m = self.model
        if type(m) is StepModel:
            # StepModel.step_time(D, D, D, P, P) term by term, in its order (the same floats)
            a = m.c_tok * D + m.c_logit * D
            head = m.o_step + m.o_seq * D
            c_pair, m_const, m_kv, ar_const, ar = m.c_pair, m.m_const, m.m_kv, m.ar_const, m.ar_tok * D

            def step(P):
                comp = a + c_pair * P
                mem = m_const + m_kv * (P + D)
                return head + (comp if comp > mem else mem) + ar_const + ar
        else:
            step_time = m.step_time

            def step(P):
                return step_time(D, D, D, P, P)
        while len(ends) < k_max:
            need = bucket[(-gi) % bs]
            if need > free:
                break
            free -= need
            starts.append(t)
            t = t + step(B + D * gi + D)
            ends.append(t)
            allocs.append(need)
            gi += 1
        if len(ends) < 2:
            return
        self._plan = (starts, ends, allocs)
        self._p_i = 0
        self._p_last = len(ends) - 1
        self.plan_end = t
        self.next_sync = ends[0]

    def sync(self, now: float) -> None:
        """Apply the planned steps that ended by ``now`` (and start the next), as if each had been
        driven on its own: the state read at ``now`` is the step-by-step state."""
        plan = self._plan
        if plan is None:
            return
        starts, ends, allocs = plan
        i, last = self._p_i, self._p_last
        if i >= last or ends[i] > now:
            return
        D = self.D
        step_ends = self.step_ends
        busy = self.busy_time
        while i < last and ends[i] <= now:
            t = ends[i]
            step_ends.append(t)
            busy += t - starts[i]
            i += 1
            self.free_plain -= allocs[i]
        n = i - self._p_i
        self.g += n
        self.steps += n
        self.gen_tokens += D * n
        self.busy_time = busy
        self._t_start = starts[i]
        self._p_i = i
        self.next_sync = ends[i] if i < last else INF
        self.dirty = True

    def truncate(self, now: float) -> float | None:
        """A request arrives at ``now``: the planned run ends with the step in progress. Its end
        time if that moved the run's end (the driver's event), else None."""
        if self._plan is None:
            return None
        self.sync(now)
        i = self._p_i
        if i == self._p_last:
            return None
        self._plan_cap = max(8, (i + 1) * 2)
        self._p_last = i
        self.next_sync = INF
        return self._plan[1][i]
