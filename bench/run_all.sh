#!/usr/bin/env bash
# Run every rq-reconciler benchmark in sequence (about 15 minutes on a 2-core VM).
# Usage, from anywhere: bench/run_all.sh            (uses .venv/bin/python if present)
#                        PYTHON=/path/to/python bench/run_all.sh
# Each script starts and removes its own redis-server / PostgreSQL / rq workers and
# prints its tables with PASS/MISS beside each goal; this script exits non-zero only if
# a script crashed. Numbers are only comparable on an otherwise idle machine: each
# script prints the load average at its start and end.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SCRIPTS=(sweep_vs_naive history_table sweep_memory cancel_latency handover_latency sync_lag local_kill stranded requeue rq_versions idle event_storm)
failed=()
start=$(date +%s)
for s in "${SCRIPTS[@]}"; do
    echo
    echo "### $PYTHON -m bench.$s"
    t0=$(date +%s)
    if ! "$PYTHON" -m "bench.$s"; then
        failed+=("$s")
    fi
    echo "### bench.$s took $(( $(date +%s) - t0 )) s"
done
echo
echo "### all benchmarks took $(( $(date +%s) - start )) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "### crashed: ${failed[*]}" >&2
    exit 1
fi
