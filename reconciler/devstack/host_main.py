"""A "host" of its own for multi-host tests: run as PID 1 of a new UTS + PID namespace,

    unshare --uts --pid --fork --mount-proc -- python -m reconciler.devstack.host_main ...

it takes the hostname, starts real `rq worker` processes and (optionally) a daemon
replica, reaps whatever is reparented to it (it is this namespace's init), and obeys
files dropped into its control directory:

- `kill-daemon`: SIGKILL the replica (a host whose replica died; its workers live on);
- `stop`: stop everything and exit.

It writes `ready` into the control directory once the workers are registered (and the
replica, if any, said READY=1), with one line per worker: `worker <name> <pid>`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reconciler.devstack.procs import harness_env
from reconciler.devstack.workers import start_worker


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hostname", required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--worker-prefix", default="w")
    ap.add_argument("--config", help="run a daemon replica with this config")
    ap.add_argument("--rq-version", help="the RQ series of the workers (default: the rq here)")
    ap.add_argument("--control", required=True, type=Path)
    ap.add_argument("--logs", required=True, type=Path)
    args = ap.parse_args()
    socket.sethostname(args.hostname)
    args.control.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    stopping = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    workers = [start_worker(args.redis_url, f"{args.worker_prefix}{i}-{args.hostname}",
                            log_path=args.logs / f"worker-{i}.log", rq_version=args.rq_version)
               for i in range(args.workers)]
    # Registered before the replica starts: its start-up sweep then finds them all (a
    # worker that registers later is learnt from its next heartbeat's keyspace event).
    for w in workers:
        w.wait_registered(60)
    daemon: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    if args.config:
        sock_dir = tempfile.mkdtemp(prefix="rqr-host-")
        sock_path = os.path.join(sock_dir, "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(sock_path)
        notify.settimeout(0.1)
        with open(args.logs / "daemon.log", "ab") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "run", "--config", args.config],
                stdout=log, stderr=subprocess.STDOUT,
                env=harness_env({"NOTIFY_SOCKET": sock_path}))
    try:
        if notify is not None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    if b"READY=1" in notify.recv(4096):
                        break
                _reap()
            else:
                print("replica never became ready", file=sys.stderr)
                return 1
        (args.control / "ready.tmp").write_text(
            "".join(f"worker {w.name} {w.pid}\n" for w in workers))
        (args.control / "ready.tmp").rename(args.control / "ready")
        while not stopping and not (args.control / "stop").exists():
            if daemon is not None and (args.control / "kill-daemon").exists():
                daemon.kill()
                daemon.wait()
                daemon = None
            _reap()
            time.sleep(0.05)
    finally:
        if daemon is not None:
            daemon.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(30)
            daemon.kill()
        for w in workers:
            with contextlib.suppress(Exception):
                w.stop()
        _reap()
        if notify is not None:
            notify.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
