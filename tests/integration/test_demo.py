"""README's first command: `rq-reconciler demo` tells the whole story and cleans up."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from reconciler.devstack import REPO_ROOT, processes_under, processes_with_env, tmp_base

# Set for this one demo run; every Python process it starts (workers, horses, the daemon)
# inherits it. redis-server and postgres write their titles over their environment, so
# they are found by their working directory, which lies in the demo run's own temp dir.
MARK_ENV = "RQR_TEST_DEMO_RUN"


def test_demo_runs_the_story_and_cleans_up() -> None:
    mark = uuid.uuid4().hex
    # Traversable by the postgres user, like every devstack server dir.
    servers = Path(tempfile.mkdtemp(prefix="demo-test-", dir=tmp_base()))
    servers.chmod(0o755)
    try:
        env = {**os.environ, MARK_ENV: mark, "RQ_HARNESS_TMPDIR": str(servers)}
        p = subprocess.run([sys.executable, "-m", "reconciler", "demo"], capture_output=True,
                           text=True, timeout=170, cwd=REPO_ROOT, env=env)
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
        # nothing it started is left running, and its server dirs are gone
        leftover = {q.pid: q for q in [*processes_with_env(MARK_ENV, mark), *processes_under(servers)]}
        assert [(q.pid, q.name()) for q in leftover.values()] == []
        assert list(servers.iterdir()) == []
    finally:
        shutil.rmtree(servers, ignore_errors=True)
