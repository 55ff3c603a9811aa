# The two commands a newcomer needs: `make demo` and `make test`. Both build their venv first.
#
# The gate (.ci/run) covers a matrix, each leg what only it can:
#
#   leg              package's rq   workers' rq   servers                  suites
#   make test        3.x            2.x and 3.x   the machine's            unit, integration, faults,
#                                                                          deploy, packaging, alone
#   make test-slow   3.x            2.x and 3.x   the machine's            chaos, storms, busy minute
#   make test-rq2    2.x            2.x (3.x in   the wheels' (Valkey 9,   unit, integration, faults
#                                   test_rq_ver-  PostgreSQL 18)
#                                   sions' own)
#
# Why this shape: the workers' series is what the daemon reads (their layout in Redis), so
# the suites run on both in `make test` and the slow runs. The rq 2 leg runs them on RQ 2
# workers (RQ_WORKER_VERSIONS=2): their RQ 3 side is the same daemon code, run in `make
# test`, and the package on rq 2 still meets RQ 3 workers in the tests written for that
# pairing (test_rq_versions.py starts its own RQ 3 workers: a mixed fleet on one Redis,
# stop-execution, a re-run's horse, a custom key prefix). The package's
# rq decides how the daemon writes to RQ (its API, its constants) and how the tests
# enqueue; rq 3 is what pip installs today, so it meets the servers most hosts run (the
# machine's Redis and PostgreSQL) in README's command, and rq 2 meets the servers a fresh
# machine gets from wheels (Valkey's WATCH, PostgreSQL 18's SQL). The two pairings left
# out (rq 3 on the wheels', rq 2 on the machine's) share every code path with the two
# kept but the server's version, which the other pairing already crosses.
#
# Run once, in `make test` only: the deploy and packaging tests (the unit file, the image,
# which installs its own rq, Compose and Kubernetes files, alert rules, the wheel: neither
# the venv's rq nor the servers' versions reach them) and the `alone` tests (a metrics flood
# that touches no RQ code; a pod killed whole, judged by the replica registry's SQL, which
# the rq 2 leg's replica tests already run on PostgreSQL 18); README's integration script
# (it installs the package into a venv of its own, with the rq pip picks: this leg's rq
# never reaches it, and test_least_privilege runs the same grants on PostgreSQL 18).
#
# .ci/run runs `make test`, then test-slow and test-rq2 at once: the slow runs mostly wait
# (a minute of traffic, a locked row held for a minute), so they cost the other leg little;
# each leg takes its ports from a range of its own (RQ_DEVSTACK_PORT_BASE).
#
# Venvs: .venv-rq3 (rq 3.x: make test, the demo) and .venv (rq 2.x: the development venv,
# make test-rq2). Workers come from venvs of their own series (.venvs/workers-rq2,
# .venvs/workers-rq3, built on first use: reconciler/devstack/rqvenv.py).
#
# Tests run in XDIST test processes (pytest-xdist): each has its own servers, ports and
# temp dirs (reconciler/devstack). Tests marked `alone` load the whole machine on purpose
# and run afterwards, by themselves.
PY ?= python3
XDIST ?= -n 4
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VENV3 := .venv-rq3
BIN3 := $(VENV3)/bin
STAMP3 := $(VENV3)/.installed

.PHONY: demo test test-unit test-fast test-slow test-rq2 ci lint tools worker-venvs bench clean

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

# promtool, systemd-analyze and pgbouncer from Debian's packages (tests/test_deploy.py,
# the pooler tests); a no-op once they are there.
tools:
	bash scripts/install-ci-tools.sh

demo: $(STAMP3)
	$(BIN3)/rq-reconciler demo

lint: $(STAMP) $(STAMP3)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict examples
	$(BIN)/mypy --strict reconciler
	$(BIN3)/mypy --strict reconciler

# README's test command: lint and types, then every unit, integration and fault test but
# the slow runs, on the package's rq 3 with RQ 2 and RQ 3 workers and the machine's servers.
test: $(STAMP3) lint worker-venvs tools
	$(BIN3)/pytest -q $(XDIST) -m "not slow and not alone"
	$(BIN3)/pytest -q -m "alone and not slow"

# The pure core, config, parsers, work queue, stop ladder and supervisor: no server.
test-unit: $(STAMP)
	$(BIN)/pytest -q -n 2 tests/unit

# test without lint, on the development venv: the loop after a change types already cover.
test-fast: $(STAMP) worker-venvs tools
	$(BIN)/pytest -q $(XDIST) -m "not slow and not alone"

# The chaos run, the replica storms and the busy minute: long, and what users trust most,
# so they are in the gate (.ci/run). Two at a time: each loads the machine.
test-slow: $(STAMP3) worker-venvs
	RQ_DEVSTACK_PORT_BASE=26000 $(BIN3)/pytest -q -n 2 -m slow

# The package on rq 2 against the servers the `embedded` extra's wheels ship (Valkey 9,
# PostgreSQL 18), as a fresh machine without redis-server or PostgreSQL runs them.
test-rq2: $(STAMP) worker-venvs tools
	RQ_DEVSTACK_SERVERS=wheels RQ_DEVSTACK_PORT_BASE=20000 RQ_WORKER_VERSIONS=2 \
		$(BIN)/pytest -q $(XDIST) \
		-m "not slow and not alone" tests/unit tests/integration tests/faults \
		--ignore=tests/integration/test_integrating_it.py

# Every leg of the matrix above, as the gate runs them.
ci:
	bash .ci/run

bench: $(STAMP)
	$(BIN)/python -m bench.sweep_vs_naive
	$(BIN)/python -m bench.sweep_memory

clean:
	rm -rf $(VENV) $(VENV3) .venvs .pytest_cache .mypy_cache .ruff_cache
