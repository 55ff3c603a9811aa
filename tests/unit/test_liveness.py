"""liveness.judge: whether a worker is gone, on facts that cannot lie across hosts.

Tables for each rule, and properties (hypothesis): no wall clock enters the verdict (the
heartbeat values may sit anywhere in time), a live local process is never dead, and a
silent command channel alone never kills a worker whose heartbeat is on time."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import assume, given
from hypothesis import strategies as st

from reconciler.liveness import SILENT_SECONDS, Memory, Seen, judge
from reconciler.rq_layout import HEARTBEAT_STALE_SECONDS, WorkerRecord

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def rec(hb: datetime | None = T0, *, subs: int = 1, expires_in: float | None = 80.0,
        persistent: bool = False, death: bool = False, exists: bool = True,
        unreadable: bool = False) -> WorkerRecord:
    return WorkerRecord("w", exists, birth=T0, last_heartbeat=hb, pid=10, hostname="elsewhere",
                        death=death, subscribers=subs, unreadable=unreadable,
                        persistent=persistent, expires_in=None if persistent else expires_in)


def run(readings: list[tuple[float, WorkerRecord]], pid_gone: str | None = None,
        owner_stale: bool = False) -> list[str]:
    """The verdicts of a sequence of (monotonic instant, reading) of one worker."""
    seen: Seen | None = None
    out = []
    for now, r in readings:
        why, seen = judge(r, "w", seen, now, pid_gone=pid_gone, owner_stale=owner_stale)
        out.append(why)
    return out


def test_the_server_holding_the_hash_is_a_fresh_heartbeat_however_old_its_value() -> None:
    # A worker host ten minutes (or ten years) behind ours: its values are "old", and only
    # their changes matter.
    old = T0 - timedelta(days=3650)
    assert run([(0.0, rec(old)), (10_000.0, rec(old + timedelta(seconds=1)))]) == ["", ""]


def test_a_missing_hash_or_a_recorded_death_is_gone_and_forgotten() -> None:
    why, seen = judge(rec(exists=False), "w", Seen(T0, 0.0), 1.0, pid_gone=None)
    assert "is missing" in why and seen is None
    assert judge(None, "w", None, 1.0, pid_gone=None)[0]
    assert judge(rec(death=True), "w", None, 1.0, pid_gone=None)[0] == "worker registered its death"


def test_an_unreadable_hash_says_nothing() -> None:
    prev = Seen(T0, 0.0, 0.0)
    assert judge(rec(unreadable=True, subs=0), "w", prev, 1e6, pid_gone=None) == ("", prev)


def test_a_hash_that_never_expires_is_judged_by_its_heartbeat_changing_on_our_clock() -> None:
    r = rec(persistent=True)
    stale = HEARTBEAT_STALE_SECONDS + 1
    assert run([(0.0, r), (stale - 2, r)]) == ["", ""]
    assert run([(0.0, r), (stale, r)])[-1].startswith("heartbeat unchanged for")
    moved = rec(T0 + timedelta(seconds=1), persistent=True)
    assert run([(0.0, r), (stale - 2, moved), (2 * stale - 3, moved)]) == ["", "", ""]


def test_a_silent_channel_counts_only_with_a_late_heartbeat_that_stood_still() -> None:
    silent_late = rec(subs=0, expires_in=20.0)
    after = SILENT_SECONDS + 1
    assert run([(0.0, silent_late), (after, silent_late)])[-1].startswith("nobody subscribed")
    # ... not while the server says the heartbeat is on time (the pub/sub thread died)
    on_time = rec(subs=0, expires_in=70.0)
    assert run([(0.0, on_time), (after * 100, on_time)]) == ["", ""]
    # ... not when the TTL is not known
    assert run([(0.0, rec(subs=0, expires_in=None)), (after * 100, rec(subs=0, expires_in=None))]) \
        == ["", ""]
    # ... not when the heartbeat moved meanwhile
    moved = rec(T0 + timedelta(seconds=5), subs=0, expires_in=20.0)
    assert run([(0.0, silent_late), (after - 5, moved), (after, moved)]) == ["", "", ""]
    # ... not when someone listened in between, or Redis could not tell (-1)
    for between in (1, -1):
        heard = rec(subs=between, expires_in=20.0)
        assert run([(0.0, silent_late), (5.0, heard), (after, silent_late)]) == ["", "", ""]


def test_a_silent_channel_whose_watching_replica_stopped_beating_is_a_gone_pod() -> None:
    """Rule 4: the worker's listener and the replica beside it both gone: at the first
    reading, whatever the heartbeat and its TTL say."""
    why, _ = judge(rec(subs=0, expires_in=85.0), "w", None, 0.0, pid_gone=None, owner_stale=True)
    assert "stopped heartbeating" in why and "rq:pubsub:w" in why
    # Either one alone is not enough.
    assert judge(rec(subs=1), "w", None, 0.0, pid_gone=None, owner_stale=True)[0] == ""
    assert judge(rec(subs=0), "w", None, 0.0, pid_gone=None, owner_stale=False)[0] == ""
    # Redis could not tell who listens (-1, just restarted): nothing.
    assert judge(rec(subs=-1), "w", None, 0.0, pid_gone=None, owner_stale=True)[0] == ""
    # This host's proof of a live process wins.
    assert judge(rec(subs=0), "w", None, 0.0, pid_gone="", owner_stale=True)[0] == ""
    # A reading that says nothing still says nothing.
    assert judge(rec(subs=0, unreadable=True), "w", None, 0.0, pid_gone=None,
                 owner_stale=True)[0] == ""


def test_memory_is_bounded_and_forgets_the_gone_and_the_unregistered() -> None:
    m = Memory(cap=3)
    for i in range(5):
        m.judge(f"w{i}", rec(), 0.0, pid_gone=None)
    assert len(m) == 3 and "w0" not in m and "w4" in m
    m.judge("w4", rec(exists=False), 1.0, pid_gone=None)
    assert "w4" not in m
    m.keep_only({"w3"})
    assert len(m) == 1 and "w3" in m
    m.judge("w3", rec(), 2.0, pid_gone="pid 10 is dead")
    assert len(m) == 0


# -- properties -------------------------------------------------------------------------

records = st.builds(
    rec,
    hb=st.one_of(st.none(), st.datetimes(timezones=st.just(UTC))),
    subs=st.sampled_from([-1, 0, 1, 2]),
    expires_in=st.one_of(st.none(), st.floats(0, 1000)),
    persistent=st.booleans(),
    death=st.booleans(),
    exists=st.booleans(),
    unreadable=st.booleans(),
)
readings = st.lists(st.tuples(st.floats(0, 10.0 * HEARTBEAT_STALE_SECONDS), records),
                    max_size=12).map(lambda rs: sorted(rs, key=lambda x: x[0]))


@given(readings)
def test_a_live_local_process_is_never_dead(rs: list[tuple[float, WorkerRecord]]) -> None:
    assert set(run(rs, pid_gone="")) <= {""}


@given(readings, st.text(min_size=1, max_size=20))
def test_a_dead_local_process_is_always_dead(rs: list[tuple[float, WorkerRecord]],
                                             why: str) -> None:
    assert all(v == why for v in run(rs, pid_gone=why))


@given(readings, st.timedeltas(min_value=timedelta(days=-3650), max_value=timedelta(days=3650)))
def test_no_wall_clock_enters_the_verdict(rs: list[tuple[float, WorkerRecord]],
                                          shift: timedelta) -> None:
    """Every heartbeat value moved by the same amount (the worker host's clock set
    anywhere): the same verdicts."""
    def moved(r: WorkerRecord) -> WorkerRecord:
        if r.last_heartbeat is None:
            return r
        try:
            return replace(r, last_heartbeat=r.last_heartbeat + shift)
        except OverflowError:
            assume(False)
            raise

    assert run(rs) == run([(t, moved(r)) for t, r in rs])


@given(st.floats(1.0, 120.0), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
       st.sampled_from([0, 1, -1]))
def test_a_worker_heartbeating_on_time_is_never_gone(interval: float, gaps: list[float],
                                                     subs: int) -> None:
    """A remote worker whose hash the server holds with its margin left (RQ re-sets
    interval + 60 s at each heartbeat), read at any instants, whoever listens on its
    channel: never gone."""
    now, out = 0.0, []
    seen: Seen | None = None
    for g in gaps:
        now += g * 3 * interval
        hb = T0 + timedelta(seconds=interval * (now // interval))
        why, seen = judge(rec(hb, subs=subs, expires_in=60.0 + interval - (now % interval)),
                          "w", seen, now, pid_gone=None)
        out.append(why)
    assert set(out) == {""}


@given(readings)
def test_a_worker_whose_listing_replica_lives_is_never_gone_by_rule_4(
        rs: list[tuple[float, WorkerRecord]]) -> None:
    """owner_stale=False (its replica beats): no verdict ever comes from rule 4."""
    out = run(rs, owner_stale=False)
    assert not [v for v in out if "stopped heartbeating" in v]


@given(readings)
def test_rule_4_needs_a_silent_channel(rs: list[tuple[float, WorkerRecord]]) -> None:
    """Someone listens on the worker's channel (or Redis cannot tell): a stale replica
    changes no verdict."""
    rs = [(t, replace(r, subscribers=max(r.subscribers, 1) if r.subscribers >= 0 else -1))
          for t, r in rs]
    assert run(rs, owner_stale=True) == run(rs)


@given(readings)
def test_a_live_local_process_is_never_dead_even_with_a_stale_replica(
        rs: list[tuple[float, WorkerRecord]]) -> None:
    assert set(run(rs, pid_gone="", owner_stale=True)) <= {""}
