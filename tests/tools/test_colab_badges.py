"""tools/colab_badges.py rewrites the Colab links between README's markers, nothing else."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("colab_badges",
                                              os.path.join(REPO, "tools", "colab_badges.py"))
colab_badges = importlib.util.module_from_spec(spec)
spec.loader.exec_module(colab_badges)

COLAB = "https://colab.research.google.com/github/"


def _readme():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_is_committed_with_the_placeholder_and_every_notebook():
    text = _readme()
    assert colab_badges.rewrite(text, "OWNER/NAME") == text
    for name in sorted(os.listdir(os.path.join(REPO, "notebooks"))):
        if name.endswith(".ipynb"):
            assert f"{COLAB}OWNER/NAME/blob/main/notebooks/{name})" in text, name


def test_rewrites_only_inside_the_block():
    text = (f"[a]({COLAB}x/y/blob/main/notebooks/a.ipynb)\n{colab_badges.BEGIN}\n"
            f"| [b]({COLAB}OWNER/NAME/blob/main/notebooks/b.ipynb) |\n{colab_badges.END}\n")
    new = colab_badges.rewrite(text, "my-org/llm-jax", branch="dev")
    assert f"{COLAB}x/y/blob/main/notebooks/a.ipynb" in new  # outside the markers: kept
    assert f"{COLAB}my-org/llm-jax/blob/dev/notebooks/b.ipynb" in new
    assert colab_badges.rewrite(new, "OWNER/NAME") == text


@pytest.mark.parametrize("repo", ["llm-jax", "a/b/c", "https://github.com/a/b", ""])
def test_refuses_what_is_not_owner_slash_name(repo):
    with pytest.raises(ValueError, match="OWNER/NAME"):
        colab_badges.rewrite(_readme(), repo)
