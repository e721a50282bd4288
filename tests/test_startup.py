"""Start order and start-up progress (nbkit.cluster.startup): pure order over plans, the driver with
a stand-in launcher (fake processes that write vLLM-like logs on a schedule), stage parsing from log
lines, and a start of simulated replicas driving the bars to completion."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest

from nbkit.cluster import startup
from nbkit.cluster.placement import plan_replicas
from nbkit.cluster.process import ReplicaStartError
from nbkit.cluster.spec import GPU, Inventory, ReplicaSpec

GPU_LOG = [  # (seconds after spawn, line): a GPU start, shortened from vLLM 0.32's log
    (0.00, "(APIServer pid=1) INFO [api_utils.py:286] non-default args: {...}"),
    (0.05, "(EngineCore pid=2) INFO [gpu_model_runner.py:5040] Starting to load model m..."),
    (0.10, "(EngineCore pid=2) INFO [default_loader.py:502] Loading weights took 0.01 seconds"),
    (0.15, "(EngineCore pid=2) INFO [backends.py:1167] Dynamo bytecode transform time: 3.10 s"),
    (0.20, "(EngineCore pid=2) INFO [gpu_worker.py:760] Available KV cache memory: 30.1 GiB"),
    (0.22, "(EngineCore pid=2) INFO [kv_cache_utils.py:2328] GPU KV cache size: 98,304 tokens"),
    (0.30, "(EngineCore pid=2) INFO [core.py:403] init engine (profile, create kv cache, warmup model) took 4.2 s"),
    (0.35, "(APIServer pid=1) INFO [entry.py:140] Starting vLLM server on http://127.0.0.1:8100"),
]
HEALTHY_AT = 0.45


class FakeProcess:
    """Stands in for ReplicaProcess: spawn() records when, then writes GPU_LOG on its schedule;
    wait_healthy() returns at HEALTHY_AT, or raises like a replica that exits at start."""

    def __init__(self, i: int, log_path: Path, events: list, fail_at: float | None = None):
        self.i, self.log_path, self.events, self.fail_at = i, log_path, events, fail_at
        self.pid = 1000 + i
        self.spawned_at: float | None = None
        self.task: asyncio.Task | None = None

    def spawn(self) -> None:
        self.spawned_at = time.monotonic()
        self.events.append(("spawn", self.i, self.spawned_at))
        self.task = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        lines = GPU_LOG if self.fail_at is None else GPU_LOG[:1] + [
            (self.fail_at, "vllm serve: error: unrecognized arguments: --no-such-flag")]
        for at, line in lines:
            await asyncio.sleep(max(0.0, self.spawned_at + at - time.monotonic()))
            with open(self.log_path, "a") as f:
                f.write(line + "\n")
            if startup.stage_of(line) == "KV cache" and not any(e[:2] == ("kv", self.i) for e in self.events):
                self.events.append(("kv", self.i, time.monotonic()))  # the first KV-cache line

    async def wait_healthy(self, timeout: float, probe=None) -> float:
        if self.fail_at is not None:
            await asyncio.sleep(self.fail_at + 0.05)
            raise ReplicaStartError(f"replica{self.i}", "exited with code 2 before it was healthy", "(tail)")
        await asyncio.sleep(HEALTHY_AT)
        self.events.append(("healthy", self.i, time.monotonic()))
        return time.monotonic() - self.spawned_at


def gpu_plans(devices: list[tuple[int, ...]], n_gpus: int = 2):
    inv = Inventory(cores=(0, 1), gpus=tuple(GPU(g, "H100", 80.0) for g in range(n_gpus)), memory_gib=64)
    return plan_replicas([ReplicaSpec(model="m", devices=d, tp_size=len(d)) for d in devices], inv,
                         port_free=lambda h, p: True, check_models=False)


def run_start(plans, tmp_path, fail: dict[int, float] | None = None, progress=None, idx=None):
    events: list = []
    procs: dict[int, FakeProcess] = {}

    def launch(i):
        procs[i] = FakeProcess(i, tmp_path / f"r{i}.log", events, (fail or {}).get(i))
        return procs[i]

    async def go():
        try:
            return await startup.start_replicas(plans, list(range(len(plans))) if idx is None else idx, launch,
                                                timeout=10, progress=progress, poll_s=0.01, settle_s=0.3)
        finally:
            for p in procs.values():
                if p.task is not None:
                    p.task.cancel()

    return asyncio.run(go()), events, procs


def at(events, kind, i):
    return next(t for k, j, t in events if k == kind and j == i)


# ------------------------------------------------------------------------------------- pure order
def test_replicas_sharing_a_gpu_wait_for_the_one_before_them_on_it():
    plans = gpu_plans([(0,), (0,), (0,), (1,)])
    assert startup.start_after(plans) == {0: (), 1: (0,), 2: (1,), 3: ()}
    assert startup.waves(plans) == [[0, 3], [1], [2]]
    assert startup.start_after(plans, [2, 3]) == {2: (), 3: ()}  # a restart or scale: only those started


def test_cpu_and_simulated_replicas_and_tp_groups_on_their_own_gpus_start_at_once():
    inv = Inventory(cores=(0, 1, 2, 3), memory_gib=64)
    cpu = plan_replicas([ReplicaSpec(model="m")] * 4, inv, port_free=lambda h, p: True, check_models=False)
    assert startup.waves(cpu) == [[0, 1, 2, 3]]
    sim = plan_replicas([ReplicaSpec(model="tiny", engine="sim")] * 3, inv, port_free=lambda h, p: True,
                        check_models=False)
    assert startup.waves(sim) == [[0, 1, 2]]
    tp = gpu_plans([(0, 1), (2, 3)], n_gpus=4)
    assert startup.start_after(tp) == {0: (), 1: ()}


# --------------------------------------------------------------------------------- stage parsing
@pytest.mark.parametrize("line, stage", [
    ("(EngineCore pid=2072) INFO 12-01 18:18:41 [cpu_model_runner.py:68] Starting to load model /m...", "loading weights"),
    ("Loading safetensors checkpoint shards:   0% Completed | 0/1 [00:00<?, ?it/s]", "loading weights"),
    ("(EngineCore pid=2) INFO [default_loader.py:501] Loading weights took 0.01 seconds", "loading weights"),
    ("(EngineCore pid=2) INFO [backends.py:399] Compiling a graph for compile range (1, 8192) takes 9.1 s", "compiling"),
    ("(EngineCore pid=2) INFO [monitor.py:20] torch.compile took 12.30 s in total", "compiling"),
    ("(EngineCore pid=2072) INFO [kv_cache_utils.py:2327] CPU KV cache size: 1,048,576 tokens, Maximum ...", "KV cache"),
    ("(EngineCore pid=2) INFO [kv_cache_utils.py:2328] GPU KV cache size: 98,304 tokens", "KV cache"),
    ("(EngineCore pid=2) INFO [core.py:402] init engine (profile, create kv cache, warmup model) took 0.70 s", "KV cache"),
    ("nbkit.sim.server: tiny (tiny on cpu x1, 1 engine(s), 8192 blocks of 16) at http://127.0.0.1:8100", "KV cache"),
    ("(APIServer pid=2035) INFO 12-01 18:18:44 [launcher.py:195] Route: /health, Methods: GET", None),
    ("(APIServer pid=2035) INFO 12-01 18:18:39 [model.py:2152] Using max model len 4096", None),
])
def test_stage_of_a_log_line(line, stage):
    assert startup.stage_of(line) == stage


def test_stage_log_follows_a_file_from_where_it_stood_and_never_goes_back(tmp_path):
    path = tmp_path / "replica0.log"
    path.write_text("old start\n(EngineCore) GPU KV cache size: 10 tokens\n")  # an earlier start's lines
    watch = startup.StageLog(path)
    assert watch.poll() == "launched"
    with open(path, "a") as f:
        f.write("(EngineCore) Starting to load model m...\nLoading safetensors checkpoint shards:  0% |\r")
    assert watch.poll() == "loading weights"
    with open(path, "a") as f:
        f.write("(EngineCore) CPU KV cache size: 1 tokens\n(EngineCore) Capturing CUDA graphs (decode, FULL)\n")
    assert watch.poll() == "KV cache"  # monotone: the later graph capture does not move it back
    assert watch.take_new() == ["loading weights", "KV cache"] and watch.take_new() == []
    with open(path, "a") as f:
        f.write("vllm serve: error: unrecognized arguments: --bad")  # no newline yet
    watch.poll()
    assert watch.last_line == "vllm serve: error: unrecognized arguments: --bad"


# ------------------------------------------------------------------- the driver, stand-in launcher
def test_shared_gpu_replicas_start_in_sequence_after_the_kv_cache_line_others_in_parallel(tmp_path):
    plans = gpu_plans([(0,), (0,), (1,)])
    took, events, _ = run_start(plans, tmp_path)
    assert sorted(took) == [0, 1, 2]
    # replica1 (GPU 0, after replica0) starts once replica0 has sized its KV cache, before it is healthy
    assert at(events, "kv", 0) <= at(events, "spawn", 1) < at(events, "healthy", 0)
    # replica2 (GPU 1) started together with replica0
    assert abs(at(events, "spawn", 2) - at(events, "spawn", 0)) < 0.05
    assert at(events, "spawn", 1) - at(events, "spawn", 0) >= GPU_LOG[4][0] - 0.01


def test_a_failure_stops_the_launches_and_names_the_siblings_that_failed_too(tmp_path):
    plans = gpu_plans([(0,), (0,), (1,), (1,)])
    with pytest.raises(ReplicaStartError) as err:
        run_start(plans, tmp_path, fail={0: 0.05, 2: 0.1})
    msg = str(err.value)
    assert msg.startswith("replica0 exited") and "also failed: replica2" in msg
    # replica1 and replica3 wait behind the failed ones on their GPUs: never launched
    plans = gpu_plans([(0,), (0,)])
    events_box = []

    def launch(i):
        return FakeProcess(i, tmp_path / f"s{i}.log", events_box, 0.05 if i == 0 else None)

    with pytest.raises(ReplicaStartError):
        asyncio.run(startup.start_replicas(plans, [0, 1], launch, timeout=10, poll_s=0.01, settle_s=0.1))
    assert [i for k, i, _ in events_box if k == "spawn"] == [0]


def test_bars_show_each_stage_and_the_failing_replicas_last_line(tmp_path):
    out = io.StringIO()
    plans = gpu_plans([(0,), (1,)])
    with pytest.raises(ReplicaStartError):
        run_start(plans, tmp_path, fail={1: 0.3}, progress=startup.TqdmProgress(file=out, refresh_s=0.0))
    text = out.getvalue()
    for stage in ("launched", "loading weights", "compiling", "KV cache", "healthy in"):
        assert stage in text, (stage, text)
    assert "5/5 healthy in 0 s" in text
    assert "failed after 0 s: vllm serve: error: unrecognized arguments: --no-such-flag" in text


def test_line_progress_prints_one_line_per_stage_even_when_one_poll_reads_several(tmp_path):
    out = io.StringIO()
    plans = gpu_plans([(0,), (0,)])

    def launch(i):
        return FakeProcess(i, tmp_path / f"r{i}.log", [])

    asyncio.run(startup.start_replicas(plans, [0, 1], launch, timeout=10, progress=startup.LineProgress(out),
                                       poll_s=0.5))
    lines = out.getvalue().splitlines()
    r1 = [ln for ln in lines if ln.startswith("nbkit: replica1")]
    assert r1[0].startswith("nbkit: replica1 waiting") and "after replica0, same GPU" in r1[0]
    assert [ln.split(" (")[0] for ln in r1[1:]] == [
        "nbkit: replica1 launched", "nbkit: replica1 loading weights", "nbkit: replica1 compiling",
        "nbkit: replica1 KV cache", "nbkit: replica1 healthy in 0 s"]


def test_progress_default_is_off_without_a_terminal_or_notebook(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert type(startup.open_progress(None)) is startup.Progress
    assert isinstance(startup.open_progress(True), startup.TqdmProgress)
    assert startup.open_progress(io.StringIO()).file is not None
    mine = startup.LineProgress()
    assert startup.open_progress(mine) is mine
    with pytest.raises(TypeError):
        startup.open_progress("yes")


# ---------------------------------------------------------------------- a real start, sim replicas
def test_a_sim_cluster_start_drives_the_bars_to_completion(tmp_path):
    from nbkit import Cluster
    out = io.StringIO()
    c = Cluster.replicas("tiny", n=2, engine="sim", run_dir=tmp_path, kv_events=False)
    try:
        c.start(timeout=120, progress=out)
        assert all(s.state == "healthy" for s in c.status())
    finally:
        c.stop()
    text = out.getvalue()
    for name in ("replica0", "replica1"):
        last = [seg for seg in text.replace("\n", "\r").split("\r") if seg.startswith(name)][-1]
        assert "5/5 healthy in" in last, text
    assert "KV cache" in text
