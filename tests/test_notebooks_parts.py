"""The teaching notebooks on the parts (components, kernels, optimizers, serving) are clean
and check something; tests/test_notebooks.py executes every notebook.

Each notebook holds `assert` cells that hold the code to a reference written from the paper
(absorbed MLA == naive == the equations in numpy, Pallas kernels == reference within 1e-4,
Moonlight update == 0.2·sqrt(max(A, B))·NS5(g), engine tokens == recomputed tokens, ...), so executing it is a test. They run in
their smoke setting (`NOTEBOOK_SMOKE=1`: short loops, small problems) on one CPU device.
"""
import os

import nbformat
import pytest

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
