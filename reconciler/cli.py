"""Command line: argparse sub-commands and exit codes; the logic lives elsewhere.

Exit codes: 0 ok, 1 the command failed (backend unreachable, outcome not `cancelled`,
a check failed), 2 bad config or usage — reported before any connection is made.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from reconciler import __version__
from reconciler.config import Config, ConfigError, load
from reconciler.errors import ReconcilerError

if TYPE_CHECKING:  # the sweep's modules are imported only by the command that sweeps
    from reconciler.reconcile import PassReport
    from reconciler.rq_state import RqState

GC_THRESHOLD = 10_000
# Event-loop turns a sweep gives its Postgres connections before it imports the rest:
# enough for each to have sent its connect (asyncpg's pool start-up, then the socket's).
CONNECT_HEAD_START_STEPS = 4


_CONFIG_HELP = ("config file (default: $RQ_RECONCILER_CONFIG, else /etc/rq-reconciler/config.toml); "
                "before or after the command")
_DEMO_HELP = "the whole story on throwaway Redis + Postgres and real RQ workers"
# Commands that read no config: --config given to them is a mistake, said so.
_NO_CONFIG = ("demo", "example-config", "example-unit")


def _seconds(text: str) -> float:
    """A finite number of seconds >= 0 (argparse's float() takes "nan" and "inf")."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rq-reconciler",
        description="Keeps a Postgres jobs table true to RQ's real state in Redis.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Before the command or after it: `rq-reconciler --config X check` = `check --config X`.
    p.add_argument("--config", metavar="PATH", default=None, help=_CONFIG_HELP)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        # SUPPRESS: not given here, it leaves the value given before the command.
        sp.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=_CONFIG_HELP)
        return sp

    cmd("run", "run the daemon")
    sp = cmd("sweep", "run one sweep now, print what changed, exit")
    sp.add_argument("--dry-run", action="store_true", help="decide, but change nothing")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.add_argument("--force", action="store_true",
                    help="override the mass-orphan breaker for this sweep")
    sp = cmd("cancel", "request the cancellation of a job (the daemon carries it out)")
    sp.add_argument("job_id", help="the jobs table's id of the job")
    sp.add_argument("--reason", default="", help="why (stored on the request)")
    sp.add_argument("--by", default="cli", help="who asks (requested_by)")
    sp.add_argument("--wait", type=_seconds, metavar="SECONDS", default=None,
                    help="wait for the outcome and print it as JSON")
    sp = cmd("migrate", "create/upgrade rq-reconciler's tables and trigger")
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--print-sql", action="store_true",
                     help="print the SQL instead of running it; made from the config alone "
                          "(no connection), for a DBA to run")
    how.add_argument("--print-grants", metavar="APP_ROLE", nargs="?", const="",
                     help="print the GRANTs the daemon's role (postgres.dsn's user) needs, and "
                          "with APP_ROLE those that let that role request cancels and read "
                          "their outcomes (and nothing more); from the config alone")
    cmd("check", "check config, connectivity, table, columns, index and keyspace setting")
    # The commands that read no config accept --config only to refuse it with a reason.
    sp = sub.add_parser("example-config", help="print the example configuration (every key, its "
                        "default and what it does) to start /etc/rq-reconciler/config.toml from",
                        description="print the example configuration")
    sp.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sp = sub.add_parser("example-unit", help="print the systemd unit (for "
                        "/etc/systemd/system/rq-reconciler.service)",
                        description="print the systemd unit")
    sp.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sp = sub.add_parser("demo", help=_DEMO_HELP, description=_DEMO_HELP + " (it makes its own "
                        "config: it takes no --config)")
    sp.add_argument("--keep", action="store_true", help="leave everything running at the end")
    sp.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _load(args: argparse.Namespace, *, missing_ok: bool = False) -> Config:
    return load(args.config, missing_ok=missing_ok)


def _settle_heap() -> None:
    """What is loaded by now (modules, config) lives as long as the process: keep the
    cyclic collector from walking it again and again, and from running every 700
    allocations. A 20,000-row sweep makes a few hundred thousand objects; with the
    defaults the collector took about a tenth of it (600 collections, 5 of them full).
    Until then (`main` switches it off) it does not run at all: start-up makes nothing but
    modules, classes and functions, which are never garbage, and the collections it ran
    over them cost a 20,000-row sweep's whole command about 12 ms."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)
    gc.enable()


def _run(coro: Coroutine[Any, Any, int]) -> int:
    _settle_heap()
    try:
        import uvloop

        return int(uvloop.run(coro))
    except ImportError:  # pragma: no cover - uvloop is a hard dependency
        import asyncio  # (not at the top: --help and a config error need no event loop)

        return asyncio.run(coro)


# The commands that talk to Redis through RQ's API; the others (migrate, cancel) import
# neither redis nor rq, which would cost them a tenth of a second of start-up.
_RQ_COMMANDS = frozenset({"run", "sweep", "check"})


def _adopt_key_prefix(cfg: Config, *, eager: bool) -> None:
    """RQ 3 fixes its key prefix from $RQ_KEY_PREFIX when rq is first imported, and the
    daemon writes through RQ's API: set it from redis.key_prefix before anything imports
    rq, then make sure the rq imported agrees (RQ 2 knows no prefix but "rq").

    Not `eager` (a one-shot sweep, which may never write through RQ): with the default
    prefix and no other in the environment, every rq agrees without being imported, and
    rq is left to the first write (rq_api.py)."""
    prefix = cfg.redis.key_prefix
    if "rq" not in sys.modules and prefix != "rq":
        os.environ.setdefault("RQ_KEY_PREFIX", prefix)
    if not eager and prefix == "rq" and os.environ.get("RQ_KEY_PREFIX", "rq") == "rq":
        return
    from reconciler.rq_api import prefix_problem

    problem = prefix_problem(prefix)
    if problem:
        raise ConfigError("redis.key_prefix", problem)


def main(argv: Sequence[str] | None = None) -> int:
    collecting = gc.isenabled()
    gc.disable()  # until _settle_heap(), once the command's modules are loaded
    try:
        return _main(argv)
    finally:
        if collecting:
            gc.enable()


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd in _NO_CONFIG and args.config is not None:
        why = ("it starts its own Redis and PostgreSQL and writes its own config"
               if args.cmd == "demo" else "it prints a file and reads none")
        parser.error(f"{args.cmd} takes no --config: {why}")
    try:
        if args.cmd in ("example-config", "example-unit"):
            # Files a pip-installed package has no other way to hand over.
            from importlib import resources

            name = "config.example.toml" if args.cmd == "example-config" else "rq-reconciler.service"
            sys.stdout.write(resources.files("reconciler").joinpath(name).read_text(encoding="utf-8"))
            return 0
        if args.cmd == "demo":
            gc.enable()  # (runs for a while, without _run)
            from reconciler.demo import run_demo

            return run_demo(keep=args.keep)
        cfg = _load(args)
        if args.cmd in _RQ_COMMANDS:
            _adopt_key_prefix(cfg, eager=args.cmd != "sweep")
    except ConfigError as exc:
        print(f"rq-reconciler: {exc}", file=sys.stderr)
        return 2
    from reconciler import log

    # One-shot commands keep stdout for their own output; the daemon logs to stdout.
    log.configure(cfg.log.format, cfg.log.level,
                  stream=sys.stdout if args.cmd == "run" else sys.stderr)
    try:
        if args.cmd == "run":
            from reconciler.supervisor import run_daemon

            return _run(run_daemon(cfg))
        if args.cmd == "sweep":
            return _run(_sweep(cfg, dry_run=args.dry_run, as_json=args.json, force=args.force))
        if args.cmd == "cancel":
            return _run(_cancel(cfg, args.job_id, args.reason, args.by, args.wait))
        if args.cmd == "migrate":
            if args.print_grants is not None:
                return _run(_print_grants(cfg, args.print_grants))
            return _run(_migrate(cfg, print_only=args.print_sql))
        if args.cmd == "check":
            return _run(_check(cfg))
    except ReconcilerError as exc:
        print(f"rq-reconciler: {_with_address(cfg, exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2  # pragma: no cover - argparse rejects unknown commands


def _with_address(cfg: Config, exc: ReconcilerError) -> str:
    """`exc`'s message, naming where the backend it is about was sought (host:port, never
    a password): an outage, or PostgreSQL refusing the login (SQLSTATE class 28)."""
    from reconciler.urls import addresses

    text = str(exc)
    backend = getattr(exc, "backend", None)
    if backend is None and str(getattr(exc.__cause__, "sqlstate", "") or "").startswith("28"):
        backend, text = "postgres", f"postgres: {text}"
    if backend == "redis":
        where = addresses(cfg.redis.url)
    elif backend == "postgres":
        where = ",".join(dict.fromkeys(a for a in (addresses(cfg.postgres.dsn),
                                                   addresses(cfg.postgres.session_dsn)) if a))
    else:
        return text
    prefix = f"{backend}: "
    if where and text.startswith(prefix):
        return f"{backend} at {where}: {text[len(prefix):]}"
    return text


async def _sweep(cfg: Config, *, dry_run: bool, as_json: bool, force: bool) -> int:
    import asyncio

    from reconciler.aio import cancel_until_done
    from reconciler.jobs_table import Store

    out = _ChangeOutput(cfg, as_json=as_json, dry_run=dry_run)
    store = Store(cfg)
    # All connections at once, in parallel: the sweep keeps up to four busy (its lock, a
    # page, a lookup, a write) and would otherwise open them one by one mid-sweep. They
    # are opened first, and the rest of the sweep's modules (redis-py's alone are a fifth
    # of the command's start-up) imported while the server forks their backends.
    # Each opening step is a task; the `finally` collects them all, whatever happened.
    opening = [asyncio.ensure_future(store.connect(min_size=cfg.postgres.pool_size))]
    rq: RqState | None = None
    try:
        for _ in range(CONNECT_HEAD_START_STEPS):
            await asyncio.sleep(0)
        gc.disable()
        from reconciler.model import WAITING
        from reconciler.processes import Processes
        from reconciler.reconcile import Reconciler
        from reconciler.rq_state import RqState
        from reconciler.sweep import Sweeper
        from reconciler.workers import Workers

        _settle_heap()

        rq = RqState(cfg.redis.url, socket_timeout=cfg.redis.socket_timeout_seconds,
                     key_prefix=cfg.redis.key_prefix)
        opening.append(asyncio.ensure_future(rq.ping()))
        for step in opening:
            await step
        # A one-shot sweep proves no horse gone (it watched none): it never queues an orphan
        # again, whatever [orphans] requeue says, and fails it as the first turn did; the
        # daemon applies the policy.
        once = dataclasses.replace(cfg, orphans=dataclasses.replace(cfg.orphans, requeue="never"))
        rec = Sweeper(Reconciler(once, store, rq, Workers(rq, Processes()), None))
        if dry_run:
            report = await rec.sweep(dry_run=True, force=force, on_page=out.page)
        else:
            async with store.sweep_lock() as got:
                if not got:
                    print("rq-reconciler: another sweep holds the lock (a daemon replica is "
                          "sweeping); try again in a moment", file=sys.stderr)
                    return 1

                async def page(part: PassReport) -> None:
                    await out.page(part)
                    for rid in part.rq_cancels:
                        # A cancelled row's job waits in RQ: the intent holds, cancel it now.
                        await rq.cancel_job(rid, only_from=WAITING)

                report = await rec.sweep(force=force, on_page=page)
    except ReconcilerError as exc:
        out.abort(str(exc))  # what was applied before the failure has been printed
        raise
    finally:
        await cancel_until_done(opening)
        if rq is not None:
            await rq.close()
        await store.close()
    out.finish({
        "checked": report.checked, "changed": report.changed, "lost_races": report.lost_races,
        "breaker_open": report.breaker_open, "not_found": report.not_found_held,
        "worker_breaker_open": report.worker_breaker_open, "worker_gone": report.gone_held,
        "active": report.counts, "stuck": report.stuck,
        "duration_seconds": round(report.duration, 3),
    })
    if report.breaker_open:
        print(f"rq-reconciler: mass-orphan breaker open: {report.not_found_held} of "
              f"{report.checked} rows have no RQ job; none were failed. Is redis.url the right "
              "server and db? Re-run with --force to fail them anyway.", file=sys.stderr)
        return 1
    if report.worker_breaker_open:
        print(f"rq-reconciler: worker breaker open: {report.gone_held} rows run on workers whose "
              "hashes vanished at once; none were failed. Re-run with --force to fail them "
              "anyway.", file=sys.stderr)
        return 1
    return 0


class _ChangeOutput:
    """A sweep's output, written page by page as the sweep applies them; nothing grows with
    the number of rows (a first sweep over a neglected table can change a million). As a
    table: the changes, then a note per horse to stop. As one JSON document: the
    "changes" array streamed, then the summary with its "horse_stops" and "rq_cancels"
    arrays, which wait in temporary files (in memory up to a megabyte) until then."""

    CLIP = 70

    def __init__(self, cfg: Config, *, as_json: bool, dry_run: bool) -> None:
        from reconciler.model import Reason

        self.as_json, self.dry_run = as_json, dry_run
        self.count = 0
        self._started = False
        words = [*cfg.jobs.statuses.active, *cfg.jobs.statuses.terminal]
        self._w_status = max(len("FROM"), *(len(w) for w in words))
        self._w_reason = max(len("REASON"), *(len(r.value) for r in Reason))
        self._w_id = len("JOB_ID")  # grows with the ids seen: ids are not known up front
        self._horse_stops = _Spool()
        self._rq_cancels = _Spool()

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.as_json:
            sys.stdout.write(f'{{\n  "dry_run": {json.dumps(self.dry_run)},\n  "changes": [')

    async def page(self, report: PassReport) -> None:
        """One page's report."""
        if report.changes:
            self.write(report.changes)
        for h in report.horse_stops:
            if self.as_json:
                self._horse_stops.add(json.dumps({"job_id": str(h.job_id), "rq_id": h.rq_id,
                                                  "worker": h.worker_name, "why": h.why}))
            else:
                self._horse_stops.add(f"note: job {h.job_id} ({h.rq_id}) has a horse to stop on "
                                      f"worker {h.worker_name}: {h.why} (the daemon does this)")
        if self.as_json:
            for rid in report.rq_cancels:
                self._rq_cancels.add(json.dumps(rid))

    def write(self, changes: Sequence[Any]) -> None:
        self._start()
        c = self.CLIP
        if self.as_json:
            sep = "\n    " if self.count == 0 else ",\n    "
            sys.stdout.write(sep + ",\n    ".join(json.dumps({
                "job_id": str(ch.job_id), "from": ch.from_status, "to": ch.to_status,
                "reason": ch.reason, "rq_status": ch.rq_status, "error": ch.error,
            }) for ch in changes))
        else:
            ws, wr = self._w_status, self._w_reason
            ids = [str(ch.job_id)[:c] for ch in changes]
            self._w_id = wi = max(self._w_id, *map(len, ids))
            lines = [] if self.count else [
                f"{'JOB_ID':<{wi}}  {'FROM':<{ws}}  {'TO':<{ws}}  {'REASON':<{wr}}  ERROR"]
            lines += [
                f"{i:<{wi}}  {ch.from_status[:c]:<{ws}}  {ch.to_status[:c]:<{ws}}  "
                f"{ch.reason:<{wr}}  {ch.error[:c]}".rstrip()
                for i, ch in zip(ids, changes, strict=True)
            ]
            sys.stdout.write("\n".join(lines) + "\n")
        self.count += len(changes)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.as_json:
            self._start()
            out = sys.stdout
            out.write("\n  ],\n" if self.count else "],\n")
            out.write(json.dumps(summary, indent=2)[2:-2])  # its members, without braces
            for key, spool in (("horse_stops", self._horse_stops), ("rq_cancels", self._rq_cancels)):
                out.write(f',\n  "{key}": [')
                spool.copy_to(out, sep=",\n    ", first="\n    ", last="\n  ")
                out.write("]")
            out.write("\n}\n")
            return
        if not self.count:
            print("nothing to change" if not self.dry_run else "nothing would change")
        self._horse_stops.copy_to(sys.stdout, sep="\n", first="", last="\n")
        self._rq_cancels.close()
        verb = "would change" if self.dry_run else "changed"
        print(f"\nchecked {summary['checked']} active rows, {verb} {summary['changed']} "
              f"in {summary['duration_seconds']:.2f} s")

    def abort(self, error: str) -> None:
        """Close the JSON document of a sweep that failed midway (still valid JSON)."""
        if self.as_json:
            self.finish({"error": error, "completed": False, "changed": self.count})
        else:
            if self.count:
                print(f"\nstopped after {self.count} changes: the sweep could not complete")
            self._horse_stops.close()
            self._rq_cancels.close()


class _Spool:
    """Lines kept for the end of the output: in memory up to a megabyte, then in an
    unnamed temporary file."""

    def __init__(self) -> None:
        self._file: Any = None
        self.count = 0

    def add(self, line: str) -> None:
        if self._file is None:
            import tempfile

            self._file = tempfile.SpooledTemporaryFile(max_size=1 << 20, mode="w+",  # noqa: SIM115
                                                       encoding="utf-8")
        self._file.write(line.replace("\n", " ") + "\n")
        self.count += 1

    def copy_to(self, out: Any, *, sep: str, first: str, last: str) -> None:
        """Write the lines to `out`, joined by `sep`, between `first` and `last` (nothing at
        all if there are none)."""
        if self._file is None:
            return
        self._file.seek(0)
        for i, line in enumerate(self._file):
            out.write((first if i == 0 else sep) + line.rstrip("\n"))
        out.write(last)
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def _migrate(cfg: Config, *, print_only: bool) -> int:
    from reconciler.migrations import SCHEMA_VERSION, migrate, preflight

    if print_only:
        print(await migrate(cfg, print_only=True))
        return 0
    await preflight(cfg)  # what it lacks, in one line, before anything else asks
    before = await _schema_where(cfg)
    await migrate(cfg)
    after = await _schema_where(cfg)
    tables = ", ".join([cfg.cancel.requests_table, cfg.events_table, cfg.first_seen_table,
                        cfg.replicas_table, cfg.requeues_table, after.version_table])
    where = f'in schema "{after.schema}"'
    if before.version >= SCHEMA_VERSION:
        said = f"rq-reconciler's tables {where} were up to date (v{before.version}); nothing changed"
    elif before.version == 0:
        said = (f"created rq-reconciler's tables {where} (v{after.version}): {tables}, and the "
                f"trigger that NOTIFYs {cfg.cancel.channel} on each new request")
    else:
        said = f"upgraded rq-reconciler's tables {where} from v{before.version} to v{after.version}"
    print(f"migrate: {said}", file=sys.stderr)
    if after.jobs_schema and after.jobs_schema != after.schema:
        # Unqualified names land in the first schema of the search_path, which is seldom
        # where an app keeps a schema-qualified table: say so while it is cheap to change.
        print(f'migrate: note: the jobs table {cfg.jobs.table} is in schema "{after.jobs_schema}"; '
              f"to keep rq-reconciler's tables beside it, set cancel.requests_table = "
              f'"{after.jobs_schema}.{cfg.cancel.requests_table.rpartition(".")[2]}"',
              file=sys.stderr)
    return 0


class _SchemaWhere(NamedTuple):
    version: int
    schema: str  # where our tables are (or, before the first migrate, will be created)
    version_table: str
    jobs_schema: str | None


async def _schema_where(cfg: Config) -> _SchemaWhere:
    import asyncpg

    from reconciler.config import quote_ident
    from reconciler.pgpool import translated

    schema, _dot, _ = cfg.cancel.requests_table.rpartition(".")
    version_table = cfg.version_table
    async with translated():
        conn = await asyncpg.connect(cfg.postgres.session_dsn, timeout=10)
        try:
            version = 0
            if await conn.fetchval("SELECT to_regclass($1)", quote_ident(version_table)):
                version = int(await conn.fetchval(
                    f"SELECT coalesce(max(version), 0) FROM {quote_ident(version_table)}") or 0)
            ours = schema or str(await conn.fetchval("SELECT current_schema()"))
            jobs = await conn.fetchval(
                "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.oid = to_regclass($1)", quote_ident(cfg.jobs.table))
        finally:
            await conn.close()
    return _SchemaWhere(version, ours, version_table, jobs)


async def _print_grants(cfg: Config, role: str) -> int:
    from reconciler.schema_needs import dsn_role, render_grants

    if role and (len(role.encode()) > 63 or not role.isprintable()):
        print("rq-reconciler: --print-grants needs a role name of 1 to 63 bytes, "
              "printable characters only", file=sys.stderr)
        return 2
    print(render_grants(cfg, daemon_role=dsn_role(cfg.postgres.dsn), app_role=role or None),
          end="")
    return 0


async def _check(cfg: Config) -> int:
    from reconciler.checks import run_checks

    lines = await run_checks(cfg)
    for line in lines:
        print(line.render())
    return 1 if any(ln.level == "FAIL" for ln in lines) else 0


async def _cancel(cfg: Config, job_id: str, reason: str, by: str, wait: float | None) -> int:
    import asyncpg

    from reconciler.client import CancelTimeout, cancel_async
    from reconciler.pgpool import translated

    async with translated():
        # A session of its own: it LISTENs for the outcome (a pooler would lose the NOTIFY).
        conn = await asyncpg.connect(cfg.postgres.session_dsn, timeout=10)
    try:
        async with translated():
            try:
                out = await cancel_async(conn, job_id, reason=reason, requested_by=by, wait=wait,
                                         requests_table=cfg.cancel.requests_table,
                                         channel=cfg.cancel.channel)
            except CancelTimeout as exc:  # a TimeoutError: not to be taken for an outage
                print(json.dumps({"request_id": exc.request_id, "state": exc.state,
                                  "outcome": None, "message": str(exc)}, indent=2))
                return 1
    finally:
        await conn.close()
    shown = {**out.detail, "request_id": out.request_id} if out.done else {
        "request_id": out.request_id, "state": out.state}
    if out.done:
        shown["outcome"] = out.outcome
    print(json.dumps(shown, indent=2, default=str))
    return 0 if out.success or (wait is None and not out.done) else 1
