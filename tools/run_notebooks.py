"""Execute the notebooks in place, so the committed copies carry their outputs (plots too).

Each notebook first gets the setup cell of tools/notebook_setup.py as its first code cell,
then runs top to bottom with nbclient from the repository root on the machine at hand; the
outputs are written back into notebooks/<name>.ipynb. What would churn a diff without
saying anything is left out: no execution timestamps are recorded and the notebook's own
metadata (kernelspec, Colab settings) is kept as it was, not replaced by the kernel's.

    python tools/run_notebooks.py                        # every notebook, full settings
    python tools/run_notebooks.py --smoke=kernels        # NOTEBOOK_SMOKE=1 for kernels.ipynb
    python tools/run_notebooks.py serving                # only notebooks/serving.ipynb
    python tools/run_notebooks.py --sync                 # only copy the setup cell in

`make notebooks` runs it with the settings chosen for a 2-core CPU (see the Makefile).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
SETUP_FILE = os.path.join(ROOT, "tools", "notebook_setup.py")
NAMES = ("quickstart", "components", "kernels", "optimizers", "serving")


def setup_cell_source() -> str:
    """The source every notebook's first code cell must hold."""
    with open(SETUP_FILE, encoding="utf-8") as f:
        return f.read().rstrip("\n")


def sync_setup_cell(nb) -> bool:
    """Make the first code cell the setup cell (Colab shows it folded); True if it changed."""
    cell = next(c for c in nb.cells if c.cell_type == "code")
    source = setup_cell_source()
    changed = cell.source != source or cell.metadata.get("cellView") != "form"
    cell.source = source
    cell.metadata["cellView"] = "form"  # Colab: the title, code behind "show code"
    return changed


def coalesce_streams(outputs):
    """Merge consecutive stream outputs of one stream, and redraw what carriage returns
    overwrite (tqdm redraws its bar with '\\r'), as Jupyter shows them live."""
    merged = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.output_type == "stream" and prev is not None and prev.output_type == "stream"
                and prev.name == out.name):
            prev.text += out.text
        else:
            merged.append(out)
    for out in merged:
        if out.output_type == "stream" and "\r" in out.text:
            lines = []
            for line in out.text.split("\n"):
                shown = ""
                for part in line.split("\r"):  # each part overwrites the line from its start
                    shown = part + shown[len(part):]
                lines.append(shown.rstrip() if "\r" in line else shown)
            out.text = "\n".join(lines)
    return merged


def execute(path: str, *, smoke: bool, timeout: int = 1200) -> float:
    """Run the notebook at `path` in place; returns the seconds it took."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    sync_setup_cell(nb)
    metadata = nb.metadata  # the kernel's language_info would replace it
    env = {"NOTEBOOK_SMOKE": "1" if smoke else "0", "PYTHONHASHSEED": "0",
           # tqdm's warning that ipywidgets is missing (it is there on Colab), with our paths
           "PYTHONWARNINGS": "ignore:IProgress not found"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        t0 = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": ROOT}}).execute()
        seconds = time.perf_counter() - t0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    nb.metadata = metadata
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = coalesce_streams(cell.outputs)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", default=list(NAMES), help="notebooks (default: all)")
    p.add_argument("--smoke", default="", help="comma-separated notebooks to run with "
                   "NOTEBOOK_SMOKE=1 (the test suite's small settings)")
    p.add_argument("--sync", action="store_true", help="only copy the setup cell in")
    args = p.parse_args(argv)
    smoke = {n.removesuffix(".ipynb") for n in args.smoke.split(",") if n}
    names = [os.path.basename(n).removesuffix(".ipynb") for n in args.names]
    for n in sorted(set(names) | smoke):
        if n not in NAMES:
            sys.exit(f"unknown notebook {n!r}: one of {', '.join(NAMES)}")
    total = 0.0
    for name in names:
        path = os.path.join(NOTEBOOK_DIR, f"{name}.ipynb")
        if args.sync:
            nb = nbformat.read(path, as_version=4)
            if sync_setup_cell(nb):
                nbformat.write(nb, path)
                print(f"{name}.ipynb: setup cell updated")
            continue
        seconds = execute(path, smoke=name in smoke)
        total += seconds
        print(f"{name}.ipynb ({'smoke' if name in smoke else 'full'}): {seconds:.0f} s",
              flush=True)
    if not args.sync:
        print(f"all: {total:.0f} s")


if __name__ == "__main__":
    main()
