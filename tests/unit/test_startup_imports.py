"""One-shot commands import only what they use: operators wait for start-up on every run.

Each command runs in a fresh interpreter; what it imported is read from sys.modules when
it exits. (How long start-up takes is bench material; which libraries load is not.)
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.devstack import REPO_ROOT, write_config

HEAVY = ("asyncio", "asyncpg", "redis", "rq", "psutil", "prometheus_client", "uvloop", "structlog")
_PROBE = (
    "import atexit, json, sys\n"
    f"atexit.register(lambda: print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), "
    "file=sys.stderr))\n"
    "from reconciler.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def imported(*argv: str, rc: int | None = None) -> set[str]:
    p = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True,
                       cwd=REPO_ROOT, timeout=60, check=False)
    if rc is not None:
        assert p.returncode == rc, p.stderr
    return set(json.loads(p.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("cmd", ["run", "sweep", "cancel", "migrate", "check"])
def test_help_imports_no_library(cmd: str) -> None:
    assert imported(cmd, "--help", rc=0) == set()


def test_a_config_error_imports_no_library(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[sweep]\ninterval_seconds = -1\n")
    assert imported("sweep", "--config", str(bad), rc=2) == set()


@pytest.mark.parametrize("argv", [("migrate",), ("cancel", "1")])
def test_postgres_only_commands_import_neither_redis_nor_rq(tmp_path: Path, argv: tuple[str, ...]) -> None:
    # Nothing listens on port 1: cancel fails at its first connection, after its imports;
    # --print-sql makes none (it prints from the config alone).
    cfg = write_config(tmp_path / "c.toml", "redis://127.0.0.1:1/0",
                       "postgresql://postgres@127.0.0.1:1/none")
    got = imported(argv[0], "--config", str(cfg), *argv[1:], rc=0 if "--print-sql" in argv else 1)
    if argv[0] == "cancel":
        assert "asyncpg" in got  # it did get as far as connecting
    assert got.isdisjoint({"redis", "rq", "psutil", "prometheus_client"}), got


@pytest.mark.parametrize("argv", [("--print-sql",), ("--print-grants",), ("--print-grants", "web")])
def test_printed_sql_and_grants_need_no_server(tmp_path: Path, argv: tuple[str, ...]) -> None:
    """`migrate --print-sql` and `--print-grants` are written from the config alone (for a
    DBA, before there is a role or a table to connect to): nothing listens on port 1."""
    cfg = write_config(tmp_path / "c.toml", "redis://127.0.0.1:1/0",
                       "postgresql://rqr_daemon@127.0.0.1:1/none")
    got = imported("migrate", "--config", str(cfg), *argv, rc=0)
    assert got.isdisjoint({"redis", "rq", "psutil", "prometheus_client"}), got


def test_sweep_imports_neither_metrics_library_nor_rq_nor_psutil(tmp_path: Path) -> None:
    """rq is for writes through RQ's API (rq_api.py), imported when a sweep first makes one;
    the daemon and `check` import it at start-up to check the key prefix."""
    cfg = write_config(tmp_path / "c.toml", "redis://127.0.0.1:1/0",
                       "postgresql://postgres@127.0.0.1:1/none")
    got = imported("sweep", "--config", str(cfg), rc=1)
    assert {"asyncpg", "redis"} <= got
    # (psutil only once a local worker's children are to be listed: proving a horse)
    assert got.isdisjoint({"prometheus_client", "rq", "psutil"}), got


def test_sweep_under_another_prefix_checks_rq_at_start_up(tmp_path: Path) -> None:
    """With a prefix other than RQ's default, the rq installed must be able to write under
    it: that is checked (importing rq) before anything is read."""
    cfg = write_config(tmp_path / "c.toml", "redis://127.0.0.1:1/0",
                       "postgresql://postgres@127.0.0.1:1/none", redis={"key_prefix": "myapp"})
    got = imported("sweep", "--config", str(cfg))
    assert "rq" in got


_GC_PROBE = (
    "import gc, sys\n"
    "from reconciler.cli import main\n"
    "before = sum(s['collections'] for s in gc.get_stats())\n"
    "rc = main(sys.argv[1:])\n"
    "print(sum(s['collections'] for s in gc.get_stats()) - before, gc.isenabled(), file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def test_start_up_runs_no_garbage_collection(tmp_path: Path) -> None:
    """What a command imports is never garbage: the collector is off until its modules are
    loaded (with the defaults it ran about 40 times over a sweep's imports), and on again
    when main() returns."""
    cfg = write_config(tmp_path / "c.toml", "redis://127.0.0.1:1/0",
                       "postgresql://postgres@127.0.0.1:1/none")
    p = subprocess.run([sys.executable, "-c", _GC_PROBE, "sweep", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False)
    assert p.returncode == 1, p.stderr
    collections, enabled = p.stderr.strip().splitlines()[-1].split()
    assert int(collections) <= 2, p.stderr
    assert enabled == "True"


def test_main_leaves_a_caller_s_collector_as_it_found_it() -> None:
    from reconciler.cli import main

    gc.disable()
    try:
        assert main(["example-unit"]) == 0
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert main(["example-unit"]) == 0
    assert gc.isenabled()
