"""The reconciler's CLI as a subprocess: a config file for it, ``run_cli`` and ``migrate``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from reconciler.devstack.procs import REPO_ROOT, free_port


def write_config(path: Path, redis_url: str, pg_dsn: str, **sections: dict[str, Any]) -> Path:
    """A config file; ``sections`` override/extend e.g. ``sweep={"min_age_seconds": 0}``."""
    base: dict[str, dict[str, Any]] = {
        "redis": {"url": redis_url},
        "postgres": {"dsn": pg_dsn, "pool_size": 4},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"format": "json", "level": "info"},
        "cancel": {"grace_seconds": 2.0, "lease_seconds": 10.0},
        "sweep": {"min_age_seconds": 0.0},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def run_cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m reconciler <args[0]> --config <config> <args[1:]>``, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args[:1], "--config", str(config), *args[1:]],
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
    )


def migrate(config: Path) -> None:
    """``rq-reconciler migrate``: the reconciler's tables and trigger, as an operator runs it."""
    p = run_cli(config, "migrate")
    if p.returncode != 0:
        raise RuntimeError(f"rq-reconciler migrate failed ({p.returncode}): {p.stderr}")
