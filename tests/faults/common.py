"""Shared helpers for the fault tests: the invariants every fault test checks at the end,
and readers for the daemons' JSON logs."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from reconciler.devstack import DaemonProc, Pg

ACTIVE = ("queued", "running")
TERMINAL = ("completed", "failed", "cancelled")
# RQ statuses a row may show for each terminal row status once both sides agree.
ROW_MATCHES_RQ: dict[str, set[str | None]] = {
    "completed": {"finished"},
    "failed": {"failed", "stopped", "canceled", None},
    # A cancelled row: RQ canceled it, or its horse was stopped (stopped/failed), or the
    # job hash is gone (a cancel of a job that was never enqueued or already deleted).
    "cancelled": {"canceled", "stopped", "failed", None},
}


def start_all(daemons: Sequence[DaemonProc], timeout: float = 60) -> None:
    """Start every daemon at once, then wait for each one's READY=1."""
    for d in daemons:
        d.start(wait_ready=False)
    for d in daemons:
        d.wait_message("READY=1", timeout)


def insert_rows(pg: Pg, rq_ids: Sequence[str | None], status: str = "queued") -> list[int]:
    rows = pg.fetch(
        "INSERT INTO training_jobs (rq_job_id, status) SELECT u, $2 FROM unnest($1::text[]) "
        "WITH ORDINALITY AS t(u, n) ORDER BY n RETURNING id", list(rq_ids), status, retry_for=30)
    return [int(r["id"]) for r in rows]


def insert_requests(pg: Pg, job_ids: Sequence[int], by: str = "storm",
                    reason: str = "test") -> list[int]:
    rows = pg.fetch(
        "INSERT INTO rq_reconciler_cancel_requests (job_id, requested_by, reason) "
        "SELECT j, $2, $3 FROM unnest($1::bigint[]) WITH ORDINALITY AS t(j, n) ORDER BY n "
        "RETURNING id", list(job_ids), by, reason, retry_for=30)
    return [int(r["id"]) for r in rows]


def rq_statuses(redis_url: str, rq_ids: Iterable[str]) -> dict[str, str | None]:
    ids = list(rq_ids)
    with redis.Redis.from_url(redis_url) as r, r.pipeline(transaction=False) as p:
        for i in ids:
            p.hget(f"rq:job:{i}", "status")
        raw = p.execute()
    return {i: (v.decode() if v is not None else None) for i, v in zip(ids, raw, strict=True)}


# -- the invariants ----------------------------------------------------------------------------


def audit_problems(pg: Pg) -> list[str]:
    """Every way the audit table can show a transition applied twice or a terminal row
    leaving its state. Empty means clean."""
    out: list[str] = []
    for r in pg.fetch("SELECT job_id, to_status, count(*) AS n FROM rq_reconciler_events "
                      "GROUP BY 1, 2 HAVING count(*) > 1", retry_for=30):
        out.append(f"job {r['job_id']}: {r['n']} transitions to {r['to_status']}")
    for r in pg.fetch("SELECT job_id, count(*) AS n FROM rq_reconciler_events "
                      "WHERE to_status = ANY($1::text[]) GROUP BY 1 HAVING count(*) > 1",
                      list(TERMINAL), retry_for=30):
        out.append(f"job {r['job_id']}: {r['n']} terminal transitions")
    for r in pg.fetch("SELECT job_id, from_status, to_status FROM rq_reconciler_events "
                      "WHERE from_status = ANY($1::text[])", list(TERMINAL), retry_for=30):
        out.append(f"job {r['job_id']}: left terminal {r['from_status']} for {r['to_status']}")
    # The chain of transitions of each job must be contiguous: each from = previous to.
    chains: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for r in pg.fetch("SELECT job_id, from_status, to_status FROM rq_reconciler_events "
                      "ORDER BY id", retry_for=30):
        chains[r["job_id"]].append((r["from_status"], r["to_status"]))
    for job_id, chain in chains.items():
        for (_, prev_to), (nxt_from, _) in itertools.pairwise(chain):
            if prev_to != nxt_from:
                out.append(f"job {job_id}: transitions not contiguous {chain}")
                break
    return out


def terminal_transitions(pg: Pg) -> Counter[str]:
    return Counter(str(r["job_id"]) for r in pg.fetch(
        "SELECT job_id FROM rq_reconciler_events WHERE to_status = ANY($1::text[])",
        list(TERMINAL), retry_for=30))


def request_problems(pg: Pg) -> list[str]:
    """Every request done with an outcome; all requests of one job share one outcome, and
    the outcome agrees with the row."""
    out: list[str] = []
    rows = pg.fetch(
        "SELECT r.id, r.job_id, r.state, r.outcome, r.detail, t.status FROM "
        "rq_reconciler_cancel_requests r JOIN training_jobs t ON t.id = r.job_id ORDER BY r.id",
        retry_for=30)
    by_job: dict[int, set[str | None]] = defaultdict(set)
    for r in rows:
        if r["state"] != "done" or r["outcome"] is None:
            out.append(f"request {r['id']} (job {r['job_id']}) is {r['state']}/{r['outcome']}")
            continue
        by_job[int(r["job_id"])].add(r["outcome"])
        detail = json.loads(r["detail"]) if r["detail"] else {}
        if r["outcome"] == "cancelled":
            if r["status"] != "cancelled" or detail.get("success") is not True:
                out.append(f"request {r['id']}: outcome cancelled but row {r['status']}, {detail}")
        elif r["outcome"] == "already_finished":
            if r["status"] not in ("completed", "failed") or detail.get("success") is not False:
                out.append(f"request {r['id']}: already_finished but row {r['status']}, {detail}")
        else:
            out.append(f"request {r['id']} (job {r['job_id']}): outcome {r['outcome']}: {detail}")
    for job_id, outcomes in by_job.items():
        if len(outcomes) > 1:
            out.append(f"job {job_id}: requests got different outcomes {sorted(map(str, outcomes))}")
    return out


def row_rq_mismatches(pg: Pg, redis_url: str, dead_workers: Iterable[str] = ()) -> list[str]:
    """Rows still active, or terminal in a way RQ disagrees with. A job RQ still calls
    started is fine only when its worker died (`dead_workers`): nobody records the end of
    such a job in RQ until RQ's own registry cleanup calls it abandoned."""
    dead = set(dead_workers)
    rows = pg.fetch("SELECT id, rq_job_id, status FROM training_jobs ORDER BY id", retry_for=30)
    ids = [r["rq_job_id"] for r in rows if r["rq_job_id"]]
    with redis.Redis.from_url(redis_url) as conn, conn.pipeline(transaction=False) as p:
        for i in ids:
            p.hmget(f"rq:job:{i}", ["status", "worker_name"])
        raw = dict(zip(ids, p.execute(), strict=True))
    out = []
    for r in rows:
        st_b, worker_b = raw.get(r["rq_job_id"], (None, None)) if r["rq_job_id"] else (None, None)
        st = st_b.decode() if st_b is not None else None
        worker = worker_b.decode() if worker_b is not None else ""
        if r["status"] in ACTIVE:
            out.append(f"job {r['id']} still {r['status']} (RQ {st})")
        elif st == "started" and r["status"] in ("failed", "cancelled") and worker in dead:
            continue
        elif st not in ROW_MATCHES_RQ[r["status"]]:
            out.append(f"job {r['id']} is {r['status']} but RQ says {st} (worker {worker!r})")
    return out


# -- logs ------------------------------------------------------------------------------------


def log_events(paths: Iterable[Path]) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        ev = json.loads(line)
                        ev["_log"] = path.name
                        out.append(ev)
    return out


def error_lines(paths: Iterable[Path], allow: Iterable[str] = ()) -> list[str]:
    """JSON lines at level error (except events in `allow`), and any traceback printed
    outside our JSON lines (a crash, or a library logging around us)."""
    allowed = set(allow)
    out: list[str] = []
    paths = list(paths)
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            raw = [ln for ln in path.read_text(errors="replace").splitlines()
                   if not ln.startswith("{")]
            if any("Traceback" in ln for ln in raw):
                out.append(f"{path.name}: " + "\n".join(raw)[:3000])
    for ev in log_events(paths):
        if ev.get("level") in ("error", "critical") and ev.get("event") not in allowed:
            out.append(f"{ev['_log']}: {json.dumps(ev)[:600]}")
    return out


def _ts(ev: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(ev["timestamp"]).replace("Z", "+00:00")).timestamp()


def overlapping_sweeps(paths: Sequence[Path]) -> list[str]:
    """Sweeps (sweep_done with its duration) of different replicas that overlap in time."""
    spans: list[tuple[float, float, str]] = []
    for path in paths:
        for ev in log_events([path]):
            if ev.get("event") == "sweep_done":
                end = _ts(ev)
                spans.append((end - float(ev.get("seconds") or 0.0), end, path.name))
    spans.sort()
    out = []
    for (s1, e1, n1), (s2, e2, n2) in itertools.pairwise(spans):
        # 2 ms slack: `seconds` is rounded to 1 ms.
        if n1 != n2 and s2 < e1 - 0.002:
            out.append(f"{n1} [{s1:.3f}, {e1:.3f}] overlaps {n2} [{s2:.3f}, {e2:.3f}]")
    return out


def cancel_done_counts(paths: Iterable[Path]) -> Counter[int]:
    """How many times each request id was finished (cancel_done lines name them)."""
    c: Counter[int] = Counter()
    for ev in log_events(paths):
        if ev.get("event") == "cancel_done":
            for rid in ev.get("requests") or []:
                c[int(rid)] += 1
    return c
