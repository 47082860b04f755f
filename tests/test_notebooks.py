"""Every notebook runs top to bottom in its smoke setting (NOTEBOOK_SMOKE=1: a few steps,
small shapes, no network), shows what it promises, and shows the same kinds of output, cell
by cell, as the committed copy that `make notebooks` wrote (values differ: the committed
copies ran the full settings)."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))

# Text a notebook's outputs must contain (notebooks not listed only have to run).
EXPECTED = {
    "quickstart.ipynb": ("validation loss", "bits/byte", "step 4:"),  # step 4: restored + sampled
}


def output_kinds(cell):
    """The kinds of output a code cell shows, in order, repeats collapsed: 'text' (stdout),
    'image' (a PNG), 'result', 'display', 'error'. Standard error (warnings, progress bars)
    is left out: it differs from machine to machine."""
    kinds = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            kind = "text" if out.name == "stdout" else None
        elif out.output_type == "error":
            kind = "error"
        elif "image/png" in out.get("data", {}):
            kind = "image"
        else:
            kind = "result" if out.output_type == "execute_result" else "display"
        if kind is not None and (not kinds or kinds[-1] != kind):
            kinds.append(kind)
    return kinds


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: smoke settings, one CPU device, and the
    # repository importable. Outputs go to the in-memory copy, not the checked-in file.
    monkeypatch.setenv("NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("LLM_JAX_REPO_URL", raising=False)
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Run from a scratch directory of links to the repository's top level, so whatever a
    # notebook writes (runs/, plots) lands in tmp_path; the setup cell finds it a checkout.
    workdir = tmp_path / "repo"
    workdir.mkdir()
    for name in os.listdir(REPO):
        if not name.startswith(".") and name != "runs":
            os.symlink(os.path.join(REPO, name), workdir / name)
    committed = nbformat.read(path, as_version=4)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()
    name = os.path.basename(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = "".join(o.get("text", "") for c in code for o in c.outputs)
    for text in EXPECTED.get(name, ()):
        assert text in outputs, f"{name}: no {text!r} in its outputs"
    if name == "quickstart.ipynb":
        assert (workdir / "runs" / "quickstart-smoke" / "metrics.jsonl").exists()

    # The setup cell ran live, found the scratch checkout, and installed nothing.
    setup = "".join(o.get("text", "") for o in code[0].outputs)
    assert "nothing to install" in setup and "pip install" not in setup, setup

    # Same kinds of output as the committed copy, cell by cell (run `make notebooks` after
    # changing what a cell shows).
    old = [c for c in committed.cells if c.cell_type == "code"]
    for i, (fresh, saved) in enumerate(zip(code, old, strict=True)):
        assert output_kinds(fresh) == output_kinds(saved), (
            f"{name}, code cell {i + 1}: this run shows {output_kinds(fresh)}, the committed copy "
            f"{output_kinds(saved)}: run `make notebooks`")
