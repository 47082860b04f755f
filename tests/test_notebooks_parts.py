"""The teaching notebooks on the parts (components, kernels, optimizers, serving) run top to bottom.

Each notebook holds `assert` cells that hold the code to a reference written from the paper
(absorbed MLA == naive == the equations in numpy, Pallas kernels == reference within 1e-4,
Moonlight update == 0.2·sqrt(max(A, B))·NS5(g), engine tokens == recomputed tokens, ...), so executing it is a test. They run in
their smoke setting (`NOTEBOOK_SMOKE=1`: short loops, small problems) on one CPU device.
"""
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = ["components.ipynb", "kernels.ipynb", "optimizers.ipynb", "serving.ipynb"]


def _read(name):
    return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_and_checks_something(name):
    """Saved without outputs (small diffs), valid, and with at least one assert cell."""
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), (
        f"{name} has saved outputs: clear them before committing")
    assert any("assert" in c.source for c in code), f"{name} has no assert cell"
    assert "google.colab" in code[0].source, f"{name}: the first cell must set up Colab"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
    # The kernel inherits this environment: smoke settings, one CPU device, the repository
    # importable. Outputs stay in memory; the checked-in notebook is not touched.
    monkeypatch.setenv("NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = _read(name)
    # Run from notebooks/, as a user who opens the file there would (the first cell moves
    # to the repository root). "python3" is ipykernel's kernel on this interpreter.
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()  # raises CellExecutionError on any failing cell (and so any failed assert)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in ran), f"{name}: some cells did not run"
