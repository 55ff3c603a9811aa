"""`rediss://` with a private CA: a real redis-server with a TLS port, certificates made
here by openssl; `check` says what is wrong with the TLS set-up, and the daemon and RQ's
workers work over it."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from reconciler.devstack import (
    DaemonProc,
    RedisServer,
    WorkerPool,
    enqueue,
    free_port,
    insert_job,
    migrate,
    run_cli,
    wait_status,
    write_config,
)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


class Tls(NamedTuple):
    port: int
    plain_port: int
    ca: Path
    other_ca: Path

    def url(self, host: str = "127.0.0.1", ca: Path | None = None) -> str:
        query = f"?ssl_ca_certs={ca}" if ca is not None else ""
        return f"rediss://{host}:{self.port}/0{query}"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[Tls]:
    d = tmp_path / "tls"
    d.mkdir()
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    # The server's certificate names 127.0.0.1 only: "localhost" is another host to TLS.
    (d / "san.cnf").write_text("subjectAltName = IP:127.0.0.1\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=redis", "-keyout", "server.key",
            "-out", "server.csr", cwd=d)
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.pem", cwd=d)
    for f in d.iterdir():
        f.chmod(0o644)
    port = free_port()
    srv = RedisServer(extra_args=["--tls-port", str(port), "--tls-cert-file", str(d / "server.pem"),
                                  "--tls-key-file", str(d / "server.key"),
                                  "--tls-ca-cert-file", str(d / "ca.pem"),
                                  "--tls-auth-clients", "no"])
    try:
        srv.start()
    except RuntimeError as exc:  # a server built without TLS refuses the options
        pytest.skip(f"this redis-server has no TLS: {str(exc)[-200:]}")
    try:
        yield Tls(port, srv.port, d / "ca.pem", d / "other-ca.pem")
    finally:
        srv.cleanup()


def tls_line(out: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln[5:].startswith("redis tls:")]
    return line


def test_check_judges_the_tls_set_up(tmp_path: Path, pg_dsn: str, tls_redis: Tls) -> None:
    cases = [
        (tls_redis.url(ca=tls_redis.ca), "OK   redis tls: the server's certificate is verified "
                                         f"against the CA in {tls_redis.ca}"),
        (tls_redis.url(), "FAIL redis tls: the server's certificate was refused"),
        (tls_redis.url(ca=tls_redis.other_ca), "FAIL redis tls: the server's certificate was refused"),
        (tls_redis.url("localhost", tls_redis.ca), "FAIL redis tls: the server's certificate was refused"),
        (tls_redis.url(ca=tmp_path / "nope.pem"), f"FAIL redis tls: ssl_ca_certs={tmp_path / 'nope.pem'} "
                                                  "cannot be read"),
        (tls_redis.url(ca=tls_redis.ca) + "&ssl_cert_reqs=none", "WARN redis tls: ssl_cert_reqs=none"),
    ]
    for i, (url, want) in enumerate(cases):
        cfg = write_config(tmp_path / f"c{i}.toml", url, pg_dsn)
        p = run_cli(cfg, "check")
        assert tls_line(p.stdout).startswith(want), (url, p.stdout)
    # TLS to a port that does not speak it
    cfg = write_config(tmp_path / "plain.toml",
                       f"rediss://127.0.0.1:{tls_redis.plain_port}/0?ssl_ca_certs={tls_redis.ca}", pg_dsn,
                       redis={"socket_timeout_seconds": 1.0})
    p = run_cli(cfg, "check")
    assert p.returncode == 1
    assert tls_line(p.stdout).startswith("FAIL redis tls: TLS handshake failed"), p.stdout


def test_the_daemon_and_workers_over_tls(tmp_path: Path, pg_dsn: str, tls_redis: Tls) -> None:
    url = tls_redis.url(ca=tls_redis.ca)
    cfg = write_config(tmp_path / "config.toml", url, pg_dsn)
    migrate(cfg)
    daemon = DaemonProc(cfg, tmp_path / "daemon.log")
    pool = WorkerPool(url, log_dir=tmp_path)
    try:
        daemon.start()
        pool.start()
        rq_id = str(uuid.uuid4())  # the row first, then its job: as an app does
        job = insert_job(pg_dsn, rq_id, status="queued", started_ago=None)
        enqueue(url, "tests.jobs.succeed", 1, job_id=rq_id)
        assert wait_status(pg_dsn, job, "completed")["error_message"] == "Synced: RQ finished"
        assert daemon.stop() == 0
    finally:
        pool.stop_all()
        daemon.close()
