# Everything bootstraps its own virtual environment in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Parallel workers for pytest (the suite is CPU bound; CI machines have 2 cores).
WORKERS ?= 2

.PHONY: install test test-all train bench-cpu notebooks lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n $(WORKERS) --dist loadfile tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile tests

train: $(STAMP)
	$(BIN)/python train.py --config=configs/llama3.py:tiny --workdir=runs/tiny

bench-cpu: $(STAMP)
	$(BIN)/python bench/bigram.py

# Execute every notebook in place (tools/run_notebooks.py), so the committed copies carry
# their outputs, plots included. All five take their full settings: 6.9 min on a 2-core CPU
# shared with other jobs (load ~4: quickstart 2.8, serving 1.5, components 1.0, kernels 0.9,
# optimizers 0.7), 10.7 min under load ~9; under ~10 min, so none runs with NOTEBOOK_SMOKE=1
# (add --smoke=NAME for one that grows slow).
notebooks: $(STAMP)
	$(BIN)/python tools/run_notebooks.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
