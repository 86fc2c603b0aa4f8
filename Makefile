# Two commands for a fresh clone: `make serve` (install, then serve the default model) and
# `make test` (install, then run the whole test suite). Both create .venv/ on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/hybridserve: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

.PHONY: install serve test
install: $(BIN)/hybridserve

serve: install
	$(BIN)/hybridserve serve $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
