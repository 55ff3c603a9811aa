"""The replica registry: each replica's heartbeat and the local workers it can see
(reconciler.replicas runs the beat and asks who can see a worker).

Runs on the jobs table's pool (pgpool.OnPool). It must never decide anything about a
job: it only says which replicas are alive and what they can see.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from reconciler.pgpool import OnPool, PoolOwner, translated

# A replica whose heartbeat is older than this is not alive (it beats every third of it).
REPLICA_STALE_SECONDS = 15.0


class Holder(NamedTuple):
    """The replica registered under a name: where it runs, and its last heartbeat."""

    hostname: str
    host_id: str
    pid: int
    heartbeat_at: datetime
    age: float  # seconds since that heartbeat, by the database's clock


class ReplicaTable(OnPool):
    """`store.replicas`: each replica's heartbeat and the local workers it can see
    (reconciler.replicas runs the beat and asks who can see a worker)."""

    def __init__(self, owner: PoolOwner) -> None:
        super().__init__(owner)
        self.table = owner.names.replicas

    async def register(self, *, hostname: str, host_id: str, pid: int,
                       workers: Sequence[str]) -> int:
        """Our heartbeat (and the local workers we can see); returns how many replicas,
        us included, are alive."""
        sql = (
            f"WITH up AS (INSERT INTO {self.table} "
            f"(instance, hostname, host_id, pid, workers) VALUES ($1, $2, $3, $4, $5::text[]) "
            f"ON CONFLICT (instance) DO UPDATE SET hostname = EXCLUDED.hostname, "
            f"host_id = EXCLUDED.host_id, pid = EXCLUDED.pid, workers = EXCLUDED.workers, "
            f"heartbeat_at = now(), started_at = CASE WHEN {self.table}.pid = EXCLUDED.pid "
            f"THEN {self.table}.started_at ELSE now() END RETURNING 1) "
            f"SELECT count(*) + 1 FROM {self.table} "
            f"WHERE heartbeat_at > now() - make_interval(secs => $6) AND instance <> $1"
        )
        async with translated(self.pool):
            n = await self._p().fetchval(sql, self.cfg.instance.name, hostname, host_id, pid,
                                         list(workers), REPLICA_STALE_SECONDS)
        return int(n or 1)

    async def take_name(self, *, hostname: str, host_id: str, pid: int,
                        force: bool = False) -> Holder | None:
        """Register our instance name, unless a live replica elsewhere holds it: then that
        replica's row (None: the name is ours now). A row of ours (this host, this pid) or
        one whose heartbeat is stale is taken over; `force` takes over any (its holder was
        proven gone)."""
        t = self.table
        sql = (
            f"WITH up AS (INSERT INTO {t} (instance, hostname, host_id, pid) "
            f"VALUES ($1, $2, $3, $4) ON CONFLICT (instance) DO UPDATE SET "
            f"hostname = EXCLUDED.hostname, host_id = EXCLUDED.host_id, pid = EXCLUDED.pid, "
            f"workers = '{{}}', heartbeat_at = now(), started_at = now() "
            f"WHERE $6 OR {t}.heartbeat_at <= now() - make_interval(secs => $5) "
            f"OR ({t}.host_id = EXCLUDED.host_id AND {t}.pid = EXCLUDED.pid) RETURNING 1) "
            f"SELECT hostname, host_id, pid, heartbeat_at, "
            f"extract(epoch FROM now() - heartbeat_at)::float8 AS age "
            f"FROM {t} WHERE instance = $1 AND NOT EXISTS (SELECT 1 FROM up)"
        )
        async with translated(self.pool):
            rec = await self._p().fetchrow(sql, self.cfg.instance.name, hostname, host_id, pid,
                                           REPLICA_STALE_SECONDS, force)
        if rec is None:
            return None
        return Holder(str(rec["hostname"]), str(rec["host_id"]), int(rec["pid"]),
                      rec["heartbeat_at"], float(rec["age"]))

    async def unregister(self) -> None:
        async with translated(self.pool):
            await self._p().execute(f"DELETE FROM {self.table} WHERE instance = $1",
                                    self.cfg.instance.name)

    async def for_worker(self, worker_name: str) -> str | None:
        """The live replica (not us) that lists `worker_name` among its local workers."""
        async with translated(self.pool):
            found = await self._p().fetchval(
                f"SELECT instance FROM {self.table} WHERE $1 = ANY(workers) "
                f"AND instance <> $2 AND heartbeat_at > now() - make_interval(secs => $3) "
                f"ORDER BY heartbeat_at DESC LIMIT 1",
                worker_name, self.cfg.instance.name, REPLICA_STALE_SECONDS)
        return None if found is None else str(found)

    async def listings(self) -> list[tuple[list[str], float]]:
        """The workers each other replica lists, and how many seconds ago (by the server's
        clock) that replica last beat."""
        async with translated(self.pool):
            rows = await self._p().fetch(
                f"SELECT workers, extract(epoch FROM now() - heartbeat_at)::float8 AS age "
                f"FROM {self.table} WHERE instance <> $1 AND cardinality(workers) > 0",
                self.cfg.instance.name)
        return [(list(r["workers"]), float(r["age"])) for r in rows]
