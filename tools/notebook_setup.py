# @title Setup: work in a checkout of llm-jax, or fetch and install one
# The first cell of every notebook; `make notebooks` copies it in from tools/notebook_setup.py.
# Inside a checkout (this notebook opened from notebooks/) it works from the repository root
# and installs only what does not import. Anywhere else (Colab) it clones REPO_URL and
# installs it, after jax for the runtime's GPU or TPU when the installed jax does not see it.
import os
import subprocess
import sys

# The git URL of the repository you host this code at (https://github.com/<you>/<repo>.git).
# Not needed when the notebook is opened from a local checkout.
REPO_URL = os.environ.get("LLM_JAX_REPO_URL", "")


def find_checkout(start):
    """The nearest directory at or above `start` whose pyproject.toml names llm-jax, or None."""
    import tomllib

    here = os.path.abspath(start)
    while True:
        try:
            with open(os.path.join(here, "pyproject.toml"), "rb") as f:
                if tomllib.load(f).get("project", {}).get("name") == "llm-jax":
                    return here
        except (OSError, tomllib.TOMLDecodeError):
            pass
        if os.path.dirname(here) == here:
            return None
        here = os.path.dirname(here)


def requirements(checkout):
    """The checkout's dependencies from its pyproject.toml, and matplotlib for the plots."""
    import tomllib

    with open(os.path.join(checkout, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["dependencies"] + ["matplotlib"]


def dist_name(req):
    """'jax' of 'jax>=0.10.2', 'orbax-checkpoint' of 'orbax-checkpoint>=0.11'."""
    import re

    return re.match(r"[A-Za-z0-9._-]+", req).group()


def missing(reqs):
    """The requirements whose distribution is not installed."""
    import importlib.metadata

    absent = []
    for req in reqs:
        try:
            importlib.metadata.version(dist_name(req))
        except importlib.metadata.PackageNotFoundError:
            absent.append(req)
    return absent


def accelerator():
    """'tpu' or 'gpu' when this runtime has one (whatever jax sees), else None."""
    import glob

    if os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME") or glob.glob("/dev/accel*"):
        return "tpu"
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        if smi.returncode == 0 and "GPU" in smi.stdout:
            return "gpu"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None


def jax_sees(accel, jax_req):
    """Whether the installed jax meets `jax_req` (e.g. 'jax>=0.10.2') and sees `accel`.

    Asked in a fresh interpreter: this kernel must not import jax before it is installed.
    """
    import re

    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.__version__, "
                            "jax.default_backend())"], capture_output=True, text=True)
    if probe.returncode != 0:
        return False
    version, backend = probe.stdout.split()[-2:]
    number = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:3])
    floor = re.search(r">=\s*([0-9.]+)", jax_req)
    return backend == accel and (floor is None or number(version) >= number(floor.group(1)))


def setup(repo_url, clone_to="llm-jax", run=subprocess.run):
    """Find (or clone) the checkout, install what it needs; returns the checkout's path."""
    root = find_checkout(os.getcwd())
    if root is None:  # outside a checkout, e.g. on Colab
        root = os.path.abspath(clone_to)
        if not os.path.exists(root):
            if not repo_url:
                raise RuntimeError(
                    "This notebook is not inside a checkout of llm-jax, so it has to clone one: "
                    "set REPO_URL in the first cell (or the LLM_JAX_REPO_URL environment "
                    "variable) to the git URL of the repository you host this code at, or open "
                    "the notebook from a local checkout (notebooks/ of a git clone).")
            run(["git", "clone", "--depth=1", repo_url, root], check=True)
        if find_checkout(root) != root:
            raise RuntimeError(f"{root} exists but holds no llm-jax pyproject.toml: move it away")
        installs = [["-e", root]]  # a fresh clone is always installed
    else:
        installs = [["-e", root]] if missing(requirements(root)) else []
    if installs:
        jax_req = next(r for r in requirements(root) if dist_name(r) == "jax")
        accel = accelerator()
        if accel is not None and not jax_sees(accel, jax_req):
            extra = {"gpu": "cuda12", "tpu": "tpu"}[accel]
            installs.insert(0, [jax_req.replace("jax", f"jax[{extra}]", 1)])
        if missing(["matplotlib"]):
            installs[-1].append("matplotlib")
    for args in installs:
        print("pip install", " ".join(args))
        run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)
    if installs:
        import importlib

        importlib.invalidate_caches()  # see what pip just added without a restart
    else:
        print("In a checkout of llm-jax with every requirement installed: nothing to install.")
    return root


if __name__ == "__main__":  # a notebook cell runs as __main__; importing only defines
    ROOT = setup(REPO_URL)
    os.chdir(ROOT)  # work from the repository root: configs/, runs/ and train.py are there
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # the packages sit at the top of the repository
