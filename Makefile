# The two commands a newcomer needs: `make demo` and `make test`. Both build the venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint test-fast test-slow bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rq-reconciler demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict reconciler

# Everything, the slow chaos and replica-storm suites included: they guard what users
# trust most, so they belong in the gate (CI runs this target).
test: $(STAMP) lint
	bash scripts/install-ci-tools.sh
	$(BIN)/pytest -q

# A developer's quicker loop: all but the slow suites.
test-fast: $(STAMP) lint
	bash scripts/install-ci-tools.sh
	$(BIN)/pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m bench.sweep_vs_naive
	$(BIN)/python -m bench.sweep_memory

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
