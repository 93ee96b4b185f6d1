# `make demo` runs the offline demo, `make test` runs the tests, `make test-fast` the tests that start no
# ranks (the developer loop).
# Each creates (or reuses) .venv and installs torch first: a bare torch requirement would pull the CUDA
# wheels. On a GPU machine name another build, e.g. `make demo TORCH="torch==2.13.0 --index-url ..."`.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: demo test test-fast install comm-op

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/distill demo --workdir runs/demo

# DeepSpeed compiles its CPU all-reduce op (g++) on first use: built here, before any test, so that no
# test's time limit runs over the compiler and no two ranks race on its build lock.
comm-op: $(BIN)/.installed
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"

test: comm-op
	$(BIN)/python -m pytest -q

test-fast: comm-op
	$(BIN)/python -m pytest -q -m "not integration"
