"""The stop ladder in-process, against small fakes of its ports (Redis, the host's
processes, the worker tracker): which steps run, in which order, and what they report."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from reconciler import stop as stop_mod
from reconciler.aio import TaskSet
from reconciler.config import from_mapping
from reconciler.liveness import judge
from reconciler.model import RqJob, RqStatus, WorkerState
from reconciler.processes import OrphanedHorse
from reconciler.procfs import ProcIdentity
from reconciler.rq_layout import DEFAULT_KEYS, WorkerRecord
from reconciler.stop import HorseStop, Stopper

HORSE = ProcIdentity(4242, 1.0)


@dataclass
class FakeRq:
    worker: WorkerRecord | None
    status: RqStatus = RqStatus.STARTED
    receivers: int = 1
    sent: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    on_stop_job: Any = None
    keys: Any = DEFAULT_KEYS

    async def read_workers(self, names: Any) -> dict[str, WorkerRecord]:
        return {n: self.worker for n in names if self.worker is not None and n == self.worker.name}

    async def read_jobs(self, ids: Any) -> dict[str, RqJob]:
        return {i: RqJob(i, self.status, worker_name="w1") for i in ids}

    async def send_stop_job(self, worker: str, job_id: str, rec: WorkerRecord | None = None) -> int:
        self.sent.append(f"stop-job:{worker}:{job_id}")
        if self.on_stop_job is not None:
            self.on_stop_job()
        return self.receivers

    async def cancel_job(self, job_id: str, *, only_from: Any) -> str:
        self.cancelled.append(job_id)
        return "canceled"


@dataclass
class FakeProcs:
    """A horse that dies on the first signal in `dies_on` (and tells the fake Redis)."""

    rq: FakeRq
    local: bool = True
    worker_dead: str = ""
    horse: ProcIdentity | None = HORSE
    dies_on: tuple[str, ...] = ("SIGTERM",)
    alive: bool = True
    signals: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    reap: bool = True
    leftovers: tuple[int, ...] = ()
    orphaned: OrphanedHorse = field(default_factory=OrphanedHorse)

    def is_local(self, rec: WorkerRecord) -> bool:
        return self.local

    def local_worker_gone(self, rec: WorkerRecord) -> str:
        return self.worker_dead

    def tracked_horse(self, job_id: str) -> ProcIdentity | None:
        return self.horse if self.alive else None

    def orphaned_horse(self, worker_name: str, job_id: str,
                       started_at: Any) -> OrphanedHorse:
        return self.orphaned

    def signal_horse(self, ident: ProcIdentity, sig: Any) -> bool:
        if not self.alive:
            return False
        self.signals.append(sig.name)
        if sig.name in self.dies_on:
            self.die()
        return True

    def die(self) -> None:
        self.alive = False
        if self.reap:
            self.rq.status = RqStatus.STOPPED

    async def wait_exit(self, ident: ProcIdentity, timeout: float) -> bool:
        await asyncio.sleep(0)
        return not self.alive

    def forget(self, job_id: str) -> None:
        self.forgotten.append(job_id)

    async def kill_leftovers(self, leader: ProcIdentity) -> list[int]:
        self.signals.append("SIGKILL:group")
        return list(self.leftovers)


class FakeWorkers:
    def __init__(self, procs: FakeProcs) -> None:
        self.procs = procs
        self.proofs = 0

    async def prove_horse(self, worker: str, job_id: str, started_at: Any) -> ProcIdentity | None:
        self.proofs += 1
        return self.procs.horse

    def state(self, name: str, rec: WorkerRecord | None) -> WorkerState:
        """Workers.state on the fake host: the pure judgment, one reading, no memory."""
        local = rec is not None and rec.exists and self.procs.is_local(rec)
        pid_gone = self.procs.local_worker_gone(rec) if local and rec is not None else None
        why, _ = judge(rec, name, None, 0.0, pid_gone=pid_gone)
        return WorkerState(name, why, local)


def worker(name: str = "w1") -> WorkerRecord:
    now = datetime.now(UTC)
    return WorkerRecord(name, True, birth=now, last_heartbeat=now, pid=100, hostname="h",
                        current_job="j1", subscribers=1)


def make(procs_kw: dict[str, Any] | None = None, rq_kw: dict[str, Any] | None = None,
         grace: float = 0.05) -> tuple[Stopper, FakeRq, FakeProcs]:
    rq = FakeRq(worker(), **(rq_kw or {}))
    procs = FakeProcs(rq, **(procs_kw or {}))
    cfg = from_mapping({"cancel": {"grace_seconds": grace}})
    stopper = Stopper(cfg, rq, procs, FakeWorkers(procs), TaskSet("test"))  # type: ignore[arg-type]
    return stopper, rq, procs


@pytest.fixture(autouse=True)
def _short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stop_mod, "WORKER_REAP_SECONDS", 0.05)
    monkeypatch.setattr(stop_mod, "KILL_AFTER_STOP_JOB_SECONDS", 0.01)
    monkeypatch.setattr(stop_mod, "FIND_HORSE_SECONDS", 0.01)


async def test_a_horse_that_obeys_sigterm_gets_nothing_else() -> None:
    s, rq, procs = make()
    res = await s.stop("j1", "w1", None)
    assert res.signals == ["SIGTERM"] and res.stopped and not res.wedged and not res.orphan
    assert rq.sent == [] and procs.forgotten == ["j1"]
    assert procs.signals == ["SIGTERM", "SIGKILL:group"]  # the group is swept once it ended
    assert s.recent["j1"] is res


async def test_sigterm_ignored_then_stop_job_then_nothing_more() -> None:
    s, rq, procs = make()
    rq.on_stop_job = procs.die
    procs.dies_on = ()
    res = await s.stop("j1", "w1", None)
    assert res.signals == ["SIGTERM", "stop-job"] and res.stopped
    assert procs.signals == ["SIGTERM", "SIGKILL:group"]


async def test_every_step_for_a_horse_that_ignores_all_but_sigkill() -> None:
    s, _rq, _procs = make({"dies_on": ("SIGKILL",)})
    res = await s.stop("j1", "w1", None)
    assert res.signals == ["SIGTERM", "stop-job", "SIGKILL"] and res.stopped


async def test_a_horse_that_survives_sigkill_is_reported() -> None:
    s, _rq, _procs = make({"dies_on": ()})
    res = await s.stop("j1", "w1", None)
    assert not res.stopped and "survived SIGKILL" in res.message


async def test_a_zero_receiver_count_alone_is_no_stop_of_a_worker_not_proven_gone() -> None:
    """A live worker whose pub/sub thread died hears nothing: its job may run on, so the
    cancel must not report it stopped (the worker is gone only by liveness' facts)."""
    s, _rq, procs = make({"local": False}, {"receivers": 0})
    res = await s.stop("j1", "w1", None)
    assert res.signals == ["stop-job"] and not res.orphan and not res.stopped
    assert procs.signals == [] and "nothing proves it gone" in res.message


async def test_dead_local_worker_without_a_proven_horse_signals_nothing() -> None:
    s, rq, _procs = make({"worker_dead": "pid 100 is dead", "horse": None})
    res = await s.stop("j1", "w1", None)
    assert res.orphan and not res.stopped and res.signals == []
    assert "was not signalled" in res.message and rq.sent == []


async def test_dead_local_worker_whose_horse_is_found_orphaned_gets_the_ladder() -> None:
    """The worker died before the horse was proven: the process its fork left is."""
    s, rq, procs = make({"worker_dead": "pid 100 is dead", "horse": None})
    procs.orphaned = OrphanedHorse(horse=HORSE, why="the one horse left in its session")
    res = await s.stop("j1", "w1", None)
    assert res.signals == ["SIGTERM"] and res.orphan and res.stopped and rq.sent == []


async def test_dead_local_worker_that_left_no_process_is_an_orphan_without_signals() -> None:
    s, rq, procs = make({"worker_dead": "pid 100 is dead", "horse": None})
    procs.orphaned = OrphanedHorse(absent=True, why="no process of its session 100 is left")
    res = await s.stop("j1", "w1", None)
    assert res.orphan and res.stopped and res.signals == [] and rq.sent == []
    assert "no process of its session" in res.message


async def test_dead_local_worker_with_a_proven_horse_is_an_orphan_stop_without_stop_job() -> None:
    s, rq, _procs = make({"worker_dead": "pid 100 is dead", "dies_on": ("SIGKILL",)})
    res = await s.stop("j1", "w1", None)
    assert res.signals == ["SIGTERM", "SIGKILL"] and res.orphan and res.stopped
    assert rq.sent == []  # no worker to ask


async def test_a_worker_that_never_records_the_end_is_wedged() -> None:
    s, _rq, _procs = make({"reap": False})
    res = await s.stop("j1", "w1", None)
    assert res.stopped and res.wedged and "wedged" in res.message


async def test_concurrent_callers_share_one_ladder() -> None:
    s, _rq, procs = make({"dies_on": ("SIGKILL",)})
    a, b = await asyncio.gather(s.stop("j1", "w1", None), s.stop("j1", "w1", None))
    assert a is b and procs.signals.count("SIGTERM") == 1


async def test_stops_for_reconcile_are_owned_tasks() -> None:
    s, rq, procs = make()
    s.stop_for_reconcile([HorseStop(1, "j1", "w1", "cancel requested", for_cancel=True)])
    assert len(s.tasks) == 1
    assert await s.tasks.drain(1)
    assert procs.signals[0] == "SIGTERM" and rq.cancelled == ["j1"]


async def test_an_orphans_stop_does_not_call_its_job_canceled() -> None:
    s, rq, procs = make()
    s.stop_for_reconcile([HorseStop(1, "j1", "w1", "Orphaned: worker w1 is gone")])
    assert await s.tasks.drain(1)
    assert procs.signals[0] == "SIGTERM" and rq.cancelled == []


async def test_leftovers_of_the_group_are_reported() -> None:
    s, _rq, _procs = make({"leftovers": (777,)})
    res = await s.stop("j1", "w1", None)
    assert res.signals == ["SIGTERM", "SIGKILL:leftovers"] and res.stopped


async def test_a_surviving_horse_leaves_its_group_alone() -> None:
    s, _rq, procs = make({"dies_on": ()})
    await s.stop("j1", "w1", None)
    assert "SIGKILL:group" not in procs.signals
