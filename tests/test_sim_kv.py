"""KV-cache events from simulated replicas: ``engine="sim"`` servers take vLLM's
``--kv-events-config`` and publish their prefix caches' BlockStored / BlockRemoved with vLLM's
wire format (byte for byte), on the token ids the router's own tokenizer makes, so ``kv_aware``
runs on a simulated cluster exactly as on a real one: events arrive per rank, a repeated prefix
goes where it is cached (no fallback), and a subscriber that starts late replays the history.
No vLLM is started (these are not ``vllm`` tests)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from conftest import free_port, free_ports, wait_for
from nbkit import Cluster
from nbkit.policies.kv_index import KVIndex
from nbkit.routing.kv_events import KVEventSubscriber
from nbkit.sim.kv_publish import encode_events, parse_kv_events_config

N = 2
BS = 128  # the cpu profile's block size (vLLM-CPU's)


def doc(seed: int, words: int = 400) -> str:
    import random
    rng = random.Random(seed)
    vocab = ["the replica", "a router", "serves", "many tokens", "quickly", "the cache", "caches", "prefills",
             "the batch", "again", "on time", "for everyone", "the scheduler", "streams", "one by one"]
    return " ".join(rng.choice(vocab) for _ in range(words)) + "."


@pytest.fixture(scope="module")
def cluster(tiny_model_path, tmp_path_factory):
    c = Cluster.replicas(tiny_model_path, n=N, engine="sim", port_start=free_port(8820),
                         run_dir=tmp_path_factory.mktemp("simkv"), extra_args=["--speed", "20"])
    c.start(timeout=120)
    try:
        ix = c.kv_index
        wait_for(lambda: all(ix.rank(r.name).warm for r in c.ranks), what="every rank's index warm (replayed)")
        yield c
    finally:
        c.stop()


def kv_client(cluster):
    return cluster.client("kv_aware")


# --------------------------------------------------------------------------------- the flags
def test_sim_replicas_get_the_kv_events_flag_and_the_routers_tokenizer_matches_theirs(cluster):
    for p in cluster.plans:
        cfg = json.loads(p.argv[p.argv.index("--kv-events-config") + 1])
        assert cfg["topic"] == p.name and cfg["endpoint"] == f"tcp://127.0.0.1:{cluster.kv.port}"
        assert cfg["replay_endpoint"] == f"tcp://127.0.0.1:{p.kv_replay_port}"
    tok, url = cluster.tokenizer, cluster.ranks[0].url
    for prompt in ("Hello", doc(1, 40), "  spaces\tand\nnew lines, ünïcödé — dashes…"):
        want = httpx.post(f"{url}/tokenize", json={"prompt": prompt}, timeout=30).json()["tokens"]
        assert tok.token_ids({"prompt": prompt}) == want, prompt[:40]
    for messages in ([{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": doc(2, 30)},
                      {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And then?"}],
                     [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]}]):
        want = httpx.post(f"{url}/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
        assert tok.token_ids({"messages": messages}) == want, messages


# ----------------------------------------------------------------------- events and routing
def test_events_arrive_per_rank_and_kv_aware_routes_a_repeated_prefix_to_its_rank(cluster):
    ix, tok = cluster.kv_index, cluster.tokenizer
    names = [r.name for r in cluster.ranks]
    prefixes = {names[0]: doc(10), names[1]: doc(11)}
    client = kv_client(cluster)
    try:
        # seed: each prefix on its own rank (pinned), then wait until the events say it is cached
        for name, pre in prefixes.items():
            before = ix.rank(name).last_seq
            client.sync.complete(pre + " First question?", max_tokens=2, rank=name)
            ids = tok.completion(pre)
            need = len(ids) // BS * BS
            assert need >= 2 * BS
            wait_for(lambda name=name, ids=ids, need=need: ix.match(name, ids) >= need,
                     what=f"{name}'s BlockStored events (after sequence {before})")
        assert all(ix.blocks(n) > 0 for n in names), ix.snapshot()
        assert all(ix.rank(n).warm and ix.rank(n).gaps == 0 for n in names)

        async def ask(pre, q):
            return await client.complete(pre + q, max_tokens=2)

        async def main():
            out = []
            for k in range(3):  # one at a time: each decision sees the other rank idle
                for name, pre in prefixes.items():
                    out.append((name, await ask(pre, f" Question {k}?")))
            return out

        outs = asyncio.run(main())
        frame = client.records_frame()
        for want, o in outs:
            assert o["nbkit"]["rank"] == want, (o["nbkit"], list(frame["reason"]))
        routed = frame.tail(len(outs))  # the seeding calls before were pinned (reason: explicit rank=)
        for (want, _), reason in zip(outs, routed["reason"]):
            assert reason.startswith(f"kv_aware: {want} "), reason
            hit = int(reason.split(f"{want} ", 1)[1].split("/", 1)[0])
            assert hit >= 2 * BS, reason  # the matched tokens are named
            assert "->" not in reason and "prefix_affinity" not in reason
        assert client.router.fallbacks == 0
        # the engines' own prefix-cache counters agree that the prefix was reused where it was sent
        from nbkit.routing.metrics import parse_metrics
        for r in cluster.ranks:
            m = parse_metrics(httpx.get(r.url + "/metrics", timeout=10).text)["0"]
            assert m.prefix_cache_hits >= 3 * 2 * BS, (r.name, m.prefix_cache_hits)
    finally:
        client.close()


def test_a_chat_conversation_stays_where_its_history_is_cached(cluster):
    ix, tok = cluster.kv_index, cluster.tokenizer
    history = [{"role": "system", "content": doc(20, 200)}, {"role": "user", "content": "Summarize."}]
    client = kv_client(cluster)
    try:
        first = client.sync.chat(history, max_tokens=2)
        home = first["nbkit"]["rank"]
        ids = tok.chat(history)
        wait_for(lambda: ix.match(home, ids) >= len(ids) // BS * BS, what="the conversation's blocks")
        for k in range(2):
            out = client.sync.chat(history + [{"role": "assistant", "content": "Done."},
                                              {"role": "user", "content": f"Again, {k}?"}], max_tokens=2)
            assert out["nbkit"]["rank"] == home
        reasons = list(client.records_frame()["reason"])[-2:]
        assert all(r.startswith(f"kv_aware: {home} ") and "->" not in r for r in reasons), reasons
        assert client.router.fallbacks == 0
    finally:
        client.close()


def test_a_late_subscriber_replays_the_earlier_blocks(cluster):
    """A second router, started after the replicas cached prefixes, asks each engine's replay
    endpoint for its history and ends up with the same blocks as the cluster's own index."""
    ix, tok = cluster.kv_index, cluster.tokenizer
    name = cluster.ranks[0].name
    pre = doc(30)
    seed = cluster.client("round_robin")
    try:  # every rank caches something of its own (this test may be the first to use the cluster)
        for i, r in enumerate(cluster.ranks):
            seed.sync.complete(pre if r.name == name else doc(300 + i), max_tokens=2, rank=r.name)
    finally:
        seed.close()
    ids = tok.completion(pre)
    wait_for(lambda: ix.match(name, ids) >= len(ids) // BS * BS, what="the prefix in the cluster's index")
    wait_for(lambda: all(ix.blocks(r.name) > 0 for r in cluster.ranks), what="blocks on every rank")
    # the engine has published (sequence 0 is its first batch, enough when no earlier test used it)
    assert ix.rank(name).last_seq is not None and ix.rank(name).stored > 0
    late = KVIndex()
    sub = KVEventSubscriber(late, port=free_ports(1, 27557)[0])  # nobody publishes live to this one
    for p in cluster.plans:
        sub.add_source(p.kv_topic, replay_port=p.kv_replay_port, names={0: p.name})
    sub.start()
    try:
        wait_for(lambda: all(late.rank(p.name).last_seq == ix.rank(p.name).last_seq for p in cluster.plans),
                 what="the replays of every rank")
        for p in cluster.plans:
            assert late.rank(p.name).warm and late.blocks(p.name) == ix.blocks(p.name) > 0
        assert late.match(name, ids) == ix.match(name, ids) >= 2 * BS
        assert sub.snapshot()["counters"]["replays"] == N and sub.snapshot()["counters"]["gaps"] == 0
    finally:
        sub.close()


# -------------------------------------------------------------------------- in-process parts
def test_data_parallel_ranks_publish_on_their_own_ports_with_their_rank():
    from nbkit.sim.replica import SimReplica
    port, replay = free_ports(1, 27600)[0], free_ports(2, 27700)[0]
    while not all(q not in (port, port + 1) for q in (replay, replay + 1)):
        replay += 2
    cfg = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{port}",
                      "topic": "sim", "replay_endpoint": f"tcp://127.0.0.1:{replay}"})
    ix = KVIndex()
    sub = KVEventSubscriber(ix, port=port, dp_ports=2).start()
    sub.add_source("sim", dp_size=2, replay_port=replay)
    replica = SimReplica.from_args(["--model-spec", "tiny", "--hardware", "cpu", "--data-parallel-size", "2",
                                    "--block-size", "16", "--speed", "50", "--kv-events-config", cfg])
    ids = list(range(1000, 1000 + 5 * 16 + 3))

    async def main():
        await replica.start()
        try:
            wait = [replica.submit(ids, 2, engine=k) for k in range(2)]
            for s in wait:
                async for _ in replica.token_counts(s):
                    pass
            for name in ("sim/dp0", "sim/dp1"):
                await asyncio.to_thread(wait_for, lambda name=name: ix.match(name, ids) == 5 * 16, 30.0, name)
        finally:
            await replica.stop()

    try:
        asyncio.run(main())
        assert sub.snapshot()["counters"]["gaps"] == 0 and sub.snapshot()["counters"]["unknown_topic"] == 0
        assert all(ix.rank(n).warm for n in ("sim/dp0", "sim/dp1"))
    finally:
        sub.close()


def test_the_payload_is_vllms_byte_for_byte():
    import msgspec
    ids = list(range(32))
    events = [{"type": "BlockStored", "block_hashes": [-5, 7], "parent_block_hash": None, "token_ids": ids,
               "block_size": 16, "lora_name": None, "medium": "GPU"},
              {"type": "BlockRemoved", "block_hashes": [-5, 7], "medium": "GPU"}, {"type": "AllBlocksCleared"}]
    payload = encode_events(events, 0, ts=1.5)
    ts, evs, dp = msgspec.msgpack.decode(payload)
    assert (ts, dp) == (1.5, 0) and [e["type"] for e in evs] == ["BlockStored", "BlockRemoved", "BlockRemoved",
                                                                  "AllBlocksCleared"]
    assert evs[0]["block_hashes"] == [(1 << 64) - 5, 7] and evs[0]["token_ids"] == ids and evs[0]["group_idx"] == 0
    kv = pytest.importorskip("vllm.distributed.kv_events")  # already imported by test_kv_events' publisher tests
    stored = kv.BlockStored(block_hashes=[(1 << 64) - 5, 7], parent_block_hash=None, token_ids=ids, block_size=16,
                            lora_id=None, medium="GPU", lora_name=None, group_idx=0)
    stored.kv_cache_spec_kind = "full_attention"  # what vLLM's KV cache manager adds for a full-attention model
    theirs = kv.KVEventBatch(ts=1.5, events=[stored, kv.BlockRemoved(block_hashes=[(1 << 64) - 5], medium="GPU",
                                                                       group_idx=0),
                                             kv.BlockRemoved(block_hashes=[7], medium="GPU", group_idx=0),
                                             kv.AllBlocksCleared()], data_parallel_rank=0)
    assert msgspec.msgpack.encode(theirs) == payload


def test_the_config_is_vllms_and_binds_loopback_only():
    base = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://127.0.0.1:5557", "topic": "t"}
    assert parse_kv_events_config(json.dumps(base))["buffer_steps"] == 10_000
    assert parse_kv_events_config(json.dumps({**base, "enable_kv_cache_events": False})) is None
    assert parse_kv_events_config(json.dumps({**base, "publisher": "null"})) is None
    for bad, needle in (({**base, "publisher": "kafka"}, "unknown event publisher"),
                        ({**base, "replay_endpoint": "tcp://10.1.2.3:5600"}, "loopback only"),
                        ({**base, "endpoint": "udp://x:1"}, "tcp://"), ({**base, "topics": "x"}, "unknown field")):
        with pytest.raises(ValueError, match=needle):
            parse_kv_events_config(json.dumps(bad))
    with pytest.raises(ValueError, match="JSON"):
        parse_kv_events_config("{nope")

