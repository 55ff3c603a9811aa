"""Two daemons on one host with one metrics port: the second says why and exits 2 (the
unit does not restart it), and `check` says so before anyone starts it."""

from __future__ import annotations

import socket
from pathlib import Path

from reconciler.devstack import DaemonProc, free_port, migrate, run_cli, write_config


def test_a_second_daemon_on_a_taken_metrics_port(tmp_path: Path, redis_url: str, pg_dsn: str) -> None:
    port = free_port()
    first = write_config(tmp_path / "first.toml", redis_url, pg_dsn,
                         metrics={"listen": f"127.0.0.1:{port}"}, instance={"name": "first"})
    second = write_config(tmp_path / "second.toml", redis_url, pg_dsn,
                          metrics={"listen": f"127.0.0.1:{port}"}, instance={"name": "second"})
    migrate(first)
    assert f"OK   metrics: 127.0.0.1:{port} is free" in run_cli(second, "check").stdout
    a = DaemonProc(first, tmp_path / "first.log", name="first")
    b = DaemonProc(second, tmp_path / "second.log", name="second")
    try:
        a.start()
        p = run_cli(second, "check")
        assert f"OK   metrics: 127.0.0.1:{port} is served by a running rq-reconciler" in p.stdout
        b.start(wait_ready=False)
        assert b.proc is not None and b.proc.wait(30) == 2
        (event,) = [e for e in b.log_events() if e.get("event") == "metrics_listen_in_use"]
        assert event["listen"] == f"127.0.0.1:{port}" and "its own metrics.listen" in event["hint"]
        assert a.stop() == 0
    finally:
        a.close()
        b.close()
    # A port another program holds: FAIL, before the daemon would exit on it.
    with socket.create_server(("127.0.0.1", port)):
        p = run_cli(second, "check")
    assert p.returncode == 1
    assert f"FAIL metrics: 127.0.0.1:{port} is in use by another program" in p.stdout
