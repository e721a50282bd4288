"""The control panel: live load per rank and the knobs, as one ipywidgets layout.

    client = cluster.client("least_load")      # the panel drives every client/endpoint of the cluster
    panel = cluster.panel()                    # display it (last expression of a cell)
    panel.snapshot()                           # the table as a DataFrame (for asserts, no browser)
    panel.close()                              # stops the refresh

What it shows, refreshed about once a second by a task on nbkit's loop (updates keep coming while
no cell runs): one row per rank (state, pinning, port, running, waiting, KV cache %, prompt and
generation tok/s, requests served/routed, TTFT p50, memory, last error); a chart of generation
throughput per rank and in total over the last two minutes, and one of queue depth (waiting) per
rank; the last routing decisions with their reasons; a log tail per replica; the autoscaler's
decisions with theirs.

What it controls: the routing policy (applied live to the cluster's clients and endpoints), the
max concurrency, the number of instances and the TP size (Apply shows what will happen, Confirm
does it), and stop/restart per replica. Long actions run on nbkit's loop; the kernel stays free.
Over servers nbkit did not start (``Cluster.attach(urls)``, whose ``attached`` is True) the
scale and stop/restart controls are hidden and disabled (``panel.controllable`` is False): only
the routing knobs remain.

Charts are drawn (altair -> vl-convert SVG, tens of milliseconds each) on the panel's own thread,
never on nbkit's loop, which forwards every request of the cluster's clients and endpoints.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import logging
import time

import ipywidgets as W

from nbkit import loop
from nbkit.ui.monitor import ERROR_SHOW_S, Monitor

log = logging.getLogger(__name__)

_COLS = [("rank", "rank"), ("state", "state"), ("pinning", "pinned"), ("port", "port"), ("running", "running"),
         ("waiting", "waiting"), ("kv_cache_pct", "KV %"), ("prompt_tok_s", "prompt tok/s"),
         ("gen_tok_s", "gen tok/s"), ("requests_served", "served"), ("routed", "routed"),
         ("ttft_p50_s", "TTFT p50 s"), ("mem_gb", "mem GB"), ("kv_blocks", "KV blocks"),
         ("predicted_hit_pct", "hit % (kv_aware)"), ("reported_hit_pct", "hit % (vLLM)"), ("restarts", "restarts"),
         ("last_error", "last error")]
_STATE_COLOR = {"healthy": "#1a7f37", "starting": "#9a6700", "unhealthy": "#cf222e", "failed": "#cf222e",
                "restarting": "#9a6700", "stopped": "#6e7781", "detached": "#6e7781"}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def concurrency_text(value: int | None) -> str:
    """The max-concurrency setting as shown: 0 or None is unlimited."""
    return "∞ (unlimited)" if not value else str(value)


def _error_cell(r) -> tuple[str, str]:
    """(text, style) of a row's last error: with its age, fading as it gets older."""
    if not r.last_error:
        return "", ""
    age = r.last_error_age_s or 0.0
    opacity = max(0.35, 1.0 - age / ERROR_SHOW_S)
    return f"{r.last_error} ({age:.0f} s ago)", f"opacity:{opacity:.2f}"


def rows_html(rows) -> str:
    """The rank table as HTML (each row carries data-rank, each cell a class named for its field)."""
    head = "".join(f'<th style="padding:2px 8px">{html.escape(t)}</th>' for _, t in _COLS)
    body = []
    for r in rows:
        cells = []
        for f, _ in _COLS:
            v = getattr(r, f)
            extra = f"color:{_STATE_COLOR.get(v, 'inherit')};font-weight:600" if f == "state" else ""
            text = _fmt(v)
            if f == "last_error":
                text, extra = _error_cell(r)
            cells.append(f'<td class="nbkit-{f}" style="padding:2px 8px;{extra}">{html.escape(text)}</td>')
        body.append(f'<tr class="nbkit-row" data-rank="{html.escape(r.rank)}">{"".join(cells)}</tr>')
    return (f'<table class="nbkit-ranks" style="border-collapse:collapse;font-size:12px">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def decisions_html(records, n: int = 8) -> str:
    recs = list(records)[-n:][::-1]
    if not recs:
        return "<i>no routed requests yet</i>"
    rows = "".join(
        f"<tr><td>{r.id}</td><td>{html.escape(r.rank)}</td><td>{html.escape(r.policy)}</td>"
        f"<td>{html.escape(r.reason)}</td><td>{r.queue_wait_s * 1000:.1f}</td>"
        f"<td>{'-' if r.ttft_s is None else f'{r.ttft_s:.3f}'}</td><td>{html.escape(r.outcome)}</td></tr>"
        for r in recs)
    return ('<table class="nbkit-decisions" style="font-size:12px"><thead><tr><th>id</th><th>rank</th>'
            "<th>policy</th><th>reason</th><th>queue ms</th><th>TTFT s</th><th>outcome</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def tenants_html(routers) -> str:
    """Per tenant over the cluster's routers: in flight, queued, share of what finished ok, output
    tokens, throttled (429) requests."""
    rows: dict[str, dict] = {}
    for r in routers:
        queued = r.queued_by_tenant()
        for name, c in r.admission.snapshot().items():
            row = rows.setdefault(name, {"in_flight": 0, "queued": 0, "ok": 0, "tokens": 0, "throttled": 0})
            for k in ("in_flight", "ok", "tokens", "throttled"):
                row[k] += c.get(k, 0)
            row["queued"] += queued.pop(name, 0)
        for name, n in queued.items():
            rows.setdefault(name, {"in_flight": 0, "queued": 0, "ok": 0, "tokens": 0, "throttled": 0})["queued"] += n
    if not rows:
        return ("<i>no requests yet; tenants: cluster.endpoint(tenants='tenants.toml') or "
                "client.complete(..., tenant='alice', priority='batch')</i>")
    total = sum(r["tokens"] for r in rows.values()) or 1
    body = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{r['in_flight']}</td><td>{r['queued']}</td><td>{r['ok']}</td>"
        f"<td>{r['tokens']}</td><td>{r['tokens'] / total:.0%}</td><td>{r['throttled']}</td></tr>"
        for name, r in sorted(rows.items()))
    return ("<table class='nbkit-tenants' style='font-size:12px'><thead><tr><th>tenant</th><th>in flight</th>"
            "<th>queued</th><th>ok</th><th>tokens out</th><th>share</th><th>throttled</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


def scaling_html(scaler, n: int = 8) -> str:
    """The autoscaler's last decision (a hold too) and its latest ups and downs, newest first."""
    if scaler is None:
        return "<i>no autoscaler: cluster.autoscale(min_replicas=..., max_replicas=..., ttft_p90_ms=...)</i>"
    last = scaler.last
    head = ("<i>no decision yet</i>" if last is None else
            f'<div class="nbkit-scale-last"><b>{html.escape(last.direction)}</b> {last.current} -&gt; {last.desired}: '
            f"{html.escape(last.reason)}</div>")
    t0 = scaler.started_at
    rows = "".join(
        f"<tr><td>{d.t - t0:.0f}</td><td>{html.escape(d.direction)}</td><td>{d.current} -&gt; {d.desired}</td>"
        f"<td>{html.escape(d.reason)}</td></tr>" for d in scaler.decisions[-n:][::-1])
    return (f"{head}<table class='nbkit-scaling' style='font-size:12px'><thead><tr><th>s</th><th>action</th>"
            f"<th>replicas</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>")


def charts(history_df):
    """Altair charts: generation tok/s per rank and total (dashed); queue depth (waiting) per rank. One
    legend (the rank colours, shared by both) under the charts."""
    import altair as alt

    df = history_df[["time", "rank", "gen_tok_s", "waiting"]]
    color = alt.Color("rank:N", title="rank", legend=alt.Legend(orient="bottom", direction="horizontal"))
    base = alt.Chart(df).encode(x=alt.X("time:T", title=None, axis=alt.Axis(format="%H:%M:%S", tickCount=4)),
                                color=color)
    dash = alt.condition(alt.datum.rank == "total", alt.value([5, 3]), alt.value([1, 0]))
    thr = base.mark_line().encode(y=alt.Y("gen_tok_s:Q", title="generation tok/s"), strokeDash=dash).properties(
        width=420, height=160, title="throughput per rank and total")
    q = base.transform_filter(alt.datum.rank != "total").mark_line().encode(
        y=alt.Y("waiting:Q", title="waiting requests")).properties(width=420, height=160, title="queue depth per rank")
    return alt.hconcat(thr, q).resolve_scale(color="shared")


def chart_svg(history_df) -> str:
    if history_df.empty:
        return "<i>collecting samples ...</i>"
    import vl_convert as vlc
    return vlc.vegalite_to_svg(charts(history_df).to_json())


class Panel(W.VBox):
    """An ipywidgets layout over a Cluster; see the module docstring."""

    def __init__(self, cluster, *, interval: float = 1.0, chart_every: int = 2, decisions: int = 8):
        self.cluster = cluster
        self.monitor: Monitor = cluster.monitor()
        self.interval, self.chart_every, self.n_decisions = interval, chart_every, decisions
        from nbkit.policies import available_policies

        self.header = W.HTML()
        self.table = W.HTML()
        self.chart = W.HTML()
        self.decisions = W.HTML()
        self.policy = W.Dropdown(options=[p for p in available_policies() if p != "custom"],
                                 value=self._current_policy() or cluster.default_policy(), description="policy")
        conc = self._current_concurrency()
        self.concurrency = W.IntSlider(value=conc, min=0, max=max(512, conc), step=1, readout=False,
                                       description="max conc.", tooltip="0 = unlimited")
        self.concurrency_label = W.HTML(concurrency_text(conc), layout=W.Layout(min_width="110px"))
        self.instances = W.BoundedIntText(value=len(cluster), min=1, max=64, description="instances")
        self.tp = W.BoundedIntText(value=cluster.plans[0].tp_size, min=1, max=64, description="TP size")
        self.apply = W.Button(description="Apply", button_style="warning")
        self.confirm = W.Button(description="Confirm", button_style="danger", layout=W.Layout(display="none"))
        self.plan_line = W.HTML()
        names = [(p.name, p.index) for p in cluster.plans]
        self.replica = W.Dropdown(options=names, description="replica")
        self.stop_btn = W.Button(description="Stop", icon="stop")
        self.restart_btn = W.Button(description="Restart", icon="refresh")
        self.action_line = W.HTML()
        self.log_view = W.HTML()
        self._pending = None
        self._task: asyncio.Future | None = None
        # one thread draws the charts, one chart at a time (a slow one is skipped over, never queued)
        self._chart_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nbkit-panel-chart")
        self._chart_job: concurrent.futures.Future | None = None
        self._tick = 0
        self.closed = False

        self.policy.observe(self._on_policy, names="value")
        self.concurrency.observe(self._on_concurrency, names="value")
        self.apply.on_click(self._on_apply)
        self.confirm.on_click(self._on_confirm)
        self.stop_btn.on_click(lambda _: self._run_action("stop", self.replica.value))
        self.restart_btn.on_click(lambda _: self._run_action("restart", self.replica.value))
        self.scale_row = W.HBox([self.instances, self.tp, self.apply, self.confirm])
        self.replica_row = W.HBox([self.replica, self.stop_btn, self.restart_btn])
        #: False over servers nbkit did not start (``cluster.attached``): no scale, stop or restart controls
        self.controllable = not getattr(cluster, "attached", False)
        if not self.controllable:
            for w in (self.instances, self.tp, self.apply, self.confirm, self.replica, self.stop_btn,
                      self.restart_btn):
                w.disabled = True
            self.scale_row.layout.display = self.replica_row.layout.display = "none"
            self.action_line.value = ("<i>attached servers: nbkit did not start them, so it does not stop, "
                                      "restart or scale them</i>")
        controls = W.VBox([
            W.HBox([self.policy, self.concurrency, self.concurrency_label]),
            self.scale_row, self.plan_line, self.replica_row, self.action_line,
        ])
        self.scaling = W.HTML()
        self.tenants = W.HTML()
        tabs = W.Tab(children=[self.decisions, self.log_view, self.scaling, self.tenants])
        for i, title in enumerate(("routing decisions", "log tail", "autoscaling", "tenants")):
            tabs.set_title(i, title)
        super().__init__([self.header, self.table, self.chart, controls, tabs])
        self.add_class("nbkit-panel")
        self._render()
        self._task = loop.submit(self._refresh_loop())

    # -- state from the cluster's routers -------------------------------------------------------
    def _routers(self):
        return self.cluster.routers()

    def _current_policy(self):
        rs = self._routers()
        return rs[0].policy.name if rs else None

    def _current_concurrency(self) -> int:
        rs = self._routers()
        return (rs[0].max_concurrency or 0) if rs else 0

    # -- refresh ----------------------------------------------------------------------------------
    async def _refresh_loop(self) -> None:
        while not self.closed:
            t = time.monotonic()
            try:
                await self.monitor.sample()
                self._render()
            except Exception as e:  # noqa: BLE001 - the panel must keep going
                log.warning("panel: refresh failed: %r", e)
                self.header.value = f"<b>nbkit</b> refresh error: {html.escape(repr(e))}"
            await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - t)))

    def _render(self) -> None:
        rows = self.monitor.rows
        running = self.cluster.running
        routers = self._routers()
        inflight = sum(r.in_flight for r in routers)
        queued = sum(r.queued for r in routers)
        state = "running" if running else "stopped"
        what = "attached servers" if not self.controllable else "replicas"
        self.header.value = (f'<b>nbkit</b> · <span class="nbkit-cluster-state">{state}</span> · '
                            f"{len(self.cluster)} {what} · policy <code class='nbkit-policy'>"
                            f"{html.escape(self._current_policy() or '-')}</code> · in flight {inflight} · "
                            f"queued {queued} · step {self.monitor.step}")
        if not rows:
            from nbkit.ui.monitor import RankRow
            rows = [RankRow(rank=r.name, replica=r.replica, state=self.cluster.state(r.replica),
                            pinning=self.cluster.plans[r.replica].pinning, port=self.cluster.plans[r.replica].port,
                            restarts=getattr(self.cluster, "restarts_of", lambda i: 0)(r.replica))
                    for r in self.cluster.ranks]
        self.table.value = rows_html(rows)
        self.decisions.value = decisions_html(self.monitor.records(), self.n_decisions)
        self.scaling.value = scaling_html(getattr(self.cluster, "autoscaler", None), self.n_decisions)
        self.tenants.value = tenants_html(routers)
        i = self.replica.value if self.replica.value is not None else 0
        if i < len(self.cluster):
            self.log_view.value = f"<pre style='font-size:11px;max-height:240px;overflow:auto'>" \
                             f"{html.escape(self.cluster.logs(i, 15))}</pre>"
        self._tick += 1
        if (self._tick % self.chart_every == 1 or self.chart_every == 1) and (
                self._chart_job is None or self._chart_job.done()) and not self.closed:
            history = list(self.monitor.history)  # copied here, where the monitor appends to it
            self._chart_job = self._chart_pool.submit(self._draw_chart, history)

    def _draw_chart(self, history: list) -> None:
        """On the panel's chart thread: the history's charts as SVG into the chart widget."""
        try:
            value = chart_svg(self.monitor.history_frame(history))
        except Exception as e:  # noqa: BLE001
            value = f"<i>chart unavailable: {html.escape(repr(e))}</i>"
        if not self.closed:
            self.chart.value = value

    # -- controls ---------------------------------------------------------------------------------
    def _on_policy(self, change) -> None:
        for r in self._routers():
            loop.call_soon(setattr, r, "policy", change["new"])
        self.action_line.value = f"policy -> <b>{html.escape(change['new'])}</b>" + (
            "" if self._routers() else " (no client or endpoint yet: create one with cluster.client())")

    def _on_concurrency(self, change) -> None:
        value = change["new"] or None
        for r in self._routers():
            loop.call_soon(r.set_max_concurrency, value)
        self.concurrency_label.value = concurrency_text(value)
        self.action_line.value = f"max concurrency -> <b>{html.escape(concurrency_text(value))}</b>"

    def _on_apply(self, _=None) -> None:
        n, tp = self.instances.value, self.tp.value
        try:
            actions = self.cluster.scale_plan(n, tp)
        except ValueError as e:
            self.plan_line.value = f"<span style='color:#cf222e'>{html.escape(str(e))}</span>"
            self.confirm.layout.display = "none"
            return
        changes = [a for a in actions if a[0] != "keep"]
        if not changes:
            self.plan_line.value = "nothing to do"
            self.confirm.layout.display = "none"
            return
        self._pending = (n, tp)
        self.plan_line.value = "will " + "; ".join(f"<b>{a}</b> {html.escape(d)}" for a, _, d in actions) \
                               + " — press Confirm"
        self.confirm.layout.display = None

    def _on_confirm(self, _=None) -> None:
        if self._pending is None:
            return
        n, tp = self._pending
        self._pending = None
        self.confirm.layout.display = "none"
        self._run_action("scale", n, tp)

    def _run_action(self, what: str, *args) -> asyncio.Future:
        c = self.cluster
        if not self.controllable:
            raise RuntimeError(f"{what}: the panel's cluster is attached (servers nbkit did not start)")
        coro = {"stop": lambda i: c.astop_replica(i), "restart": lambda i: c.arestart(i),
                "scale": lambda n, tp: c.ascale(n, None, tp)}[what](*args)
        self.action_line.value = f"{what} {args} ... (runs in the background)"
        fut = loop.submit(coro)

        def done(f) -> None:
            err = f.exception()
            self.action_line.value = (f"{what} {args}: <span style='color:#cf222e'>{html.escape(str(err)[:400])}</span>"
                                      if err else f"{what} {args}: done")
            self.replica.options = [(p.name, p.index) for p in c.plans]
            self.instances.value, self.tp.value = len(c), c.plans[0].tp_size
        fut.add_done_callback(done)
        return fut

    # -- public -----------------------------------------------------------------------------------
    def snapshot(self):
        """The rank table as a pandas DataFrame (what the panel shows now)."""
        return self.monitor.snapshot()

    def close(self) -> None:
        """Stop refreshing and close the widgets."""
        self.closed = True
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()
        self._chart_pool.shutdown(wait=False, cancel_futures=True)
        super().close()
