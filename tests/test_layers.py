"""The house's rule, checked: each layer imports only the layers below it, and the light entry
points (``import nbkit``, ``import nbkit.sim``, ``python -m nbkit.sim --help``) stay light.

    http, loop, tiny, traces        import nothing of nbkit
    policies, records, by_tenant    pure data and decisions (shared by the router and the simulator)
    routing                         http, policies, records, loop
    ui                              routing and below (never the cluster: it reads snapshots)
    cluster, ray                    routing, ui (the panel convenience), sim's hardware tables, below
    bench                           cluster, routing and below
    sim                             policies, records, traces, tiny: never routing, http or the UI
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "nbkit"

BASE = {"nbkit.loop", "nbkit.tiny", "nbkit.traces"}
ALLOWED = {
    "nbkit.http": set(),
    "nbkit.loop": set(),
    "nbkit.tiny": set(),
    "nbkit.traces": set(),
    "nbkit.policies": set(),
    "nbkit.records": {"nbkit.traces"},
    "nbkit.by_tenant": {"nbkit.records"},    # the records' figures per tenant: the same layer
    "nbkit.routing": {"nbkit.http", "nbkit.policies", "nbkit.records", "nbkit.by_tenant", *BASE},
    "nbkit.ui": {"nbkit.routing", "nbkit.http", "nbkit.policies", "nbkit.records", "nbkit.by_tenant", *BASE},
    "nbkit.sim": {"nbkit.policies", "nbkit.records", "nbkit.by_tenant", *BASE},
    "nbkit.cluster": {"nbkit.routing", "nbkit.ui", "nbkit.http", "nbkit.policies", "nbkit.records",
                      "nbkit.sim.hardware", "nbkit.sim.models", *BASE},
    "nbkit.ray": {"nbkit.cluster", "nbkit.routing", "nbkit.http", "nbkit.policies", *BASE},
    "nbkit.bench": {"nbkit.cluster", "nbkit.routing", "nbkit.http", "nbkit.policies", "nbkit.records", "nbkit.by_tenant", "nbkit.ui",
                    *BASE},
}
TOP = ("nbkit.cli", "nbkit.demo", "nbkit.__main__", "nbkit")  # the front doors: anything


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return module


def nbkit_imports(path: Path):
    """(line, imported module) for every import of an nbkit module in ``path``, at any depth."""
    tree = ast.parse(path.read_text())
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("nbkit"):
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("nbkit"):
                continue
            if mod == "nbkit":  # from nbkit import loop / bench / Cluster
                for a in node.names:
                    yield node.lineno, f"nbkit.{a.name}"
            else:
                yield node.lineno, mod


def allowed(src_layer: str, target: str) -> bool:
    if layer_of(target) == src_layer:
        return True
    ok = ALLOWED[src_layer]
    return any(target == a or target.startswith(a + ".") for a in ok)


def test_every_module_imports_only_the_layers_below_it():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = module_name(path)
        if mod in TOP:
            continue
        src = layer_of(mod)
        assert src in ALLOWED, f"{mod}: not in a known layer (add it to this test's table)"
        for line, target in nbkit_imports(path):
            if target in ("nbkit.Cluster", "nbkit.RoutedClient") and src == "nbkit.ray":
                continue
            if not allowed(src, target):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {mod} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_module_over_600_lines():
    long = [f"{p.relative_to(ROOT.parent)}: {n}" for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600]
    assert not long, long


def loaded_modules(code: list[str]) -> set[str]:
    out = subprocess.run([sys.executable, "-X", "importtime", *code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    mods = set()
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            mods.add(line.rsplit("|", 1)[1].strip())
    return mods


HEAVY = ("nbkit.routing", "nbkit.http", "nbkit.ui", "nbkit.cluster", "httpx", "aiohttp", "ipywidgets", "altair",
         "vllm", "torch", "uvicorn", "starlette", "transformers")


@pytest.mark.parametrize("code", [["-c", "import nbkit.sim"], ["-m", "nbkit.sim", "--help"]],
                         ids=["import nbkit.sim", "python -m nbkit.sim --help"])
def test_the_simulator_imports_no_router_transport_ui_or_vllm(code):
    mods = loaded_modules(code)
    assert "nbkit.sim" in mods
    heavy = sorted(m for m in mods if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert not heavy, heavy


def test_import_nbkit_is_lazy():
    mods = loaded_modules(["-c", "import nbkit"])
    assert not [m for m in mods if m.startswith("nbkit.")], sorted(m for m in mods if m.startswith("nbkit."))
    import nbkit
    assert set(nbkit.__all__) <= set(dir(nbkit))
    assert nbkit.Cluster.__module__ == "nbkit.cluster.cluster"
    with pytest.raises(AttributeError, match="no attribute 'Clusterr'"):
        nbkit.Clusterr
