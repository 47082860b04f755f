"""Point README.md's "Open in Colab" badges at the GitHub repository that hosts this code.

A checkout does not know where it is hosted, so the README ships with the placeholder
`OWNER/NAME`. The badges sit between two markers; this rewrites the owner/name (and the
branch) of every Colab link between them and leaves everything else as it is:

    python tools/colab_badges.py my-org/llm-jax                 # branch main
    python tools/colab_badges.py my-org/llm-jax --branch=dev
"""
from __future__ import annotations

import argparse
import os
import re
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN, END = "<!-- colab-badges:begin -->", "<!-- colab-badges:end -->"
LINK = re.compile(r"https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/[^/\s)]+/")
REPO = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}")


def rewrite(text: str, repo: str, branch: str = "main") -> str:
    """`text` with every Colab link between the markers pointing at `repo` on `branch`."""
    if not REPO.fullmatch(repo):
        raise ValueError(f"{repo=} must be a GitHub OWNER/NAME, e.g. my-org/llm-jax")
    if not branch or re.search(r"[\s)]", branch):
        raise ValueError(f"{branch=} must be a branch name")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} ... {END} block")
    block = text[start:end]
    new = f"https://colab.research.google.com/github/{repo}/blob/{branch}/"
    block, count = LINK.subn(lambda _: new, block)
    if count == 0:
        raise ValueError("no Colab links between the markers")
    return text[:start] + block + text[end:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repo", help="the GitHub OWNER/NAME the repository is hosted at")
    p.add_argument("--branch", default="main", help="the branch the notebooks are on")
    p.add_argument("--readme", default=README)
    args = p.parse_args(argv)
    with open(args.readme, encoding="utf-8") as f:
        text = f.read()
    try:
        new = rewrite(text, args.repo, args.branch)
    except ValueError as e:
        sys.exit(f"{args.readme}: {e}")
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(new)
    print(f"{args.readme}: Colab badges point at github.com/{args.repo} ({args.branch})")


if __name__ == "__main__":
    main()
