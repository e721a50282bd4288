"""LoRA adapters without vLLM: the replicas' flags and environment (GPU plans included), the
validation that fails before anything launches, the policies' LoRA affinity, the router's adapter
table and loads (against stand-in replicas), the endpoint's 404, and the simulator's adapter load
time. The real replicas are in test_lora_cpu.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from nbkit.cli import parse_args, serve_setup
from nbkit.cluster.lora import check_adapter, lora_args, parse_lora_modules, served_names
from nbkit.cluster.placement import plan_replicas
from nbkit.cluster.spec import GPU, Inventory, ReplicaSpec, SpecError
from nbkit.policies import RankLoad, RequestInfo, available_policies, get_policy
from nbkit.routing.endpoint import Endpoint
from nbkit.routing.forward import Forwarder
from nbkit.routing.lora import (AdapterLoadError, Adapters, UnknownAdapter, adapters_listed, load_request,
                                unload_request)
from nbkit.routing.rank import Rank
from nbkit.routing.router import Router
from nbkit.sim import Simulator
from nbkit.sim.lora import SimAdapters
from nbkit.tiny import tiny_lora
from nbkit.traces import TraceRequest, parse_line, read_trace, write_trace

GPUS = Inventory(cores=tuple(range(16)), gpus=tuple(GPU(i, "H100", 80.0) for i in range(8)), memory_gib=512)
MODEL = "meta-llama/Llama-3.1-8B"


def plan(specs, inv=GPUS, **kw):
    return plan_replicas(specs, inv, port_free=lambda h, p: True, **kw)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return str(tiny_lora(tmp_path_factory.mktemp("lora") / "sql", r=8))


# ------------------------------------------------------------------------------ flags and plans
def test_a_gpu_plan_gets_the_lora_flags_and_the_runtime_env(adapter):
    plans = plan([ReplicaSpec(model=MODEL, tp_size=2, lora_modules={"sql": adapter, "hub": "org/hub-lora"})] * 2)
    argv = plans[1].argv
    i = argv.index("--lora-modules")
    assert argv[i - 1] == "--enable-lora" and argv[i + 1:i + 3] == (f"sql={adapter}", "hub=org/hub-lora")
    assert argv[argv.index("--max-loras") + 1] == "4" and argv[argv.index("--max-lora-rank") + 1] == "8"
    assert plans[1].env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert plans[1].env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_lora_flags_round_ranks_up_respect_extra_args_and_skip_headless(tmp_path):
    big = str(tiny_lora(tmp_path / "big", r=12))
    assert lora_args(ReplicaSpec(model=MODEL, lora_modules={"big": big}))[-2:] == ["--max-lora-rank", "16"]
    assert lora_args(ReplicaSpec(model=MODEL, enable_lora=True)) == ["--enable-lora", "--max-loras", "4",
                                                                    "--max-lora-rank", "16"]
    given = ReplicaSpec(model=MODEL, enable_lora=True, extra_args=("--max-loras", "2", "--max-lora-rank=64"))
    assert lora_args(given) == ["--enable-lora"]
    assert lora_args(ReplicaSpec(model=MODEL)) == []
    dp = ReplicaSpec(model=MODEL, dp_size=2, enable_lora=True)
    assert lora_args(dp)[-2:] == ["--api-server-count", "1"]  # vLLM refuses runtime updates with more
    plans = plan([ReplicaSpec(model=MODEL, enable_lora=True, dp_size=4, dp_size_local=2, dp_address="10.0.0.1",
                              dp_rpc_port=13345, dp_start_rank=k * 2, headless=k > 0) for k in range(2)])
    assert "--enable-lora" in plans[0].argv and "--enable-lora" not in plans[1].argv


def test_lora_specs_fail_before_launch_naming_the_field(tmp_path, adapter):
    def err(**kw):
        with pytest.raises(SpecError) as e:
            plan([ReplicaSpec(model=MODEL, **kw)])
        return str(e.value)

    assert "replicas[0].lora_modules['sql']" in err(lora_modules={"sql": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    assert "adapter_config.json" in err(lora_modules={"sql": str(tmp_path / "empty")})
    assert "replicas[0].max_lora_rank" in err(lora_modules={"sql": adapter}, max_lora_rank=12)
    assert "has rank 8" in err(lora_modules={"sql": adapter}, max_lora_rank=1)
    assert "replicas[0].max_loras" in err(lora_modules={"a": adapter, "b": adapter}, max_loras=1)
    assert "one word" in err(lora_modules={"a b": adapter})
    assert "base model" in err(lora_modules={MODEL: adapter})
    with pytest.raises(SpecError, match="engine='sim'"):
        plan([ReplicaSpec(model="tiny", engine="sim", lora_modules={"sql": adapter})])
    # a GPU layout planned on a machine without the adapters' files
    plans = plan([ReplicaSpec(model=MODEL, lora_modules={"sql": "/on/the/gpu/box"})], check_models=False)
    assert "sql=/on/the/gpu/box" in plans[0].argv
    check_adapter("lora_modules", "ok", "org/adapter")


def test_cluster_and_serve_take_lora_modules(adapter, tmp_path):
    from nbkit import Cluster
    cpu = Inventory(cores=(0, 1), memory_gib=64)
    tiny = str(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    c = Cluster([ReplicaSpec(model=tiny), ReplicaSpec(model=tiny)], lora_modules={"sql": adapter},
                inventory=cpu, kv_events=False, run_dir=tmp_path / "run")
    assert all(f"sql={adapter}" in p.argv for p in c.plans)
    assert c.lora.table() == {"replica0": ["sql"], "replica1": ["sql"]} and c.lora.base_names == {tiny}
    assert Cluster.replicas(tiny, n=2, inventory=cpu, kv_events=False, run_dir=tmp_path / "r2").lora is None
    args, vllm = parse_args(["serve", tiny, "-n", "2", "--lora-modules", f"sql={adapter}", f"two={adapter}",
                             "--max-loras", "3", "--max-num-seqs", "8"])
    setup = serve_setup(args, vllm, inventory=cpu)
    assert setup.spec_kwargs["lora_modules"] == {"sql": adapter, "two": adapter} and vllm == ["--max-num-seqs", "8"]
    argv = setup.plans(port_free=lambda h, p: True)[0].argv
    assert argv[argv.index("--max-loras") + 1] == "3"
    with pytest.raises(ValueError, match="name=path"):
        parse_lora_modules(["sql"])
    assert served_names(ReplicaSpec(model=MODEL, extra_args=("--served-model-name", "a", "b", "--x"))) == ["a", "b"]


def test_the_runtime_requests_are_planned_purely():
    assert load_request("chat", "/a/chat") == ("POST", "/v1/load_lora_adapter",
                                               {"lora_name": "chat", "lora_path": "/a/chat"})
    assert unload_request("chat") == ("POST", "/v1/unload_lora_adapter", {"lora_name": "chat"})
    models = {"data": [{"id": "/m", "parent": None}, {"id": "sql", "root": "/a/sql", "parent": "/m"}]}
    assert adapters_listed(models) == {"sql": "/a/sql"} and adapters_listed(None) == {}


# ------------------------------------------------------------------------------ the policy
def ranks(*held, load=(0, 0, 0)):
    return [RankLoad(f"r{i}", i, pending_decode_tokens=load[i], stale=False, loras=frozenset(h))
            for i, h in enumerate(held)]


@pytest.mark.parametrize("name", sorted(set(available_policies()) - {"custom"}))
def test_every_policy_prefers_the_ranks_holding_the_adapter(name):
    p = get_policy(name, seed=0)
    for _ in range(10):
        c = p.select(ranks({"sql"}, set(), {"sql"}, load=(300, 0, 200)), RequestInfo(lora="sql", session="s"))
        assert c.key in ("r0", "r2") and "lora sql: held by" in c.reason


def test_busy_holders_or_none_send_the_request_elsewhere_to_load_it():
    p = get_policy("least_load:lora_margin=500")
    c = p.select(ranks({"sql"}, set(), load=(900, 100)), RequestInfo(lora="sql"))
    assert c.key == "r1" and "lora sql: load on r1 (holders busier: load 900 > 100 + margin 500)" in c.reason
    c = p.select(ranks({"sql"}, set(), load=(500, 100)), RequestInfo(lora="sql"))
    assert c.key == "r0" and c.reason.endswith("lora sql: held by r0")  # within the margin: stay
    c = p.select(ranks(set(), {"chat"}, load=(50, 0)), RequestInfo(lora="sql"))
    assert c.key == "r1" and "load on r1 (no rank holds it)" in c.reason
    # off, unknown tables and base-model requests: the policy as before
    off = get_policy("least_load", lora_affinity=False)
    assert off.select(ranks({"sql"}, set(), load=(900, 100)), RequestInfo(lora="sql")).key == "r1"
    unknown = [RankLoad("r0", 0, pending_decode_tokens=900), RankLoad("r1", 1)]
    assert get_policy("least_load").select(unknown, RequestInfo(lora="sql")).reason == \
        "least_load: load 0 vs 900 (min of 2)"
    assert "lora" not in get_policy("least_load").select(ranks({"sql"}, set()), RequestInfo()).reason
    with pytest.raises(ValueError, match="lora_margin"):
        get_policy("power_of_two:lora_margin=-1")
    with pytest.raises(TypeError, match="every policy: lora_margin, lora_affinity"):
        get_policy("least_load", lora_margn=1)


# ------------------------------------------------------------------------------ the router's table
def stand_ins(n=2):
    return [Rank(replica=i, dp_rank=0, url=f"http://r{i}:8000", name=f"replica{i}") for i in range(n)]


class Replicas:
    """Stand-in replicas: what they were asked, and the adapters they registered."""

    def __init__(self, fail_load: bool = False):
        self.calls, self.fail_load = [], fail_load
        self.registered = {"r0": {"sql"}, "r1": set()}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        body = json.loads(request.content) if request.content else {}
        self.calls.append((host, path, body.get("lora_name") or body.get("model")))
        if path == "/v1/load_lora_adapter":
            if self.fail_load:
                return httpx.Response(500, json={"error": {"message": "no LoRA here"}})
            self.registered[host].add(body["lora_name"])
            return httpx.Response(200, text="Success")
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base", "parent": None}] + [
                {"id": a, "root": f"/a/{a}", "parent": "base"} for a in sorted(self.registered[host])]})
        if body.get("model") not in ({"base"} | self.registered[host]):
            return httpx.Response(404, json={"error": {"message": "no such model", "code": 404}})
        return httpx.Response(200, json={"model": body["model"], "choices": [{"text": "ok"}], "usage": {}})


def table(replicas, n=2, cap=2):
    rs = stand_ins(n)
    return Adapters(lambda: [(r, cap, {"sql": "/a/sql"} if r.replica == 0 else {}) for r in rs], ["base"],
                    transport=httpx.AsyncClient(transport=httpx.MockTransport(replicas)))


def endpoint(replicas, policy="least_load", **kw):
    ep = Endpoint(stand_ins(), port=8000, policy=policy, seed=0, loras=table(replicas, **kw))
    ep._fwd = Forwarder(ep.router, httpx.AsyncClient(transport=httpx.MockTransport(replicas)), retries=0)
    return ep


def post(ep, model, n=1):
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ep.app), base_url="http://ep") as c:
            return await asyncio.gather(*(c.post("/v1/completions", json={"model": model, "prompt": "hi",
                                                                            "max_tokens": 2}) for _ in range(n)))
    return asyncio.run(main())


def test_adapter_requests_go_to_the_holder_and_others_load_once_where_sent():
    replicas = Replicas()
    ep = endpoint(replicas)
    assert [r.status_code for r in post(ep, "sql", 3)] == [200] * 3
    assert {r.rank for r in ep.router.records} == {"replica0"}
    assert all("lora sql: held by replica0" in r.reason for r in ep.router.records)
    ep.router.loras.register("chat", "/a/chat")
    out = post(ep, "chat", 4)  # concurrent: one load, shared
    assert [r.status_code for r in out] == [200] * 4, [r.text for r in out]
    loads = [c for c in replicas.calls if c[1] == "/v1/load_lora_adapter"]
    assert len(loads) == 1 and ep.router.loras.loads == 1
    host = loads[0][0]
    assert ep.router.loras.holders("chat") == [f"replica{host[-1]}"]
    assert {r.rank for r in list(ep.router.records)[-4:]} == {f"replica{host[-1]}"}
    assert "load on" in list(ep.router.records)[-4].reason
    assert ep.router.loras.refresh() == ep.router.loras.table()  # GET /v1/models agrees


def test_an_unknown_adapter_is_openais_404_and_a_failed_load_503():
    ep = endpoint(Replicas())
    r = post(ep, "nope")[0]
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "NotFoundError" and err["param"] == "model" and "`nope` does not exist" in err["message"]
    assert post(ep, "base")[0].status_code == 200  # the base model: no adapter
    failing = endpoint(Replicas(fail_load=True))
    failing.router.loras.register("chat", "/a/chat")
    r = post(failing, "chat")[0]
    assert r.status_code == 503 and "loading it on" in r.json()["error"]["message"]
    assert failing.router.loras.holders("chat") == [] and failing.router.records[-1].outcome == "error"
    assert failing.router.in_flight == 0  # the lease was released


def test_the_table_is_an_lru_of_max_loras_per_rank():
    t = table(Replicas(), cap=2)
    router = Router(stand_ins(), "least_load", loras=t)
    with pytest.raises(UnknownAdapter):
        router.describe({"model": "x", "prompt": "hi"})
    assert router.describe({"model": "sql", "prompt": "hi"}).lora == "sql"
    assert router.describe({"model": "base", "prompt": "hi"}).lora is None
    for name in ("a", "b"):
        t.register(name, f"/a/{name}")

    async def go(name, rank):
        lease = await router.acquire(router.describe({"model": name, "prompt": "hi"}), rank=rank)
        lease.release("ok")
    for name in ("a", "b", "a"):
        asyncio.run(go(name, 0))
    assert t.table()["replica0"] == ["b", "a"]  # sql, then b, dropped out: 2 resident
    assert issubclass(AdapterLoadError, Exception) and "replica0" in repr(t)


# ------------------------------------------------------------------------------ the simulator
def config(lora_load_s=0.5, **inst0):
    inst = {"model_name": "tiny", "hardware": "cpu", "npu_mem": {"mem_size": 16, "mem_bw": 100},
            "lora_load_s": lora_load_s}
    return {"num_nodes": 1, "link_bw": 10, "nodes": [{"num_instances": 2, "instances": [
        {**inst, **inst0}, {**inst, "max_loras": 1}]}]}


def test_the_simulator_pays_the_load_time_for_an_adapter_not_resident():
    trace = [TraceRequest(32, 4, int(t * 1e9), lora=lora) for t, lora in
             [(0, "sql"), (5, "sql"), (10, "chat"), (15, "chat"), (20, None)]]
    sim = Simulator(config(lora_modules=["sql"]), policy="least_load:lora_margin=100000")
    res = sim.run(trace)
    ttft = [r.ttft_s for r in res.records]
    ranks = [r.rank for r in res.records]
    assert ranks[:2] == ["inst0", "inst0"]  # held: no load
    assert sim.adapters.loads == 1 and ttft[0] == pytest.approx(ttft[1], abs=1e-6)
    assert ttft[2] == pytest.approx(ttft[3] + 0.5, abs=0.01)  # the first "chat" waited for its load
    assert ranks[3] == ranks[2]
    without = Simulator(config(lora_load_s=0.0, lora_modules=["sql"]), policy="least_load").run(trace)
    assert without.records[2].ttft_s == pytest.approx(ttft[3], abs=0.01)


def test_sim_adapters_evict_the_least_recently_used_and_serialise_loads():
    class S:
        max_loras, lora_modules, lora_load_s = 2, ("a",), 1.0
    a = SimAdapters([S()])
    assert a.ready(0, "b", 0.0) == 1.0 and a.ready(0, "c", 0.5) == 2.0  # one after the other
    assert list(a.held[0]) == ["b", "c"] and a.loads == 2
    views = [RankLoad("inst0", 0)]
    a.annotate(views)
    assert views[0].loras == {"b", "c"}
    assert SimAdapters.of([type("N", (), {"max_loras": 0})()]) is None


def test_the_simulated_prefix_cache_keys_blocks_by_adapter():
    """The same prompt under another adapter is other KV (vLLM hashes the adapter into its blocks):
    no prefix hit across adapters, hits under the same one; the engine's KV events name the
    adapter, so kv_aware's index (fed by them) sends a repeat to the rank that cached it under it."""
    ids = tuple(range(7, 7 + 512))
    trace = [TraceRequest(512, 2, int(t * 1e9), input_tok_ids=ids, lora=lora) for t, lora in
             [(0, "sql"), (5, "chat"), (10, "sql"), (15, "chat"), (20, None), (25, None)]]
    cfg = config(lora_load_s=0.0, lora_modules=["sql", "chat"], max_loras=4)
    cfg["nodes"][0]["num_instances"] = 1
    cfg["nodes"][0]["instances"] = cfg["nodes"][0]["instances"][:1]
    res = Simulator(cfg, policy="least_load").run(trace)
    cached = [r.cached_tokens for r in res.records]
    assert cached[0] == cached[1] == cached[4] == 0  # first under each adapter, and the base model
    assert cached[2] > 256 and cached[3] > 256 and cached[5] > 256
    two = config(lora_load_s=0.0, lora_modules=["sql", "chat"], max_loras=4)
    two["nodes"][0]["instances"][1].update(lora_modules=["sql", "chat"], max_loras=4)
    pinned = [TraceRequest(512, 2, int(t * 1e9), input_tok_ids=ids, lora=lora) for t, lora in
              [(0, "sql"), (5, "chat"), (10, "sql"), (15, "chat")]]
    sim = Simulator(two, policy="kv_aware")
    out = sim.run(pinned)
    ranks = [r.rank for r in out.records]
    assert ranks[2] == ranks[0] and ranks[3] == ranks[1], ranks  # each repeat where its adapter's KV is
    assert all(r.cached_tokens > 256 for r in out.records[2:]), [r.cached_tokens for r in out.records]


def test_trace_requests_carry_their_adapter(tmp_path):
    item = parse_line({"input_toks": 3, "output_toks": 2, "arrival_time_ns": 0, "lora": "sql"})
    assert item.lora == "sql"
    write_trace(tmp_path / "t.jsonl", [item])
    assert read_trace(tmp_path / "t.jsonl")[0].lora == "sql"
    with pytest.raises(ValueError, match="lora"):
        parse_line({"input_toks": 3, "output_toks": 2, "arrival_time_ns": 0, "lora": 7})


def test_doctests():
    import doctest

    import nbkit.policies.lora
    import nbkit.routing.lora
    import nbkit.sim.lora
    for mod in (nbkit.policies.lora, nbkit.routing.lora, nbkit.sim.lora):
        assert doctest.testmod(mod).failed == 0, mod.__name__


def test_the_command_line_writes_a_tiny_adapter(tiny_model_path, tmp_path, capsys):
    from nbkit.cli import main
    assert main(["tiny-model", tiny_model_path, "--lora", str(tmp_path / "a")]) == 0
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["base_model_name_or_path"] == tiny_model_path
    assert capsys.readouterr().out.split() == [tiny_model_path, str(tmp_path / "a")]
