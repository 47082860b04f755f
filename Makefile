# Everything bootstraps its own virtual environment in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Parallel workers for pytest (the suite is CPU bound; CI machines have 2 cores).
WORKERS ?= 2

.PHONY: install test test-all train bench-cpu lint clean

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

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
