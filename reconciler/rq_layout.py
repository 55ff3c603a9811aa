"""RQ's layout in Redis, read as facts: the shapes of its keys, and what a worker hash, a
job hash, an execution, a status word, a results-stream entry or a read script's reply
says, for RQ 2.x and 3.x side by side.

Pure: takes names, bytes and replies, returns records, never talks to Redis (rq_state.py
does the reads, in scripts and pipelines, and hands their replies here). It must never
deserialize job data, never trust a field to be well-formed (garbage gives None, UNKNOWN or
an unreadable record, never an exception), and never import rq (tests/unit/test_rq_layout.py
holds its literal shapes to the imported rq's instead).

It runs past 600 lines because it is the one place every RQ 2/3 layout fact lives (SPEC:
"every RQ-layout detail stays inside" it and rq_state.py): splitting it by record would
spread the version differences over several modules.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from reconciler.model import RqJob, RqStatus, last_line

# The shapes of RQ's keys (2.12 and 3.x alike), as rq's own constants build them:
# Job.redis_job_namespace_prefix, Queue.redis_queue_namespace_prefix,
# Worker.redis_worker_namespace_prefix, REDIS_WORKER_KEYS, PUBSUB_CHANNEL_TEMPLATE,
# Result.get_key, ExecutionRegistry.key_template, IntermediateQueue's key. Literals, so that
# reading needs no rq import (rq_api.py); tests/unit/test_rq_layout.py holds each to the
# shape the imported rq builds.
_JOB = ":job:"
_QUEUE = ":queue:"
_WORKER = ":worker:"
_WORKERS = ":workers"
_PUBSUB = ":pubsub:"
_RESULTS = ":results:"
_JOB_EXECUTIONS = ":executions:"
INTERMEDIATE_SUFFIX = ":intermediate"
# Execution.key: "<prefix>:execution:<job_id>:<execution_id>" (rq/executions.py, 2.12 and
# 3.0 alike; a property, no constant to take it from).
_EXECUTION = ":execution:"
# RQ 3's per-worker execution index (WORKER_EXECUTIONS_KEY_TEMPLATE in rq/executions.py,
# "<prefix>:worker:{0}:executions"); RQ 2 has no such key, so it cannot come from an
# imported rq 2. tests/unit/test_rq_layout.py holds both to RQ's own when rq 3 is imported.
WORKER_EXECUTIONS_SUFFIX = ":executions"


class Keys:
    """Every RQ key and channel name this package reads or sends to, under one prefix."""

    __slots__ = ("execution", "job", "job_executions", "prefix", "pubsub", "queue", "results",
                 "worker", "workers")

    def __init__(self, prefix: str = "rq") -> None:
        self.prefix = prefix
        self.job = prefix + _JOB  # + job id: the job hash
        self.queue = prefix + _QUEUE  # + queue name: the queue list
        self.worker = prefix + _WORKER  # + worker name: the worker hash
        self.workers = prefix + _WORKERS  # the set of every worker hash's key
        self.pubsub = prefix + _PUBSUB  # + worker name: its command channel
        self.results = prefix + _RESULTS  # + job id: the results stream
        self.execution = prefix + _EXECUTION  # + "<job id>:<execution id>": one execution
        self.job_executions = prefix + _JOB_EXECUTIONS  # + job id: its executions (zset)

    def channel(self, worker_name: str) -> str:
        return self.pubsub + worker_name

    def rebase(self, rq_key: str) -> str:
        """A key as the imported rq builds it (a registry's, say), under this prefix."""
        from reconciler.rq_api import tail

        return self.prefix + tail(rq_key)

    def intermediate(self, queue: str) -> str:
        """The list a worker moves a job to as it dequeues it (RQ >= 2.0)."""
        return self.queue + queue + INTERMEDIATE_SUFFIX

    def job_id(self, key: str) -> str | None:
        """`rq:job:<id>` -> id; None for RQ's side keys (`rq:job:<id>:dependents` ...)."""
        if not key.startswith(self.job):
            return None
        rest = key[len(self.job):]
        # RQ reserves ':' inside ids for execution ids, so a colon means a side key.
        return rest if rest and ":" not in rest else None

    def worker_name(self, key: str) -> str | None:
        """The worker a key under `rq:worker:` belongs to: its hash, or (RQ 3) its
        executions set, whose events say the same worker changed. RQ 3 itself could not
        tell a worker named `<name>:executions` from that set, so neither can we."""
        if not key.startswith(self.worker):
            return None
        rest = key[len(self.worker):]
        if rest.endswith(WORKER_EXECUTIONS_SUFFIX):
            rest = rest[:-len(WORKER_EXECUTIONS_SUFFIX)]
        return rest or None


DEFAULT_KEYS = Keys()
# For callers that only ever deal with the default prefix (and the tests' raw writes).
JOB_PREFIX: str = DEFAULT_KEYS.job
QUEUE_PREFIX: str = DEFAULT_KEYS.queue
WORKER_PREFIX: str = DEFAULT_KEYS.worker


# Every RQ heartbeat (rq 2.12 and 3.0 Worker.heartbeat, register_birth) writes
# `last_heartbeat` *and* EXPIREs the worker hash: a busy worker every
# job_monitoring_interval (30 s) with a TTL of 90 s, an idle one every worker_ttl - 15
# (405 s) with worker_ttl + 60 (480 s). So the hash existing is the server's own word that
# a heartbeat came within its TTL, on the server's one clock. Only a hash that never
# expires (persisted by hand) is judged by its heartbeat value, which must then change
# within this long of the daemon's monotonic time: the longest TTL RQ sets by default,
# plus slack.
HEARTBEAT_STALE_SECONDS = 420 + 60 + 30
# ...and each of those TTLs is the worker's heartbeat interval plus this margin (rq 2.12 /
# 3.0: heartbeat(job_monitoring_interval + 60), get_heartbeat_ttl, worker_ttl + 60): a
# hash with less time than this left has missed the heartbeat its worker promised, by the
# server's clock.
HEARTBEAT_MARGIN_SECONDS = 60
# Keyspace flags we need: K keyspace channel, g generic (del/expire), h hash, x expired.
NEEDED_KEYSPACE_FLAGS = "Kghx"

_JOB_FIELDS = (b"status", b"worker_name", b"origin", b"started_at", b"ended_at", b"exc_info")
_KNOWN = {s.value for s in RqStatus} - {
    RqStatus.MISSING.value, RqStatus.UNKNOWN.value, RqStatus.UNREADABLE.value}
# A job id or worker name longer than this is not one RQ made (RQ's ids are 36 characters;
# worker names are host.pid or a uuid).
MAX_NAME = 512
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Exception texts: at most this much is inflated (a zlib bomb of 389 KB unpacks to 826 MB),
# and of that only the end is kept: the last line is all that is used.
EXC_INFLATE_BUDGET = 4 * 1024 * 1024
EXC_TAIL = 64 * 1024
EXC_NOT_READ = "(exception text too long or incomplete; its end was not read)"

class Layout(enum.StrEnum):
    """Where a worker records the job it runs, as its own hash says."""

    # RQ 2.x: the worker hash's `current_job` field.
    RQ2 = "rq2"
    # RQ 3.x: the `<prefix>:worker:<name>:executions` set, one `<job_id>:<execution_id>`
    # member per running execution, each with its `<prefix>:execution:...` hash.
    RQ3 = "rq3"
    # No version, another major, or evidence that contradicts the version: nothing it says
    # about its job is enough to prove a horse by.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """An RQ worker as read in one atomic step (its hash, and its executions), plus its
    command-channel subscriber count.

    `current_job` is the shared notion the rest of the package uses, whatever the layout:
    RQ 2's field, or RQ 3's single live execution (None when it runs several). The
    execution fields name that one execution (RQ 3), or the one live execution of
    `current_job` in RQ 2's per-job execution registry."""

    name: str
    exists: bool
    birth: datetime | None = None
    last_heartbeat: datetime | None = None
    pid: int | None = None
    hostname: str = ""
    death: bool = False
    current_job: str | None = None
    # PUBSUB NUMSUB of its command channel; -1 when Redis cannot tell (just restarted).
    subscribers: int = 0
    # The hash exists and has no TTL: the server will never expire it, so its existence
    # says nothing about heartbeats.
    persistent: bool = False
    # Seconds until the server expires the hash, as it said (None: not known).
    expires_in: float | None = None

    @property
    def heartbeat_late(self) -> bool:
        """The server's own clock says the worker missed the heartbeat it promised."""
        return self.expires_in is not None and self.expires_in < HEARTBEAT_MARGIN_SECONDS
    # The key exists but is not a hash RQ wrote (WRONGTYPE): it says nothing either way.
    unreadable: bool = False
    version: str = ""
    # Records built by hand (tests) describe an RQ 2 worker; the reader always sets it.
    layout: Layout = Layout.RQ2
    execution_id: str | None = None
    execution_created_at: datetime | None = None
    # Live executions: all the worker holds (RQ 3), or those of current_job (RQ 2).
    executions: int = 0
    # RQ recorded `shutdown_requested_date` (a warm shutdown: SIGTERM, a deploy, a drain):
    # a job it dies holding was lost through no fault of its own (rq 2.12 and 3.0 alike).
    shutdown_requested: bool = False

    @property
    def provable(self) -> bool:
        """True if what this record says about the worker's job is enough to prove a horse
        by: a known layout, and (RQ 3) exactly one live execution."""
        if self.layout is Layout.UNKNOWN or not self.current_job:
            return False
        return self.layout is Layout.RQ2 or (self.executions == 1 and self.execution_id is not None)


def text_of(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def parse_time(value: bytes | str | None) -> datetime | None:
    """RQ's utcformat timestamps ('%Y-%m-%dT%H:%M:%S.%fZ'); garbage gives None, never an
    exception. fromisoformat: strptime cost a tenth of a 20,000-row sweep."""
    if not value:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def inflate_tail(data: bytes, *, budget: int = EXC_INFLATE_BUDGET,
                 tail: int = EXC_TAIL) -> tuple[bytes, bool]:
    """The last `tail` bytes of zlib `data` inflated, inflating at most about `budget`
    bytes; and whether that reached the end of the stream. Memory stays O(tail) whatever
    the data claims to unpack to. zlib.error if `data` is not zlib at all."""
    d = zlib.decompressobj()
    end = b""
    total = 0
    buf = data
    while total < budget:
        out = d.decompress(buf, tail)
        buf = d.unconsumed_tail
        if out:
            total += len(out)
            end = (end + out)[-tail:]
        if d.eof or (not out and not buf):
            break
    return end, d.eof


def decode_exc(raw: bytes | None, *, b64: bool) -> str:
    """The end of an exception text (zlib, and base64 in RQ's results stream). A text
    that could not be read to its end (too long, or clipped by the read script) ends in
    EXC_NOT_READ instead of a last line that is not the last."""
    if not raw:
        return ""
    try:
        data = base64.b64decode(raw) if b64 else raw
        end, complete = inflate_tail(data)
    except (binascii.Error, zlib.error, ValueError):
        return ""
    text = end.decode("utf-8", "replace")
    return text if complete else f"{text}\n{EXC_NOT_READ}"


def name_problem(name: str) -> str:
    """Why `name`, a job id or worker name taken from a key, is not one to act on; ''
    if it is fine. Such a name cannot be an RQ id, and would poison SQL (NUL) or logs."""
    if not name:
        return "empty name"
    if len(name) > MAX_NAME:
        return f"name longer than {MAX_NAME} characters"
    if _CONTROL.search(name):
        return "name holds a control character"
    return ""


def decode_key(raw: bytes | str) -> str | None:
    """A key name as text, or None if it is not UTF-8 (RQ's names always are)."""
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def printable_key(raw: bytes | str) -> str:
    """A key name fit for a log line or a label, whatever it holds."""
    return ascii(raw if isinstance(raw, str) else bytes(raw))[:200]


_STATUS_BY_WORD: dict[bytes, tuple[RqStatus, str]] = {
    s.value.encode(): (s, str(s.value)) for s in RqStatus if s.value in _KNOWN}
_UNKNOWN_WORD = (RqStatus.UNKNOWN, "")


def job_from_hash(job_id: str, values: Sequence[bytes | None], result_exc: bytes | None = None) -> RqJob:
    """Build an RqJob from HMGET of _JOB_FIELDS. All-None means the hash does not exist.
    `result_exc`: a failed job's exc_string from its latest result (RQ 2), preferred over
    the job hash's legacy exc_info. Runs once per active row in a sweep: no per-field
    helpers on the common path."""
    status_b, worker_b, origin_b, started_b, ended_b, exc_b = values[:6]
    if status_b is None and worker_b is None and origin_b is None and started_b is None \
            and ended_b is None and exc_b is None:
        return RqJob(job_id, RqStatus.MISSING)
    status, word = _STATUS_BY_WORD.get(status_b or b"", _UNKNOWN_WORD)
    worker = ""
    if worker_b:
        try:
            worker = worker_b.decode("utf-8")
        except UnicodeDecodeError:
            if status is RqStatus.STARTED:
                # Which worker runs it decides whether the job is orphaned; RQ always
                # writes UTF-8 there, so this hash is not RQ's and says nothing.
                return RqJob(job_id, RqStatus.UNREADABLE, "unreadable: worker_name is not UTF-8")
            worker = worker_b.decode("utf-8", "replace")
    exc = ""
    if result_exc and status is RqStatus.FAILED:
        exc = decode_exc(result_exc, b64=True)
    if not exc and exc_b:
        exc = decode_exc(exc_b, b64=False)
    return RqJob(
        job_id,
        status,
        word or text_of(status_b)[:64],
        worker,
        origin_b.decode("utf-8", "replace") if origin_b else "",
        parse_time(started_b) if started_b else None,
        parse_time(ended_b) if ended_b else None,
        last_line(exc) if exc else "",
    )


def job_id_from_key(key: str, keys: Keys = DEFAULT_KEYS) -> str | None:
    return keys.job_id(key)


def worker_name_from_key(key: str, keys: Keys = DEFAULT_KEYS) -> str | None:
    return keys.worker_name(key)


def missing_keyspace_flags(current: str) -> str:
    """The flags of NEEDED_KEYSPACE_FLAGS that `current` does not already enable."""
    have = set(current)
    if "A" in have:  # alias for g$lshzxetd
        have |= set("g$lshzxetd")
    return "".join(f for f in NEEDED_KEYSPACE_FLAGS if f not in have)

def not_believed(persistence: dict[str, Any], replication: dict[str, Any]) -> str:
    """Why a Redis with this INFO cannot be believed about a missing key ('' if it can)."""
    if int(persistence.get("loading", 0) or 0):
        return "redis is loading its data set"
    if replication.get("role") == "slave":
        if int(replication.get("master_sync_in_progress", 0) or 0):
            return "redis is a replica in its initial sync"
        if replication.get("master_link_status") != "up":
            return "redis is a replica that lost its master"
    return ""


def worker_from_hash(name: str, vals: Sequence[bytes | None], subscribers: int) -> WorkerRecord:
    """A WorkerRecord from the worker hash's birth, last_heartbeat, pid, hostname, death,
    current_job (and version) values alone: an RQ 2 worker unless its version says other."""
    if all(v is None for v in vals):
        return WorkerRecord(name, exists=False, subscribers=subscribers)
    return worker_from_reply(name, [*vals[:6], vals[6] if len(vals) > 6 else b"2", 0, [], []],
                             subscribers)


def _major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() and len(head) < 4 else None


def layout_of(version: str, has_current_job: bool, executions_set: int) -> Layout:
    """A worker's layout from its hash's `version`, checked against the evidence:
    `executions_set` is the size of its RQ 3 executions set (-1 if that key is not a set
    RQ could have written). Contradicting evidence makes it UNKNOWN, as does any other
    version: what such a worker says about its job cannot be trusted to prove a horse."""
    major = _major(version)
    if major == 2 and executions_set == 0:
        return Layout.RQ2  # RQ 2 keeps no executions set (rq 2.12 rq/executions.py)
    if major == 3 and executions_set >= 0 and not has_current_job:
        return Layout.RQ3  # RQ 3 never writes current_job (rq 3.0 rq/worker/base.py serialize)
    return Layout.UNKNOWN


def _exec_time(value: Any) -> datetime | None:
    """An execution's created_at: seconds since the epoch, as RQ's Execution.serialize
    writes it (rq/executions.py)."""
    try:
        return datetime.fromtimestamp(float(text_of(value)), UTC)
    except (ValueError, OverflowError, OSError):
        return None


def worker_from_reply(name: str, vals: Any, subscribers: int) -> WorkerRecord:
    """A WorkerRecord from one worker's reply of rq_state's _READ_WORKERS_LUA."""
    if not isinstance(vals, list) or len(vals) < 10 or vals[0] == b"!ERR":
        return WorkerRecord(name, exists=True, unreadable=True, subscribers=subscribers)
    fields: list[Any] = vals[:7]
    if all(v is None for v in fields):
        return WorkerRecord(name, exists=False, subscribers=subscribers)
    set_size = vals[7] if isinstance(vals[7], int) else -1
    # (The key's PTTL: -1 means it never expires; a reply without it is an older script's.)
    pttl = vals[10] if len(vals) > 10 and isinstance(vals[10], int) else None
    shutdown = len(vals) > 11 and isinstance(vals[11], bytes) and bool(vals[11])
    persistent = pttl == -1
    expires_in = pttl / 1000 if pttl is not None and pttl >= 0 else None
    live3: list[Any] = vals[8] if isinstance(vals[8], list) else []
    live2: list[Any] = vals[9] if isinstance(vals[9], list) else []
    pid: int | None
    try:
        pid = int(text_of(fields[2])) if fields[2] else None
    except ValueError:
        pid = None
    version = text_of(fields[6])[:64]
    field_job = text_of(fields[5]) or None
    layout = layout_of(version, field_job is not None, set_size)
    execution_id: str | None = None
    created: datetime | None = None
    if layout is Layout.RQ3:
        # Several live executions (or a set too big to read): which one a child runs
        # cannot be told, so none is named.
        count = len(live3) // 3 if 0 < set_size <= MAX_EXECUTIONS else set_size
        current = None
        if count == 1 and len(live3) == 3:
            current, execution_id, created = text_of(live3[0]), text_of(live3[1]), _exec_time(live3[2])
    else:
        count = len(live2) // 2
        current = field_job
        if layout is Layout.RQ2 and count == 1:
            execution_id, created = text_of(live2[0]), _exec_time(live2[1])
    return WorkerRecord(
        name=name,
        exists=True,
        birth=parse_time(fields[0]),
        last_heartbeat=parse_time(fields[1]),
        pid=pid,
        hostname=text_of(fields[3]),
        death=bool(fields[4]),
        current_job=current,
        subscribers=subscribers,
        persistent=persistent,
        expires_in=expires_in,
        version=version,
        layout=layout,
        execution_id=execution_id,
        execution_created_at=created,
        executions=count,
        shutdown_requested=shutdown,
    )


# Each worker as one atomic step: its hash, its RQ 3 executions set with each live
# execution's created_at, and (for RQ 2's current_job) the live executions in that job's
# execution registry. Read apart, the hash could name a job whose execution had already
# been replaced by the next one. Read-only (HMGET, SCARD, SMEMBERS, ZRANGEBYSCORE, PTTL).
# ARGV[1] = worker names joined by "\n", ARGV[2] = the worker hash prefix, ARGV[3] = the
# executions set's suffix, ARGV[4] = the execution hash prefix, ARGV[5] = the job
# execution registry prefix, ARGV[6] = now, ARGV[7] = the most executions read per worker.
# Reply per worker: {"!ERR", msg} if its hash cannot be read, else the 7 hash values, the
# executions set's size (-1: not a set RQ wrote, or a member that is no `<job>:<execution>`),
# {job, execution, created_at, ...} of its live executions and {execution, created_at, ...}
# of current_job's, and the worker hash's PTTL (-1: it never expires). An execution is live
# while its hash exists: RQ deletes it when the

# Executions read per worker: an RQ worker runs one at a time; a set larger than this is
# not one RQ keeps, and says only "several" (no horse is proven under it).
MAX_EXECUTIONS = 16


def job_from_script(job_id: str, vals: Any) -> RqJob:
    """An RqJob from one job's reply of rq_state's _READ_JOBS_LUA."""
    if vals == 0:
        return RqJob(job_id, RqStatus.MISSING)
    if not isinstance(vals, list) or len(vals) < 2:
        return RqJob(job_id, RqStatus.UNREADABLE, "unreadable")
    if vals[0] == b"!ERR":
        return RqJob(job_id, RqStatus.UNREADABLE, f"unreadable: {text_of(vals[1])}"[:120])
    if len(vals) > 7:
        return job_from_hash(job_id, vals, vals[6])._replace(in_flight=vals[7] == 1)
    if len(vals) > 6:
        return job_from_hash(job_id, vals, vals[6])
    return job_from_hash(job_id, vals if len(vals) == 6 else vals + [None] * (6 - len(vals)))


def worker_gone_reason(rec: WorkerRecord | None, name: str, keys: Keys = DEFAULT_KEYS) -> str:
    """Why one reading of RQ's own records says the worker is gone, or '' if it does not.

    Only what the server itself holds counts here: the hash is missing (RQ deleted it, or
    the server expired it when no heartbeat came within its TTL) or records a death. The
    worker's `last_heartbeat` is its own host's wall clock and is never compared with
    ours; a silent command channel proves nothing in one reading (RQ's pub/sub thread can
    die while the worker works on). What many readings show, and the local pid proof,
    are the caller's (liveness.judge).
    """
    if rec is None or not rec.exists:
        return f"worker hash {keys.worker}{name} is missing"
    if rec.unreadable:
        return ""  # garbage under the worker's key: skip, never read it as a death
    if rec.death:
        return "worker registered its death"
    return ""


def stop_command(worker: WorkerRecord | None, job_id: str) -> tuple[str, dict[str, str]]:
    """The command (and its arguments) that makes the worker stop `job_id`'s horse.

    An RQ 3 worker whose record names the execution of `job_id` gets `stop-execution`: it
    stops that execution only, so a stop meant for a run that has ended cannot hit a later
    run of the same job id (RQ 3 rq/command.py handle_stop_execution_command; RQ 2 workers
    ignore the command). Everyone else gets `stop-job`, which both versions obey for the
    job they run (handle_stop_job_command)."""
    if (worker is not None and worker.layout is Layout.RQ3 and worker.current_job == job_id
            and worker.execution_id):
        return "stop-execution", {"job_id": job_id, "execution_id": worker.execution_id}
    return "stop-job", {"job_id": job_id}


# -- dependencies and the intermediate list --------------------------------------------------

# Dependents: `<prefix>:job:<id>:dependents` (a set of job ids; Job.dependents_key_for). A
# job's own dependencies are in its hash (`dependency_ids`, JSON; `dependency_id` before
# RQ 1.8) and in the set Job.dependencies_key, which RQ 2.12 and 3.0 build as
# f"{redis_job_namespace_prefix}:{id}:dependencies", i.e. `rq:job::<id>:dependencies`
# (sic): the hash is what is read here.
DEPENDENTS_SUFFIX = ":dependents"
# The most nodes one graph read visits; a larger graph is judged on what was read.
MAX_GRAPH = 2000
# RQ's maintenance lock of a queue (Queue.registry_cleaning_key, held by a worker while it
# runs clean_registries, the intermediate list's cleanup included), and its StartedJobRegistry
# (members `<job id>:<execution id>`), both under the prefix: "<prefix>:clean_registries:"
# and "<prefix>:wip:" + queue name.
MAINTENANCE_LOCK = ":clean_registries:"
STARTED_REGISTRY = ":wip:"
# RQ's set of every queue's key (Queue.redis_queues_keys).
QUEUES_SET = ":queues"


class DepNode(NamedTuple):
    """One job of a dependency graph as read: its status, the ids it depends on (from its
    hash), whether it allows its dependencies to fail. `readable` False: the dependency
    fields are not what RQ writes (nothing can be judged from them)."""

    id: str
    status: RqStatus
    raw_status: str = ""
    dependency_ids: tuple[str, ...] = ()
    allow_failure: bool = False
    readable: bool = True


def _dependency_ids(raw_list: Any, raw_one: Any) -> tuple[str, ...] | None:
    """RQ's `dependency_ids` (a JSON list of ids) or, failing that, `dependency_id`; None
    if what is there is not what RQ writes."""
    if isinstance(raw_list, bytes) and raw_list:
        try:
            ids = json.loads(raw_list)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(ids, list) or not all(
                isinstance(i, str) and i and not name_problem(i) for i in ids):
            return None
        return tuple(ids)
    if isinstance(raw_one, bytes) and raw_one:
        one = text_of(raw_one)
        return None if name_problem(one) else (one,)
    return ()


def dep_node(job_id: str, vals: Any) -> DepNode:
    """A DepNode from one node's reply of rq_state's graph script: {status, dependency_ids,
    dependency_id, allow_dependency_failures} (each false when absent), or 0 if the hash
    does not exist, or {"!ERR", msg}."""
    if vals == 0:
        return DepNode(job_id, RqStatus.MISSING)
    if not isinstance(vals, list) or len(vals) < 4 or vals[0] == b"!ERR":
        return DepNode(job_id, RqStatus.UNREADABLE, readable=False)
    status, word = _STATUS_BY_WORD.get(vals[0] or b"", _UNKNOWN_WORD)
    deps = _dependency_ids(vals[1], vals[2])
    allow = vals[3]
    return DepNode(job_id, status, word or text_of(vals[0])[:64], deps or (),
                   allow_failure=isinstance(allow, bytes) and allow.strip() not in (b"", b"0"),
                   readable=deps is not None)


def graph_from_reply(reply: Any) -> tuple[dict[str, DepNode], bool]:
    """The nodes of a graph script's reply {truncated, id1, vals1, id2, vals2, ...}, and
    whether the walk was cut short (MAX_GRAPH)."""
    if not isinstance(reply, list) or not reply:
        return {}, True
    nodes: dict[str, DepNode] = {}
    for i in range(1, len(reply) - 1, 2):
        jid = decode_key(reply[i]) if isinstance(reply[i], bytes) else None
        if jid is None or name_problem(jid):
            continue
        nodes[jid] = dep_node(jid, reply[i + 1])
    return nodes, reply[0] == 1


class Stranded(NamedTuple):
    """A job in a queue's intermediate list that is still `queued` and has no execution
    (no worker recorded that it runs it)."""

    queue: str
    job_id: str


def strands_from_reply(reply: Any) -> list[Stranded]:
    """rq_state's strands script reply: {queue1, id1, queue2, id2, ...}."""
    out: list[Stranded] = []
    if not isinstance(reply, list):
        return out
    for i in range(0, len(reply) - 1, 2):
        q = decode_key(reply[i]) if isinstance(reply[i], bytes) else None
        j = decode_key(reply[i + 1]) if isinstance(reply[i + 1], bytes) else None
        if q and j and not name_problem(q) and not name_problem(j):
            out.append(Stranded(q, j))
    return out


def served_queues(reply: Any, keys: Keys = DEFAULT_KEYS) -> set[str]:
    """The queues some live worker listens to, from {name1, {birth, last_heartbeat, death,
    queues}, ...} (RQ's worker hash `queues` field: names joined by ','). Live is the
    server's word (the hash not expired, no death), never a heartbeat read against our
    clock."""
    served: set[str] = set()
    if not isinstance(reply, list):
        return served
    for i in range(0, len(reply) - 1, 2):
        vals = reply[i + 1]
        if not isinstance(vals, list) or len(vals) < 4 or vals[0] == b"!ERR":
            continue
        rec = WorkerRecord(text_of(reply[i]), exists=any(v is not None for v in vals),
                           last_heartbeat=parse_time(vals[1]), death=bool(vals[2]),
                           subscribers=-1)
        if worker_gone_reason(rec, rec.name, keys):
            continue
        served.update(q for q in text_of(vals[3]).split(",") if q)
    return served


@dataclass(frozen=True, slots=True)
class OrphanJob:
    """What queueing an orphan again needs of its job hash, read raw (never unpickled):
    who ran it and when (the requeue is guarded by them), its queue, and RQ's Retry
    fields as RQ's Job reads them (`retries_left`, the JSON list `retry_intervals`,
    `enqueue_at_front_on_retry`)."""

    rq_id: str
    status: str
    worker_name: str
    started_at_raw: str
    origin: str
    retries_left: int | None = None
    retry_intervals: tuple[int, ...] = ()
    at_front_on_retry: bool = False


def orphan_job_from_reply(rq_id: str, vals: Any) -> OrphanJob | None:
    """An OrphanJob from HMGET status, worker_name, started_at, origin, retries_left,
    retry_intervals, enqueue_at_front_on_retry (None: no such hash). Garbage in a Retry
    field reads as no Retry: such a job is never retried by us."""
    if not isinstance(vals, list) or len(vals) < 7 or all(v is None for v in vals):
        return None
    left: int | None = None
    try:
        left = int(text_of(vals[4])) if vals[4] else None
    except ValueError:
        left = None
    intervals: tuple[int, ...] = ()
    if vals[5] and len(vals[5]) <= 4096:
        try:
            raw = json.loads(text_of(vals[5]))
        except ValueError:
            raw = None
        if isinstance(raw, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                         for i in raw):
            intervals = tuple(raw)
        else:
            left = None
    front = False
    try:
        front = bool(int(text_of(vals[6]))) if vals[6] else False
    except ValueError:
        front = False
    return OrphanJob(rq_id, text_of(vals[0]), text_of(vals[1]), text_of(vals[2]),
                     text_of(vals[3]), left, intervals, front)
