"""Host-PID mode (reconciler.hostpid) against real namespaces: a "pod" is a UTS + PID
namespace made with unshare(1) whose PID 1 runs a program named rq; the daemon's side is
a Processes in this (the machine's) PID namespace. Needs root (setns into a UTS namespace)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psutil
import pytest

from reconciler import hostpid
from reconciler.devstack import wait_until
from reconciler.processes import Processes
from reconciler.procfs import to_wall
from reconciler.rq_layout import WorkerRecord

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for UTS + PID namespaces")


# Test processes run side by side, and a node's daemon sees every pod on the machine: each
# test process names its pods apart (pod-a-<RUN>), or twins would appear across them.
RUN = uuid.uuid4().hex[:6]


class FakePod:
    """PID 1 of a new UTS + PID namespace with hostname `hostname`-RUN, running `argv0`."""

    def __init__(self, hostname: str, argv0: str = "rqworker") -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--uts", "--pid", "--fork", "--kill-child", "--", "bash", "-c",
             f"hostname {hostname}-{RUN} && exec -a {argv0} sleep 60"])

        def leaf() -> int | None:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                try:  # `hostname` runs (and ends) before the exec: skip what is gone
                    if p.cmdline()[:1] == [argv0]:
                        return int(p.pid)
                except psutil.Error:
                    continue
            return None

        try:
            self.host_pid = int(wait_until(leaf, 10, "the pod's process", interval=0.01))
        except BaseException:
            self.close()
            raise

    def record(self, name: str, hostname: str, pid: int = 1,
               birth_shift: float = 0.0) -> WorkerRecord:
        created = to_wall(psutil.Process(self.host_pid).create_time() - psutil.boot_time())
        birth = datetime.fromtimestamp(created + 0.5 + birth_shift, UTC)
        return WorkerRecord(name=name, exists=True, pid=pid, hostname=f"{hostname}-{RUN}",
                            birth=birth)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def pods() -> Iterator[list[FakePod]]:
    made: list[FakePod] = []
    yield made
    for p in made:
        p.close()


def test_a_pods_worker_is_mapped_to_its_process_here(pods: list[FakePod]) -> None:
    pod = FakePod("pod-a")
    pods.append(pod)
    procs = Processes(host_pid=True)
    rec = pod.record("w-a", "pod-a")
    assert procs.is_local(rec)
    ident = procs.worker_identity(rec)
    assert ident is not None and ident.pid == pod.host_pid
    assert procs.local_worker_gone(rec) == ""
    assert procs.unseen(rec) == ""
    os.kill(pod.host_pid, 9)
    wait_until(lambda: procs.local_worker_gone(rec) != "", 5, "the death to show")
    assert procs.is_local(rec), "a dead local worker stays local: its orphaned horse is ours"


def test_off_by_default_and_never_on_a_wrong_fact(pods: list[FakePod]) -> None:
    pod = FakePod("pod-b")
    pods.append(pod)
    assert not Processes().is_local(pod.record("w-b", "pod-b"))  # host_pid defaults off
    procs = Processes(host_pid=True)
    assert not procs.is_local(pod.record("w-1", "pod-x"))  # another hostname
    assert not procs.is_local(pod.record("w-2", "pod-b", pid=2))  # another pid in the pod
    assert not procs.is_local(pod.record("w-3", "pod-b", birth_shift=3600))  # far older than its birth
    assert not procs.is_local(pod.record("w-4", "pod-b", birth_shift=-3600))  # born after it: recycled
    # ... and a miss is remembered: no second scan of /proc for the same record.
    rec = pod.record("w-1", "pod-x")
    t0 = time.perf_counter()
    for _ in range(1000):
        assert not procs.is_local(rec)
    assert time.perf_counter() - t0 < 0.5


def test_a_process_that_does_not_run_rq_is_not_a_worker(pods: list[FakePod]) -> None:
    pod = FakePod("pod-c", argv0="sleeper")
    pods.append(pod)
    assert not Processes(host_pid=True).is_local(pod.record("w-c", "pod-c"))


def test_two_candidates_are_ambiguous_never_a_guess(pods: list[FakePod]) -> None:
    a, b = FakePod("pod-twin"), FakePod("pod-twin")
    pods += [a, b]
    assert not Processes(host_pid=True).is_local(a.record("w-twin", "pod-twin"))


def test_uts_names_are_read_once_per_namespace(pods: list[FakePod]) -> None:
    pod = FakePod("pod-d")
    pods.append(pod)
    names = hostpid.UtsNames()
    assert names.nodename(pod.host_pid, lambda: True) == f"pod-d-{RUN}"
    assert names.nodename(os.getpid(), lambda: True) == os.uname().nodename
    assert names.nodename(pod.host_pid, lambda: False) is None  # not the process meant
    assert len(names._names) == 2
    for _ in range(100):
        assert names.nodename(pod.host_pid, lambda: True) == f"pod-d-{RUN}"
    assert len(names._names) == 2  # read once per namespace, then from the cache


def test_decide() -> None:
    assert hostpid.decide("off") == (False, 'host_pid = "off"')
    assert hostpid.decide("auto")[0] == hostpid.initial_pid_namespace()  # root here
    assert hostpid.decide("on") == (True, "")
    idx = hostpid.nspid_index()
    assert os.getpid() in idx[os.getpid()]
