"""The kv_aware benchmark's wiring without an engine: the endpoint process of
benchmarks/router_overhead.py (``--serve-endpoint``) binds the replicas' KV-event port, replays each
replica's history from vLLM's own ZmqEventPublisher, and routes kv_aware on it in front of two
mock backends; ClusterKV's helpers it uses (kv_source, follow, listen(move=False), wait_replayed);
and benchmarks/compare_routers.py's options, result names, --kv-blocks auto and the kv_aware vs
cache_aware goals (per round and pooled)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_ports

pytestmark = pytest.mark.processes  # simulated replicas / kernels: `make test`, not `make test-fast`


ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))


def wait_for(pred, timeout=20.0, what="condition", proc=None):
    t = time.monotonic()
    while True:
        try:
            if pred():
                return
        except (httpx.HTTPError, OSError):
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) waiting for {what}")
        if time.monotonic() - t > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Procs:
    """Processes a test started, each in its own session; stopped by process group at the end."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=str(ROOT), env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.procs.append((p, log))
        return p

    def log(self, p) -> str:
        for q, f in self.procs:
            if q is p:
                f.flush()
                return Path(f.name).read_text(errors="replace")
        return ""

    def stop(self, p) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    def stop_all(self) -> None:
        for p, f in reversed(self.procs):
            self.stop(p)
            f.close()


@pytest.fixture
def procs(tmp_path):
    ps = Procs(tmp_path)
    yield ps
    ps.stop_all()


@pytest.fixture
def publishers():
    """vLLM's own ZmqEventPublisher per topic (no engine): the wire format, sequence and replay."""
    kv = pytest.importorskip("vllm.distributed.kv_events")
    made = []

    def make(port, replay_port, topic, block_size=16):
        pub = kv.ZmqEventPublisher(0, endpoint=f"tcp://127.0.0.1:{port}",
                                   replay_endpoint=f"tcp://127.0.0.1:{replay_port}", topic=topic)
        made.append(pub)

        def store(token_ids, first_hash):
            n = len(token_ids) // block_size
            hashes = [first_hash + i for i in range(n)]
            pub.publish(kv.KVEventBatch(ts=time.time(), events=[kv.BlockStored(
                block_hashes=hashes, parent_block_hash=None, token_ids=list(token_ids[:n * block_size]),
                block_size=block_size, lora_id=None, medium="GPU", lora_name=None)]))
        return store

    yield make
    for pub in made:
        pub.shutdown()


# --------------------------------------------------------------------------- nbkit helpers
def test_kv_source_names_a_plans_topic_replay_port_and_ranks(tiny_model_path):
    from nbkit.cluster.kv import kv_source
    from nbkit.cluster.placement import plan_replicas
    from nbkit.cluster.spec import GPU, Inventory, ReplicaSpec
    inv = Inventory(cores=(0, 1), gpus=tuple(GPU(i, "H100", 80.0) for i in range(4)))
    specs = [ReplicaSpec(model=tiny_model_path, device="gpu"), ReplicaSpec(model=tiny_model_path, device="gpu", dp_size=2),
             ReplicaSpec(model=tiny_model_path, device="gpu", kv_events=False)]
    plans = plan_replicas(specs, inv, port_start=8100, port_free=lambda h, p: True, kv_events_port=5557)
    s0, s1, s2 = (kv_source(p) for p in plans)
    assert s0 == {"topic": plans[0].name, "dp_size": 1, "replay_port": plans[0].kv_replay_port,
                  "names": {0: plans[0].name}}
    assert s1["dp_size"] == 2 and s1["names"] == {0: f"{plans[1].name}/dp0", 1: f"{plans[1].name}/dp1"}
    assert s2 is None


def test_listen_without_moving_raises_where_the_replicas_port_is_taken(tiny_model_path):
    import zmq

    from nbkit.cluster.kv import ClusterKV
    port = free_ports(1, 26100)[0]
    ctx = zmq.Context()
    squatter = ctx.socket(zmq.PULL)
    squatter.bind(f"tcp://127.0.0.1:{port}")
    kv = ClusterKV(tiny_model_path, port=port, dp_ports=1)
    try:
        with pytest.raises(ValueError, match=str(port)):
            kv.listen(move=False)
        assert kv.port == port
    finally:
        kv.close()
        squatter.close(linger=0)
        ctx.term()


def test_follow_replays_each_topic_and_wait_replayed_says_when(tiny_model_path, publishers):
    from nbkit.cluster.kv import ClusterKV
    port, r0, r1 = free_ports(3, 26200)
    store0 = publishers(port, r0, "replica0")
    publishers(port, r1, "replica1")  # published nothing: known empty after its replay
    tokens = list(range(1000, 1000 + 64))
    store0(tokens, 100)
    time.sleep(0.2)  # nobody listens yet: only the replay buffer has it
    kv = ClusterKV(tiny_model_path, port=port, dp_ports=1)
    try:
        kv.listen(move=False)
        kv.follow("replica0", replay_port=r0)
        kv.follow("replica1", replay_port=r1)
        assert kv.wait_replayed(10)
        assert kv.index.match("replica0", tokens) == 64 and kv.index.rank("replica0").warm
        assert kv.index.rank("replica1").warm and kv.index.blocks("replica1") == 0
        kv.follow("replica2", replay_port=free_ports(1, 26300)[0])  # nobody answers there
        assert not kv.wait_replayed(0.3)
    finally:
        kv.close()


# --------------------------------------------------------------- the endpoint process
def test_the_benchmarks_kv_aware_endpoint_follows_the_replicas_events(tiny_model_path, publishers, procs):
    """router_overhead.py --serve-endpoint --policy kv_aware --kv-events-port P --kv-sources ...:
    history replayed from before it started, live events after, decisions on the index (no fallback)."""
    from nbkit.routing.tokenize import PromptTokenizer

    b0, b1, ep_port = free_ports(3, 26400)
    kv_port, r0, r1 = free_ports(3, 26500)
    backends = [procs.start(f"mock{i}", [sys.executable, str(BENCH / "mock_backend.py"), "--port", str(p),
                                          "--parent-pid", str(os.getpid())]) for i, p in enumerate((b0, b1))]
    urls = [f"http://127.0.0.1:{p}" for p in (b0, b1)]
    for p, u in zip(backends, urls):
        wait_for(lambda u=u: httpx.get(u + "/health", timeout=1).status_code == 200, what=u, proc=p)
    store0 = publishers(kv_port, r0, "replica0")
    store1 = publishers(kv_port, r1, "replica1")
    tok = PromptTokenizer(tiny_model_path)
    first = "You are a helpful assistant. " * 12 + "Question one?"
    second = "Answer in French, briefly and kindly. " * 12 + "Question two?"
    store1(tok.completion(first), 1000)  # before the router exists: it must come from the replay
    time.sleep(0.2)
    ep = procs.start("endpoint", [sys.executable, str(BENCH / "router_overhead.py"), "--serve-endpoint",
                                  "--port", str(ep_port), "--policy", "kv_aware", "--parent-pid", str(os.getpid()),
                                  "--kv-events-port", str(kv_port), "--model", tiny_model_path,
                                  "--kv-sources", f"replica0={r0}", f"replica1={r1}", "--urls", *urls])
    url = f"http://127.0.0.1:{ep_port}"
    wait_for(lambda: "nbkit endpoint on" in procs.log(ep), timeout=60, what="the endpoint's banner", proc=ep)
    banner = procs.log(ep)
    assert "kv_events=127.0.0.1:" in banner and "replayed=yes" in banner, banner

    def ranks_of(prompt, n=4):
        out = set()
        for _ in range(n):
            r = httpx.post(url + "/v1/completions", json={"model": tiny_model_path, "prompt": prompt,
                                                          "max_tokens": 1}, timeout=10)
            assert r.status_code == 200, r.text
            out.add(r.headers["x-nbkit-rank"])
        return out

    assert ranks_of(first) == {"replica1"}
    time.sleep(0.3)  # the PUB sockets have reconnected to the new SUB
    store0(tok.completion(second), 5000)  # live
    wait_for(lambda: 'nbkit_kv_events_total{rank="replica0"} 1.0' in httpx.get(url + "/metrics").text,
             what="the live event")
    assert ranks_of(second) == {"replica0"}

    from compare_routers import endpoint_kv_stats
    stats = asyncio.run(endpoint_kv_stats(url))
    assert stats["warm"] == {"replica0": 1.0, "replica1": 1.0} and stats["fallbacks"] == 0
    assert stats["matched_count"] == 8 and stats["matched_sum"] > 0
    assert sum(stats["gaps"].values()) == 0
    procs.stop(ep)
    assert ep.returncode == 0, procs.log(ep)
    # the port is free again for the next run's endpoint
    from nbkit.cluster.kv import ClusterKV
    again = ClusterKV(tiny_model_path, port=kv_port, dp_ports=1)
    try:
        again.listen(move=False)
    finally:
        again.close()


def test_the_endpoint_without_a_kv_port_says_kv_aware_falls_back(procs):
    b0, ep_port = free_ports(2, 26600)
    mock = procs.start("mock", [sys.executable, str(BENCH / "mock_backend.py"), "--port", str(b0)])
    u = f"http://127.0.0.1:{b0}"
    wait_for(lambda: httpx.get(u + "/health", timeout=1).status_code == 200, what="mock", proc=mock)
    ep = procs.start("endpoint", [sys.executable, str(BENCH / "router_overhead.py"), "--serve-endpoint",
                                  "--port", str(ep_port), "--policy", "kv_aware", "--urls", u])
    wait_for(lambda: "nbkit endpoint on" in procs.log(ep), timeout=60, what="the banner", proc=ep)
    assert "falls back to prefix_affinity" in procs.log(ep)


# ------------------------------------------------------------------ compare_routers.py
def test_compare_routers_options_names_and_kv_blocks():
    import compare_routers as cr
    full = cr.parse_args([])
    assert full.out.name == "compare_routers.json" and full.csv_dir.name == "compare_routers"
    assert full.kv_blocks == 48 and ("nbkit", "kv_aware") in cr.router_plan(full)
    a = cr.parse_args(["--routers", "nbkit,sglang", "--workloads", "many-prefixes",
                       "--policies", "kv_aware,cache_aware,prefix_affinity,round_robin"])
    assert cr.router_plan(a) == [("nbkit", "round_robin"), ("nbkit", "prefix_affinity"), ("nbkit", "kv_aware"),
                                 ("sglang", "round_robin"), ("sglang", "cache_aware")]
    assert a.out.name != "compare_routers.json" and a.csv_dir.name == a.out.stem
    assert a.kv_blocks == 192 and a.kv_blocks_auto  # 3/4 of 32 x 8 blocks: 24 prefixes a replica, not 32
    fit = cr.kv_fit(a)["many-prefixes"]
    assert fit["as_designed"] and fit["prefixes_per_replica"] == 24
    named = cr.parse_args(["--workloads", "many-prefixes", "--out-name", "kv_aware"])
    assert named.out.name == "compare_routers_kv_aware.json" and named.csv_dir.name == "compare_routers_kv_aware"
    both = cr.parse_args(["--workloads", "shared-prefix,many-prefixes", "--kv-blocks", "auto"])
    assert both.kv_blocks == 192 and not cr.kv_fit(both)["shared-prefix"]["as_designed"]
    assert cr.parse_args(["--kv-blocks", "60"]).kv_blocks == 60
    for bad in (["--policies", "nope"], ["--workloads", "nope"], ["--routers", "vllm", "--policies", "kv_aware"],
                ["--out-name", "../x"]):
        with pytest.raises(SystemExit):
            cr.parse_args(bad)


def test_compare_routers_passes_the_kv_port_to_kv_aware_only():
    import compare_routers as cr
    args = cr.parse_args([])
    kv = {"port": 15557, "sources": ["replica0=8702", "replica1=8703"], "model": "/m"}
    argv = cr.router_argv("nbkit", "kv_aware", 9000, ["http://a", "http://b"], args, kv)
    i = argv.index("--kv-sources")
    assert argv[argv.index("--kv-events-port") + 1] == "15557" and argv[argv.index("--model") + 1] == "/m"
    assert argv[i + 1:i + 3] == kv["sources"] and argv[-3:] == ["--urls", "http://a", "http://b"]
    assert "--kv-events-port" not in cr.router_argv("nbkit", "least_load", 9000, ["http://a"], args, kv)
    assert "--kv-events-port" not in cr.router_argv("nbkit", "kv_aware", 9000, ["http://a"], args, None)


def _run(router, policy, rnd, p50, p99, tput, hits, completed=300):
    return {"workload": "many-prefixes", "router": router, "policy": policy, "label": f"{router} ({policy})",
            "rate": 10.0, "round": rnd, "sent": 300, "completed": completed, "failed": 300 - completed,
            "duration_s": 30.0, "request_throughput": tput / 32, "output_throughput": tput,
            "ttft_p50_ms": p50, "ttft_p99_ms": p99 * 0.8, "tpot_p50_ms": 10.0, "e2e_p99_ms": p99,
            "prefix_hit_rate": hits, "replica_share": [0.5, 0.5], "csv": "x.csv",
            "_ttft_ms": [p50] * 300, "_e2e_ms": [p99] * 300}


def test_kv_aware_vs_cache_aware_goals_per_round_and_pooled():
    import compare_routers as cr
    runs = [_run("nbkit", "kv_aware", 0, 60, 800, 320, 0.95), _run("sglang", "cache_aware", 0, 100, 1000, 320, 0.90),
            _run("nbkit", "kv_aware", 1, 80, 950, 310, 0.93), _run("sglang", "cache_aware", 1, 100, 1000, 320, 0.94)]
    runs[0]["kv_index"] = {"warm": {"replica0": True, "replica1": True}, "blocks": {}, "events": {}, "gaps": {},
                           "fallbacks": 0, "matched_tokens_per_request": 900.0}
    out = {"rows": cr.pooled(runs), "runs": runs, "rates": {"many-prefixes": 10.0}}
    goals = cr.kv_goals(out)
    assert [g["metric"] for g in goals] == ["ttft_p50_ms", "e2e_p99_ms", "output_throughput", "prefix_hit_rate"]
    p50, e2e, tput, hits = goals
    assert [r["pass"] for r in p50["by_round"]] == [True, False]  # 0.6, then 0.8 > 0.7
    assert p50["by_round"][0]["ratio"] == pytest.approx(0.6)
    assert p50["pass"] and p50["ratio"] == pytest.approx(0.7)  # pooled: the median of all requests (60/80 vs 100)
    assert [r["pass"] for r in e2e["by_round"]] == [True, False] and not e2e["pass"]
    assert tput["pass"] and [r["pass"] for r in hits["by_round"]] == [True, False]
    assert json.dumps(cr._finite(goals))  # stored in the JSON as they are
    args = cr.parse_args(["--workloads", "many-prefixes", "--routers", "nbkit,sglang", "--rounds", "2"])
    lines, all_goals = cr.report(out, args)
    text = "\n".join(lines)
    assert "nbkit endpoint (kv_aware) / sglang-router (cache_aware), each round and pooled" in text
    assert "p50 TTFT ratio <= 0.7" in text and "round 2" in text and "FAIL" in text and "PASS" in text
    assert all(g in all_goals for g in goals)


def test_kv_goals_say_when_cache_aware_was_not_measured():
    import compare_routers as cr
    runs = [_run("nbkit", "kv_aware", 0, 60, 800, 320, 0.95)]
    out = {"rows": cr.pooled(runs) + [{"workload": "many-prefixes", "router": "sglang", "policy": "cache_aware",
                                        "label": "sglang-router (cache_aware)", "rate": 10.0,
                                        "error": "/x/.bench-venv/bin/sglang-router not found"}],
           "runs": runs, "rates": {"many-prefixes": 10.0}}
    goals = cr.kv_goals(out)
    assert goals and not any(g["pass"] for g in goals) and "not measured" in goals[0]["why"]
    assert "not measured" in "\n".join(cr.kv_goal_lines(goals))
    assert cr.kv_goals({"rows": [], "runs": [], "rates": {"shared-prefix": 1.0}}) == []


@pytest.mark.parametrize("extra, path, send_ids", [
    ((), None, True),
    (("--tokenizer", "/elsewhere/tok"), "/elsewhere/tok", True),
    (("--tokenizer=/elsewhere/tok", "--tokenizer-mode", "auto"), "/elsewhere/tok", True),
    (("--tokenizer-mode", "mistral"), None, False),
    (("--skip-tokenizer-init",), None, False),
    (("--tokenizer-revision=abc",), None, False),
])
def test_the_router_tokenizes_as_the_replicas_flags_say(tiny_model_path, extra, path, send_ids):
    from nbkit.cluster.kv import replica_tokenizer

    tok = replica_tokenizer(tiny_model_path, ("--served-model-name", "tiny", *extra))
    assert tok.model == (path or tiny_model_path)
    assert tok.send_ids is send_ids
    assert tok.lora_of({"model": "tiny"}) is None and tok.lora_of({"model": tiny_model_path}) is None
    assert tok.lora_of({"model": "my-adapter"}) == "my-adapter"
