"""nbkit beside ``nest_asyncio.apply()`` (or its fork nest-asyncio2): the notebook
tests/notebooks_extra/nest_asyncio_check.ipynb, run by a Jupyter kernel through nbclient (as nbmake
does), applies it, then starts two simulated replicas and makes blocking, awaited, ``asyncio.run``
and streamed calls and shows the panel. No vLLM; a few seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.processes  # simulated replicas / kernels: `make test`, not `make test-fast`


NOTEBOOK = Path(__file__).parent / "notebooks_extra" / "nest_asyncio_check.ipynb"


@pytest.mark.parametrize("nbkit_loop", ["uvloop", "asyncio"])
def test_notebook_with_nest_asyncio_applied_runs(tmp_path, monkeypatch, nbkit_loop):
    """With asyncio's own loop as nbkit's, nest_asyncio's global patch (pure-Python tasks and futures)
    reaches nbkit's loop too; with uvloop it does not. Both must work."""
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    monkeypatch.setenv("NBKIT_LOOP", nbkit_loop)
    monkeypatch.setenv("NBKIT_NB_PORT_START", str(free_port(9180)))
    monkeypatch.setenv("NBKIT_NB_RUN_DIR", str(tmp_path / "run"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel inherits this process's environment; python3 is the kernel of this interpreter
    client = NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=dict(os.environ))
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    texts = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "nest_asyncio" in texts  # the patch was applied (either package)
    assert f"'{nbkit_loop}'" in texts  # nbkit's loop was of the kind asked for
