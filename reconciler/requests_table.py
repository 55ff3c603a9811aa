"""Our cancel-request table: claiming requests under a lease, handing them to another
replica, writing their outcomes; and the application's side, inserting one and reading
its outcome.

Runs on the jobs table's pool (pgpool.OnPool). It must never write the jobs table: a
cancel changes a job's row only through jobs_table.Store.apply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from reconciler.errors import DataRejected, InvalidJobId, SchemaError, UnknownJob
from reconciler.jobs_sql import active_row
from reconciler.model import ActiveRow, clean_text, sql_json, storable
from reconciler.pgpool import Names, OnPool, PoolOwner, id_texts, translated
from reconciler.replicas_table import REPLICA_STALE_SECONDS

# Free text read from the cancel-request table (who, why): the error column gets a few
# hundred characters of it; a 300 MB reason is never read whole.
REQUEST_TEXT_MAX = 1000


def intent_queries(n: Names, id_type: str) -> dict[str, str]:
    """The open cancel requests of a page's rows (Store.cancel_intents*)."""
    return {
        # A sweep page's rows are a range of ids: its intents are looked up by the range's
        # bounds, not by sending its thousand ids.
        "intents_between": (
            f"SELECT DISTINCT ON (job_id) job_id, "
            f"left(coalesce(requested_by, ''), {REQUEST_TEXT_MAX}) AS who, "
            f"left(coalesce(reason, ''), {REQUEST_TEXT_MAX}) AS why FROM {n.requests} "
            f"WHERE state <> 'done' AND job_id BETWEEN $1::{id_type} AND $2::{id_type} "
            f"ORDER BY job_id, id"
        ),
        "intents": (
            f"SELECT DISTINCT ON (job_id) job_id, "
            f"left(coalesce(requested_by, ''), {REQUEST_TEXT_MAX}) AS who, "
            f"left(coalesce(reason, ''), {REQUEST_TEXT_MAX}) AS why FROM {n.requests} "
            f"WHERE state <> 'done' AND job_id = ANY($1::text[]::{id_type}[]) ORDER BY job_id, id"
        ),
        # The latest request (in any state) on the rows of these RQ jobs: which of the jobs
        # that a dependent waited for were ended by a cancel request, and whose.
        "intents_by_rq_ids": (
            f"SELECT DISTINCT ON (t.{n.rq_id}) t.{n.rq_id}::text AS rq_id, "
            f"left(coalesce(r.requested_by, ''), {REQUEST_TEXT_MAX}) AS who, "
            f"left(coalesce(r.reason, ''), {REQUEST_TEXT_MAX}) AS why "
            f"FROM {n.jobs} t JOIN {n.requests} r ON r.job_id = t.{n.id} "
            f"WHERE t.{n.rq_id} = ANY($1::text[]) ORDER BY t.{n.rq_id}, r.id DESC"
        ),
    }


@dataclass(frozen=True, slots=True)
class CancelRequest:
    id: int
    job_id: Any
    requested_at: datetime
    requested_by: str
    reason: str
    # The replica this request was handed to by another, if any.
    handed_to: str | None = None
    # The job's row when the request was claimed (None: not read, or no such row).
    row: ActiveRow | None = None



class CancelRequestTable(OnPool):
    """`store.requests`: claiming requests under a lease, handing them to another replica,
    writing their outcomes; and the app's side, inserting one and reading its outcome."""

    def __init__(self, owner: PoolOwner) -> None:
        super().__init__(owner)
        self.table = owner.names.requests
        self._sql: dict[str, str] = {}

    @property
    def id_type(self) -> str:
        return self._owner.id_type

    def build_sql(self, select: str) -> Mapping[str, str]:
        """The claims, for the id column's type the store read; `select` is the job row as
        the store reads it (`jobs_sql.row_select`)."""
        cid = self._owner.names.id
        # A claim returns each request's job row as well, as rows_by_ids reads it: the
        # cancel starts from it without a round trip of its own.
        open_ = "(state = 'pending' OR (state = 'claimed' AND claimed_until < now()))"
        # A request handed to another replica stays that replica's while it is alive (its
        # heartbeat fresh): it may be busy, and queues what it cannot start yet. Only a
        # dead or silent owner's hand-overs are anyone's (a fallback to stop-job), once
        # cancel.handover_seconds have passed; and any owner's after a whole lease.
        claimable = (
            f"{open_} AND (handed_to IS NULL OR handed_to = $1 "
            f"OR (handed_at < now() - make_interval(secs => $4) AND (NOT EXISTS ("
            f"SELECT 1 FROM {self._owner.names.replicas} o WHERE o.instance = handed_to "
            f"AND o.heartbeat_at > now() - make_interval(secs => {REPLICA_STALE_SECONDS:g})) "
            f"OR handed_at < now() - make_interval(secs => $2))))"
        )
        for_jobs = f"{claimable} AND job_id = ANY($5::text[]::{self.id_type}[])"
        # Ours by hand-over, however many: claimed (their leases kept) even when every
        # slot is busy, so that they wait here rather than fall back elsewhere.
        handed = f"{open_} AND handed_to = $1"
        for name, where in (("claim", claimable), ("claim_for_jobs", for_jobs),
                            ("claim_handed", handed)):
            self._sql[name] = (
                f"WITH c AS (UPDATE {self.table} r SET state = 'claimed', claimed_by = $1, "
                f"claimed_until = now() + make_interval(secs => $2) "
                f"WHERE r.id IN (SELECT id FROM {self.table} WHERE {where} "
                f"ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) "
                f"RETURNING r.id, r.job_id, r.requested_at, "
                f"left(coalesce(r.requested_by, ''), {REQUEST_TEXT_MAX}) AS who, "
                f"left(coalesce(r.reason, ''), {REQUEST_TEXT_MAX}) AS why, r.handed_to) "
                f"SELECT c.id AS request_id, c.job_id, c.requested_at, c.who, c.why, c.handed_to, "
                f"j.id, j.rq_id, j.status, j.started_at, j.first_seen, j.age "
                f"FROM c LEFT JOIN LATERAL ({select}WHERE t.{cid} = c.job_id) j ON true "
                f"ORDER BY c.id"
            )
        return self._sql

    async def claim(self, lease: float, limit: int = 100,
                    job_ids: Sequence[Any] | None = None) -> list[CancelRequest]:
        """Claim pending (or lease-expired) requests, each with its job's row as it is now;
        SKIP LOCKED lets replicas share. A request handed to a replica is that replica's
        until the hand-over times out."""
        params: list[Any] = [self.cfg.instance.name, lease, limit,
                             self.cfg.cancel.handover_seconds]
        if job_ids is not None:
            params.append(id_texts(job_ids))
        sql = self._sql["claim" if job_ids is None else "claim_for_jobs"]
        async with translated(self.pool):
            recs = await self._p().fetch(sql, *params)
        return [CancelRequest(r["request_id"], r["job_id"], r["requested_at"], r["who"], r["why"],
                              r["handed_to"], None if r["id"] is None else active_row(r[6:]))
                for r in recs]

    async def claim_handed(self, lease: float, limit: int = 1000) -> list[CancelRequest]:
        """Claim every open request handed to this replica (as claim() does), whether or
        not a slot is free: they wait here for one, their leases kept (cancel.py)."""
        async with translated(self.pool):
            recs = await self._p().fetch(self._sql["claim_handed"], self.cfg.instance.name,
                                         lease, limit)
        return [CancelRequest(r["request_id"], r["job_id"], r["requested_at"], r["who"], r["why"],
                              r["handed_to"], None if r["id"] is None else active_row(r[6:]))
                for r in recs]

    async def hand_over(self, ids: Sequence[int], to: str) -> int:
        """Give our claimed requests to the replica `to` and wake it (NOTIFY): it alone may
        claim them for cancel.handover_seconds."""
        sql = (
            f"WITH u AS (UPDATE {self.table} SET state = 'pending', claimed_by = NULL, "
            f"claimed_until = NULL, handed_to = $3, handed_at = now() "
            f"WHERE id = ANY($1::text[]::bigint[]) AND state = 'claimed' AND claimed_by = $2 "
            f"RETURNING id) SELECT count(*) FROM (SELECT pg_notify($4, u.id::text) FROM u) n"
        )
        async with translated(self.pool):
            n = await self._p().fetchval(sql, id_texts(ids), self.cfg.instance.name, to,
                                         self.cfg.cancel.channel)
        return int(n or 0)

    async def extend_lease(self, ids: Sequence[int], lease: float) -> None:
        async with translated(self.pool):
            await self._p().execute(
                f"UPDATE {self.table} SET claimed_until = now() + make_interval(secs => $3) "
                f"WHERE id = ANY($1::text[]::bigint[]) AND state = 'claimed' AND claimed_by = $2",
                id_texts(ids), self.cfg.instance.name, lease,
            )

    async def finish(self, ids: Sequence[int], outcome: str,
                     detail: dict[str, Any]) -> list[tuple[int, datetime]]:
        """Write the outcome on our claimed requests and NOTIFY <channel>_done for each.
        Returns (id, requested_at) of the requests finished (a lost lease finishes none)."""
        sql = (
            f"WITH u AS (UPDATE {self.table} SET state = 'done', outcome = $3, detail = $4::jsonb, "
            f"done_at = now(), claimed_until = NULL "
            f"WHERE id = ANY($1::text[]::bigint[]) AND state = 'claimed' AND claimed_by = $2 "
            f"RETURNING id, requested_at) "
            f"SELECT u.id, u.requested_at, pg_notify($5, u.id::text) FROM u"
        )
        # The detail carries texts from Redis and the app (worker names, messages): made
        # fit for jsonb, or one odd name would keep the request from ever finishing.
        body = json.dumps(sql_json(detail), default=str)
        async with translated(self.pool):
            recs = await self._p().fetch(sql, id_texts(ids), self.cfg.instance.name, outcome,
                                         body, self.cfg.done_channel)
        return [(r["id"], r["requested_at"]) for r in recs]

    async def release_claims(self) -> int:
        async with translated(self.pool):
            status = await self._p().execute(
                f"UPDATE {self.table} SET state = 'pending', claimed_by = NULL, "
                f"claimed_until = NULL WHERE state = 'claimed' AND claimed_by = $1",
                self.cfg.instance.name,
            )
        return int(status.split()[-1])

    async def previous_cancel_detail(self, job_id: Any) -> dict[str, Any] | None:
        """The detail of this job's last successful cancel, so that late duplicates of a
        request get the same outcome."""
        async with translated(self.pool):
            raw = await self._p().fetchval(
                f"SELECT detail FROM {self.table} WHERE job_id = $1 AND state = 'done' "
                f"AND outcome = 'cancelled' ORDER BY id DESC LIMIT 1", job_id)
        return dict(json.loads(raw)) if raw else None

    async def insert(self, job_id: Any, requested_by: str, reason: str) -> int:
        """Insert a cancel request. UnknownJob if the jobs table has no such row,
        InvalidJobId if `job_id` is not a value of the id column's type."""
        jid = str(job_id)
        invalid = f"{jid!r} is not a valid {self.id_type} id"
        if not storable(jid):
            raise InvalidJobId(invalid)
        try:
            async with translated(self.pool):
                return int(await self._p().fetchval(
                    f"INSERT INTO {self.table} (job_id, requested_by, reason) "
                    f"VALUES ($1::text::{self.id_type}, $2, $3) RETURNING id",
                    jid, clean_text(requested_by), clean_text(reason),
                ))
        except UnknownJob as exc:
            raise UnknownJob(f"no job with {self.cfg.jobs.id_column} = {jid!r} in "
                             f"{self.cfg.jobs.table}", pg_error=exc.pg_error,
                             sqlstate=exc.sqlstate) from exc
        except DataRejected as exc:
            # The id is the one value cast here (the texts are cleaned, text columns).
            raise InvalidJobId(f"{invalid} ({exc.pg_error})", pg_error=exc.pg_error,
                               sqlstate=exc.sqlstate) from exc

    async def outcome(self, request_id: int) -> tuple[str, str | None, Any]:
        async with translated(self.pool):
            rec = await self._p().fetchrow(
                f"SELECT state, outcome, detail FROM {self.table} WHERE id = $1", request_id
            )
        if rec is None:
            raise SchemaError(f"cancel request {request_id} does not exist")
        detail = json.loads(rec["detail"]) if rec["detail"] else None
        return rec["state"], rec["outcome"], detail
