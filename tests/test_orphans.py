"""A Jupyter kernel that started a replica is killed with SIGKILL: no replica process survives."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from conftest import alive, kill_tree

pytestmark = pytest.mark.vllm


def test_sigkilled_kernel_leaves_no_replica(tiny_model_path, tmp_path):
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    pids: list[int] = []
    try:
        kc.wait_for_ready(timeout=60)
        out: list[str] = []

        def collect(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append("\n".join(msg["content"]["traceback"]))

        code = (
            "import os, sys, json\n"
            "from nbkit import Cluster\n"
            "from nbkit.cluster.watchdog import guard\n"
            f"c = Cluster.replicas({tiny_model_path!r}, n=1, cores=(0,), port_start=8450, run_dir={str(tmp_path)!r})\n"
            "c.start()\n"
            "print('PIDS=' + json.dumps({'kernel': os.getpid(), 'exe': sys.executable, 'watchdog': guard().pid,\n"
            "      'replica': [p.pid for p in c.process(0).processes()]}))\n"
        )
        reply = kc.execute_interactive(code, timeout=400, output_hook=collect)
        text = "".join(out)
        assert reply["content"]["status"] == "ok", text
        info = json.loads(text.split("PIDS=", 1)[1].splitlines()[0])
        assert os.path.realpath(info["exe"]) == os.path.realpath(sys.executable)
        pids = info["replica"]
        assert len(alive(pids)) >= 2  # API server + engine core at least

        os.kill(info["kernel"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(pids + [info["watchdog"]]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(pids) == [], "replica processes survived their kernel by 10 s"
        assert alive([info["watchdog"]]) == []
    finally:
        kc.stop_channels()
        kill_tree(alive(pids))  # only if the test failed
        try:
            km.shutdown_kernel(now=True)
        except Exception:
            pass
