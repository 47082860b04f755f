"""Every notebook runs top to bottom in its smoke setting (NOTEBOOK_SMOKE=1: a few steps,
small shapes, no network), and shows what it promises."""
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: smoke settings, one CPU device, and the
    # repository importable. Outputs go to the in-memory copy, not the checked-in file.
    monkeypatch.setenv("NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Run from a scratch directory of links to the repository's top level, so whatever a
    # notebook writes (runs/, plots) lands in tmp_path.
    workdir = tmp_path / "repo"
    workdir.mkdir()
    for name in os.listdir(REPO):
        if not name.startswith(".") and name != "runs":
            os.symlink(os.path.join(REPO, name), workdir / name)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    for text in EXPECTED.get(os.path.basename(path), ()):
        assert text in outputs, f"{os.path.basename(path)}: no {text!r} in its outputs"
    if os.path.basename(path) == "quickstart.ipynb":
        assert (workdir / "runs" / "quickstart-smoke" / "metrics.jsonl").exists()
