# Two entry points do all the set-up on a fresh machine:
#   make serve   -> venv + install + run the server (built-in demo model unless MODEL=...)
#   make test    -> venv + install + the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install serve test bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 first: that pin takes the CPU wheel on this machine's disk instead of a
# multi-GB CUDA build, and the range in pyproject.toml is then already satisfied.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/glm4serve serve $(if $(MODEL),--model $(MODEL)) $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
