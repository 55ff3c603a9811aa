"""RQ's own lifecycle paths, decided purely: which deferred jobs can never run (their
dependency ended in a way RQ will never let them follow), and what a job stranded in a
queue's intermediate list becomes.

Pure, like model.decide(): facts in (a dependency graph read in one script, a stranded
job seen twice), answers out; no I/O, no clock (times are passed in). A graph that cannot
be judged (a cycle, a dependency hash that is gone, a field no RQ writes, a walk cut short)
costs the job it leads from only: it is left as it is and the reason is returned, never
read as "can never run".

What RQ does, and so what is judged here (rq 2.12 and 3.0, Job.dependencies_are_met and
Queue.enqueue_dependents): a dependent is enqueued when its dependency ends, if every one
of its dependencies is `finished`, or `failed` and the dependent allows failure
(`Dependency(..., allow_failure=True)`). A dependency that ended `canceled` or `stopped`
never lets it run, whatever it allows; nor does a `failed` one unless it allows failure.
Nothing enqueues it later: it would stay deferred for ever.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

from reconciler.config import Statuses
from reconciler.model import (
    CancelIntent,
    Decision,
    Doom,
    JobRow,
    Reason,
    RqStatus,
)
from reconciler.rq_layout import DepNode

# Ends that no dependent ever follows, and the one a dependent may be allowed to follow.
NEVER_FOLLOWED = frozenset({RqStatus.CANCELED, RqStatus.STOPPED})
FOLLOWED_IF_ALLOWED = frozenset({RqStatus.FAILED})
# Still able to run: its dependents wait for it like RQ does.
_MAY_RUN = frozenset({RqStatus.CREATED, RqStatus.QUEUED, RqStatus.STARTED, RqStatus.SCHEDULED,
                      RqStatus.RATE_LIMITED, RqStatus.READY_TO_ENQUEUE})


class Verdict(NamedTuple):
    """For one deferred job: `doom` if it can never run, `problem` if that cannot be told
    (both empty: it may still run)."""

    doom: Doom | None = None
    problem: str = ""


_MAY_STILL_RUN = Verdict()


def judge(graph: Mapping[str, DepNode], *, spared: Collection[str] = ()) -> dict[str, Verdict]:
    """A verdict for every deferred job in `graph` (job id -> its node, as read).

    `spared`: ended jobs whose dependents RQ is told to enqueue anyway (cancel.dependents
    = "enqueue" on a cancel the daemon carried out): they block nobody.
    """
    memo: dict[str, Verdict] = {}
    for job_id, node in graph.items():
        if node.status is RqStatus.DEFERRED:
            _verdict(job_id, graph, spared, memo, set())
    return {j: v for j, v in memo.items() if j in graph and graph[j].status is RqStatus.DEFERRED}


def _verdict(job_id: str, graph: Mapping[str, DepNode], spared: Collection[str],
             memo: dict[str, Verdict], path: set[str]) -> Verdict:
    if job_id in memo:
        return memo[job_id]
    node = graph[job_id]
    if not node.readable:
        return memo.setdefault(job_id, Verdict(problem=f"job {job_id}: dependencies unreadable"))
    if not node.dependency_ids:
        # Deferred for another reason (or by hand): nothing here says it cannot run.
        return memo.setdefault(job_id, _MAY_STILL_RUN)
    path.add(job_id)
    problem = ""
    verdict: Verdict | None = None
    for dep_id in node.dependency_ids:
        dep = graph.get(dep_id)
        if dep is None:
            problem = problem or f"dependency {dep_id} was not read"
            continue
        st = dep.status
        if dep_id in spared or st is RqStatus.FINISHED or st in _MAY_RUN:
            continue
        if st in NEVER_FOLLOWED or (st in FOLLOWED_IF_ALLOWED and not node.allow_failure):
            verdict = Verdict(Doom(dep_id, dep_id, st))
            break
        if st in FOLLOWED_IF_ALLOWED:
            continue
        if st is RqStatus.DEFERRED:
            if dep_id in path:
                problem = problem or f"dependency cycle through {dep_id}"
                continue
            up = _verdict(dep_id, graph, spared, memo, path)
            if up.doom is not None:
                # The dependency can never run either: it is cancelled in the same pass, and
                # a canceled dependency is never followed, allow_failure or not.
                verdict = Verdict(Doom(dep_id, up.doom.root, up.doom.root_status))
                break
            if up.problem:
                problem = problem or up.problem
            continue
        if st is RqStatus.MISSING:
            problem = problem or f"dependency {dep_id} not found"
        else:  # unreadable, or a status word RQ does not use
            problem = problem or f"dependency {dep_id} is {dep.raw_status or st.value}"
    path.discard(job_id)
    if verdict is None:
        verdict = Verdict(problem=problem) if problem else _MAY_STILL_RUN
    memo[job_id] = verdict
    return verdict


def roots(verdicts: Mapping[str, Verdict]) -> set[str]:
    """The ended jobs the doomed ones are doomed by (whose cancel requests name the cause)."""
    return {v.doom.root for v in verdicts.values() if v.doom is not None}


def with_causes(verdicts: Mapping[str, Verdict],
                intents: Mapping[str, CancelIntent]) -> dict[str, Doom]:
    """The dooms, each naming the cancel request that ended its root (`intents`: root RQ
    id -> the request on the row of that RQ job), if one did."""
    out: dict[str, Doom] = {}
    for job_id, v in verdicts.items():
        if v.doom is not None:
            out[job_id] = v.doom._replace(cancelled_by=intents.get(v.doom.root))
    return out


# -- stranded in the intermediate list -------------------------------------------------------

# A live worker moves a job from its queue into the intermediate list (BLMOVE) and records
# an execution for it (prepare_execution, before it forks) in one pass of its loop: a few
# milliseconds. A job found there with no execution, twice this far apart, was taken by a
# worker that no longer runs that loop.
STRAND_SETTLE_SECONDS = 0.5


class StrandSighting(NamedTuple):
    """A job seen in `queue`'s intermediate list, `queued`, with no execution."""

    queue: str
    job_id: str
    first_seen: float  # monotonic seconds


def ripe(sighting: StrandSighting, now: float, settle: float = STRAND_SETTLE_SECONDS) -> bool:
    """Seen stranded long enough that no live worker can be about to start it."""
    return now - sighting.first_seen >= settle


def strand_decision(row: JobRow, statuses: Statuses, *, requeue: bool, worker: str,
                    queue: str, detail: Mapping[str, Any] | None = None) -> Decision:
    """What the row of a stranded job becomes: still `queued` (an audit event says
    `requeued`), or `failed` at once under orphans.requeue = "never", as RQ's maintenance
    would fail it later."""
    s = statuses
    if row.status not in s.active:
        return Decision()
    info = {"cause": "stranded", "queue": queue, "worker": worker or "?", **(detail or {})}
    if requeue:
        return Decision(row.status, Reason.REQUEUED, "", detail=info)
    return Decision(s.failed, Reason.ORPHANED, f"Orphaned: worker {worker or '?'} is gone",
                    set_completed_at=True, detail=info)
