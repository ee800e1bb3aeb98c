# `make test` and `make demo` work from nothing: they create .venv, install what is needed
# (torch pinned by constraints.txt, CPU wheel) and run. Quick when everything is installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
# The rest with uv (the same packages as pip, resolved and installed in seconds); it keeps the
# torch that pip installed, which satisfies constraints.txt. --compile-bytecode as pip does:
# where PYTHONDONTWRITEBYTECODE is set, every process would otherwise compile transformers anew.
UV     := $(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode -c constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test demo lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and alone with pip (it takes the CPU wheel on disk), so no other package can
# pull a CUDA build.
$(VENV)/.torch: constraints.txt | $(BIN)/python
	$(PIP) torch
	touch $@

$(BIN)/uv: | $(VENV)/.torch
	$(PIP) uv

$(VENV)/.dev: pyproject.toml constraints.txt $(VENV)/.torch | $(BIN)/uv
	$(UV) -e ".[dev]"
	touch $@

$(VENV)/.demo: pyproject.toml constraints.txt $(VENV)/.torch | $(BIN)/uv
	$(UV) -e ".[demo]"
	touch $@

# Tests run in parallel (pytest-xdist, one worker per core).
test: $(VENV)/.dev
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto

# Writes ./demo-out/ (soups with model cards, report.json, README.md, results.png); the
# fine-tunes are cached in $$UPCYCLE_CACHE (default ~/.cache/upcycle). DEMO_ARGS: more flags.
DEMO_ARGS ?=
demo: $(VENV)/.demo
	$(BIN)/upcycle demo --out demo-out $(DEMO_ARGS)

# ruff, and import-linter's contract of the layers (pyproject.toml [tool.importlinter]).
lint: $(VENV)/.dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info demo-out
