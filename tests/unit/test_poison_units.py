"""The pure parts of "nothing the data does stops the daemon": texts made fit for SQL,
the bounded memory of what was refused, exception texts inflated with a budget, key
names from Redis, unreadable job hashes, and which database error means what."""

from __future__ import annotations

import base64
import json
import zlib

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.config import Config
from reconciler.errors import (
    DataRejected,
    PostgresUnavailable,
    SchemaError,
    UnknownJob,
)
from reconciler.jobs_table import RowChange, Store
from reconciler.model import (
    DETAIL_TEXT_CAP,
    REPLACEMENT,
    TEXT_CAP,
    BoundedMemory,
    RqStatus,
    clean_text,
    clip,
    sql_json,
    sql_text,
    storable,
)
from reconciler.pgpool import _connection_lost, translate
from reconciler.rq_layout import (
    EXC_NOT_READ,
    EXC_TAIL,
    MAX_NAME,
    decode_exc,
    decode_key,
    inflate_tail,
    job_from_hash,
    job_from_script,
    job_id_from_key,
    name_problem,
    printable_key,
)

# -- texts bound to SQL -----------------------------------------------------------------------


def test_clean_text_replaces_nul_and_lone_surrogates() -> None:
    assert clean_text("a\x00b") == f"a{REPLACEMENT}b"
    # a byte smuggled in by surrogateescape, and half of a pair
    assert clean_text("x\udcff y \ud83d") == f"x{REPLACEMENT} y {REPLACEMENT}"
    assert clean_text("naïve ✓") == "naïve ✓"
    plain = "RuntimeError: boom"
    assert clean_text(plain) is plain  # the common case copies nothing


def test_storable() -> None:
    assert storable("abc") and storable("é") and storable("")
    assert not storable("a\x00") and not storable("é\x00") and not storable("\udc80")


def test_clip_and_sql_text() -> None:
    assert clip("abcdef", 6) == "abcdef"
    assert clip("abcdefg", 6) == "abcde…"
    assert len(clip("x" * 320, 255)) == 255
    assert sql_text("y" * 320, 255) == "y" * 254 + "…"
    assert len(sql_text("z" * (TEXT_CAP + 10))) == TEXT_CAP
    assert sql_text("a\x00" * 200, 255) == (f"a{REPLACEMENT}" * 200)[:254] + "…"


@given(st.text(), st.integers(min_value=1, max_value=300))
def test_sql_text_is_always_storable_and_fits(text: str, limit: int) -> None:
    out = sql_text(text, limit)
    assert len(out) <= limit
    assert storable(out)
    out.encode("utf-8")  # PostgreSQL (and asyncpg) can take it
    if storable(text) and len(text) <= limit:
        assert out == text


def test_sql_json_cleans_keys_values_and_nesting() -> None:
    got = sql_json({"w\x00": ["a\x00", 1, None, {"b": "\ud800" + "x" * DETAIL_TEXT_CAP}]})
    assert got == {f"w{REPLACEMENT}": [f"a{REPLACEMENT}", 1, None,
                                       {"b": (REPLACEMENT + "x" * DETAIL_TEXT_CAP)[
                                           :DETAIL_TEXT_CAP - 1] + "…"}]}
    assert "\\u0000" not in json.dumps(got)
    deep: object = "leaf"
    for _ in range(20):
        deep = [deep]
    json.dumps(sql_json(deep))  # cut, not a recursion error


def test_store_makes_each_change_storable() -> None:
    store = Store(Config())
    store.error_max = 255  # as read from a varchar(255) error column
    ok = RowChange(1, "running", "failed", "Synced: RQ failed: x", "synced", "failed",
                   detail={"rq_id": "abc"})
    assert store._storable(ok) is ok
    bad = ok._replace(error="Synced: RQ failed: " + "bad\x00byte " * 40,
                      detail={"rq_id": "abc", "worker": "w\x00", "gone_because": "\udcff"})
    got = store._storable(bad)
    assert len(got.error) == 255 and "\x00" not in got.error
    assert got.error.startswith(f"Synced: RQ failed: bad{REPLACEMENT}byte")
    assert got.detail == {"rq_id": "abc", "worker": f"w{REPLACEMENT}",
                          "gone_because": REPLACEMENT}


# -- the memory of what was refused -----------------------------------------------------------


def test_bounded_memory_forgets_least_recently_used() -> None:
    m = BoundedMemory(size=3)
    for k in "abc":
        m.put(k, 1)
    assert m.get("a") == 1  # a is now the most recent
    m.put("d", 1)
    assert "b" not in m and all(k in m for k in "acd")
    assert len(m) == 3
    m.discard("a")
    assert "a" not in m and len(m) == 2


def test_bounded_memory_first_time() -> None:
    m = BoundedMemory(size=10_000)
    assert m.first_time(("row", "7"), 111)
    assert not m.first_time(("row", "7"), 111)  # the same thing again: not new
    assert m.first_time(("row", "7"), 222)      # it changed: new again
    for i in range(20_000):
        m.first_time(i)
    assert len(m) == 10_000


# -- exception texts --------------------------------------------------------------------------


def _bomb(size: int, last: bytes = b"\nValueError: at the end\n") -> bytes:
    z = zlib.compressobj(9)
    out = [z.compress(b"\0" * (1 << 20)) for _ in range(size >> 20)]
    return b"".join(out) + z.compress(last) + z.flush()


def test_inflate_tail_of_a_small_text_is_the_text() -> None:
    text = b"Traceback (most recent call last):\n  File x\nValueError: bad\n"
    end, complete = inflate_tail(zlib.compress(text))
    assert (end, complete) == (text, True)


def test_inflate_tail_keeps_only_the_end_and_reaches_it_within_budget() -> None:
    text = b"".join(b"  line %d of a long traceback\n" % i for i in range(20_000))
    text += b"KeyError: the last line"
    assert len(text) > 4 * EXC_TAIL
    end, complete = inflate_tail(zlib.compress(text))
    assert complete and len(end) == EXC_TAIL and end.endswith(b"KeyError: the last line")


def test_a_zlib_bomb_is_not_inflated_whole() -> None:
    bomb = _bomb(64 << 20)  # 64 MiB of zeros in about 64 KB
    assert len(bomb) < 100_000
    end, complete = inflate_tail(bomb, budget=1 << 20)
    assert not complete and len(end) <= EXC_TAIL
    text = decode_exc(base64.b64encode(bomb), b64=True)
    assert text.endswith(EXC_NOT_READ)
    assert len(text) <= EXC_TAIL + len(EXC_NOT_READ) + 1


def test_a_clipped_stream_says_its_end_was_not_read() -> None:
    data = zlib.compress(b"".join(b"frame %d\n" % i for i in range(50_000)) + b"OSError: x")
    assert decode_exc(data[: len(data) // 2], b64=False).endswith(EXC_NOT_READ)


def test_garbage_exception_text_is_empty() -> None:
    assert decode_exc(b"!!not base64!!", b64=True) == ""
    assert decode_exc(b"not zlib", b64=False) == ""


def test_failed_job_with_a_bomb_gets_a_bounded_line() -> None:
    vals = [b"failed", b"w1", b"default", None, None, None]
    job = job_from_hash("j", vals, base64.b64encode(_bomb(16 << 20)))
    assert job.status is RqStatus.FAILED
    assert job.exc_line == EXC_NOT_READ
    fine = job_from_hash("j", vals, base64.b64encode(zlib.compress(b"Tb\nValueError: a\x00b")))
    assert fine.exc_line == "ValueError: a\x00b"  # cleaned where it is bound to SQL


# -- key names and unreadable job hashes ------------------------------------------------------


@pytest.mark.parametrize(("name", "ok"), [
    ("0f6b7c1e-2a4d-4e5f-9a8b-7c6d5e4f3a2b", True),
    ("my_custom-id", True),
    ("host.example.com.1234", True),
    ("naïve", True),
    ("a\x00b", False),
    ("a\nb", False),
    ("tab\there", False),
    ("del\x7f", False),
    ("", False),
    ("x" * (MAX_NAME + 1), False),
])
def test_name_problem(name: str, ok: bool) -> None:
    assert (name_problem(name) == "") is ok


def test_decode_key_and_printable_key() -> None:
    assert decode_key(b"rq:job:abc") == "rq:job:abc"
    assert decode_key(b"rq:job:\xff\xfe") is None
    assert decode_key("rq:job:x") == "rq:job:x"
    shown = printable_key(b"rq:job:a\x00b\xff" + b"x" * 1000)
    assert shown.isascii() and "\x00" not in shown and len(shown) <= 200
    assert job_id_from_key("rq:job:a\x00b") == "a\x00b"  # parsed; name_problem refuses it


def test_a_wrong_type_reply_makes_only_that_job_unreadable() -> None:
    job = job_from_script("j", [b"!ERR", b"WRONGTYPE Operation against a key holding the "
                                           b"wrong kind of value"])
    assert job.status is RqStatus.UNREADABLE and "WRONGTYPE" in job.raw_status
    assert job_from_script("j", b"garbage").status is RqStatus.UNREADABLE
    assert job_from_script("j", 0).status is RqStatus.MISSING


def test_a_started_job_naming_a_worker_that_is_not_utf8_is_unreadable() -> None:
    started = job_from_hash("j", [b"started", b"\xc3\x28", b"default", None, None, None])
    assert started.status is RqStatus.UNREADABLE
    # the worker name decides nothing for a finished job: it syncs as before
    done = job_from_hash("j", [b"finished", b"\xc3\x28", b"default", None, None, None])
    assert done.status is RqStatus.FINISHED


# -- which database error means what ----------------------------------------------------------


@pytest.mark.parametrize(("exc", "kind"), [
    # outages: retried, never exit 2
    (asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
     PostgresUnavailable),
    (asyncpg.exceptions.LockNotAvailableError("could not obtain lock"), PostgresUnavailable),
    (asyncpg.exceptions.ReadOnlySQLTransactionError("cannot execute UPDATE in a read-only "
                                                    "transaction"), PostgresUnavailable),
    (asyncpg.exceptions.DiskFullError("could not extend file"), PostgresUnavailable),
    (asyncpg.exceptions.OutOfMemoryError("out of memory"), PostgresUnavailable),
    (asyncpg.exceptions.DeadlockDetectedError("deadlock detected"), PostgresUnavailable),
    (asyncpg.exceptions.SerializationError("could not serialize"), PostgresUnavailable),
    (asyncpg.exceptions.AdminShutdownError("terminating connection"), PostgresUnavailable),
    (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
     PostgresUnavailable),
    (asyncpg.exceptions.InternalServerError("cache lookup failed"), PostgresUnavailable),
    (asyncpg.exceptions.FeatureNotSupportedError("not supported"), PostgresUnavailable),
    (ConnectionResetError("reset"), PostgresUnavailable),
    # one row's value
    (asyncpg.exceptions.StringDataRightTruncationError("value too long for type character "
                                                       "varying(255)"), DataRejected),
    (asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence"), DataRejected),
    (asyncpg.exceptions.UntranslatableCharacterError("unsupported Unicode escape sequence"),
     DataRejected),
    (asyncpg.exceptions.InvalidTextRepresentationError("invalid input syntax"), DataRejected),
    (asyncpg.exceptions.NumericValueOutOfRangeError("out of range"), DataRejected),
    (asyncpg.exceptions.CheckViolationError("violates check constraint"), DataRejected),
    (asyncpg.exceptions.NotNullViolationError("null value"), DataRejected),
    (asyncpg.exceptions.RaiseError("a trigger said no"), DataRejected),
    (asyncpg.exceptions.ProgramLimitExceededError("index row size exceeds maximum"),
     DataRejected),
    (asyncpg.exceptions.ForeignKeyViolationError("violates foreign key constraint"),
     UnknownJob),
    # this configuration cannot work
    (asyncpg.exceptions.UndefinedTableError('relation "x" does not exist'), SchemaError),
    (asyncpg.exceptions.UndefinedColumnError('column "x" does not exist'), SchemaError),
    (asyncpg.exceptions.UndefinedFunctionError("function does not exist"), SchemaError),
    (asyncpg.exceptions.DatatypeMismatchError("is of type jsonb"), SchemaError),
    (asyncpg.exceptions.InsufficientPrivilegeError("permission denied"), SchemaError),
    (asyncpg.exceptions.InvalidCatalogNameError('database "x" does not exist'), SchemaError),
])
def test_translate(exc: Exception, kind: type[Exception]) -> None:
    got = translate(exc)
    assert type(got) is kind
    if isinstance(got, DataRejected):
        assert got.pg_error == type(exc).__name__
        assert got.sqlstate == exc.sqlstate  # type: ignore[attr-defined]
        assert got.sqlstate[:2] in ("22", "23", "P0", "54")


@pytest.mark.parametrize(("exc", "lost"), [
    (ConnectionResetError("reset"), True),
    (asyncpg.exceptions.AdminShutdownError("terminating connection"), True),
    (asyncpg.exceptions.ReadOnlySQLTransactionError("read-only"), True),  # failed over
    (asyncpg.exceptions.QueryCanceledError("statement timeout"), False),
    (asyncpg.exceptions.LockNotAvailableError("lock timeout"), False),
    (asyncpg.exceptions.DeadlockDetectedError("deadlock"), False),
])
def test_which_outages_replace_the_pools_connections(exc: Exception, lost: bool) -> None:
    assert _connection_lost(exc) is lost
