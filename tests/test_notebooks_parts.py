"""The committed notebooks: one setup cell, outputs from a full run, and asserts that check.

Each teaching notebook on the parts (components, kernels, optimizers, serving) holds `assert`
cells that hold the code to a reference written from the paper (absorbed MLA == naive == the
equations in numpy, Pallas kernels == reference within 1e-4, Moonlight update ==
0.2·sqrt(max(A, B))·NS5(g), engine tokens == recomputed tokens, ...), so executing it is a
test; tests/test_notebooks.py executes every notebook (smoke settings) and compares the kinds
of its outputs with the committed copy's. The committed copies are written by `make
notebooks` (tools/run_notebooks.py); these checks read them only.
"""
import os

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = ["quickstart.ipynb", "components.ipynb", "kernels.ipynb", "optimizers.ipynb",
             "serving.ipynb"]
WITH_ASSERTS = ["components.ipynb", "kernels.ipynb", "optimizers.ipynb", "serving.ipynb"]


def _read(name):
    return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_every_notebook_is_listed():
    assert sorted(NOTEBOOKS) == sorted(n for n in os.listdir(NOTEBOOK_DIR) if n.endswith(".ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_setup_cell_is_the_shared_one(name):
    """The first code cell of every notebook is tools/notebook_setup.py, character for character
    (`python tools/run_notebooks.py --sync` copies it in)."""
    with open(os.path.join(REPO, "tools", "notebook_setup.py"), encoding="utf-8") as f:
        want = f.read().rstrip("\n")
    first = _code(_read(name))[0]
    assert first.source == want, f"{name}: run `python tools/run_notebooks.py --sync`"
    assert first.metadata.get("cellView") == "form"  # Colab folds it under its title


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_with_outputs_of_a_whole_run(name):
    """Valid; every code cell executed once, in order; plots as PNG; no errors; no timestamps."""
    nb = _read(name)
    nbformat.validate(nb)
    code = _code(nb)
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{name}: not executed top to bottom; run `make notebooks`")
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{name} has an error output"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} shows no plot"
    assert not [c for c in nb.cells if "execution" in c.metadata], f"{name}: execution timestamps"


@pytest.mark.parametrize("name", WITH_ASSERTS)
def test_notebook_checks_something(name):
    assert any("assert" in c.source for c in _code(_read(name))), f"{name} has no assert cell"
