"""requeue_policy.orphan_verdict: tables and properties (never two copies, never more runs
than the policy allows, a cancel always wins), and the [orphans] keys of the config."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.config import ConfigError, OrphansConfig, from_mapping
from reconciler.requeue_policy import (
    Cause,
    Horse,
    Kind,
    OrphanFacts,
    orphan_verdict,
    requeue_delay,
    rq_retry_interval,
)
from reconciler.rq_layout import orphan_job_from_reply

RETRIES = OrphansConfig()
ALWAYS = OrphansConfig(requeue="always", max_requeues=2, requeue_delay_seconds=5.0)
NEVER = OrphansConfig(requeue="never")
GONE = OrphanFacts(worker="w1", horse=Horse.GONE, gone_because="pid 1 is dead")


@pytest.mark.parametrize(
    ("policy", "facts", "kind", "cause", "delay", "spend", "text"),
    [
        # "retries": RQ's own rule.
        (RETRIES, GONE._replace(retries_left=2), Kind.REQUEUE, Cause.WORKER_DIED, 0.0, True, ""),
        (RETRIES, GONE._replace(retries_left=2, retry_intervals=(10, 60)), Kind.REQUEUE,
         Cause.WORKER_DIED, 10.0, True, ""),
        (RETRIES, GONE._replace(retries_left=1, retry_intervals=(10, 60)), Kind.REQUEUE,
         Cause.WORKER_DIED, 60.0, True, ""),
        (RETRIES, GONE._replace(retries_left=0), Kind.FAIL, None, 0.0, False,
         "Orphaned: worker w1 is gone (pid 1 is dead)"),
        (RETRIES, GONE, Kind.FAIL, None, 0.0, False, "Orphaned: worker w1 is gone (pid 1 is dead)"),
        (RETRIES, GONE._replace(shutdown_requested=True), Kind.REQUEUE, Cause.DISRUPTION, 0.0,
         False, ""),
        (RETRIES, GONE._replace(shutdown_requested=True, disruptions=10), Kind.FAIL, None, 0.0,
         False, "Orphaned: worker w1 is gone (pid 1 is dead)"),
        (RETRIES, GONE._replace(shutdown_requested=True, disruptions=10, retries_left=1),
         Kind.REQUEUE, Cause.WORKER_DIED, 0.0, True, ""),
        # "always": up to max_requeues, delay doubling.
        (ALWAYS, GONE, Kind.REQUEUE, Cause.WORKER_DIED, 5.0, False, ""),
        (ALWAYS, GONE._replace(requeues=1), Kind.REQUEUE, Cause.WORKER_DIED, 10.0, False, ""),
        (ALWAYS, GONE._replace(requeues=2), Kind.FAIL, None, 0.0, False,
         "Orphaned: worker w1 is gone (requeued 2 times)"),
        (ALWAYS, GONE._replace(requeues=2, shutdown_requested=True), Kind.REQUEUE,
         Cause.DISRUPTION, 0.0, False, ""),
        # "never": fails, disruption or not.
        (NEVER, GONE._replace(retries_left=3, shutdown_requested=True), Kind.FAIL, None, 0.0,
         False, "Orphaned: worker w1 is gone (pid 1 is dead)"),
        # The horse first, and a cancel above all.
        (ALWAYS, GONE._replace(horse=Horse.RUNNING), Kind.WAIT, None, 0.0, False,
         "its horse is not proven gone"),
        (ALWAYS, GONE._replace(horse=Horse.UNKNOWN), Kind.FAIL, None, 0.0, False,
         "Orphaned: worker w1 is gone (pid 1 is dead); its horse is unknown here"),
        (ALWAYS, GONE._replace(cancel=True), Kind.WAIT, None, 0.0, False, "a cancel is pending"),
        (RETRIES, GONE._replace(cancel=True, retries_left=3), Kind.WAIT, None, 0.0, False,
         "a cancel is pending"),
    ],
)
def test_verdicts(policy: OrphansConfig, facts: OrphanFacts, kind: Kind, cause: Cause | None,
                  delay: float, spend: bool, text: str) -> None:
    v = orphan_verdict(policy, facts)
    assert (v.kind, v.cause, v.delay, v.spend_retry, v.text) == (kind, cause, delay, spend, text)


def test_rq_retry_interval_is_rqs() -> None:
    # rq/job.py get_retry_interval: index = max(len(intervals) - retries_left, 0)
    assert rq_retry_interval(3, (1, 2, 3)) == 1
    assert rq_retry_interval(1, (1, 2, 3)) == 3
    assert rq_retry_interval(5, (7,)) == 7
    assert rq_retry_interval(2, ()) == 0


def test_delay_doubles_and_is_capped() -> None:
    p = OrphansConfig(requeue="always", requeue_delay_seconds=1.5)
    assert [requeue_delay(p, n) for n in range(4)] == [1.5, 3.0, 6.0, 12.0]
    assert requeue_delay(p, 10_000) == 86400.0
    assert requeue_delay(OrphansConfig(), 3) == 0.0


policies = st.builds(
    OrphansConfig,
    requeue=st.sampled_from(["retries", "always", "never"]),
    max_requeues=st.integers(0, 5),
    requeue_delay_seconds=st.sampled_from([0.0, 0.5, 3.0]),
    max_disruptions=st.integers(0, 5),
)
facts = st.builds(
    OrphanFacts,
    worker=st.text(max_size=5),
    horse=st.sampled_from(list(Horse)),
    cancel=st.booleans(),
    shutdown_requested=st.booleans(),
    retries_left=st.none() | st.integers(-1, 5),
    retry_intervals=st.lists(st.integers(0, 100), max_size=4).map(tuple),
    requeues=st.integers(0, 8),
    disruptions=st.integers(0, 8),
)


@given(policies, facts)
def test_never_two_copies_and_a_cancel_wins(policy: OrphansConfig, f: OrphanFacts) -> None:
    v = orphan_verdict(policy, f)
    if v.requeue:
        assert f.horse is Horse.GONE
        assert not f.cancel
        assert policy.requeue != "never"
        assert v.delay >= 0
    if f.cancel:
        assert v.kind is Kind.WAIT
    assert orphan_verdict(policy, f) == v  # deciding twice gives the same answer


@given(policies, st.lists(st.booleans(), min_size=1, max_size=40),
       st.none() | st.integers(0, 4))
def test_never_more_runs_than_the_policy_allows(policy: OrphansConfig, drains: list[bool],
                                                retries: int | None) -> None:
    """A job whose worker dies on every run (drained first when `drains` says so) runs at
    most 1 + its allowance of requeues + max_disruptions times."""
    requeues = disruptions = 0
    left = retries
    runs = 1
    for drained in drains:
        v = orphan_verdict(policy, OrphanFacts("w", Horse.GONE, shutdown_requested=drained,
                                               retries_left=left, requeues=requeues,
                                               disruptions=disruptions))
        if not v.requeue:
            break
        runs += 1
        if v.cause is Cause.DISRUPTION:
            disruptions += 1
        else:
            requeues += 1
            if v.spend_retry:
                assert left is not None and left > 0
                left -= 1
    allowed = {"never": 0, "always": policy.max_requeues, "retries": retries or 0}[policy.requeue]
    extra = 0 if policy.requeue == "never" else policy.max_disruptions
    assert runs <= 1 + allowed + extra


def test_orphan_job_fields_read_raw() -> None:
    j = orphan_job_from_reply("j", [b"started", b"w1", b"2026-01-01T00:00:00.000000Z",
                                    b"default", b"2", b"[5, 10]", b"1"])
    assert j is not None
    assert (j.retries_left, j.retry_intervals, j.at_front_on_retry) == (2, (5, 10), True)
    assert orphan_job_from_reply("j", [None] * 7) is None
    garbage = orphan_job_from_reply("j", [b"started", b"w", b"", b"q", b"x", b"{", b"z"])
    assert garbage is not None
    assert (garbage.retries_left, garbage.retry_intervals, garbage.at_front_on_retry) == (
        None, (), False)


def test_orphans_config_defaults_and_errors() -> None:
    cfg = from_mapping({}, environ={})
    o = cfg.orphans
    assert (o.requeue, o.max_requeues, o.requeue_delay_seconds, o.max_disruptions) == (
        "retries", 2, 0.0, 10)
    cfg = from_mapping({"orphans": {"requeue": "always", "max_requeues": 0,
                                    "requeue_delay_seconds": 2, "max_disruptions": 0}},
                       environ={})
    assert cfg.orphans.requeue_delay_seconds == 2.0
    for raw, key in [
        ({"requeue": "sometimes"}, "orphans.requeue"),
        ({"max_requeues": -1}, "orphans.max_requeues"),
        ({"max_requeues": 1.5}, "orphans.max_requeues"),
        ({"max_requeues": 100_000}, "orphans.max_requeues"),
        ({"requeue_delay_seconds": -1}, "orphans.requeue_delay_seconds"),
        ({"requeue_delay_seconds": 1e9}, "orphans.requeue_delay_seconds"),
        ({"max_disruptions": -2}, "orphans.max_disruptions"),
        ({"max_disruptions": 5000}, "orphans.max_disruptions"),
    ]:
        with pytest.raises(ConfigError) as err:
            from_mapping({"orphans": raw}, environ={})
        assert err.value.key == key


def test_decide_leaves_an_orphan_to_the_policy_and_a_cancel_still_wins() -> None:
    from reconciler.config import Statuses
    from reconciler.model import Action, CancelIntent, JobRow, RqJob, RqStatus, WorkerState, decide

    s = Statuses()
    row = JobRow(1, "j", s.running)
    job = RqJob("j", RqStatus.STARTED, worker_name="w1")
    dead = WorkerState("w1", gone_because="pid 1 is dead", local=True)
    d = decide(row, job, dead, None, s, old_enough=True, requeue_orphans=True)
    assert d.to_status is None and d.action is Action.REQUEUE_ORPHAN
    d = decide(row, job, dead, None, s, old_enough=True, requeue_orphans=False)
    assert d.to_status == s.failed and d.action is Action.STOP_HORSE
    d = decide(row, job, dead, CancelIntent("u", "r"), s, old_enough=True, requeue_orphans=True)
    assert d.to_status == s.cancelled and d.action is Action.STOP_HORSE
