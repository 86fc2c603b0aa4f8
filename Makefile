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

.PHONY: install serve test js-deps
install: $(BIN)/hybridserve

# The AI SDK's packages for tests/integration/test_structured_outputs.py (skipped without node or them).
JS := tests/js
js-deps:
	@if command -v npm >/dev/null; then \
		[ $(JS)/node_modules/.package-lock.json -nt $(JS)/package-lock.json ] || \
		(cd $(JS) && npm ci --no-audit --no-fund --loglevel=error); \
	else echo "npm not found: the AI SDK test will be skipped"; fi

serve: install
	$(BIN)/hybridserve serve $(ARGS)

test: install js-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
