"""The notebooks' shared setup cell (tools/notebook_setup.py): where it finds the checkout and
what it would install, with git and pip replaced by a recorder (nothing is installed)."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def setup_cell():
    spec = importlib.util.spec_from_file_location(
        "notebook_setup", os.path.join(REPO, "tools", "notebook_setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines only
    return module


class Recorder:
    """Stands in for subprocess.run: records commands; a `git clone` copies pyproject.toml."""

    def __init__(self):
        self.commands = []

    def __call__(self, cmd, check):
        self.commands.append(cmd)
        if cmd[:2] == ["git", "clone"]:
            os.makedirs(cmd[-1])
            shutil.copy(os.path.join(REPO, "pyproject.toml"), cmd[-1])


def pip_installs(recorder):
    return [c[c.index("-q") + 1:] for c in recorder.commands if c[1:4] == ["-m", "pip", "install"]]


def test_finds_the_checkout_from_below_and_through_links(setup_cell, tmp_path):
    assert setup_cell.find_checkout(os.path.join(REPO, "notebooks")) == REPO
    links = tmp_path / "links"  # how tests/test_notebooks.py runs the notebooks
    links.mkdir()
    os.symlink(os.path.join(REPO, "pyproject.toml"), links / "pyproject.toml")
    (links / "notebooks").mkdir()
    assert setup_cell.find_checkout(links / "notebooks") == str(links)
    other = tmp_path / "other"
    other.mkdir()
    (other / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    assert setup_cell.find_checkout(other) is None


def test_in_a_checkout_with_everything_installed_nothing_runs(setup_cell, monkeypatch, capsys):
    monkeypatch.chdir(os.path.join(REPO, "notebooks"))
    run = Recorder()
    assert setup_cell.setup("", run=run) == REPO
    assert run.commands == []
    assert "nothing to install" in capsys.readouterr().out


def test_in_a_checkout_missing_a_package_installs_it_editable(setup_cell, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(setup_cell, "missing", lambda reqs: reqs[:1])
    monkeypatch.setattr(setup_cell, "accelerator", lambda: None)
    run = Recorder()
    setup_cell.setup("", run=run)
    assert pip_installs(run) == [["-e", REPO, "matplotlib"]]


def test_outside_a_checkout_without_a_url_says_what_to_set(setup_cell, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="REPO_URL.*LLM_JAX_REPO_URL.*local checkout"):
        setup_cell.setup("", run=Recorder())


@pytest.mark.parametrize("accel, sees, extra", [
    (None, False, None),            # CPU runtime: nothing extra
    ("gpu", False, "jax[cuda12]"),  # a GPU the installed jax does not see
    ("gpu", True, None),            # Colab's own jax already sees it
    ("tpu", False, "jax[tpu]"),
])
def test_outside_a_checkout_clones_and_installs(setup_cell, monkeypatch, tmp_path, accel, sees,
                                                extra):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(setup_cell, "accelerator", lambda: accel)
    monkeypatch.setattr(setup_cell, "jax_sees", lambda a, req: sees)
    monkeypatch.setattr(setup_cell, "missing", lambda reqs: [])
    run = Recorder()
    root = setup_cell.setup("https://example.invalid/llm-jax.git", run=run)
    assert root == str(tmp_path / "llm-jax")
    assert run.commands[0] == ["git", "clone", "--depth=1", "https://example.invalid/llm-jax.git",
                               root]
    installs = pip_installs(run)
    assert installs[-1] == ["-e", root]  # a fresh clone is always installed, jax extra first
    if extra is None:
        assert len(installs) == 1
    else:
        assert installs[0][0].startswith(extra + ">=") and len(installs) == 2


def test_accelerator_from_the_environment(setup_cell, monkeypatch):
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
    assert setup_cell.accelerator() == "tpu"
    monkeypatch.delenv("COLAB_TPU_ADDR")
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.setenv("PATH", "")  # no nvidia-smi
    if not os.path.exists("/dev/accel0"):
        assert setup_cell.accelerator() is None


def test_jax_sees_reads_version_and_backend(setup_cell, monkeypatch):
    def fake_run(cmd, **kw):
        assert cmd[0] == sys.executable
        return subprocess.CompletedProcess(cmd, 0, stdout="0.10.2 gpu\n")

    monkeypatch.setattr(setup_cell.subprocess, "run", fake_run)
    assert setup_cell.jax_sees("gpu", "jax>=0.10.2")
    assert not setup_cell.jax_sees("gpu", "jax>=0.11")  # too old: reinstall with the extra
    assert not setup_cell.jax_sees("tpu", "jax>=0.10.2")
