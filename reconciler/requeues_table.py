"""Requeue counts of orphans, and the claim that lets one replica alone requeue one run.

Runs on the jobs table's pool (pgpool.OnPool). It decides nothing: requeue_policy.py
does, on the counts read here; a claim only makes sure that the decision is taken once
per run of a job (`<worker>@<started_at>`), on the counts it was taken on.
"""

from __future__ import annotations

from typing import NamedTuple

from reconciler.pgpool import OnPool, PoolOwner, translated


class Counts(NamedTuple):
    requeues: int = 0
    disruptions: int = 0
    last_attempt: str | None = None


class RequeueTable(OnPool):
    """`store.requeues`."""

    def __init__(self, owner: PoolOwner) -> None:
        super().__init__(owner)
        self.table = owner.names.requeues

    async def counts(self, rq_id: str) -> Counts:
        async with translated(self.pool):
            r = await self._p().fetchrow(
                f"SELECT requeues, disruptions, last_attempt FROM {self.table} WHERE rq_id = $1",
                rq_id)
        if r is None:
            return Counts()
        return Counts(int(r["requeues"]), int(r["disruptions"]), r["last_attempt"])

    async def claim(self, rq_id: str, attempt: str, seen: Counts, *, disruption: bool,
                    cause: str) -> Counts | None:
        """Count one more requeue (or disruption) of `rq_id` for the run `attempt`, if the
        counts are still those the decision saw (`seen`) and no one claimed this run yet.
        Returns the new counts, or None when another replica (or an earlier look) won."""
        new_r = seen.requeues + (0 if disruption else 1)
        new_d = seen.disruptions + (1 if disruption else 0)
        t = self.table
        sql = (
            f"INSERT INTO {t} AS t (rq_id, requeues, disruptions, last_attempt, last_cause, "
            f"last_at, claimed_by) VALUES ($1, $2, $3, $4, $5, now(), $6) "
            f"ON CONFLICT (rq_id) DO UPDATE SET requeues = EXCLUDED.requeues, "
            f"disruptions = EXCLUDED.disruptions, last_attempt = EXCLUDED.last_attempt, "
            f"last_cause = EXCLUDED.last_cause, last_at = now(), claimed_by = EXCLUDED.claimed_by "
            f"WHERE t.requeues = $7 AND t.disruptions = $8 "
            f"AND t.last_attempt IS DISTINCT FROM EXCLUDED.last_attempt "
            f"RETURNING requeues, disruptions"
        )
        async with translated(self.pool):
            r = await self._p().fetchrow(sql, rq_id, new_r, new_d, attempt, cause,
                                         self.cfg.instance.name, seen.requeues, seen.disruptions)
        if r is None:
            return None
        return Counts(int(r["requeues"]), int(r["disruptions"]), attempt)

    async def unclaim(self, rq_id: str, attempt: str, seen: Counts) -> None:
        """Give back a claim whose requeue Redis refused (the job moved on meanwhile)."""
        async with translated(self.pool):
            await self._p().execute(
                f"UPDATE {self.table} SET requeues = $3, disruptions = $4, last_attempt = $5 "
                f"WHERE rq_id = $1 AND last_attempt = $2 AND claimed_by = $6",
                rq_id, attempt, seen.requeues, seen.disruptions, seen.last_attempt,
                self.cfg.instance.name)
