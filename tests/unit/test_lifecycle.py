"""Dependents that can never run, and stranded jobs: the pure judgements (lifecycle.py),
the words decide() gives them, and the parsers of the scripts' replies (rq_layout.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.config import Statuses
from reconciler.lifecycle import (
    StrandSighting,
    Verdict,
    judge,
    ripe,
    roots,
    strand_decision,
    with_causes,
)
from reconciler.model import (
    Action,
    CancelIntent,
    Doom,
    JobRow,
    Reason,
    RqJob,
    RqStatus,
    decide,
)
from reconciler.rq_layout import (
    DepNode,
    Stranded,
    dep_node,
    graph_from_reply,
    served_queues,
    strands_from_reply,
)

S = Statuses()
D = RqStatus.DEFERRED
ALICE = CancelIntent("web:alice", "clicked Cancel")


def node(jid: str, status: RqStatus, *deps: str, allow: bool = False) -> DepNode:
    return DepNode(jid, status, status.value, tuple(deps), allow)


def graph(*nodes: DepNode) -> dict[str, DepNode]:
    return {n.id: n for n in nodes}


@pytest.mark.parametrize(("root", "allow", "doomed"), [
    (RqStatus.CANCELED, False, True),
    (RqStatus.STOPPED, False, True),
    (RqStatus.FAILED, False, True),
    # RQ lets an allow_failure dependent follow a failed dependency, never a canceled or
    # stopped one (Job.dependencies_are_met).
    (RqStatus.FAILED, True, False),
    (RqStatus.CANCELED, True, True),
    (RqStatus.STOPPED, True, True),
    (RqStatus.FINISHED, False, False),
    (RqStatus.QUEUED, False, False),
    (RqStatus.STARTED, False, False),
    (RqStatus.SCHEDULED, False, False),
    (RqStatus.RATE_LIMITED, False, False),
])
def test_direct_dependency(root: RqStatus, allow: bool, doomed: bool) -> None:
    v = judge(graph(node("a", root), node("b", D, "a", allow=allow)))
    assert set(v) == {"b"}
    assert (v["b"].doom == Doom("a", "a", root)) if doomed else v["b"] == Verdict()


def test_chain_is_doomed_through_jobs_between() -> None:
    g = graph(node("a", RqStatus.FAILED), node("b", D, "a"), node("c", D, "b"),
              node("d", D, "c", allow=True))
    v = judge(g)
    assert v["b"].doom == Doom("a", "a", RqStatus.FAILED)
    assert v["c"].doom == Doom("b", "a", RqStatus.FAILED)
    # allow_failure does not save it: its dependency is cancelled, not failed
    assert v["d"].doom == Doom("c", "a", RqStatus.FAILED)
    assert roots(v) == {"a"}


def test_one_blocking_dependency_of_several_is_enough() -> None:
    g = graph(node("ok", RqStatus.FINISHED), node("run", RqStatus.STARTED),
              node("bad", RqStatus.STOPPED), node("j", D, "ok", "run", "bad"))
    assert judge(g)["j"].doom == Doom("bad", "bad", RqStatus.STOPPED)


@pytest.mark.parametrize(("g", "problem"), [
    (graph(node("a", D, "b"), node("b", D, "a")), "cycle"),
    (graph(node("a", D, "gone"), DepNode("gone", RqStatus.MISSING)), "not found"),
    (graph(node("a", D, "unread")), "was not read"),
    (graph(DepNode("a", D, readable=False)), "unreadable"),
    (graph(node("a", D, "x"), DepNode("x", RqStatus.UNKNOWN, "weird")), "weird"),
])
def test_what_cannot_be_judged_costs_that_job_only(g: dict[str, DepNode], problem: str) -> None:
    v = judge({**g, **graph(node("z", RqStatus.CANCELED), node("n", D, "z"))})
    assert v["a"].doom is None and problem in v["a"].problem
    assert v["n"].doom is not None  # the neighbour is judged all the same


def test_cycle_behind_a_doomed_dependency_is_still_doomed() -> None:
    g = graph(node("x", RqStatus.CANCELED), node("a", D, "x", "b"), node("b", D, "a"))
    v = judge(g)
    assert v["a"].doom == Doom("x", "x", RqStatus.CANCELED)
    assert v["b"].doom == Doom("a", "x", RqStatus.CANCELED)


def test_deferred_without_dependencies_may_run() -> None:
    assert judge(graph(node("a", D))) == {"a": Verdict()}


def test_spared_roots_block_nobody() -> None:
    g = graph(node("a", RqStatus.CANCELED), node("b", D, "a"))
    assert judge(g, spared={"a"}) == {"b": Verdict()}


def test_causes_name_the_request_that_ended_the_root() -> None:
    v = judge(graph(node("a", RqStatus.STOPPED), node("b", D, "a"), node("c", D, "b")))
    dooms = with_causes(v, {"a": ALICE})
    assert dooms["c"] == Doom("b", "a", RqStatus.STOPPED, ALICE)


# -- the words decide() gives a doomed row ---------------------------------------------------

def deferred_row(status: str = "queued") -> tuple[JobRow, RqJob]:
    return JobRow(1, "b", status), RqJob("b", D, "deferred")


@pytest.mark.parametrize(("doom", "to", "reason", "text"), [
    (Doom("a", "a", RqStatus.FAILED), "failed", Reason.ORPHANED,
     "Orphaned: dependency a ended failed"),
    (Doom("a", "a", RqStatus.STOPPED), "failed", Reason.ORPHANED,
     "Orphaned: dependency a ended stopped"),
    (Doom("c", "a", RqStatus.FAILED), "failed", Reason.ORPHANED,
     "Orphaned: dependency c ended canceled (its dependency a ended failed)"),
    (Doom("a", "a", RqStatus.CANCELED, ALICE), "cancelled", Reason.CANCELLED,
     "Cancelled: dependency a was cancelled (web:alice / clicked Cancel)"),
    (Doom("c", "a", RqStatus.STOPPED, ALICE), "cancelled", Reason.CANCELLED,
     "Cancelled: dependency c was cancelled (web:alice / clicked Cancel) via a"),
])
def test_doomed_row(doom: Doom, to: str, reason: Reason, text: str) -> None:
    r, j = deferred_row()
    d = decide(r, j, None, None, S, old_enough=False, doom=doom)
    assert (d.to_status, d.reason, d.error) == (to, reason, text)
    assert d.action is Action.CANCEL_RQ and d.set_completed_at
    assert d.detail["dependency"] == doom.dependency and d.detail["root"] == doom.root


def test_doom_of_a_row_with_its_own_request_uses_its_words() -> None:
    r, j = deferred_row()
    d = decide(r, j, None, CancelIntent("bob", "no"), S, old_enough=True,
               doom=Doom("a", "a", RqStatus.FAILED))
    assert d.to_status == "cancelled" and d.error == "Cancelled: bob / no"
    assert d.action is Action.CANCEL_RQ


def test_doom_only_moves_a_deferred_job() -> None:
    r, _ = deferred_row()
    doom = Doom("a", "a", RqStatus.FAILED)
    for status in (RqStatus.QUEUED, RqStatus.STARTED, RqStatus.FINISHED):
        got = decide(r, RqJob("b", status, status.value, worker_name="w"), None, None, S,
                     old_enough=True, doom=doom)
        assert got == decide(r, RqJob("b", status, status.value, worker_name="w"), None, None,
                             S, old_enough=True)


_STATUS = st.sampled_from([RqStatus.CANCELED, RqStatus.STOPPED, RqStatus.FAILED,
                           RqStatus.FINISHED, RqStatus.QUEUED, RqStatus.STARTED, D,
                           RqStatus.MISSING])


@st.composite
def graphs(draw: st.DrawFn) -> dict[str, DepNode]:
    n = draw(st.integers(1, 8))
    ids = [f"j{i}" for i in range(n)]
    out = {}
    for jid in ids:
        status = draw(_STATUS)
        deps = tuple(draw(st.lists(st.sampled_from([*ids, "outside"]), max_size=3)))
        out[jid] = node(jid, status, *deps, allow=draw(st.booleans())) if status is D \
            else node(jid, status)
    return out


@given(graphs())
def test_judging_is_total_and_consistent(g: dict[str, DepNode]) -> None:
    v = judge(g)
    # every deferred job, and only those, gets a verdict; never both a doom and a problem
    assert set(v) == {j for j, n in g.items() if n.status is D}
    for jid, verdict in v.items():
        assert not (verdict.doom and verdict.problem)
        if verdict.doom is not None:
            dep = g[verdict.doom.dependency]
            assert verdict.doom.dependency in g[jid].dependency_ids
            # the root really ended in a way nobody (or, failed, not this job) follows
            assert g[verdict.doom.root].status in (RqStatus.CANCELED, RqStatus.STOPPED,
                                                   RqStatus.FAILED)
            assert dep.status is D or dep.id == verdict.doom.root
    assert judge(g) == v  # deterministic


@given(graphs())
def test_nothing_is_doomed_while_every_dependency_may_run(g: dict[str, DepNode]) -> None:
    calm = {j: (n if n.status in (D, RqStatus.FINISHED, RqStatus.QUEUED, RqStatus.STARTED)
                else n._replace(status=RqStatus.FINISHED)) for j, n in g.items()}
    assert all(v.doom is None for v in judge(calm).values())


@given(graphs(), st.sampled_from(["queued", "running", "completed", "failed", "cancelled"]))
def test_a_terminal_row_never_changes_for_a_doom(g: dict[str, DepNode], status: str) -> None:
    doom = Doom("a", "a", RqStatus.FAILED)
    d = decide(JobRow(1, "b", status), RqJob("b", D, "deferred"), None, None, S,
               old_enough=True, doom=doom)
    if status in ("completed", "failed"):
        assert d.to_status is None
    if status == "cancelled":
        assert d.to_status is None and d.action is Action.CANCEL_RQ


# -- parsers of the scripts' replies ----------------------------------------------------------

def test_dep_node_reads_what_rq_writes() -> None:
    n = dep_node("b", [b"deferred", json.dumps(["a", "c"]).encode(), b"a", b"1"])
    assert n == DepNode("b", D, "deferred", ("a", "c"), True, True)
    # before RQ 1.8 only dependency_id
    assert dep_node("b", [b"deferred", None, b"a", None]).dependency_ids == ("a",)
    assert dep_node("b", 0).status is RqStatus.MISSING
    assert dep_node("b", [b"!ERR", b"WRONGTYPE"]).status is RqStatus.UNREADABLE
    assert not dep_node("b", [b"deferred", b"{not json", None, None]).readable
    assert not dep_node("b", [b"deferred", b'[1, 2]', None, None]).readable
    assert not dep_node("b", [b"deferred", b'["a\\u0000"]', None, None]).readable
    assert dep_node("b", [b"deferred", None, None, b"0"]).allow_failure is False


def test_graph_reply() -> None:
    nodes, cut = graph_from_reply([1, b"a", [b"failed", None, None, None], b"b",
                                   [b"deferred", b'["a"]', b"a", None], b"\xff", 0])
    assert cut and set(nodes) == {"a", "b"}
    assert graph_from_reply("garbage") == ({}, True)


def test_strands_reply() -> None:
    assert strands_from_reply([b"default", b"j1", b"q\x00", b"j2", b"high", b"j3"]) == [
        Stranded("default", "j1"), Stranded("high", "j3")]
    assert strands_from_reply(None) == []


def test_served_queues_are_those_of_live_workers() -> None:
    """Live by the server's word: w2's heartbeat reads an hour old by our clock, but its
    hash is there (Redis expires it when the heartbeats stop): it serves."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    fresh = (now - timedelta(seconds=5)).isoformat().encode()
    stale = (now - timedelta(hours=1)).isoformat().encode()
    reply = [b"w1", [b"x", fresh, None, b"default,high"],
             b"w2", [b"x", stale, None, b"low"],
             b"w3", [b"x", fresh, b"2026", b"dead"],
             b"w4", [None, None, None, None],
             b"w5", [b"!ERR"]]
    assert served_queues(reply) == {"default", "high", "low"}


# -- stranded jobs ---------------------------------------------------------------------------

def test_ripeness() -> None:
    s = StrandSighting("q", "j", 10.0)
    assert not ripe(s, 10.4, 0.5) and ripe(s, 10.5, 0.5)


@pytest.mark.parametrize("status", ["queued", "running"])
def test_strand_decisions(status: str) -> None:
    r = JobRow(1, "j", status)
    d = strand_decision(r, S, requeue=True, worker="w1", queue="default")
    assert (d.to_status, d.reason, d.error) == (status, Reason.REQUEUED, "")
    assert d.detail["cause"] == "stranded" and d.detail["worker"] == "w1"
    d = strand_decision(r, S, requeue=False, worker="w1", queue="default")
    assert (d.to_status, d.reason, d.error) == ("failed", Reason.ORPHANED,
                                               "Orphaned: worker w1 is gone")
    for terminal in ("completed", "failed", "cancelled"):
        assert strand_decision(JobRow(1, "j", terminal), S, requeue=True, worker="w",
                               queue="q").to_status is None


def test_layout_literals_are_rqs_own() -> None:
    """The graph and strands reads use literal key shapes; they must be RQ's."""
    import redis as redis_py
    from rq.job import Job
    from rq.queue import Queue
    from rq.registry import StartedJobRegistry

    from reconciler import rq_layout
    from reconciler.rq_api import IMPORTED_PREFIX, tail

    conn = redis_py.Redis()  # never connected: only key names are built
    k = rq_layout.Keys(IMPORTED_PREFIX)
    assert Job.dependents_key_for("x") == k.job + "x" + rq_layout.DEPENDENTS_SUFFIX
    assert tail(Queue.redis_queues_keys) == rq_layout.QUEUES_SET
    q = Queue("q", connection=conn)
    assert q.registry_cleaning_key == IMPORTED_PREFIX + rq_layout.MAINTENANCE_LOCK + "q"
    assert StartedJobRegistry("q", connection=conn).key == \
        IMPORTED_PREFIX + rq_layout.STARTED_REGISTRY + "q"
    assert q.intermediate_queue_key == k.intermediate("q")


def test_config_keys() -> None:
    from reconciler.config import ConfigError, from_mapping

    cfg = from_mapping({}, environ={})
    assert cfg.cancel.dependents == "cancel" and cfg.orphans.requeue == "retries"
    cfg = from_mapping({"cancel": {"dependents": "enqueue"}, "orphans": {"requeue": "never"}},
                       environ={})
    assert cfg.cancel.dependents == "enqueue" and cfg.orphans.requeue == "never"
    for raw, key in (({"cancel": {"dependents": "run"}}, "cancel.dependents"),
                     ({"orphans": {"requeue": "sometimes"}}, "orphans.requeue")):
        with pytest.raises(ConfigError, match=key):
            from_mapping(raw, environ={})
