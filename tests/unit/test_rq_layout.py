"""How RQ 2 and RQ 3 layouts are told apart and read, without a Redis: key names under a
prefix, keyspace channels, a worker's layout from its hash, the stop command it gets."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import rq
import rq.defaults
import rq.executions

from reconciler.config import ConfigError, from_mapping
from reconciler.rq_api import IMPORTED_PREFIX, RefusingSerializer, prefix_problem, rq_key_shapes
from reconciler.rq_layout import (
    WORKER_EXECUTIONS_SUFFIX,
    Keys,
    Layout,
    WorkerRecord,
    layout_of,
    stop_command,
    worker_from_reply,
)

RQ3_IMPORTED = hasattr(rq.defaults, "RQ_KEY_PREFIX")


def test_keys_follow_the_prefix() -> None:
    k = Keys("myapp")
    assert k.job == "myapp:job:"
    assert k.worker == "myapp:worker:"
    assert k.workers == "myapp:workers"
    assert k.channel("w1") == "myapp:pubsub:w1"
    assert k.results == "myapp:results:"
    assert k.execution == "myapp:execution:"
    assert k.job_executions == "myapp:executions:"
    assert k.intermediate("default") == "myapp:queue:default:intermediate"
    assert k.rebase(f"{IMPORTED_PREFIX}:canceled:default") == "myapp:canceled:default"


def test_keys_match_what_the_imported_rq_builds() -> None:
    """Our shapes are RQ's (with the prefix it was imported with)."""
    from rq.command import PUBSUB_CHANNEL_TEMPLATE
    from rq.executions import Execution, ExecutionRegistry
    from rq.job import Job
    from rq.results import Result
    from rq.worker import Worker

    k = Keys(IMPORTED_PREFIX)
    assert k.job == Job.redis_job_namespace_prefix
    assert k.worker == Worker.redis_worker_namespace_prefix
    assert k.channel("w") == PUBSUB_CHANNEL_TEMPLATE % "w"
    assert k.results + "j" == Result.get_key("j")  # type: ignore[no-untyped-call]
    assert k.job_executions + "j" == ExecutionRegistry.key_template.format("j")
    assert Execution(id="e", job_id="j", connection=None).key == k.execution + "j:e"  # type: ignore[arg-type]


def test_key_shape_literals_are_the_imported_rqs() -> None:
    """rq_layout.py reads without importing rq: its literal shapes must be RQ's own."""
    from reconciler import rq_layout

    shapes = rq_key_shapes()
    assert shapes == {
        "job": rq_layout._JOB, "queue": rq_layout._QUEUE, "worker": rq_layout._WORKER,
        "workers": rq_layout._WORKERS, "pubsub": rq_layout._PUBSUB, "results": rq_layout._RESULTS,
        "job_executions": rq_layout._JOB_EXECUTIONS, "intermediate": rq_layout.INTERMEDIATE_SUFFIX,
    }


@pytest.mark.skipif(not RQ3_IMPORTED, reason="the executions set exists in RQ 3 only")
def test_worker_executions_key_is_rq3s() -> None:
    template = rq.executions.WORKER_EXECUTIONS_KEY_TEMPLATE  # type: ignore[attr-defined]
    assert template.format("w1") == Keys(IMPORTED_PREFIX).worker + "w1" + WORKER_EXECUTIONS_SUFFIX


@pytest.mark.parametrize(("key", "worker"), [
    ("rq:worker:w1", "w1"),
    ("rq:worker:w1:executions", "w1"),  # an RQ 3 heartbeat touches this set
    ("rq:worker:host.123", "host.123"),
    ("rq:workers", None),
    ("rq:worker:", None),
    ("other:worker:w1", None),
])
def test_worker_keys_name_their_worker(key: str, worker: str | None) -> None:
    assert Keys("rq").worker_name(key) == worker


def test_a_custom_prefix_parses_its_own_keys_only() -> None:
    k = Keys("myapp")
    assert k.worker_name("myapp:worker:w1:executions") == "w1"
    assert k.job_id("myapp:job:abc") == "abc"
    assert k.job_id("rq:job:abc") is None
    assert k.worker_name("rq:worker:w1") is None


@pytest.mark.parametrize(("version", "current_job", "set_size", "layout"), [
    ("2.12.0", True, 0, Layout.RQ2),
    ("2.12.0", False, 0, Layout.RQ2),
    ("3.0.0", False, 0, Layout.RQ3),
    ("3.0.0", False, 1, Layout.RQ3),
    ("3.1.2", False, 2, Layout.RQ3),
    # contradictions: each version keeps its job where the other does not
    ("2.12.0", True, 1, Layout.UNKNOWN),
    ("3.0.0", True, 1, Layout.UNKNOWN),
    # the executions key is not a set RQ wrote
    ("3.0.0", False, -1, Layout.UNKNOWN),
    # no version, or one this package does not know
    ("", True, 0, Layout.UNKNOWN),
    ("", False, 1, Layout.UNKNOWN),
    ("4.0.0", False, 1, Layout.UNKNOWN),
    ("1.16.0", True, 0, Layout.UNKNOWN),
    ("three", False, 1, Layout.UNKNOWN),
])
def test_layout_from_version_and_evidence(version: str, current_job: bool, set_size: int,
                                          layout: Layout) -> None:
    assert layout_of(version, current_job, set_size) is layout


NOW = datetime(2026, 1, 1, tzinfo=UTC)
HASH = [b"2026-01-01T00:00:00.000000Z", b"2026-01-01T00:00:01.000000Z", b"123", b"h", None]


def reply(version: bytes | None, current_job: bytes | None, set_size: int,
          live3: list[bytes], live2: list[bytes]) -> list[object]:
    return [*HASH, current_job, version, set_size, live3, live2]


def test_an_rq3_worker_names_its_one_live_execution() -> None:
    rec = worker_from_reply("w", reply(b"3.0.0", None, 1, [b"job1", b"ex1", b"1767225600.5"], []), 1)
    assert rec.layout is Layout.RQ3 and rec.current_job == "job1"
    assert rec.execution_id == "ex1" and rec.executions == 1
    assert rec.execution_created_at == datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)
    assert rec.provable


def test_an_rq3_worker_with_several_executions_proves_nothing() -> None:
    live = [b"job1", b"ex1", b"1767225600.5", b"job2", b"ex2", b"1767225601.5"]
    rec = worker_from_reply("w", reply(b"3.0.0", None, 2, live, []), 1)
    assert rec.layout is Layout.RQ3 and rec.executions == 2
    assert rec.current_job is None and rec.execution_id is None
    assert not rec.provable


def test_an_rq3_worker_whose_execution_expired_runs_nothing() -> None:
    # a member left in the set whose execution hash is gone: not live
    rec = worker_from_reply("w", reply(b"3.0.0", None, 1, [], []), 1)
    assert rec.current_job is None and rec.executions == 0 and not rec.provable


def test_an_rq2_worker_keeps_current_job_and_learns_its_execution() -> None:
    rec = worker_from_reply("w", reply(b"2.12.0", b"job1", 0, [], [b"ex1", b"1767225600"]), 1)
    assert rec.layout is Layout.RQ2 and rec.current_job == "job1"
    assert rec.execution_id == "ex1" and rec.provable


def test_an_unknown_layout_keeps_its_job_but_proves_nothing() -> None:
    rec = worker_from_reply("w", reply(None, b"job1", 0, [], []), 1)
    assert rec.layout is Layout.UNKNOWN and rec.current_job == "job1"
    assert not rec.provable


def test_a_worker_hash_that_cannot_be_read_is_unreadable_not_gone() -> None:
    rec = worker_from_reply("w", [b"!ERR", b"WRONGTYPE"], 1)
    assert rec.exists and rec.unreadable


def test_a_missing_worker_hash() -> None:
    rec = worker_from_reply("w", [None] * 7 + [0, [], []], 0)
    assert not rec.exists


def rq3(job: str = "j", execution: str | None = "e1") -> WorkerRecord:
    return WorkerRecord("w", True, current_job=job, layout=Layout.RQ3, execution_id=execution,
                        executions=1)


def test_stop_execution_for_the_run_an_rq3_worker_names() -> None:
    assert stop_command(rq3(), "j") == ("stop-execution", {"job_id": "j", "execution_id": "e1"})


@pytest.mark.parametrize("worker", [
    None,  # not read
    WorkerRecord("w", True, current_job="j"),  # RQ 2
    rq3(job="other"),  # the worker runs another job now
    rq3(execution=None),  # several executions
    WorkerRecord("w", True, current_job="j", layout=Layout.UNKNOWN),
])
def test_stop_job_for_everyone_else(worker: WorkerRecord | None) -> None:
    assert stop_command(worker, "j") == ("stop-job", {"job_id": "j"})


def test_the_serializer_given_to_rq_loads_and_dumps_nothing() -> None:
    import pickle

    with pytest.raises(ValueError, match="never deserializes"):
        RefusingSerializer.loads(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="never serializes"):
        RefusingSerializer.dumps({"a": 1})


def test_prefix_problem_names_what_to_do() -> None:
    assert prefix_problem(IMPORTED_PREFIX) == ""
    problem = prefix_problem(IMPORTED_PREFIX + "x")
    assert "redis.key_prefix" in problem
    assert ("install rq>=3" in problem) if not RQ3_IMPORTED else ("RQ_KEY_PREFIX" in problem)


@pytest.mark.parametrize("prefix", ["", "a b", "rq\n", "ü", "a*"])
def test_a_key_prefix_rq_would_refuse_is_a_config_error(prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"redis\.key_prefix"):
        from_mapping({"redis": {"key_prefix": prefix}}, environ={})


@pytest.mark.parametrize("prefix", ["rq", "myapp", "{rq}", "a.b:c-d_e"])
def test_key_prefixes_rq_accepts(prefix: str) -> None:
    assert from_mapping({"redis": {"key_prefix": prefix}}, environ={}).redis.key_prefix == prefix


def test_the_worker_hash_ttl_is_read_as_the_server_said() -> None:
    """The script's last value is the hash's PTTL: -1 never expires; a reply without it
    (an older script) knows nothing of it."""
    base = reply(b"2.12.0", b"j1", 0, [], [])
    never = worker_from_reply("w", [*base, -1], 1)
    assert never.persistent and never.expires_in is None and not never.heartbeat_late
    soon = worker_from_reply("w", [*base, 59_000], 1)
    assert not soon.persistent and soon.expires_in == 59.0 and soon.heartbeat_late
    fresh = worker_from_reply("w", [*base, 89_000], 1)
    assert not fresh.heartbeat_late
    older = worker_from_reply("w", base, 1)
    assert not older.persistent and older.expires_in is None and not older.heartbeat_late
