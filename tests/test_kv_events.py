"""KV-cache events without an engine: the exact index (store, reuse, evict, clear, LoRA, gaps),
the subscriber against vLLM's own ZmqEventPublisher (live events and the replay of a late
joiner), the ``kv_aware`` policy's decisions and fallbacks, and the Cluster's launch flags."""

from __future__ import annotations

import json
import time

import pytest

from conftest import free_ports, wait_for
from nbkit.policies import RankLoad, RequestInfo, get_policy
from nbkit.policies.kv_index import KVIndex, block_keys, event_fields

BS = 16


def stored(hashes, tokens, parent=None, lora=None, size=BS):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": size, "lora_id": None, "medium": "GPU", "lora_name": lora}


def removed(hashes):
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


PROMPT = list(range(100, 100 + 5 * BS + 3))  # five full blocks and a partial one


# ------------------------------------------------------------------------------------- index
def test_index_follows_store_reuse_evict_and_clear():
    ix = KVIndex()
    ix.apply_batch("r0", 0, [stored([1, 2], PROMPT[:2 * BS])])
    assert ix.match("r0", PROMPT) == 2 * BS
    ix.apply_batch("r0", 1, [stored([3, 4, 5], PROMPT[2 * BS:5 * BS], parent=2)])  # chunked: the rest later
    assert ix.match("r0", PROMPT) == 5 * BS
    assert ix.match("r0", PROMPT[:3 * BS + 5]) == 3 * BS  # only whole blocks of the prompt count
    other = PROMPT[:BS] + [7] * (4 * BS)
    assert ix.match("r0", other) == BS  # diverges after the first block
    ix.apply_batch("r0", 2, [removed([3])])  # evicted in the middle: the match stops there
    assert ix.match("r0", PROMPT) == 2 * BS
    assert ix.match("r1", PROMPT) == 0
    ix.apply_batch("r0", 3, [{"type": "AllBlocksCleared"}])
    assert ix.match("r0", PROMPT) == 0 and ix.blocks("r0") == 0
    snap = ix.snapshot()["r0"]
    assert snap["warm"] and snap["events"] == 4 and snap["gaps"] == 0 and snap["block_size"] == BS


def test_lora_blocks_are_not_the_base_models():
    ix = KVIndex()
    ix.apply_batch("r0", 0, [stored([1, 2], PROMPT[:2 * BS], lora="sql")])
    assert ix.match("r0", PROMPT) == 0
    assert ix.match("r0", PROMPT, lora="sql") == 2 * BS
    assert ix.match("r0", PROMPT, lora="other") == 0


def test_gaps_late_joins_orphans_and_restarts_make_the_rank_cold_or_reset():
    ix = KVIndex()
    assert ix.rank("r0").cold == "no events yet"
    ix.apply_batch("r0", 0, [stored([1], PROMPT[:BS])])
    assert ix.rank("r0").warm
    assert ix.apply_batch("r0", 3, [stored([2], PROMPT[BS:2 * BS], parent=1)]) == 2
    assert ix.rank("r0").gaps == 2 and "missed" in ix.rank("r0").cold
    ix.apply_batch("r1", 7, [stored([9], PROMPT[BS:2 * BS], parent=8)])  # joined late; parent unknown
    assert "joined at sequence 7" in ix.rank("r1").cold and ix.rank("r1").orphans == 1
    ix.apply_batch("r0", 0, [])  # sequence 0 again: a new engine, an empty cache
    assert ix.rank("r0").warm and ix.blocks("r0") == 0
    ix.apply_batch("r0", 1, [stored([5], PROMPT[:BS])])
    ix.apply_batch("r0", 1, [stored([6], PROMPT[:BS])], replay=True)  # a replay overlapping live: ignored
    assert ix.rank("r0").batches == 4 and ix.rank("r0").stored == 3


def test_positional_events_of_older_versions_are_read():
    kind, f = event_fields(["BlockStored", [1, 2], None, PROMPT[:2 * BS], BS, None, "GPU"])
    assert kind == "BlockStored" and f["block_hashes"] == [1, 2] and f["block_size"] == BS
    ix = KVIndex()
    ix.apply_batch("r0", 0, [["BlockStored", [1, 2], None, PROMPT[:2 * BS], BS, None, "GPU"], ["BlockRemoved", [2], "GPU"]])
    assert ix.match("r0", PROMPT) == BS
    with pytest.raises(ValueError, match="unknown shape"):
        event_fields(42)


def test_memory_is_bounded_and_overflow_says_so():
    ix = KVIndex(max_blocks_per_rank=3)
    ix.apply_batch("r0", 0, [stored([1, 2, 3, 4, 5], PROMPT[:5 * BS])])
    assert ix.blocks("r0") == 3 and "max_blocks_per_rank=3" in ix.rank("r0").cold


def test_block_keys_chain_over_whole_blocks():
    a = block_keys(PROMPT, BS)
    assert len(a) == 5 and len(set(a)) == 5
    assert block_keys(PROMPT[:2 * BS], BS) == a[:2]
    assert block_keys(PROMPT[BS:2 * BS], BS, parent=a[0]) == [a[1]]


# ------------------------------------------------------------------------------------ policy
def loads(n=2, **kw):
    return [RankLoad(f"r{i}", i, **kw) for i in range(n)]


def kv_policy(ix, spec="kv_aware"):
    p = get_policy(spec, seed=0)
    p.kv_index = ix
    return p


def warm(ix, *keys):
    for k in keys:
        ix.mark_empty(k)


def test_kv_aware_goes_where_the_prefix_is_cached_and_says_how_much():
    ix = KVIndex()
    warm(ix, "r0", "r1")
    ix.apply_batch("r1", 0, [stored([1, 2, 3], PROMPT[:3 * BS])])
    p = kv_policy(ix)
    c = p.select(loads(), RequestInfo(prompt_tokens=len(PROMPT), max_tokens=8, token_ids=PROMPT))
    assert c.key == "r1" and c.cached_tokens == 3 * BS and not c.fallback
    assert c.reason.startswith(f"kv_aware: r1 {3 * BS}/{len(PROMPT)} cached") and f"r0 0/{len(PROMPT)} cached" in c.reason


def test_each_prompt_is_matched_by_its_own_tokens_even_when_the_last_ones_memory_is_reused():
    """Prompts routed one after another, each list freed before the next is made (so CPython
    hands the next list the same address): every choice follows the prefix of its own prompt."""
    ix = KVIndex()
    warm(ix, "r0", "r1")
    other = [t + 1000 for t in PROMPT]
    ix.apply_batch("r0", 0, [stored([1, 2, 3], PROMPT[:3 * BS])])
    ix.apply_batch("r1", 0, [stored([7, 8, 9], other[:3 * BS])])
    p, wrong = kv_policy(ix), []
    for i in range(200):
        want, ids = ("r0", list(PROMPT)) if i % 2 else ("r1", list(other))
        c = p.select(loads(), RequestInfo(prompt_tokens=len(ids), max_tokens=8, token_ids=ids))
        if (c.key, c.cached_tokens) != (want, 3 * BS):
            wrong.append((i, c.reason))
        del ids, c
    assert wrong == [], f"{len(wrong)} of 200 prompts matched another prompt's blocks: {wrong[:2]}"


def test_kv_aware_spreads_a_burst_once_the_cached_rank_is_busier_than_a_second_copy():
    ix = KVIndex()
    warm(ix, "r0", "r1")
    ix.apply_batch("r1", 0, [stored([1, 2, 3, 4, 5], PROMPT[:5 * BS])])
    p = kv_policy(ix)
    info = RequestInfo(prompt_tokens=len(PROMPT), max_tokens=8, token_ids=PROMPT)
    busy = [RankLoad("r0", 0), RankLoad("r1", 1, pending_prefill_tokens=10, pending_decode_tokens=500)]
    assert p.select(busy, info).key == "r0"  # 83 tokens of prefill on r0 beat 500 queued on r1
    light = [RankLoad("r0", 0), RankLoad("r1", 1, pending_decode_tokens=20)]
    assert p.select(light, info).key == "r1"


def test_in_flight_requests_blocks_count_as_cached_until_they_finish():
    ix = KVIndex()
    warm(ix, "r0", "r1")
    p = kv_policy(ix)
    first = RequestInfo(prompt_tokens=len(PROMPT), max_tokens=8, token_ids=PROMPT)
    c1 = p.select(loads(), first)
    p.on_dispatch(c1, first)
    second = RequestInfo(prompt_tokens=len(PROMPT), max_tokens=8, token_ids=list(PROMPT))
    c2 = p.select(loads(), second)
    assert c2.key == c1.key and c2.cached_tokens == 5 * BS  # its blocks are on the way there
    p.on_release(c1, first)
    assert p.select(loads(), second).cached_tokens == 0


@pytest.mark.parametrize("setup, needle", [
    ("no index", "no KV-event index"),
    ("no tokens", "no token ids"),
    ("cold", "r1 no events yet"),
])
def test_kv_aware_falls_back_to_prefix_affinity_and_says_why(setup, needle):
    ix = KVIndex()
    ix.mark_empty("r0")
    p = kv_policy(None if setup == "no index" else ix)
    info = RequestInfo(prompt_tokens=40, max_tokens=8, prefix="hello " * 40,
                       token_ids=None if setup == "no tokens" else PROMPT)
    c = p.select(loads(), info)
    assert needle in c.fallback
    assert c.reason.startswith(f"kv_aware -> prefix_affinity ({c.fallback}): prefix_affinity")


def test_kv_aware_takes_options_in_its_name():
    p = get_policy("kv_aware:prefill_weight=2,pending_blocks=0")
    assert (p.prefill_weight, p.pending_blocks) == (2, 0)
    with pytest.raises(ValueError, match="prefil_weight"):
        get_policy("kv_aware:prefil_weight=2")


# -------------------------------------------------------------------------------- subscriber
@pytest.fixture
def vllm_publisher():
    """vLLM's own publisher (no engine): the real wire format, sequence numbers and replay."""
    kv = pytest.importorskip("vllm.distributed.kv_events")
    made = []

    def make(port, replay_port, topic="replica0"):
        pub = kv.ZmqEventPublisher(0, endpoint=f"tcp://127.0.0.1:{port}",
                                   replay_endpoint=f"tcp://127.0.0.1:{replay_port}", topic=topic)
        made.append(pub)

        def publish(*events):
            pub.publish(kv.KVEventBatch(ts=time.time(), events=list(events)))
        return publish

    yield make, kv
    for pub in made:
        pub.shutdown()


def test_a_late_subscriber_replays_the_history_then_follows_live_events(vllm_publisher):
    from nbkit.routing.kv_events import KVEventSubscriber
    make, kv = vllm_publisher
    port, replay = free_ports(2, 25557)
    publish = make(port, replay)
    publish(kv.BlockStored(block_hashes=[11, 12], parent_block_hash=None, token_ids=PROMPT[:2 * BS],
                           block_size=BS, lora_id=None, medium="GPU", lora_name=None))
    time.sleep(0.3)  # sent while nobody listens: lost live, kept in the replay buffer
    ix = KVIndex()
    sub = KVEventSubscriber(ix, port=port)
    sub.add_source("replica0", replay_port=replay)
    sub.start()
    try:
        wait_for(lambda: ix.match("replica0", PROMPT) == 2 * BS, what="the replayed blocks")
        assert ix.rank("replica0").warm
        time.sleep(0.5)  # the PUB socket reconnects to the new SUB
        publish(kv.BlockStored(block_hashes=[13], parent_block_hash=12, token_ids=PROMPT[2 * BS:3 * BS],
                               block_size=BS, lora_id=None, medium="GPU", lora_name=None))
        publish(kv.BlockRemoved(block_hashes=[11], medium="GPU"))
        wait_for(lambda: ix.rank("replica0").last_seq == 2, what="the live batches")
        assert ix.match("replica0", PROMPT) == 0 and ix.blocks("replica0") == 2
        snap = sub.snapshot()
        assert snap["counters"]["gaps"] == 0 and snap["counters"]["replays"] == 1
        assert snap["ranks"]["replica0"]["events"] == 3
    finally:
        sub.close()


def test_an_engine_that_published_nothing_is_known_empty(vllm_publisher):
    from nbkit.routing.kv_events import KVEventSubscriber
    make, _ = vllm_publisher
    port, replay = free_ports(2, 25600)
    make(port, replay, topic="replica1")
    ix = KVIndex()
    sub = KVEventSubscriber(ix, port=port).start()
    try:
        sub.add_source("replica1", replay_port=replay)
        wait_for(lambda: ix.rank("replica1").warm, what="the empty replay")
        sub.add_source("replica2")  # no replay endpoint: cold, and says why
        assert "no replay endpoint" in ix.rank("replica2").cold
    finally:
        sub.close()


def test_the_sub_socket_binds_loopback_only():
    from nbkit.routing.kv_events import KVEventSubscriber
    with pytest.raises(ValueError, match="loopback"):
        KVEventSubscriber(KVIndex(), port=5557, host="0.0.0.0")


# ------------------------------------------------------------------------------ launch flags
def test_replicas_publish_to_the_routers_port_with_a_topic_and_replay_port_each(tiny_model_path):
    from nbkit.cluster.placement import plan_replicas
    from nbkit.cluster.spec import GPU, Inventory, ReplicaSpec
    inv = Inventory(cores=(0, 1, 2, 3), gpus=tuple(GPU(i, "H100", 80.0) for i in range(4)))
    specs = [ReplicaSpec(model=tiny_model_path, device="gpu"), ReplicaSpec(model=tiny_model_path, device="gpu", dp_size=2),
             ReplicaSpec(model=tiny_model_path, device="gpu", kv_events=False)]
    plans = plan_replicas(specs, inv, port_start=8100, port_free=lambda h, p: True, kv_events_port=5557)
    cfgs = []
    for p in plans[:2]:
        cfg = json.loads(p.argv[p.argv.index("--kv-events-config") + 1])
        cfgs.append(cfg)
        assert cfg["endpoint"] == "tcp://127.0.0.1:5557" and cfg["topic"] == p.name == p.kv_topic
        assert cfg["replay_endpoint"] == f"tcp://127.0.0.1:{p.kv_replay_port}"
        assert "*" not in json.dumps(cfg)
    assert plans[1].kv_replay_port - plans[0].kv_replay_port >= 1
    assert "--kv-events-config" not in plans[2].argv and plans[2].kv_topic is None
    http = {p.port for p in plans}
    replay = {plans[0].kv_replay_port, plans[1].kv_replay_port, plans[1].kv_replay_port + 1}
    assert len(replay) == 3 and not replay & (http | {5557, 5558})
    none = plan_replicas(specs[:1], inv, port_start=8100, port_free=lambda h, p: True)
    assert "--kv-events-config" not in none[0].argv


def test_a_cluster_routes_by_kv_aware_unless_it_has_no_kv_events_to_route_on(tiny_model_path, tmp_path, caplog):
    """What ``cluster.client()``, ``cluster.endpoint()`` and ``nbkit serve`` route by when no policy is
    named: kv_aware where the cluster follows its replicas' KV-cache events, least_load where it
    cannot (events off, a prefill/decode split, simulated replicas of a model it cannot tokenize)."""
    import logging

    from nbkit.cluster.cluster import Cluster
    from nbkit.cluster.pd import pd_specs
    from nbkit.cluster.spec import Inventory, ReplicaSpec
    inv = Inventory(cores=(0, 1, 2, 3))

    def cluster(specs, **kw):
        return Cluster(specs, inventory=inv, run_dir=tmp_path, port_start=free_ports(1, 18200)[0], **kw)

    two = [ReplicaSpec(model=tiny_model_path, cores=(0,)), ReplicaSpec(model=tiny_model_path, cores=(1,))]
    c = cluster(two)
    assert c.default_policy() == "kv_aware"
    with caplog.at_level(logging.INFO, logger="nbkit.cluster.cluster"):
        client = c.client()
    try:
        assert client.router.policy.name == "kv_aware" and client.router.kv_index is c.kv_index
        assert "routing by kv_aware (the replicas' KV-cache events)" in caplog.text
    finally:
        client.close()
    named = c.client("round_robin")           # a policy named is the policy used
    assert named.router.policy.name == "round_robin"
    named.close()
    assert cluster(two, kv_events=False).default_policy() == "least_load"
    pd = pd_specs(tiny_model_path, prefill=1, decode=1, connector="example", shared_dir=str(tmp_path), device="cpu")
    assert cluster(pd).default_policy() == "least_load"
    sim = [ReplicaSpec(model="meta-llama/Llama-3.1-8B", engine="sim"), ReplicaSpec(model="meta-llama/Llama-3.1-8B",
                                                                                     engine="sim")]
    assert cluster(sim).default_policy() == "least_load"
    sim_tiny = [ReplicaSpec(model=tiny_model_path, engine="sim")] * 2
    assert cluster(sim_tiny).default_policy() == "kv_aware"


# ------------------------------------------------------------------------------- simulator
def test_kv_aware_runs_in_the_simulator_on_the_engines_own_events():
    """The simulated engines publish BlockStored/BlockRemoved from their prefix caches into one
    index; kv_aware decides on it exactly (no fallback) and keeps each prefix where it is cached."""
    import random

    from nbkit.sim import Simulator
    from nbkit.traces import TraceRequest
    from test_sim_engine import cfg_of, inst

    rng = random.Random(0)
    prefixes = [tuple(rng.randrange(50_000) for _ in range(640)) for _ in range(6)]
    tr = []
    for k in range(240):
        g = rng.randrange(len(prefixes))
        q = tuple(rng.randrange(50_000) for _ in range(24))
        tr.append(TraceRequest(664, 8, k * 15_000_000, prefixes[g] + q))
    # each instance holds about 4 of the 6 prefixes: together they hold all, one alone cannot
    sims = {name: Simulator(cfg_of([inst(kv_cache_gb=0.35), inst(kv_cache_gb=0.35)]), policy=name)
            for name in ("kv_aware", "least_load", "prefix_affinity")}
    res = {name: sim.run(tr) for name, sim in sims.items()}
    kv = sims["kv_aware"].policy
    index = kv.kv_index
    assert index is not None and all(index.rank(k).warm for k in ("inst0", "inst1"))
    assert sum(index.rank(k).stored for k in ("inst0", "inst1")) > 0
    assert all(len(p) == 0 for p in kv.pending.values())  # every finished request was released
    hits = {name: sum(i["prefix_hits"] for i in r.instances) for name, r in res.items()}
    assert hits["kv_aware"] > hits["least_load"]
    # the index agrees with the engines' own prefix caches at the end
    for e in sims["kv_aware"].engines:
        assert index.blocks(e.key) == len(e.cached)


def test_a_cluster_whose_kv_port_was_taken_listens_on_the_next_free_block(tiny_model_path):
    import zmq

    from nbkit.cluster.kv import ClusterKV
    ctx = zmq.Context()
    squatter = ctx.socket(zmq.PULL)
    kv = ClusterKV(tiny_model_path, dp_ports=2)
    squatter.bind(f"tcp://127.0.0.1:{kv.port + 1}")  # another process took one of the chosen ports
    try:
        chosen = kv.port
        assert kv.listen() >= chosen + 2
        assert kv.subscriber.endpoints == [f"tcp://127.0.0.1:{kv.port}", f"tcp://127.0.0.1:{kv.port + 1}"]
    finally:
        kv.close()
        squatter.close(linger=0)
        ctx.term()


def test_scaling_keeps_running_replicas_kv_ports_so_they_are_kept_not_restarted(tiny_model_path, tmp_path):
    from types import SimpleNamespace

    from nbkit.cluster.cluster import Cluster
    from nbkit.cluster.spec import Inventory, ReplicaSpec
    c = Cluster([ReplicaSpec(model=tiny_model_path, cores=(0,)), ReplicaSpec(model=tiny_model_path, cores=(1,))],
                inventory=Inventory(cores=(0, 1, 2, 3)), run_dir=tmp_path, port_start=free_ports(1, 18100)[0])
    before = {p.index: p.kv_replay_port for p in c.plans}
    c._procs = [SimpleNamespace(alive=True), SimpleNamespace(alive=True)]  # as if both run
    specs, plans, actions = c._scale_target(3)
    assert [a for a, _, _ in actions] == ["keep", "keep", "start"]
    assert {i: plans[i].kv_replay_port for i in (0, 1)} == before
    ports = [p.port for p in plans] + [p.kv_replay_port for p in plans]
    assert len(set(ports)) == 6, ports


def test_router_tokenizer_fast_path_gives_the_transformers_ids(tiny_model_path):
    """The Rust ``tokenizers`` path the router uses gives exactly the ids of the ``transformers``
    call that vLLM makes, with and without special tokens, for text the byte-level BPE splits in
    odd places (unicode, runs of spaces, digits, text that looks like special tokens)."""
    from nbkit.routing.tokenize import PromptTokenizer

    tok = PromptTokenizer(tiny_model_path)
    hf = tok.tokenizer
    texts = ["Hello", " leading space", "tabs\tand\nnewlines\n\n", "unicode: héllo wörld 你好 🙂",
             "digits 1234567890 3.14159", "   many    spaces   ", "<s> </s> <|eot_id|> [INST]", "x" * 3000,
             "".join(chr(c) for c in range(32, 600))]
    for text in texts:
        for special in (True, False):
            want = list(hf(text, add_special_tokens=special)["input_ids"])
            assert tok.completion(text, special) == want, (text[:40], special)
    messages = [{"role": "system", "content": "Be brief. " * 50}, {"role": "user", "content": "héllo  there"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.chat(messages) == list(hf(text, add_special_tokens=False)["input_ids"])
