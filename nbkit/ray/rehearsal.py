"""The helper process that holds a local Ray rehearsal cluster on 127.0.0.1 (``python -m
nbkit.ray.rehearsal``; started by :meth:`nbkit.ray.RayNodes.local`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
from typing import Sequence




# -- the helper process that owns a local rehearsal cluster ------------------------------------------
def _serve_local(num_nodes: int, cpus: int) -> int:
    """Start ``ray.cluster_utils.Cluster`` on 127.0.0.1, print its address as one JSON line, then hold
    it until stdin closes (parent done or dead) or SIGTERM, and shut it down."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cluster = None
    try:
        from ray.cluster_utils import Cluster
        common = {"num_cpus": cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False,
                  "include_log_monitor": False}
        cluster = Cluster(initialize_head=True, head_node_args={**common, "no_monitor": True, "resources": {"node0": 1}})
        for k in range(1, num_nodes):
            cluster.add_node(**common, resources={f"node{k}": 1})
    except Exception as e:  # noqa: BLE001 - reported to the parent, which also kills this process group
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.shutdown()
        return 1
    print(json.dumps({"address": cluster.address}), flush=True)

    def watch_stdin():
        with contextlib.suppress(Exception):
            while sys.stdin.buffer.read(1024):
                pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(0.5):
        pass
    cluster.shutdown()
    if os.path.basename(os.environ.get("RAY_TMPDIR", "")).startswith("nbkit-ray-"):  # ours (the kernel may be gone)
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m nbkit.ray.rehearsal", description="hold a local Ray rehearsal cluster")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=1)
    a = ap.parse_args(argv)
    return _serve_local(a.nodes, a.cpus)


if __name__ == "__main__":
    sys.exit(main())
