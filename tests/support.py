"""`sweep --json` for the tests that drive the CLI. Servers, the daemon, the jobs table,
`Pg`, `wait_until` and the metrics reader live in reconciler.devstack; the names below are
re-exported only for test modules that still import them from here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reconciler.devstack import (
    DaemonProc,
    insert_job,
    metric_value,
    request_cancel,
    row,
    run_cli,
    statuses,
    transitions,
    wait_request,
    wait_status,
    write_config,
)

__all__ = [
    "DaemonProc",
    "insert_job",
    "metric_value",
    "request_cancel",
    "row",
    "run_cli",
    "statuses",
    "sweep_json",
    "transitions",
    "wait_request",
    "wait_status",
    "write_config",
]


def sweep_json(config: Path, *extra: str) -> dict[str, Any]:
    p = run_cli(config, "sweep", "--json", *extra)
    assert p.returncode in (0, 1), p.stderr
    out: dict[str, Any] = json.loads(p.stdout)
    out["_rc"] = p.returncode
    out["_stderr"] = p.stderr
    return out
