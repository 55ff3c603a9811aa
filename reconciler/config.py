"""Configuration: one TOML file -> frozen dataclasses, validated once, at the edge.

Every error names the key path and what is wrong, and is raised before any connection
is made (the CLI turns it into exit 2). Secrets may come from the environment; they are
never printed: use `redact()` on any URL or DSN that goes to a log line.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from reconciler.hostid import default_instance_name
from reconciler.urls import (
    SCHEME,
    UrlError,
    authority_end,
    check_postgres_dsn,
    check_redis_url,
    check_sentinel_userinfo,
    cut_password_end,
    raw_password_end,
)

DEFAULT_CONFIG_PATH = "/etc/rq-reconciler/config.toml"
ENV_CONFIG = "RQ_RECONCILER_CONFIG"
ENV_REDIS_URL = "RQ_RECONCILER_REDIS_URL"
ENV_POSTGRES_DSN = "RQ_RECONCILER_POSTGRES_DSN"
ENV_POSTGRES_LISTEN_DSN = "RQ_RECONCILER_POSTGRES_LISTEN_DSN"

KeyspaceMode = Literal["auto", "require", "off"]
Pooler = Literal["none", "transaction"]
OrphanedHorse = Literal["kill", "let-finish"]
HostPid = Literal["auto", "on", "off"]
Dependents = Literal["cancel", "enqueue"]
OrphanRequeue = Literal["retries", "always", "never"]
LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


class ConfigError(Exception):
    """A configuration problem; `key` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error: {key}: {message}")
        self.key = key
        self.message = message


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
# What RQ 3 accepts as RQ_KEY_PREFIX (rq/defaults.py); it is spliced into Lua and templates.
_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.:{}-]+")


def quote_ident(name: str) -> str:
    """Quote a (possibly schema-qualified) identifier that already passed validation."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


# PostgreSQL keeps NAMEDATALEN - 1 = 63 bytes of an identifier and silently cuts the rest.
MAX_IDENT_BYTES = 63
_HASH_CHARS = 8


def derived_ident(base: str, suffix: str) -> str:
    """`base + suffix` as an identifier PostgreSQL keeps whole: at most 63 bytes.

    Names we derive (an index, trigger, function or channel named after a configured
    table or channel) can outgrow the limit, and PostgreSQL would cut them, so that two of
    them could become one name (for a 63-character table, both of its indexes became the
    table's own name and were never created). A name that is too long keeps its suffix (it
    still says what it is) and as much of `base` as fits, plus a hash of the whole name:
    two bases that share a long prefix never meet. A name that fits is unchanged, so
    existing installs keep theirs."""
    name = base + suffix
    if len(name.encode("utf-8")) <= MAX_IDENT_BYTES:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:_HASH_CHARS]
    room = MAX_IDENT_BYTES - len(f"_{digest}{suffix}".encode())
    head = base.encode("utf-8")[:room].decode("utf-8", "ignore")
    return f"{head}_{digest}{suffix}"


def _check_ident(key: str, value: str, *, qualified: bool = False) -> str:
    parts = value.split(".") if qualified else [value]
    if qualified and len(parts) > 2:
        raise ConfigError(key, f"{value!r} has more than one dot; use schema.table")
    for part in parts:
        if not _IDENT.match(part):
            raise ConfigError(
                key,
                f"{value!r} is not a plain SQL identifier "
                "(letters, digits, _ and $, not starting with a digit, at most 63 chars)",
            )
    return value


# A query parameter whose name ends in "password" (password, sslpassword, ssl_password):
# the value runs to the next parameter or the fragment.
_QUERY_SECRET = re.compile(r"([?&;][^=&;#]*password=)[^&;#]*", re.IGNORECASE)
# libpq key/value DSN: `password=secret`, `password = 'a b\\'c'`. A quoted value runs to
# its closing quote (backslash escapes a character), an unquoted one to whitespace (a
# backslash escapes there too); an unterminated quote hides the rest of the string.
_KV_SECRET = re.compile(
    r"((?:^|(?<=\s))\w*password\s*=\s*)(?:'(?:\\.|[^'\\])*(?:'|\\?$)|(?:\\.|[^\s\\])*\\?)",
    re.IGNORECASE | re.DOTALL,
)
_MASK = "***"


def redact(url: str) -> str:
    """Hide every password in a URL or libpq DSN, for logs and `check` output.

    URLs: the userinfo password (`redis://user:pw@host`) and every `password=` query
    parameter (`unix:///run/redis.sock?password=pw`, the only place a unix-socket Redis
    can take one; also `sslpassword=`). A password that should have been percent-encoded
    and was not (a raw `/`, `?` or `#` in it) is still hidden. libpq key/value DSNs:
    `password=` values, quoted or not. When in doubt it hides too much, never too little.
    """
    m = SCHEME.match(url)
    if m is None:
        return _KV_SECRET.sub(lambda k: k.group(1) + _MASK, url)
    head, rest = url[:m.end()], url[m.end():]
    end = authority_end(rest)
    at = max(rest.rfind("@", 0, end), raw_password_end(rest, end), cut_password_end(rest, end))
    if at == -1:
        shown, tail = rest[:end], rest[end:]
    else:
        userinfo, after = rest[:at], rest[at:]
        host_end = authority_end(after)
        user, colon, _password = userinfo.partition(":")
        shown = (f"{user}:{_MASK}" if colon else userinfo) + after[:host_end]
        tail = after[host_end:]
    return head + shown + _QUERY_SECRET.sub(lambda q: q.group(1) + _MASK, tail)


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    keyspace_events: KeyspaceMode = "auto"
    socket_timeout_seconds: float = 5.0
    # RQ 3's RQ_KEY_PREFIX: the first part of every RQ key and channel (RQ 2 has only "rq").
    key_prefix: str = "rq"


@dataclass(frozen=True)
class PostgresConfig:
    dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    pool_size: int = 4
    # What needs a session of its own (LISTEN, the sweep's advisory lock) connects here;
    # "" = dsn. Set it when dsn goes through a transaction-mode pooler (PgBouncer).
    listen_dsn: str = ""
    # "transaction": dsn is a transaction-mode pooler: no prepared-statement cache and no
    # startup parameters (PgBouncer refuses both); listen_dsn is then required.
    pooler: Pooler = "none"

    @property
    def session_dsn(self) -> str:
        return self.listen_dsn or self.dsn


@dataclass(frozen=True)
class Statuses:
    queued: str = "queued"
    running: str = "running"
    completed: str = "completed"
    failed: str = "failed"
    cancelled: str = "cancelled"

    @property
    def active(self) -> tuple[str, str]:
        return (self.queued, self.running)

    @property
    def terminal(self) -> tuple[str, str, str]:
        return (self.completed, self.failed, self.cancelled)


@dataclass(frozen=True)
class JobsConfig:
    table: str = "training_jobs"
    id_column: str = "id"
    rq_id_column: str = "rq_job_id"
    status_column: str = "status"
    error_column: str = "error_message"
    started_at_column: str = "started_at"
    completed_at_column: str = "completed_at"
    statuses: Statuses = field(default_factory=Statuses)


DEFAULT_REQUESTS_TABLE = "rq_reconciler_cancel_requests"


@dataclass(frozen=True)
class CancelConfig:
    requests_table: str = DEFAULT_REQUESTS_TABLE
    channel: str = "rq_reconciler_cancel"
    grace_seconds: float = 10.0
    lease_seconds: float = 60.0
    handover_seconds: float = 2.0
    orphaned_horse: OrphanedHorse = "kill"
    # Cancels this replica carries out at once; the rest wait their turn (claims handed to
    # it included: their leases are kept while they wait).
    concurrency: int = 32
    # "cancel": the dependents of a job cancelled on request can never run: they are
    # cancelled too. "enqueue": RQ's Job.cancel(enqueue_dependents=True) lets them run.
    dependents: Dependents = "cancel"


@dataclass(frozen=True)
class OrphansConfig:
    # What a job whose worker died becomes (requeue_policy.py decides): "retries" applies
    # RQ's own Retry rule at once, "always" queues any orphan again (up to max_requeues),
    # "never" fails it. A job stranded in a queue's intermediate list (it never started)
    # is put back on its queue under "retries" and "always", and fails under "never".
    requeue: OrphanRequeue = "retries"
    # With "always": requeues after which the job fails.
    max_requeues: int = 2
    # Wait before an orphan is queued again under "always" (doubles each time; > 0 puts it
    # in RQ's scheduled registry). "retries" honours the job's own Retry interval instead.
    requeue_delay_seconds: float = 0.0
    # Drained-then-killed workers (shutdown requested, then gone) a job may survive
    # without spending a retry or a requeue.
    max_disruptions: int = 10


@dataclass(frozen=True)
class SweepConfig:
    interval_seconds: float = 300.0
    min_age_seconds: float = 60.0
    max_orphan_fraction: float = 0.5
    max_orphan_min: int = 20
    stuck_after_seconds: float = 1800.0
    fallback_interval_seconds: float = 30.0
    page_size: int = 1000


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"

    @property
    def host_port(self) -> tuple[str, int]:
        """"9464" alone is loopback's port (127.0.0.1); ":9464", an empty host, is every
        IPv4 interface (0.0.0.0), as asked for in so many words; "[::1]:9464" IPv6.
        ValueError when it is none of these."""
        host, colon, port = self.listen.strip().rpartition(":")
        if not colon:
            return "127.0.0.1", _port(port)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError("an IPv6 address goes in brackets: [::1]:9464")
        return host or "0.0.0.0", _port(port)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"{text!r} is not a port number")
    return int(text)


@dataclass(frozen=True)
class LogConfig:
    format: LogFormat = "json"
    level: LogLevel = "info"


@dataclass(frozen=True)
class InstanceConfig:
    # Unique per host by default (hostname plus host identity: reconciler.hostid).
    name: str = field(default_factory=default_instance_name)
    # Map workers of other hostnames in PID namespaces below ours (a DaemonSet with
    # hostPID: true): reconciler.hostpid.
    host_pid: HostPid = "auto"


@dataclass(frozen=True)
class Config:
    redis: RedisConfig = field(default_factory=RedisConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    cancel: CancelConfig = field(default_factory=CancelConfig)
    orphans: OrphansConfig = field(default_factory=OrphansConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    source: str = "<defaults>"

    # Our other tables live beside the requests table, in its schema, and are named after
    # it: two installs in one schema (two apps, two jobs tables) never share one. The
    # default requests table keeps the names every install had before (rq_reconciler_*).

    def _ours(self, suffix: str) -> str:
        schema, dot, base = self.cancel.requests_table.rpartition(".")
        if base == DEFAULT_REQUESTS_TABLE:
            return f"{schema}{dot}rq_reconciler{suffix}"
        return f"{schema}{dot}{derived_ident(base, suffix)}"

    @property
    def events_table(self) -> str:
        return self._ours("_events")

    @property
    def first_seen_table(self) -> str:
        return self._ours("_first_seen")

    @property
    def replicas_table(self) -> str:
        return self._ours("_replicas")

    @property
    def version_table(self) -> str:
        return self._ours("_schema")

    @property
    def requeues_table(self) -> str:
        # Requeue counts and the per-attempt claim (one replica requeues an orphan); the
        # install's own, like the others.
        return self._ours("_requeues")

    @property
    def done_channel(self) -> str:
        return derived_ident(self.cancel.channel, "_done")


_CHOICES: dict[str, tuple[str, ...]] = {
    "redis.keyspace_events": ("auto", "require", "off"),
    "postgres.pooler": ("none", "transaction"),
    "cancel.orphaned_horse": ("kill", "let-finish"),
    "instance.host_pid": ("auto", "on", "off"),
    "cancel.dependents": ("cancel", "enqueue"),
    "orphans.requeue": ("retries", "always", "never"),
    "log.format": ("json", "console"),
    "log.level": ("debug", "info", "warning", "error"),
}

_POSITIVE = {
    "redis.socket_timeout_seconds",
    "postgres.pool_size",
    "cancel.lease_seconds",
    "cancel.concurrency",
    "sweep.interval_seconds",
    "sweep.fallback_interval_seconds",
    "sweep.page_size",
    "sweep.stuck_after_seconds",
}
# Bounds of [orphans]: beyond them a setting is a typo, not a policy.
MAX_REQUEUES = 1000
MAX_REQUEUE_DELAY_SECONDS = 86400.0

_NON_NEGATIVE = {"cancel.grace_seconds", "cancel.handover_seconds", "sweep.min_age_seconds",
                 "sweep.max_orphan_min", "orphans.max_requeues", "orphans.requeue_delay_seconds",
                 "orphans.max_disruptions"}


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(key, "unsupported value")  # pragma: no cover


def _section(cls: type[Any], raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a table, got {type(raw).__name__}")
    defaults = cls()
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{path}.{key}"
        if key not in known:
            raise ConfigError(full, f"unknown key (known: {', '.join(sorted(known))})")
        default = getattr(defaults, key)
        if isinstance(default, Statuses):
            values[key] = _section(Statuses, value, full)
            continue
        value = _coerce(full, value, default)
        if full in _CHOICES and value not in _CHOICES[full]:
            raise ConfigError(full, f"{value!r} is not one of {', '.join(_CHOICES[full])}")
        if full in _POSITIVE and value <= 0:
            raise ConfigError(full, f"must be > 0, got {value!r}")
        if full in _NON_NEGATIVE and value < 0:
            raise ConfigError(full, f"must be >= 0, got {value!r}")
        values[key] = value
    return replace(defaults, **values)


_SECTIONS: dict[str, type[Any]] = {
    "redis": RedisConfig,
    "postgres": PostgresConfig,
    "jobs": JobsConfig,
    "cancel": CancelConfig,
    "orphans": OrphansConfig,
    "sweep": SweepConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
    "instance": InstanceConfig,
}


def from_mapping(raw: dict[str, Any], *, source: str = "<mapping>",
                 environ: dict[str, str] | None = None) -> Config:
    env = os.environ if environ is None else environ
    parts: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _SECTIONS:
            raise ConfigError(key, f"unknown section (known: {', '.join(sorted(_SECTIONS))})")
        parts[key] = _section(_SECTIONS[key], value, key)
    cfg = Config(**parts, source=source)
    env_keys = {key: var for key, var in (("redis.url", ENV_REDIS_URL), ("postgres.dsn", ENV_POSTGRES_DSN),
                                          ("postgres.listen_dsn", ENV_POSTGRES_LISTEN_DSN))
                if env.get(var)}
    if env.get(ENV_REDIS_URL):
        cfg = replace(cfg, redis=replace(cfg.redis, url=env[ENV_REDIS_URL]))
    if env.get(ENV_POSTGRES_DSN):
        cfg = replace(cfg, postgres=replace(cfg.postgres, dsn=env[ENV_POSTGRES_DSN]))
    if env.get(ENV_POSTGRES_LISTEN_DSN):
        cfg = replace(cfg, postgres=replace(cfg.postgres, listen_dsn=env[ENV_POSTGRES_LISTEN_DSN]))
    _validate(cfg, env_keys)
    return cfg


def _check_url(key: str, url: str, env_keys: dict[str, str]) -> None:
    """ConfigError naming `key` (and the variable it came from), never the password."""
    where = f" (set by ${env_keys[key]})" if key in env_keys else ""
    try:
        if key.startswith("postgres."):
            check_postgres_dsn(url)
            return
        m = SCHEME.match(url)
        scheme = url[:m.end() - 3].lower() if m else ""
        if scheme not in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
            raise UrlError("scheme must be redis://, rediss://, unix:// or (Redis Sentinel) "
                           f"redis+sentinel://, got {redact(url)!r}")
        if not scheme.endswith("+sentinel"):
            check_redis_url(url)
            return
        from reconciler.redisconn import RedisUrlError, parse_sentinel_url

        check_sentinel_userinfo(url)
        try:
            parse_sentinel_url(url)
        except RedisUrlError as exc:
            raise UrlError(f"{exc} (redis+sentinel://host:port,host:port/<master name>/<db>), "
                           f"got {redact(url)!r}") from None
    except UrlError as exc:
        raise ConfigError(key, f"{exc}{where}") from None


def _validate(cfg: Config, env_keys: dict[str, str] | None = None) -> None:
    env_keys = env_keys or {}
    j = cfg.jobs
    _check_ident("jobs.table", j.table, qualified=True)
    for name in ("id_column", "rq_id_column", "status_column", "error_column"):
        _check_ident(f"jobs.{name}", getattr(j, name))
    for name in ("started_at_column", "completed_at_column"):
        if getattr(j, name):
            _check_ident(f"jobs.{name}", getattr(j, name))
    _check_ident("cancel.requests_table", cfg.cancel.requests_table, qualified=True)
    if cfg.postgres.pool_size < 2:
        # With one connection a sweep would wait forever for a second one.
        raise ConfigError("postgres.pool_size", "must be at least 2: a sweep holds one "
                          f"connection for its lock and queries on others, got {cfg.postgres.pool_size}")
    _check_ident("cancel.channel", cfg.cancel.channel)
    words: dict[str, str] = {}
    for f in fields(Statuses):
        word = getattr(j.statuses, f.name)
        if not word:
            raise ConfigError(f"jobs.statuses.{f.name}", "must not be empty")
        if word in words:
            raise ConfigError(
                f"jobs.statuses.{f.name}", f"{word!r} is also used for {words[word]}"
            )
        words[word] = f.name
    if not _KEY_PREFIX.fullmatch(cfg.redis.key_prefix):
        raise ConfigError("redis.key_prefix", "only letters, digits and _ . : - { } are allowed "
                          f"(RQ's own rule for RQ_KEY_PREFIX), got {cfg.redis.key_prefix!r}")
    _check_url("redis.url", cfg.redis.url, env_keys)
    for key in ("dsn", "listen_dsn"):
        if key == "dsn" or getattr(cfg.postgres, key):
            _check_url(f"postgres.{key}", getattr(cfg.postgres, key), env_keys)
    if cfg.postgres.pooler == "transaction" and not cfg.postgres.listen_dsn:
        # Through such a pooler a LISTEN hears nothing and a session lock is held by
        # whichever client gets that server connection next.
        raise ConfigError("postgres.listen_dsn", "required with pooler = \"transaction\": "
                          "LISTEN and the sweep lock need a session; give a direct (or "
                          "session-pooled) DSN")
    try:
        cfg.metrics.host_port  # noqa: B018 - it raises what is wrong
    except ValueError as exc:
        raise ConfigError("metrics.listen", f"expected HOST:PORT (or a port alone, for 127.0.0.1), "
                          f"got {cfg.metrics.listen!r}: {exc}") from None
    if not 0 < cfg.sweep.max_orphan_fraction <= 1:
        raise ConfigError("sweep.max_orphan_fraction", "must be in (0, 1]")
    if not cfg.instance.name:
        raise ConfigError("instance.name", "must not be empty")
    o = cfg.orphans
    if o.max_requeues > MAX_REQUEUES:
        raise ConfigError("orphans.max_requeues", f"must be at most {MAX_REQUEUES}, got "
                          f"{o.max_requeues} (a job that kills its worker each time is stopped "
                          "by a small number)")
    if o.max_disruptions > MAX_REQUEUES:
        raise ConfigError("orphans.max_disruptions",
                          f"must be at most {MAX_REQUEUES}, got {o.max_disruptions}")
    if o.requeue_delay_seconds > MAX_REQUEUE_DELAY_SECONDS:
        raise ConfigError("orphans.requeue_delay_seconds",
                          f"must be at most {MAX_REQUEUE_DELAY_SECONDS:g} (a day), got "
                          f"{o.requeue_delay_seconds:g}")


def resolve_path(path: str | None, environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return path or env.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH


def load(path: str | None = None, *, environ: dict[str, str] | None = None,
         missing_ok: bool = False) -> Config:
    """Load and validate a config file. Raises ConfigError naming the key on any problem."""
    resolved = resolve_path(path, environ)
    p = Path(resolved)
    if not p.exists():
        if missing_ok:
            return from_mapping({}, source="<defaults>", environ=environ)
        raise ConfigError("<file>", f"{resolved} does not exist (use --config or ${ENV_CONFIG}; "
                          f"`rq-reconciler example-config > {resolved}` writes one to start "
                          "from, every key commented)")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("<file>", f"{resolved} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("<file>", f"cannot read {resolved}: {exc}") from None
    return from_mapping(raw, source=resolved, environ=environ)
