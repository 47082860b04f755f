"""Every notebook runs top to bottom (in its smoke setting: a few steps, no network)."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: smoke settings, one CPU device, and the
    # repository importable. Outputs go to a copy, not the checked-in notebook.
    monkeypatch.setenv("QUICKSTART_SMOKE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    workdir = tmp_path / "repo"
    workdir.mkdir()
    # Run from a scratch directory holding links to the repository's top level, so the
    # notebook's runs/ folder lands in tmp_path.
    for name in os.listdir(REPO):
        if not name.startswith(".") and name != "runs":
            os.symlink(os.path.join(REPO, name), workdir / name)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "validation loss" in outputs and "bits/byte" in outputs
    assert "step 4:" in outputs                 # sampled from the restored checkpoint
    assert (workdir / "runs" / "quickstart-smoke" / "metrics.jsonl").exists()
