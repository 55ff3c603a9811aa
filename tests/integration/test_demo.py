"""README's first command: `rq-reconciler demo` tells the whole story and cleans up."""

from __future__ import annotations

import re
import subprocess
import sys

import psutil

from tests.harness import REPO_ROOT


def test_demo_runs_the_story_and_cleans_up() -> None:
    before = {p.pid for p in psutil.process_iter()}
    p = subprocess.run([sys.executable, "-m", "reconciler", "demo"], capture_output=True,
                       text=True, timeout=170, cwd=REPO_ROOT)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    assert "Synced: RQ finished" in out
    assert "Synced: RQ failed: RuntimeError: CUDA out of memory" in out
    assert "outcome 'cancelled'" in out and '"horse_signals": ["SIGTERM"]' in out
    assert "SIGTERM: checkpoint saved" in out
    assert "RQ says 'canceled'" in out
    assert re.search(r"Orphaned: worker gpu-\d is gone", out)
    assert "Orphaned: no RQ job id" in out
    assert "/metrics" in out
    for label in ("RQ finished -> row completed", "cancel: request inserted -> outcome written",
                  "worker SIGKILL -> row failed (orphaned)"):
        assert re.search(re.escape(label) + r"\s+\d+ ms", out), label
    assert "daemon stopped on SIGTERM with exit code 0" in out
    # nothing it started is left running
    leftover = [q for q in psutil.process_iter(["pid", "name", "cmdline"])
                if q.pid not in before and q.info["name"] in ("redis-server", "postgres", "rq")]
    assert leftover == []
