# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= pipeline.yaml
ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

# (Re)install when pyproject.toml or this file changes.  editable_mode=compat:
# the source tree as a plain path in a .pth file.  The default editable
# install is an import hook that every Python process of the venv imports as
# it starts (pathlib and more), and `mpipe run` starts three: the runner,
# multiprocessing's resource tracker and the forkserver.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' \
		--config-settings editable_mode=compat
	touch $@

run: $(STAMP)
	$(BIN)/mpipe run $(CONFIG) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The full benchmark of issue 4 (about half an hour; BENCH_ARGS=--quick for a smoke run).
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/mpipe bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check mpipe tests examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) data/input data/output data/results.h5 data/.mpipe
