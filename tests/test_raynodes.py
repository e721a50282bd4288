"""Ray multi-node placement (nbkit.ray): pure placement/pinning tests, and one real run that puts
two tiny vLLM replicas on the two nodes of a local Ray rehearsal cluster (127.0.0.1)."""

from __future__ import annotations

import os
import pickle
import signal
import time

import pytest

from conftest import alive, kill_tree
from nbkit.cluster.spec import GPU, Inventory, ReplicaSpec, SpecError
from nbkit.ray.placement import HEAD_RESOURCE, Placement, RayNode, alive_nodes, place, plan_on_node, ranks_of, share


def ray_node(node_id, address="127.0.0.1", head=False, **res):
    resources = {"CPU": 1.0, f"node:{address}": 1.0, **res}
    if head:
        resources[HEAD_RESOURCE] = 1.0
    return {"NodeID": node_id, "Alive": True, "NodeManagerAddress": address, "NodeManagerHostname": "h",
            "Resources": resources}


def free(host, port):
    return True


SPEC = ReplicaSpec(model="/models/tiny", device="cpu")


# -- which node ---------------------------------------------------------------------------------------
def test_alive_nodes_head_first_dead_dropped():
    infos = [ray_node("b", node1=1), ray_node("a", head=True, node0=1), {**ray_node("c"), "Alive": False}]
    nodes = alive_nodes(infos)
    assert [n.node_id for n in nodes] == ["a", "b"]
    assert nodes[0].is_head and not nodes[1].is_head
    assert nodes[1].labels == ["node1"] and nodes[0].cpus == 1.0 and nodes[0].gpus == 0.0


def test_place_one_per_node_ports_names_and_machine_slots():
    nodes = alive_nodes([ray_node("h", head=True), ray_node("w")])  # the rehearsal: one machine
    ps = place([SPEC, SPEC], nodes, port_start=8800)
    assert [(p.node.node_id, p.port, p.name, p.slot, p.slots) for p in ps] == [
        ("h", 8800, "node0", 0, 2), ("w", 8801, "node1", 1, 2)]
    apart = alive_nodes([ray_node("h", "10.0.0.1", head=True), ray_node("w", "10.0.0.2")])  # two machines
    assert [(p.slot, p.slots) for p in place([SPEC, SPEC], apart)] == [(0, 1), (0, 1)]


def test_place_picks_nodes_and_rejects_what_cannot_run():
    nodes = alive_nodes([ray_node("h", head=True), ray_node("w"), ray_node("x")])
    assert [p.node.node_id for p in place([SPEC], nodes, node_ids=["x"])] == ["x"]
    assert [p.node.node_id for p in place([SPEC, SPEC], nodes)] == ["h", "w"]   # the first nodes, head first
    with pytest.raises(SpecError, match="needs 4 nodes, 3 alive"):
        place([SPEC] * 4, nodes)
    with pytest.raises(SpecError, match="not alive Ray nodes"):
        place([SPEC], nodes, node_ids=["nope"])
    with pytest.raises(SpecError, match="listed twice"):
        place([SPEC, SPEC], nodes, node_ids=["h", "h"])
    with pytest.raises(SpecError, match=r"replicas\[1\].port=8800: replica 0 uses it on the same machine"):
        place([SPEC.model_copy(update={"port": 8800})] * 2, nodes)
    with pytest.raises(SpecError, match="at least one replica"):
        place([], nodes)
    head = ReplicaSpec(model="/m", dp_size=2, dp_size_local=1, dp_start_rank=1, dp_address="10.0.0.1", headless=True)
    with pytest.raises(SpecError, match="headless"):
        place([head], nodes)


def test_share_splits_a_machine():
    assert share((0, 1), 0, 2) == (0,) and share((0, 1), 1, 2) == (1,)
    assert share(tuple(range(8)), 1, 2) == (4, 5, 6, 7)
    with pytest.raises(SpecError, match="cannot be split"):
        share((0,), 1, 2)


# -- what the node runs -------------------------------------------------------------------------------------
def test_rehearsal_pins_node_k_to_core_k_and_binds_the_node_ip():
    nodes = alive_nodes([ray_node("h", head=True), ray_node("w")])
    inv = Inventory(cores=(0, 1))
    plans = [plan_on_node(p, inv, "127.0.0.1", check_models=False, port_free=free)
             for p in place([SPEC, SPEC], nodes, port_start=8800)]
    assert [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in plans] == ["0", "1"]
    assert [p.cores for p in plans] == [(0,), (1,)]
    assert [p.url for p in plans] == ["http://127.0.0.1:8800", "http://127.0.0.1:8801"]
    assert all(p.env["VLLM_HOST_IP"] == "127.0.0.1" for p in plans)
    assert [p.index for p in plans] == [0, 1] and [p.name for p in plans] == ["node0", "node1"]
    argv = plans[1].argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8801"


def test_separate_machines_use_the_whole_node_and_explicit_cores_win():
    nodes = alive_nodes([ray_node("h", "10.0.0.1", head=True), ray_node("w", "10.0.0.2")])
    inv = Inventory(cores=tuple(range(8)))
    p0, p1 = place([SPEC, SPEC.model_copy(update={"cores": (2, 3)})], nodes)
    a = plan_on_node(p0, inv, "10.0.0.1", check_models=False, port_free=free)
    b = plan_on_node(p1, inv, "10.0.0.2", check_models=False, port_free=free)
    assert a.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-7" and a.url == "http://10.0.0.1:8100"
    assert b.env["VLLM_CPU_OMP_THREADS_BIND"] == "2-3" and b.env["VLLM_HOST_IP"] == "10.0.0.2"


def test_gpu_node_pins_the_gpus_ray_gave_the_actor():
    # Ray sets CUDA_VISIBLE_DEVICES for an actor with num_gpus; discover() then sees only those GPUs.
    nodes = alive_nodes([ray_node("g", "10.0.0.3", head=True, GPU=8.0)])
    spec = ReplicaSpec(model="org/model", tp_size=2, device="auto")
    (p,) = place([spec], nodes)
    inv = Inventory(cores=tuple(range(32)), gpus=(GPU(4, "H100", 80.0), GPU(5, "H100", 80.0)))
    plan = plan_on_node(p, inv, "10.0.0.3", check_models=False, port_free=free)
    assert plan.device == "gpu" and plan.env["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert "--tensor-parallel-size" in plan.argv and plan.env["VLLM_HOST_IP"] == "10.0.0.3"


def test_node_side_errors_name_the_replica_and_the_node():
    nodes = alive_nodes([ray_node("h", head=True), ray_node("w0123456789")])
    p = place([SPEC, SPEC.model_copy(update={"cores": (5,)})], nodes)[1]
    with pytest.raises(SpecError, match=r"replicas\[1\]\.cores=\[5\].*on Ray node w0123456 at 127.0.0.1"):
        plan_on_node(p, Inventory(cores=(0, 1)), "127.0.0.1", check_models=False, port_free=free)
    busy = place([SPEC], nodes)[0]
    with pytest.raises(SpecError, match=r"replicas\[0\]\.port=8100: already in use"):
        plan_on_node(busy, Inventory(cores=(0, 1)), "127.0.0.1", check_models=False, port_free=lambda h, p: False)


def test_ranks_and_placements_cross_process_boundaries():
    nodes = alive_nodes([ray_node("h", head=True), ray_node("w")])
    ps = place([SPEC, SPEC.model_copy(update={"dp_size": 2, "cores": None})], nodes, port_start=8800)
    inv = Inventory(cores=(0, 1, 2, 3))
    plans = [plan_on_node(p, inv, "127.0.0.1", check_models=False, port_free=free) for p in ps]
    ranks = ranks_of(plans)
    assert [(r.name, r.url, r.headers) for r in ranks] == [
        ("node0", "http://127.0.0.1:8800", ()),
        ("node1/dp0", "http://127.0.0.1:8801", (("X-data-parallel-rank", "0"),)),
        ("node1/dp1", "http://127.0.0.1:8801", (("X-data-parallel-rank", "1"),))]
    # what travels to and from the actors
    assert pickle.loads(pickle.dumps(ps[1])) == ps[1] and pickle.loads(pickle.dumps(plans[1])) == plans[1]
    assert isinstance(ps[0], Placement) and isinstance(ps[0].node, RayNode)


# -- the real thing ------------------------------------------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_two_replicas_placed_one_per_ray_node(tiny_model_path):
    ray = pytest.importorskip("ray")
    from nbkit import RoutedClient
    from nbkit.ray.nodes import RayNodes
    from nbkit.ray.replicas import RayReplicas

    nodes = RayNodes.local(num_nodes=2)
    group = None
    pids: list[int] = []
    per_actor: list[dict] = []
    ray_pids = nodes.pids()
    try:
        head, other = nodes.node_ids
        group = RayReplicas.one_per_node(tiny_model_path, nodes=nodes, port_start=8800)
        group.start()
        ray_pids = nodes.pids()  # now with the actors' workers and watchdogs

        # each actor ran on the node it was placed on, as Ray itself reports it
        assert [group.node_of(0), group.node_of(1)] == [head, other]
        where = ray.get([a.where.remote() for a in group._actors])
        assert [w["node_id"] for w in where] == [head, other]
        assert [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in group.plans] == ["0", "1"]
        assert [r.url for r in group.ranks] == ["http://127.0.0.1:8800", "http://127.0.0.1:8801"]
        assert all(p.env["VLLM_HOST_IP"] == "127.0.0.1" for p in group.plans)

        # routed through nbkit's client: pinned to each node, then balanced
        with RoutedClient(group.ranks, "round_robin", model=group.model) as client:
            for rank in group.ranks:
                out = client.sync.complete("Hello", max_tokens=5, ignore_eos=True, rank=rank.name)
                assert out["nbkit"]["rank"] == rank.name and out["usage"]["completion_tokens"] == 5
            for _ in range(4):
                client.sync.complete("The router balances", max_tokens=4, ignore_eos=True)
            served = client.records_frame().groupby("rank").size().to_dict()
        assert served == {"node0": 3, "node1": 3}

        pids = group.pids()
        per_actor = group.actor_pids()
        assert len(alive(pids)) >= 4  # API server + engine core on each node
        assert all(alive([a["watchdog"]]) for a in per_actor)

        # the actor's worker dies (as when Ray kills it because the driver is gone): its watchdog
        # stops that node's replica
        victim = per_actor[1]
        os.kill(victim["actor"], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while alive(victim["replica"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(victim["replica"]) == [], "node1's replica outlived its Ray actor by 15 s"
        assert alive(per_actor[0]["replica"]), "node0's replica must not be touched"
    finally:
        if group is not None:
            group.stop()
        left = alive(pids)
        nodes.shutdown()
        kill_tree(alive(pids))  # only if the test failed
    assert left == [], f"replica processes left after group.stop(): {left}"
    assert not ray.is_initialized()
    time.sleep(1)
    assert alive(ray_pids) == [], "Ray processes left after nodes.shutdown()"
    helpers = [a[k] for a in per_actor for k in ("actor", "watchdog")]
    assert alive(helpers) == [], "an actor or its (detached) watchdog outlived the group"
