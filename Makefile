# The two commands a newcomer needs: `make demo` and `make test`. Both build their venv first.
#
# Two venvs for the package itself, one per RQ series it supports (rq>=2.0,<4):
#   .venv      rq 2.x: the development venv, and the full suite (slow suites included);
#   .venv-rq3  rq 3.x: what `pip install rq-reconciler` resolves to today; the demo, and
#              the suite but the slow runs.
# Apart from these, the tests start `rq worker`s of both series from venvs of their own
# (.venvs/workers-rq2, .venvs/workers-rq3, built on first use: reconciler/devstack/rqvenv.py),
# so each leg runs every worker test against RQ 2 and RQ 3 workers.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VENV3 := .venv-rq3
BIN3 := $(VENV3)/bin
STAMP3 := $(VENV3)/.installed

.PHONY: demo test test-embedded lint test-fast test-slow test-rq3 worker-venvs bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' 'rq>=2.12,<3'
	touch $(STAMP)

$(STAMP3): pyproject.toml
	$(PY) -m venv $(VENV3)
	$(BIN3)/pip install -q --upgrade pip
	$(BIN3)/pip install -q -e '.[test]' 'rq>=3,<4'
	touch $(STAMP3)

worker-venvs: $(STAMP)
	$(BIN)/python -c "from reconciler.devstack import RQ_SERIES, worker_python; \
		[print(worker_python(s)) for s in RQ_SERIES]"

demo: $(STAMP3)
	$(BIN3)/rq-reconciler demo

lint: $(STAMP) $(STAMP3)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict examples
	$(BIN)/mypy --strict reconciler
	$(BIN3)/mypy --strict reconciler

# Everything, the slow chaos and replica-storm suites included: they guard what users
# trust most, so they belong in the gate (CI runs this target); then the package on RQ 3.
test: $(STAMP) lint worker-venvs
	bash scripts/install-ci-tools.sh
	$(BIN)/pytest -q
	$(MAKE) test-rq3

# The package's own rq at 3.x, every test but the slow ones.
test-rq3: $(STAMP3) worker-venvs
	$(BIN3)/pytest -q -m "not slow"

# A developer's quicker loop: all but the slow suites, on the package's rq 2.
test-fast: $(STAMP) lint worker-venvs
	bash scripts/install-ci-tools.sh
	$(BIN)/pytest -q -m "not slow"

test-slow: $(STAMP) worker-venvs
	$(BIN)/pytest -q -m slow

# CI's second leg: the integration and fault suites once more on the servers that the
# `embedded` extra's wheels ship (Valkey 9, PostgreSQL 18) instead of the machine's, so
# that RQ on Valkey and our SQL on PostgreSQL 18 are covered (restarts, flushes and
# failovers included), and so is a fresh machine's demo. The unit tests touch no server
# and the slow storms ran in the first leg; RQ 3 workers only, since the first leg ran
# both series: about 7 minutes on 2 cores.
test-embedded: $(STAMP)
	RQ_DEVSTACK_SERVERS=wheels RQ_WORKER_VERSIONS=3 $(BIN)/pytest -q -m "not slow" tests/integration tests/faults

bench: $(STAMP)
	$(BIN)/python -m bench.sweep_vs_naive
	$(BIN)/python -m bench.sweep_memory

clean:
	rm -rf $(VENV) $(VENV3) .venvs .pytest_cache .mypy_cache .ruff_cache
