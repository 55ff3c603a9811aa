"""The pod layouts of deploy/kubernetes and deploy/compose, exercised with Linux namespaces
(tests/faults/pods.py) against real forking RQ workers:

- sidecar (shareProcessNamespace / Compose `pid: service:worker`): the daemon shares the
  worker's PID and UTS namespaces, each with its own mount namespace. A cancel gets the
  graceful path (SIGTERM to the job first) and a worker SIGKILLed mid-job fails its row
  at once (pidfd on the worker), not after its Redis TTL or a sweep.
- a container of the worker's pod *without* a shared PID namespace: the same hostname but
  the worker's pid is not visible: the worker is remote, never dead; the cancel ends by
  RQ's stop-job and says so.
- DaemonSet with hostPID: the daemon sees every process of the node, while the worker
  registered its pod's hostname and its pid inside its pod's PID namespace; host-PID
  mode (reconciler.hostpid) maps it to its process on the node, so cancels are graceful
  and its death is seen at once, as in the sidecar; with host_pid = "off" it is remote.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from reconciler.devstack import (
    DaemonProc,
    Pg,
    enqueue,
    harness_env,
    insert_job,
    metric_value,
    migrate,
    request_cancel,
    rq_status,
    wait_request,
    wait_status,
    wait_until,
    write_config,
)
from tests.faults import pods

pytestmark = pytest.mark.skipif(bool(pods.available()), reason=pods.available() or "-")

JOB = "tests.jobs.trap_sigterm"
STOP_COMMANDS = {"stop-job", "stop-execution"}


class Setup:
    def __init__(self, tmp: Path, redis_url: str, pg_dsn: str, rq_version: str) -> None:
        self.tmp, self.redis_url, self.dsn, self.rq_version = tmp, redis_url, pg_dsn, rq_version
        self.pods: list[pods.Pod] = []
        self.daemons: list[DaemonProc] = []
        self.workers: list[pods.PodWorker] = []
        self.instance: dict[str, Any] = {}

    def start(self, layout: str, hostname: str | None = None
              ) -> tuple[pods.Pod, pods.PodWorker, DaemonProc]:
        # A node's daemon sees every pod on the machine, those of test processes running
        # beside this one too: a pod named alike there would make ours ambiguous.
        hostname = hostname or f"pod-{uuid.uuid4().hex[:8]}"
        cfg = write_config(self.tmp / f"{layout}.toml", self.redis_url, self.dsn,
                           instance={"name": f"rqr-{layout}", **self.instance},
                           cancel={"grace_seconds": 5.0, "lease_seconds": 20.0,
                                   "handover_seconds": 1.0},
                           sweep={"interval_seconds": 300.0, "min_age_seconds": 60.0})
        migrate(cfg)
        pod = pods.Pod(self.tmp, hostname, self.redis_url)
        self.pods.append(pod)
        worker = pods.PodWorker(pod, self.redis_url, self.tmp, self.rq_version)
        self.workers.append(worker)
        worker.wait_registered()
        daemon = pods.start_daemon(layout, pod, cfg, self.tmp / f"daemon-{layout}.log")
        self.daemons.append(daemon)
        return pod, worker, daemon

    def running_job(self, name: str) -> tuple[int, str, Path]:
        marker = self.tmp / f"{name}.txt"
        marker.touch()
        rq_id = enqueue(self.redis_url, JOB, 120, str(marker), job_timeout=300)
        jid = insert_job(self.dsn, rq_id, status="running", started_ago=0)
        pods.wait_file_line(marker, "STARTED")
        return jid, rq_id, marker

    def close(self) -> None:
        for d in self.daemons:
            pods.stop_daemon(d)
        for p in self.pods:
            p.stop()
        for w in self.workers:
            w.close()


@pytest.fixture
def setup(tmp_path: Path, redis_url: str, pg_dsn: str, rq_version: str) -> Iterator[Setup]:
    s = Setup(tmp_path, redis_url, pg_dsn, rq_version)
    yield s
    s.close()


def _cancel(s: Setup, jid: int) -> dict[str, Any]:
    with Pg(s.dsn) as pg:
        return wait_request(pg, request_cancel(pg, jid), timeout=60)


def test_sidecar_cancel_is_graceful(setup: Setup) -> None:
    _pod, worker, daemon = setup.start("sidecar")
    jid, rq_id, marker = setup.running_job("sidecar-cancel")
    req = _cancel(setup, jid)
    assert req["outcome"] == "cancelled", req
    detail = req["detail"]
    assert detail["horse_signals"] == ["SIGTERM"], detail
    assert detail["graceful"] is True, detail
    assert metric_value(daemon.scrape(), "rq_reconciler_graceful_stop_available") == 1
    assert _check_in(_pod, "sidecar", setup).startswith("OK"), "check agrees"
    assert detail["path"] == "local" and detail["instance"] == "rqr-sidecar", detail
    assert "SIGTERM" in marker.read_text(), "the job's own handler never ran"
    assert rq_status(setup.redis_url, rq_id) == "canceled"
    with Pg(setup.dsn) as pg:
        assert pg.val("SELECT status FROM training_jobs WHERE id = $1", jid) == "cancelled"
    assert not STOP_COMMANDS & set(detail["horse_signals"])
    assert worker.proc.poll() is None, "the worker itself must live on"
    assert not [c for c in STOP_COMMANDS if c in daemon.log_text()]


def test_sidecar_worker_sigkill_fails_the_row_at_once(setup: Setup) -> None:
    _pod, worker, daemon = setup.start("sidecar")
    jid, _rq_id, _marker = setup.running_job("sidecar-kill")
    time.sleep(0.3)
    t0 = time.monotonic()
    worker.kill()
    # Sweeps are 300 s apart and the worker's Redis key lives on for minutes: only the
    # daemon's watch on the worker's pid, in the shared PID namespace, can be this fast.
    row = wait_status(setup.dsn, jid, "failed", timeout=5)
    took = time.monotonic() - t0
    assert row["error_message"].startswith("Orphaned"), row
    events = [e.get("event") for e in daemon.log_events()]
    assert "local_worker_exited" in events, events
    print(f"sidecar: SIGKILL -> row failed in {took * 1000:.0f} ms")


def _check_in(pod: pods.Pod, layout: str, setup: Setup) -> str:
    """`rq-reconciler check` run where the daemon of `layout` runs; its graceful-stop line."""
    argv = [sys.executable, "-m", "reconciler", "check", "--config",
            str(setup.tmp / f"{layout}.toml")]
    if layout != "daemonset":
        argv = pod.container(argv, share_pid=layout == "sidecar")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=harness_env())
    return next(ln for ln in out.stdout.splitlines() if "graceful stop" in ln)


def test_separate_pid_namespace_cancel_falls_back_to_stop_job(setup: Setup) -> None:
    pod, worker, daemon = setup.start("separate")
    line = _check_in(pod, "separate", setup)
    assert line.startswith("WARN") and "shareProcessNamespace" in line, line
    jid, rq_id, marker = setup.running_job("separate-cancel")
    req = _cancel(setup, jid)
    # It cannot see the worker's processes: RQ's stop-job (an immediate SIGKILL), said so.
    assert req["outcome"] == "cancelled", req
    detail = req["detail"]
    assert detail["path"] == "stop-job", detail
    assert "SIGTERM" not in detail["horse_signals"], detail
    assert detail["graceful"] is False, detail  # never reads as a graceful stop
    # ... and the replica said so when it found the worker, and says so to Prometheus.
    warned = [e for e in daemon.log_events() if e.get("event") == "graceful_stop_unavailable"]
    assert warned and "shareProcessNamespace" in warned[0]["fix"], warned
    assert metric_value(daemon.scrape(), "rq_reconciler_graceful_stop_available") == 0
    assert "SIGTERM" not in marker.read_text()
    assert rq_status(setup.redis_url, rq_id) in ("stopped", "canceled")
    assert worker.proc.poll() is None


def test_separate_pid_namespace_never_takes_another_process_for_the_worker(setup: Setup) -> None:
    _pod, worker, daemon = setup.start("separate")
    jid, _rq_id, _marker = setup.running_job("separate-cancel")
    _cancel(setup, jid)
    jid2, _, _ = setup.running_job("separate-alive")
    time.sleep(2.0)
    with Pg(setup.dsn) as pg:
        assert pg.val("SELECT status FROM training_jobs WHERE id = $1", jid2) == "running"
    assert "local_worker_exited" not in [e.get("event") for e in daemon.log_events()]
    assert worker.proc.poll() is None


def test_daemonset_cancel_is_graceful(setup: Setup) -> None:
    _pod, worker, daemon = setup.start("daemonset")
    jid, rq_id, marker = setup.running_job("daemonset-cancel")
    req = _cancel(setup, jid)
    assert req["outcome"] == "cancelled", req
    detail = req["detail"]
    assert detail["horse_signals"] == ["SIGTERM"], detail
    assert detail["graceful"] is True, detail
    assert detail["path"] == "local" and detail["instance"] == "rqr-daemonset", detail
    assert "SIGTERM" in marker.read_text(), "the job's own handler never ran"
    assert rq_status(setup.redis_url, rq_id) == "canceled"
    assert metric_value(daemon.scrape(), "rq_reconciler_graceful_stop_available") == 1
    assert worker.proc.poll() is None, "the worker itself must live on"
    assert not [c for c in STOP_COMMANDS if c in daemon.log_text()]


def test_daemonset_worker_sigkill_fails_the_row_at_once(setup: Setup) -> None:
    """The node's daemon maps the pod's worker to its own pid (NSpid, the pod's UTS
    hostname, birth) and watches that process: its death is seen at once."""
    _pod, worker, daemon = setup.start("daemonset")
    jid, _rq_id, _marker = setup.running_job("daemonset-kill")
    time.sleep(0.3)
    t0 = time.monotonic()
    worker.kill()
    row = wait_status(setup.dsn, jid, "failed", timeout=5)
    took = time.monotonic() - t0
    assert row["error_message"].startswith("Orphaned"), row
    events = [e.get("event") for e in daemon.log_events()]
    assert "local_worker_exited" in events, events
    print(f"daemonset: SIGKILL -> row failed in {took * 1000:.0f} ms")


def test_daemonset_without_host_pid_never_takes_the_worker_for_dead(setup: Setup) -> None:
    """host_pid = "off": the pod's worker is remote to the node's daemon: safe (nothing
    alive is judged dead, nor is a dead one at once), not graceful."""
    setup.instance = {"host_pid": "off"}
    _pod, worker, daemon = setup.start("daemonset")
    jid, _rq_id, marker = setup.running_job("daemonset-off")
    req = _cancel(setup, jid)
    assert req["outcome"] == "cancelled", req
    assert req["detail"]["path"] == "stop-job", req["detail"]
    assert req["detail"]["graceful"] is False, req["detail"]
    assert "SIGTERM" not in marker.read_text()
    jid2, _, _ = setup.running_job("daemonset-alive")
    worker.kill()
    time.sleep(2.0)
    with Pg(setup.dsn) as pg:  # its death is not seen at once either (Redis TTL / sweep)
        assert pg.val("SELECT status FROM training_jobs WHERE id = $1", jid2) == "running"
    assert "local_worker_exited" not in [e.get("event") for e in daemon.log_events()]


# Alone: once in the gate, beside three other test processes, the other replica logged no
# stale listing within 90 s (rq3); alone it has always passed. Unexplained: see the note.
@pytest.mark.alone
def test_a_sidecar_pod_killed_whole_fails_its_row_once_its_replica_goes_stale(
        setup: Setup) -> None:
    """The pod's PID 1 is SIGKILLed: worker, horse and sidecar replica die together. A
    replica on another host cannot see the pid; it sees the worker's command channel
    empty and the sidecar's registry heartbeat stale (liveness rule 4), and fails the row
    then, not when the worker's Redis key expires (~90 s) or at the next sweep (300 s)."""
    from reconciler.replicas_table import REPLICA_STALE_SECONDS
    from reconciler.rq_state import PUBSUB_SETTLE_SECONDS

    pod, worker, _sidecar = setup.start("sidecar")
    cfg = write_config(setup.tmp / "other.toml", setup.redis_url, setup.dsn,
                       instance={"name": "rqr-other"},
                       sweep={"interval_seconds": 300.0, "min_age_seconds": 60.0})
    other_pod = pods.Pod(setup.tmp, "pod-other", setup.redis_url)
    setup.pods.append(other_pod)
    other = pods.start_daemon("sidecar", other_pod, cfg, setup.tmp / "daemon-other.log")
    setup.daemons.append(other)
    jid, _rq_id, _marker = setup.running_job("pod-killed")
    with Pg(setup.dsn) as pg:
        wait_until(lambda: pg.val("SELECT count(*) FROM rq_reconciler_replicas WHERE "
                                  "instance = 'rqr-sidecar' AND $1 = ANY(workers)",
                                  worker.name) == 1, 30, "the sidecar to list its worker")
    time.sleep(1.0)  # the other replica has seen the job start (a keyspace event)
    # A Redis up for less than PUBSUB_SETTLE_SECONDS has lost its subscriptions a moment
    # ago: its NUMSUB 0 says nothing, and rightly so. Wait for the test's Redis to settle.
    with redis.Redis.from_url(setup.redis_url) as r:
        up = int(r.info("server")["uptime_in_seconds"])
    time.sleep(max(0.0, PUBSUB_SETTLE_SECONDS + 1 - up))
    t0 = time.monotonic()
    os.kill(pod.init_pid, signal.SIGKILL)
    row = wait_status(setup.dsn, jid, "failed", timeout=REPLICA_STALE_SECONDS + 75)
    took = time.monotonic() - t0
    # Judged by the rule for a pod gone whole (its sidecar's heartbeat stale, nobody on the
    # worker's channel), not by the worker's hash expiring a minute or more later.
    assert row["error_message"].startswith("Orphaned"), row
    assert "stopped heartbeating" in row["error_message"], row
    events = [e for e in other.log_events() if e.get("event") == "worker_replicas_stale"]
    assert events and worker.name in events[0]["workers"], events
    print(f"sidecar pod killed whole: row failed in {took:.1f} s "
          f"(replica stale after {REPLICA_STALE_SECONDS:g} s)")
