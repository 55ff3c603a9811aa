"""Virtualenvs holding one RQ series each, for ``rq worker`` subprocesses.

A fleet mid-upgrade runs RQ 2 and RQ 3 workers on one Redis, whatever rq the daemon
itself imports; so the workers a test or a bench starts come from a venv of their own
series, built on first use (a few seconds; pip needs the package index) and kept under
``$RQ_RECONCILER_WORKER_VENVS`` (default ``<repo>/.venvs``). Building is serialized by a
file lock, so parallel test processes build each venv once.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from reconciler.devstack.procs import REPO_ROOT

# The series a worker can be started from, and what pip installs for each.
RQ_SERIES: dict[str, str] = {"2": "rq>=2.12,<3", "3": "rq>=3,<4"}
ENV_VENVS = "RQ_RECONCILER_WORKER_VENVS"
_STAMP = ".rq-reconciler-spec"


def venvs_root() -> Path:
    return Path(os.environ.get(ENV_VENVS) or REPO_ROOT / ".venvs")


def worker_python(series: str | None) -> str:
    """The interpreter to run ``rq worker`` of RQ `series` ("2" or "3") with; None means
    this interpreter (the rq the package itself imports)."""
    if series is None:
        return sys.executable
    if series not in RQ_SERIES:
        raise ValueError(f"unknown RQ series {series!r} (known: {', '.join(RQ_SERIES)})")
    spec = RQ_SERIES[series]
    venv = venvs_root() / f"workers-rq{series}"
    python = venv / "bin" / "python"
    stamp = venv / _STAMP
    if _built(stamp, spec):
        return str(python)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".workers-rq{series}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _built(stamp, spec):
            _build(venv, spec)
            stamp.write_text(spec)
    return str(python)


def rq_version_of(python: str) -> str:
    """The rq version `python` imports."""
    out = subprocess.run([python, "-c", "import rq; print(rq.__version__)"],
                         check=True, capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


def _built(stamp: Path, spec: str) -> bool:
    try:
        return stamp.read_text() == spec and (stamp.parent / "bin" / "python").exists()
    except OSError:
        return False


def _build(venv: Path, spec: str) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True,
                   capture_output=True, timeout=300)
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", spec],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"could not install {spec} into {venv}:\n{done.stdout}\n{done.stderr}")
