"""How PostgreSQL would run each statement the daemon sends to the jobs table.

Every statement the store builds (``Store.build_queries``) is EXPLAINed with arguments
like the daemon's (real ids and RQ ids from the table), twice: as a custom plan, which
sees the arguments, and as the generic plan asyncpg's prepared statements switch to
after their fifth run, which does not. Used by tests/integration/test_history_plans.py
and bench/history_table.py to show that no statement reads the whole jobs table.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from reconciler.config import Config, quote_ident
from reconciler.devstack.sync_pg import Pg
from reconciler.jobs_table import Store


@dataclass(frozen=True)
class Explained:
    name: str
    mode: str  # "custom" or "generic"
    plan: dict[str, Any]

    def nodes(self) -> Iterator[dict[str, Any]]:
        stack = [self.plan]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.get("Plans", ()))

    def seq_scans(self, table: str) -> list[str]:
        """Aliases under which `table` (bare name) is read by a sequential scan."""
        return [str(n.get("Alias", table)) for n in self.nodes()
                if n.get("Node Type") == "Seq Scan" and n.get("Relation Name") == table]

    def rows_discarded(self, table: str) -> int:
        """Rows of `table` read and thrown away by a filter (EXPLAIN ANALYZE only; a
        parallel scan reports an average per process, times its loops)."""
        return sum(int(n.get("Rows Removed by Filter", 0)) * int(n.get("Actual Loops", 1) or 1)
                   for n in self.nodes() if n.get("Relation Name") == table)

    def summary(self, table: str) -> str:
        """The scans of `table` and the indexes they use, one short line."""
        out = []
        for n in self.nodes():
            kind = str(n.get("Node Type", ""))
            if n.get("Relation Name") == table or (kind == "Bitmap Index Scan"):
                index = n.get("Index Name")
                out.append(f"{kind} {index}" if index else kind)
        return "; ".join(dict.fromkeys(out)) or "(no scan of the table)"


def _literal(value: Any) -> str:
    """`value` as an SQL literal for EXECUTE (the statement's own casts type it)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        items = ",".join('"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
                         for v in value)
        return _literal("{" + items + "}")
    return "'" + str(value).replace("'", "''") + "'"


def sample_args(pg: Pg, cfg: Config, store: Store) -> dict[str, Sequence[Any]]:
    """Arguments like the daemon's for each statement: a page's worth of active ids and
    RQ ids, read from the table."""
    j = cfg.jobs
    t, cid, crq = quote_ident(j.table), quote_ident(j.id_column), quote_ident(j.rq_id_column)
    n = cfg.sweep.page_size
    active = store.active_predicate()
    recs = pg.fetch(f"SELECT t.{cid} AS id, t.{crq}::text AS rq FROM {t} t WHERE {active} "
                    f"ORDER BY t.{cid} LIMIT {int(n)}")
    ids = [r["id"] for r in recs] or [0]
    rq_ids = [r["rq"] for r in recs if r["rq"]] or ["none"]
    s = j.statuses
    texts = [str(i) for i in ids]  # id lists travel as text[] (pgpool.id_texts)
    change = [str(ids[0]), s.running, s.failed, "Orphaned: RQ job not found", "orphaned",
              "missing", None, None, False, True, {"rq_id": rq_ids[0]}]
    return {
        "page_first": [n],
        "page_next": [n, ids[len(ids) // 2]],
        "page_ids_first": [n],
        "page_ids_next": [n, ids[len(ids) // 2]],
        "by_rq_ids": [rq_ids, [*s.active, s.cancelled]],
        "by_ids": [texts[:100]],
        "recently_cancelled": [3600.0, s.cancelled, 10_000],
        "recently_cancelled_ids": [3600.0, s.cancelled, 10_000],
        "apply": [texts[:1], json.dumps([change]), "explain", list(s.active)],
        "first_seen": [texts],
        "prune_first_seen": [],
        "intents": [texts],
        "intents_between": [ids[0], ids[-1]],
        "job_status": [ids[0]],
        "claim": ["explain", 30.0, 100, 2.0],
        "claim_for_jobs": ["explain", 30.0, 100, 2.0, texts[:1]],
        "claim_handed": ["explain", 30.0, 1000],
        "intents_by_rq_ids": [rq_ids],
    }


def explain_store_queries(dsn: str, cfg: Config, *, analyze: bool = False,
                          settings: str = "") -> list[Explained]:
    """Every statement of ``Store.build_queries``, EXPLAINed as a custom and as a generic
    plan (PREPARE + plan_cache_mode), under `settings` (SET LOCALs) if given. KeyError if
    a statement has no sample arguments: a new statement must be added to `sample_args`
    to be judged. Nothing is executed unless `analyze` (then inside a transaction that is
    rolled back)."""
    out: list[Explained] = []
    with Pg(dsn) as pg:
        id_type = str(pg.val(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
            quote_ident(cfg.jobs.table), cfg.jobs.id_column))
        store = Store(cfg)
        queries = store.build_queries(id_type)
        args = sample_args(pg, cfg, store)
        options = "ANALYZE, BUFFERS, " if analyze else ""
        for name, sql in queries.items():
            values = ", ".join(_literal(a) for a in args[name])
            stmt = f"q_{uuid.uuid4().hex[:8]}"
            pg.execute(f"PREPARE {stmt} AS {sql}")
            try:
                for mode in ("custom", "generic"):
                    pg.execute("BEGIN")
                    try:
                        pg.execute(f"SET LOCAL plan_cache_mode = force_{mode}_plan")
                        if settings:
                            pg.execute(settings)
                        execute = f"EXECUTE {stmt}({values})" if values else f"EXECUTE {stmt}"
                        raw = pg.val(f"EXPLAIN ({options}FORMAT JSON) {execute}")
                    finally:
                        pg.execute("ROLLBACK")
                    doc = json.loads(raw) if isinstance(raw, str) else raw
                    out.append(Explained(name, mode, dict(doc[0]["Plan"])))
            finally:
                pg.execute(f"DEALLOCATE {stmt}")
    return out
