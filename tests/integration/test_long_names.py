"""A request table with a 63-character name: `migrate` creates every index, trigger and
function, under names PostgreSQL keeps whole. Real PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from reconciler.config import MAX_IDENT_BYTES, Config, from_mapping
from reconciler.migrations import migrate

LONG = "r" * 63


def config(pg_dsn: str, table: str, channel: str = "rq_reconciler_cancel") -> Config:
    return from_mapping({"postgres": {"dsn": pg_dsn},
                         "cancel": {"requests_table": table, "channel": channel}}, environ={})


async def objects(conn: asyncpg.Connection, table: str) -> dict[str, Any]:
    indexes = [r["indexname"] for r in await conn.fetch(
        "SELECT indexname FROM pg_indexes WHERE tablename = $1 ORDER BY indexname", table)]
    index_cols = sorted(r["def"].split(" USING btree ")[1] for r in await conn.fetch(
        "SELECT indexdef AS def FROM pg_indexes WHERE tablename = $1", table))
    triggers = [(r["tgname"], r["fn"]) for r in await conn.fetch(
        "SELECT t.tgname, p.proname AS fn FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid "
        "WHERE t.tgrelid = to_regclass($1) AND NOT t.tgisinternal", f'"{table}"')]
    return {"indexes": indexes, "index_cols": index_cols, "triggers": triggers}


async def test_63_character_request_table_gets_every_index_and_its_trigger(pg_dsn: str) -> None:
    cfg = config(pg_dsn, LONG, channel="c" * 63)
    await migrate(cfg)
    await migrate(cfg)  # again: nothing doubles
    conn = await asyncpg.connect(pg_dsn)
    try:
        got = await objects(conn, LONG)
        assert got["index_cols"] == ["(done_at) WHERE (outcome = 'cancelled'::text)", "(id)",
                                     "(id) WHERE (state <> 'done'::text)", "(job_id)"]
        assert len(set(got["indexes"])) == 4 and LONG not in got["indexes"]
        assert all(len(n) <= MAX_IDENT_BYTES for n in got["indexes"])
        [(trigger, fn)] = got["triggers"]
        assert trigger.endswith("_notify") and fn == trigger and len(trigger) <= MAX_IDENT_BYTES
        # The trigger works: an insert is heard on the channel.
        heard: asyncio.Queue[str] = asyncio.Queue()
        await conn.add_listener(cfg.cancel.channel, lambda *a: heard.put_nowait(a[3]))
        job = await conn.fetchval("INSERT INTO training_jobs DEFAULT VALUES RETURNING id")
        rid = await conn.fetchval(f'INSERT INTO "{LONG}" (job_id) VALUES ($1) RETURNING id', job)
        assert await asyncio.wait_for(heard.get(), 5) == str(rid)
        # and so is the done channel the daemon notifies on, 63 + 5 characters long
        await conn.add_listener(cfg.done_channel, lambda *a: heard.put_nowait("done:" + a[3]))
        await conn.execute("SELECT pg_notify($1, '7')", cfg.done_channel)
        assert await asyncio.wait_for(heard.get(), 5) == "done:7"
    finally:
        await conn.close()


async def test_two_long_names_sharing_a_60_character_prefix_do_not_collide(pg_dsn: str) -> None:
    a, b = "x" * 60 + "one", "x" * 60 + "two"
    await migrate(config(pg_dsn, a))
    await migrate(config(pg_dsn, b))
    conn = await asyncpg.connect(pg_dsn)
    try:
        oa, ob = await objects(conn, a), await objects(conn, b)
        assert len(oa["indexes"]) == len(ob["indexes"]) == 4
        assert not set(oa["indexes"]) & set(ob["indexes"])
        assert len(oa["triggers"]) == len(ob["triggers"]) == 1
        assert oa["triggers"][0][1] != ob["triggers"][0][1]  # two trigger functions
    finally:
        await conn.close()


async def test_an_install_with_names_postgres_cut_is_upgraded_in_place(pg_dsn: str) -> None:
    """Before v2 a 62-character table got one index (both names were cut to the same 63
    bytes) and a cut trigger and function name: `migrate` renames, recreates, drops."""
    table = "t" * 62
    cfg = config(pg_dsn, table)
    await migrate(cfg)
    conn = await asyncpg.connect(pg_dsn)
    try:
        now = await objects(conn, table)
        open_idx = next(n for n in now["indexes"] if n.endswith("_open_idx"))
        job_idx = next(n for n in now["indexes"] if n.endswith("_job_idx"))
        trigger, fn = now["triggers"][0]
        cut = (table + "_open_idx")[:63]
        # What v1 left behind.
        await conn.execute(f'DROP INDEX "{job_idx}"')
        await conn.execute(f'ALTER INDEX "{open_idx}" RENAME TO "{cut}"')
        await conn.execute(f'ALTER TRIGGER "{trigger}" ON "{table}" RENAME TO "{(table + "_notify")[:63]}"')
        await conn.execute(f'ALTER FUNCTION "{fn}"() RENAME TO "{(table + "_notify")[:63]}"')

        await migrate(cfg)

        after = await objects(conn, table)
        assert sorted(after["indexes"]) == sorted(now["indexes"])
        assert after["triggers"] == now["triggers"]
        assert await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname = $1",
                                   (table + "_notify")[:63]) == 0
    finally:
        await conn.close()
