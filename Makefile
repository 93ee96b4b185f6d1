# Two commands: `make demo` runs the offline demo, `make test` runs the tests.
# Both create (or reuse) .venv and install torch first: a bare torch requirement would pull the CUDA
# wheels. On a GPU machine name another build, e.g. `make demo TORCH="torch==2.13.0 --index-url ..."`.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: demo test install

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/distill demo --workdir runs/demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q
