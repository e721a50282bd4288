"""The panel in a real browser: JupyterLab on 127.0.0.1, a notebook that starts 2 tiny replicas,
shows the panel and runs a load; Playwright (Debian's chromium) runs it and reads the page."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import alive, kill_tree

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PORT = 8890

CELLS = [
    "from nbkit import Cluster, loop\nfrom nbkit.demo import closed_loop\n"
    "cluster = Cluster.replicas(n=2, port_start=8630)\ncluster.start()\nclient = cluster.client('least_load')",
    "panel = cluster.panel(interval=0.5)\npanel",
    "load = loop.submit(closed_loop(client, requests=3000, concurrency=8, max_tokens=32))",
]


def _notebook(path: Path) -> None:
    nb = {"nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "nbkit", "display_name": "nbkit (.venv)", "language": "python"}},
          "cells": [{"cell_type": "code", "metadata": {}, "source": c, "outputs": [], "execution_count": None,
                     "id": f"c{i}"} for i, c in enumerate(CELLS)]}
    path.write_text(json.dumps(nb))


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed (make test installs it)")
def test_panel_in_jupyterlab_shows_healthy_ranks_and_drives_the_policy(tmp_path, output_dir, tiny_model_path):
    from playwright.sync_api import sync_playwright

    root = tmp_path / "lab"
    root.mkdir()
    _notebook(root / "panel.ipynb")
    token = secrets.token_hex(16)
    env = dict(os.environ, NBKIT_MODEL=tiny_model_path)
    jupyter = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip", "127.0.0.1", "--port", str(PORT),
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
               "--ServerApp.port_retries=0"]
    log = open(tmp_path / "jupyter.log", "w")
    lab = subprocess.Popen(jupyter, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{PORT}"
    descendants: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/api/status", params={"token": token}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert lab.poll() is None and time.monotonic() < deadline, (tmp_path / "jupyter.log").read_text()
            time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"{base}/lab/tree/panel.ipynb?token={token}", timeout=120_000)
            # JupyterLab may ask which kernel to start; take the one it proposes (the project's)
            try:
                page.locator(".jp-Dialog button.jp-mod-accept").click(timeout=15_000)
            except Exception:  # noqa: BLE001 - no dialog: the notebook's kernel started directly
                pass
            page.locator('div.lm-MenuBar-itemLabel:text-is("Run")').click(timeout=120_000)
            # "Run All" in JupyterLab 4.6 ("Run All Cells" in earlier 4.x)
            page.locator(".lm-Menu-itemLabel").filter(has_text=re.compile(r"^Run All( Cells)?$")).first.click()
            rows = page.locator("tr.nbkit-row")
            deadline = time.monotonic() + 420
            ok = False
            while time.monotonic() < deadline:
                for c in psutil.Process(lab.pid).children(recursive=True):
                    descendants.add(c.pid)
                states = rows.locator("td.nbkit-state").all_inner_texts()
                toks = rows.locator("td.nbkit-gen_tok_s").all_inner_texts()
                if len(states) == 2 and states == ["healthy", "healthy"] and all(
                        t not in ("-", "0") and float(t) > 0 for t in toks):
                    ok = True
                    break
                time.sleep(1)
            page.screenshot(path=str(output_dir / "panel.png"), full_page=True)
            assert ok, f"rows never showed 2 healthy ranks with tok/s > 0: {states} {toks}"
            # change the routing policy in the page; the title reads the router's policy back
            select = page.locator(".nbkit-panel .widget-dropdown select").first
            select.select_option("round_robin")
            page.locator("code.nbkit-policy", has_text="round_robin").wait_for(timeout=20_000)
            page.screenshot(path=str(output_dir / "panel-round-robin.png"), full_page=True)
            browser.close()
        # shut the kernel down through the server: nbkit stops its replicas
        kernels = httpx.get(f"{base}/api/kernels", params={"token": token}).json()
        for k in kernels:
            httpx.delete(f"{base}/api/kernels/{k['id']}", params={"token": token}, timeout=60)
        deadline = time.monotonic() + 30
        while alive(descendants) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert alive(descendants) == [], "replicas outlived their kernel"
    finally:
        try:
            os.killpg(lab.pid, signal.SIGTERM)
            lab.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(lab.pid, signal.SIGKILL)
        kill_tree(alive(descendants))
