# Everything goes through .venv; `make venv` is idempotent (a stamp tracks pyproject.toml).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The main job: ~1M synthetic rows, DLRM, 2 PS shards + 2 workers on a local Ray.
demo: venv
	$(BIN)/recps train --config deploy/demo.yaml --overwrite
	$(BIN)/recps demo serve --config deploy/demo.yaml

demo-store: venv
	$(BIN)/recps demo store

.PHONY: demo demo-store venv test test-slow test-all bench bench-quick lint fmt clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so the resolver never reaches for a CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Every benchmarks/*.py except helpers (_echo_server.py: the PS benchmark's echo server).
BENCHMARKS := $(filter-out benchmarks/_%,$(wildcard benchmarks/*.py))

bench: venv
	@for b in $(BENCHMARKS); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

bench-quick: venv
	@for b in $(BENCHMARKS); do echo "== $$b"; $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
