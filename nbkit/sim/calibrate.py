"""Fit a hardware profile's efficiency factors and fixed costs to a real run.

Give it the per-request CSV of a benchmark run (``nbkit bench``'s, seconds or nanoseconds) and the
cluster config that describes what ran; it replays the same arrivals (and, when the CSV names
them, the same instance per request) through the simulator and looks for the factors that make
the simulated times match the real ones::

    from nbkit.records import read_csv
    from nbkit.sim.calibrate import calibrate
    fit = calibrate(read_csv("real.csv"), "cpu-1x-tiny.json", block_size=128)
    print(fit.report())
    fit.save("cpu-fitted.json")      # then: python -m nbkit.sim --hardware-profile cpu-fitted.json ...

or ``python -m nbkit.sim calibrate --csv real.csv --cluster-config C --output cpu-fitted.json``.

What is matched: the mean TTFT and the mean decode time (``e2e - ttft``) of groups of requests
(all of them; quartiles by input length, by output length and by arrival time; load levels by
the number of requests in flight, 1, 2-3, 4-7, ..., so prefill cost, decode cost, the fixed costs
seen at low load and the per-sequence costs of big batches each weigh in) and the run's
makespan, as relative errors.

How (``method="linear"``, the default where it applies): a simulated step lasts::

    step_overhead_s + seq_overhead_s * S + (1 / compute_eff) * F + (1 / mem_eff) * B + allreduce

with ``F`` (``B``) the step's compute (memory) time at full efficiency, whichever side of the
roofline binds. With the schedule held fixed, every request's TTFT and decode time are sums of
step durations plus constants (busy periods start at arrivals), so the group means are linear in
``theta = (step_overhead_s, seq_overhead_s, 1/compute_eff, 1/mem_eff, request_overhead_s,
decode_overhead_s)`` (``request_overhead_s`` shifts every TTFT and E2E: requests reach the engine
that long after they arrive; ``decode_overhead_s`` every decode time: tokens 2..n arrive that much later). Each iteration simulates
once at the current ``theta``, solves that linear least-squares problem (non-negative, with a
small ridge towards the starting values so parameters the data cannot see stay put) and moves
there; on noise-free data the true parameters are a fixed point. Lockstep DP groups and
prefill/decode splits use ``method="nelder-mead"`` on the same objective (no SciPy needed).

On a trace with bursts separated by idle gaps (:func:`~nbkit.sim.fidelity.calibration_trace`)
the schedule does not move with the parameters and the iteration lands on them exactly; on a
steady stream it stops close, and a short Nelder-Mead search (``polish_evals``) finishes. Either way the aim is the
figures: compare mean TTFT, mean TPOT and throughput in ``report()``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from nbkit.records import RequestResult
from nbkit.traces import TraceRequest, TraceSession, read_trace
from nbkit.sim.config import ClusterConfig, load_cluster_config, resolve_instances
from nbkit.sim.fidelity import arrival_order, compare, held, load_levels, ran_alone, trace_from_records
from nbkit.sim.hardware import DEFAULT_FIT, FITTABLE, HardwareProfile, save_profile
from nbkit.sim.simulator import Simulator

__all__ = ["calibrate", "CalibrationResult", "nelder_mead"]


def nelder_mead(f: Callable[[list[float]], float], x0: Sequence[float], step: float = 0.4,
                max_evals: int = 200, tol: float = 1e-9) -> tuple[list[float], float, int]:
    """Minimise ``f`` from ``x0``; returns (x, f(x), evaluations). Plain Nelder-Mead with the
    usual coefficients (reflection 1, expansion 2, contraction 0.5, shrink 0.5)."""
    n = len(x0)
    pts = [list(x0)] + [[x0[j] + (step if j == i else 0.0) for j in range(n)] for i in range(n)]
    vals = [f(p) for p in pts]
    evals = len(pts)
    while evals < max_evals:
        order = sorted(range(n + 1), key=vals.__getitem__)
        pts = [pts[i] for i in order]
        vals = [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) <= tol and max(abs(a - b) for p in pts[1:] for a, b in zip(p, pts[0])) < 1e-4:
            break
        cen = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]
        worst = pts[-1]
        xr = [c + (c - w) for c, w in zip(cen, worst)]
        fr = f(xr)
        evals += 1
        if fr < vals[0]:
            xe = [c + 2 * (c - w) for c, w in zip(cen, worst)]
            fe = f(xe)
            evals += 1
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            if fr < vals[-1]:
                xc = [c + 0.5 * (r - c) for c, r in zip(cen, xr)]
            else:
                xc = [c + 0.5 * (w - c) for c, w in zip(cen, worst)]
            fc = f(xc)
            evals += 1
            if fc < min(fr, vals[-1]):
                pts[-1], vals[-1] = xc, fc
            else:
                best = pts[0]
                for i in range(1, n + 1):
                    pts[i] = [b + 0.5 * (p - b) for b, p in zip(best, pts[i])]
                    vals[i] = f(pts[i])
                    evals += 1
    k = min(range(n + 1), key=vals.__getitem__)
    return pts[k], vals[k], evals


@dataclass
class CalibrationResult:
    """The fitted profile, the parameters before and after, and how well the fit matches."""

    profile: HardwareProfile
    start: dict[str, float]
    fitted: dict[str, float]
    loss_start: float
    loss: float
    evals: int
    method: str = "linear"
    before: dict = field(default_factory=dict)   # compare(real, sim with the start profile)
    after: dict = field(default_factory=dict)    # compare(real, sim with the fitted profile)

    def report(self) -> str:
        lines = [f"calibrated profile {self.profile.name!r} ({self.method}): loss {self.loss_start:.4g} -> "
                 f"{self.loss:.4g} in {self.evals} simulations"]
        for k in self.fitted:
            lines.append(f"  {k:<16} {self.start[k]:.6g} -> {self.fitted[k]:.6g}")
        lines.append(f"  {'figure':<18}{'real':>12}{'sim before':>12}{'sim after':>12}{'err after':>11}")
        for k in ("mean_ttft_s", "mean_tpot_s", "throughput_tok_s"):
            real = self.after["real"][k]
            lines.append(f"  {k:<18}{real:>12.5g}{self.before['sim'][k]:>12.5g}{self.after['sim'][k]:>12.5g}"
                         f"{self.after['rel_err'][k] * 100:>10.1f}%")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> None:
        save_profile(self.profile, path, fit={"method": self.method, "start": self.start, "fitted": self.fitted,
                                              "loss": self.loss, "loss_start": self.loss_start,
                                              "evals": self.evals, "after": self.after})


# theta index of each fittable parameter;
# theta = (step_overhead_s, seq_overhead_s, 1/ce, 1/me, request_overhead_s, decode_overhead_s)
_THETA = {"step_overhead_s": 0, "seq_overhead_s": 1, "compute_eff": 2, "mem_eff": 3, "request_overhead_s": 4,
          "decode_overhead_s": 5}
_NTH = len(_THETA)
# a generous size of each theta component, for parameters that start at 0 (the ridge then
# hardly pulls them back to 0)
_TYPICAL = (1e-2, 1e-3, 1.0, 1.0, 1e-2, 1e-2)


def _theta_of(p: HardwareProfile) -> list[float]:
    return [p.step_overhead_s, p.seq_overhead_s, 1.0 / p.compute_eff, 1.0 / p.mem_eff, p.request_overhead_s,
            p.decode_overhead_s]


def _profile_of(base: HardwareProfile, theta: Sequence[float], names: Sequence[str]) -> HardwareProfile:
    vals = {}
    for k in names:
        if k not in _THETA:
            continue
        v = theta[_THETA[k]]
        if k in ("compute_eff", "mem_eff"):
            vals[k] = min(1.0, 1.0 / max(v, 1e-9))
        else:
            vals[k] = max(v, 0.0)
    return base.replace(**vals)


def _progress_bar(progress, total: int):
    """A tqdm bar of the simulations (``progress``: False, True or a file), or None."""
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="calibrate", unit="sim", file=None if progress is True else progress,
                dynamic_ncols=True, leave=True)


def calibrate(records: Sequence[RequestResult], config: ClusterConfig | dict | str, *,
              trace: Sequence[TraceRequest | TraceSession] | str | None = None,
              params: Sequence[str] = DEFAULT_FIT, dtype: str = "float16", block_size: int | None = None,
              hardware: dict[str, HardwareProfile] | None = None, start: HardwareProfile | None = None,
              method: str = "auto", max_evals: int = 40, ridge: float = 1e-4, n_bins: int = 4,
              polish_evals: int | None = None, replay_routing: bool = True, policy: Any = "least_load",
              name: str | None = None, load_groups: bool = True, drop_held: bool = True,
              progress=False) -> CalibrationResult:
    """Fit ``params`` of the (single) hardware profile used by ``config`` to ``records``.

    ``trace``: what was sent, when the CSV alone cannot say (sessions); by default a flat trace
    is rebuilt from the CSV (arrival, input and output tokens per request). ``replay_routing``
    ``load_groups`` adds groups by load level (requests in flight during each request, in
    powers of two), so that the few lightly loaded requests of a bursty trace, which show the
    fixed costs, weigh as much as each level of the big bursts. ``replay_routing``
    sends each request to the instance the CSV names (``instance_id``), so the fit does not
    depend on the routing policy. ``drop_held`` leaves requests whose first tokens reached the
    client in one burst (:func:`~nbkit.sim.fidelity.held`: a stall on the measuring side) out of
    the compared means; they are still simulated, since they loaded the engine all the same. ``start`` replaces the profile the search starts from.
    ``max_evals`` bounds the simulations (linear: iterations; Nelder-Mead: evaluations, at least
    30 per parameter is sensible); ``polish_evals`` more go to a short Nelder-Mead search from
    the linear result when that does not already match (default: 60, or 30 per parameter where
    more parameters are fitted). The fitted profile keeps the hardware's name (or ``name``),
    so ``--hardware-profile`` applies it to instances of that hardware. ``progress``: True (a tqdm
    bar: simulations run, best loss so far) or a file object the bar writes to.
    """
    bad = [p for p in params if p not in FITTABLE]
    if bad or not params:
        raise ValueError(f"params {bad or list(params)}: choose among {', '.join(FITTABLE)}")
    if method not in ("auto", "linear", "nelder-mead"):
        raise ValueError(f"method={method!r}: expected auto, linear or nelder-mead")
    if not isinstance(config, ClusterConfig):
        config = load_cluster_config(config)
    setups = resolve_instances(config, dtype=dtype, block_size=block_size, hardware=hardware)
    hw_names = {s.hw.name for s in setups}
    if len(hw_names) != 1:
        raise ValueError(f"calibration needs one hardware profile in the config, found {sorted(hw_names)}")
    base = start or setups[0].hw
    if base.layer_overhead_s:  # the fit sees one fixed cost per step: fold the per-layer part into it
        base = base.replace(step_overhead_s=base.step_overhead_s + base.layer_overhead_s * setups[0].model.num_layers,
                            layer_overhead_s=0.0)
    lockstep_or_pd = any(s.pd_type for s in setups) or any(
        sum(1 for t in setups if t.dp_group == s.dp_group) > 1 for s in setups if s.dp_group is not None)
    if method == "auto":
        method = "nelder-mead" if lockstep_or_pd else "linear"
    if method == "linear" and lockstep_or_pd:
        raise ValueError("method='linear' cannot model lockstep DP groups or a prefill/decode split; "
                         "use method='nelder-mead'")

    # what ran
    if isinstance(trace, (str, os.PathLike)):
        trace = read_trace(trace)
    if trace is None:
        trace, real_sorted = trace_from_records(records)
        by_id = None
    else:
        trace = list(trace)
        real_sorted = sorted((r for r in records if r.outcome == "ok" and r.ttft_s is not None
                              and r.e2e_s is not None), key=arrival_order)
        by_id = {r.request_id: r for r in real_sorted}
        if not all(isinstance(t, TraceRequest) for t in trace) or len(real_sorted) != len(trace):
            replay_routing = False
    if not real_sorted:
        raise ValueError("no successful request to calibrate on")
    routes: list[int] | None = None
    if replay_routing and not lockstep_or_pd and all(
            r.instance_id is not None and 0 <= r.instance_id < len(setups) for r in real_sorted):
        routes = [r.instance_id for r in real_sorted]

    def make_policy():
        if routes is None:
            return policy
        it = iter(routes)

        def replay(candidates, request):
            want = next(it, None)
            for c in candidates:
                if c.index == want:
                    return c
            return min(candidates, key=lambda c: c.pending_prefill_tokens + c.pending_decode_tokens)
        return replay

    bar = _progress_bar(progress, max_evals + (polish_evals or max(60, 30 * len(params))) + 2)

    def simulate(prof: HardwareProfile, instrument: bool = False) -> Simulator:
        sim = Simulator(config, policy=make_policy(), setups=[dataclasses.replace(s, hw=prof) for s in setups])
        sim.instrument = instrument
        sim.result = sim.run(trace)
        if bar is not None:
            bar.update(1)
        return sim

    # real requests paired with simulated ids
    if by_id is None:
        real = real_sorted
        sim_ids = [str(i) for i in range(len(real))]
    else:
        sim_ids = [rid for rid in (r.request_id for r in real_sorted)]
        real = real_sorted
    real_span = max(r.arrival_s + r.e2e_s for r in real) - min(r.arrival_s for r in real)

    # groups of requests whose means are compared
    idx = [i for i in range(len(real)) if not (drop_held and held(real[i]))]
    groups = [idx]
    m = len(idx)
    k = max(1, min(n_bins, m // 8))
    for key in (lambda i: real[i].input_toks, lambda i: real[i].output_toks, lambda i: real[i].arrival_s):
        order = sorted(idx, key=key)
        groups += [order[b * m // k:(b + 1) * m // k] for b in range(k)]
    if load_groups:
        kept = set(idx)  # the load levels count every request: a held one loaded the engine too
        levels = [[i for i in level if i in kept] for level in load_levels(real)]
        groups += levels
        lone = [i for i in levels[0] if ran_alone(real, i)] if levels else []
        kl = min(n_bins, len(lone) // 8)
        if kl > 1:
            # requests that ran alone, by prompt length: they alone separate the fixed and the
            # per-prompt-token costs in front of the engine from queueing behind a burst, and
            # most real traffic runs at low load
            order = sorted(lone, key=lambda i: real[i].input_toks)
            groups += [order[b * len(order) // kl:(b + 1) * len(order) // kl] for b in range(kl)]
    groups = [g for g in groups if g]
    real_ttft = [[sum(real[i].ttft_s for i in g) / len(g)] for g in groups]
    dec_groups = [[i for i in g if real[i].output_toks > 1] for g in groups]
    real_dec = [sum(real[i].e2e_s - real[i].ttft_s for i in g) / len(g) if g else 0.0 for g in dec_groups]

    def loss_of(sim_recs: Sequence[RequestResult]) -> float:
        by = {r.request_id: r for r in sim_recs}
        rows = [by.get(s) for s in sim_ids]
        total, terms = 0.0, 0
        for g, dg, rt, rd in zip(groups, dec_groups, real_ttft, real_dec):
            okg = [i for i in g if rows[i] is not None and rows[i].outcome == "ok" and rows[i].ttft_s is not None]
            if len(okg) < len(g):
                total += 4.0 * (len(g) - len(okg)) / len(g)
            if okg:
                st = sum(rows[i].ttft_s for i in okg) / len(okg)
                if st > 0 and rt[0] > 0:
                    total += math.log(st / rt[0]) ** 2
                    terms += 1
            okd = [i for i in dg if rows[i] is not None and rows[i].outcome == "ok" and rows[i].e2e_s is not None]
            if okd and rd > 0:
                sd = sum(rows[i].e2e_s - rows[i].ttft_s for i in okd) / len(okd)
                if sd > 0:
                    total += math.log(sd / rd) ** 2
                    terms += 1
        ok = [r for r in rows if r is not None and r.outcome == "ok" and r.e2e_s is not None]
        span = (max(r.arrival_s + r.e2e_s for r in ok) - min(r.arrival_s for r in ok)) if ok else 0.0
        total += math.log(span / real_span) ** 2 if span > 0 and real_span > 0 else 4.0
        return total / (terms + 1)

    names = list(params)
    if polish_evals is None:
        polish_evals = max(60, 30 * len(names))
    theta0 = _theta_of(base)
    start_vals = {k: float(getattr(base, k)) for k in names}
    sim0 = simulate(base, instrument=(method == "linear"))
    start_recs = sim0.result.records
    loss_start = loss_of(start_recs)

    x_names = names
    # a parameter that starts at 0 starts the log-space search at a typical size instead
    floor = {k: (1e-3 if k == "api_serial_s" else 1e-7) for k in x_names}
    x0 = [math.log(max(float(getattr(base, k)), floor[k])) for k in x_names]

    def prof_at(x):
        vals = {k: math.exp(v) for k, v in zip(x_names, x)}
        for e in ("compute_eff", "mem_eff"):
            if e in vals:
                vals[e] = min(vals[e], 1.0)
        return base.replace(**vals)

    def search(from_prof: HardwareProfile, step: float, evals: int):
        xs = [math.log(max(float(getattr(from_prof, k)), floor[k])) for k in x_names]

        def objective(x):
            reg = ridge * sum((a - b) ** 2 for a, b in zip(x, x0))
            return loss_of(simulate(prof_at(x)).result.records) + reg

        x, _, used = nelder_mead(objective, xs, step=step, max_evals=evals)
        prof = prof_at(x)
        recs = simulate(prof).result.records
        return prof, loss_of(recs), recs, used + 1

    if method == "linear":
        best_prof, best_loss, best_recs, evals = _linear_fit(
            base, names, theta0, sim0, simulate, loss_of, loss_start, real, sim_ids, groups, dec_groups,
            real_ttft, real_dec, real_span, ridge, max_evals)
        if polish_evals and best_loss > 1e-6:
            # the schedule moves with the parameters; a short local search finishes the job
            p2, l2, r2, used = search(best_prof, 0.15, polish_evals)
            evals += used
            if l2 < best_loss:
                best_prof, best_loss, best_recs = p2, l2, r2
                method = "linear+nelder-mead"
    else:
        best_prof, best_loss, best_recs, evals = search(base, 0.4, max(max_evals, 10 * len(x0) + 1))
    if bar is not None:
        bar.set_postfix_str(f"loss {loss_start:.3g} -> {best_loss:.3g}")
        bar.close()
    if name:
        best_prof = best_prof.replace(name=name)
    notes = base.notes if "calibrated" in base.notes else (base.notes + " | calibrated").strip(" |")
    return CalibrationResult(profile=best_prof.replace(notes=notes), start=start_vals,
                             fitted={k: float(getattr(best_prof, k)) for k in names}, loss_start=loss_start,
                             loss=best_loss, evals=evals + 1, method=method,
                             before=compare(real, start_recs), after=compare(real, best_recs))


def _linear_fit(base, names, theta0, sim0, simulate, loss_of, loss_start, real, sim_ids, groups, dec_groups,
                real_ttft, real_dec, real_span, ridge, max_iters):
    """The fixed-point iteration of the module doc; returns (profile, loss, records, simulations)."""
    import numpy as np

    fit_idx = sorted(_THETA[k] for k in names if k in _THETA)  # api_serial_s: held here, fitted by the polish
    best = (base, loss_start, sim0.result.records)
    theta = list(theta0)
    sim = sim0
    evals = 0
    for _ in range(max_iters):
        rows_t = np.zeros((len(real), _NTH))
        const_t = np.zeros(len(real))
        rows_d = np.zeros((len(real), _NTH))
        const_d = np.zeros(len(real))
        rows_end = np.zeros((len(real), _NTH))
        const_end = np.zeros(len(real))
        prepared = {}
        for e in sim.engines:
            if not e.step_log:
                continue
            log = np.array(e.step_log, dtype=float)
            start, T, S, L, P, R = log.T
            m = e.model
            F = (m.c_tok * T + m.c_logit * L + m.c_pair * P) * m.hw.compute_eff     # at full efficiency
            B = (m.m_const + m.m_kv * (R + T)) * m.hw.mem_eff
            comp = F * theta[2] > B * theta[3]
            feats = np.stack([np.ones_like(T), S, np.where(comp, F, 0.0), np.where(comp, 0.0, B),
                              np.zeros_like(T), np.zeros_like(T)], axis=1)
            const = m.ar_const + m.ar_tok * T
            # parameters held fixed go to the constant
            for j in range(4):
                if j not in fit_idx:
                    const = const + feats[:, j] * theta[j]
                    feats[:, j] = 0.0
            ends = np.array(e.step_ends[:len(start)])
            new = np.ones(len(start), dtype=bool)
            new[1:] = start[1:] > ends[:-1] + 1e-12
            first = np.maximum.accumulate(np.where(new, np.arange(len(start)), 0))
            cumF = np.vstack([np.zeros((1, _NTH)), np.cumsum(feats, axis=0)])
            cumC = np.concatenate([[0.0], np.cumsum(const)])
            endF = cumF[1:] - cumF[first]            # end_k = anchor_k + endF_k . theta + endC_k
            endC = start[first] + cumC[1:] - cumC[first]
            prepared[e.index] = (endF, endC)
        for i, sid in enumerate(sim_ids):
            fr = sim.finals.get(sid)
            if fr is None:
                continue
            e, r = fr
            endF, endC = prepared[e.index]
            kf = r.segs[0][0]
            kl = r.segs[-1][1] - 1
            rows_t[i] = endF[kf]
            const_t[i] = endC[kf] - (r.data.arrival if r.data is not None else r.arrival)
            rows_d[i] = endF[kl] - endF[kf]
            const_d[i] = endC[kl] - endC[kf]
            rows_end[i] = endF[kl]
            const_end[i] = endC[kl]
            if 4 in fit_idx:
                # every request reaches the engine request_overhead_s after its arrival, and so
                # does every busy period's anchor: all end times move by it one for one
                rows_t[i, 4] = rows_end[i, 4] = 1.0
                const_t[i] -= theta[4]
                const_end[i] -= theta[4]
            if r.data is not None and r.data.output > 1:
                # tokens 2..n reach the client decode_overhead_s later (reported times only)
                if 5 in fit_idx:
                    rows_d[i, 5] = rows_end[i, 5] = 1.0
                else:
                    const_d[i] += theta[5]
                    const_end[i] += theta[5]
        # simulated times are relative to the simulator's t0 = first arrival; so are real ones
        A, b = [], []
        for g, dg, rt, rd in zip(groups, dec_groups, real_ttft, real_dec):
            gi = np.array(g)
            if rt[0] > 0:
                A.append(rows_t[gi].mean(axis=0) / rt[0])
                b.append(1.0 - const_t[gi].mean() / rt[0])
            if dg and rd > 0:
                di = np.array(dg)
                A.append(rows_d[di].mean(axis=0) / rd)
                b.append(1.0 - const_d[di].mean() / rd)
        last = int(np.argmax(const_end + rows_end @ np.array(theta)))
        sim_t0 = min(r.data.arrival for _, r in sim.finals.values())
        if real_span > 0:
            A.append(rows_end[last] / real_span)
            b.append(1.0 + (sim_t0 - const_end[last]) / real_span)
        A = np.array(A)[:, fit_idx]
        b = np.array(b)
        th0 = np.array([theta0[j] for j in fit_idx])
        # unknowns in units of the start values (a typical size where a start value is 0); the
        # ridge pulls each towards its start value
        scale = np.where(th0 > 0, th0, np.array([_TYPICAL[j] for j in fit_idx]))
        lam = math.sqrt(ridge)
        A_reg = np.vstack([A * scale, lam * np.eye(len(fit_idx))])
        b_reg = np.concatenate([b, lam * th0 / scale])
        x_next = _nnls_small(A_reg, b_reg)
        new_theta = list(theta)
        for j, v in zip(fit_idx, x_next * scale):
            new_theta[j] = float(v)
        for j in (2, 3):
            new_theta[j] = max(new_theta[j], 1.0)     # efficiency <= 1
        prof = _profile_of(base, new_theta, names)
        sim = simulate(prof, instrument=True)
        evals += 1
        loss = loss_of(sim.result.records)
        if loss < best[1]:
            best = (prof, loss, sim.result.records)
        change = max(abs(a - c) / max(abs(c), 1e-12) for a, c in zip(new_theta, theta))
        theta = _theta_of(prof)
        if change < 1e-5 or loss < 1e-12:
            break
    return best[0], best[1], best[2], evals


def _nnls_small(A, b):
    """Non-negative least squares for a handful of unknowns: the best unconstrained solution over
    every subset of free variables that comes out non-negative."""
    import numpy as np

    n = A.shape[1]
    best, best_r = np.zeros(n), float(np.sum(b * b))
    for k in range(1, n + 1):
        for subset in itertools.combinations(range(n), k):
            cols = list(subset)
            x, *_ = np.linalg.lstsq(A[:, cols], b, rcond=None)
            if np.any(x < 0):
                continue
            full = np.zeros(n)
            full[cols] = x
            r = float(np.sum((A @ full - b) ** 2))
            if r < best_r:
                best, best_r = full, r
    return best
