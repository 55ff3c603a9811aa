"""Redis behind Sentinel on this machine: a master, its replicas and a quorum of sentinels,
each a real redis-server (or valkey-server) process on a free port; `failover()` has the
sentinels promote a replica, as they would when the master's host is lost."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from reconciler.devstack.binaries import redis_server_bin
from reconciler.devstack.procs import (
    free_port,
    harness_env,
    harness_root,
    register,
    signal_popen,
    tail,
    unregister,
)
from reconciler.devstack.redis_server import RedisServer, redis_client
from reconciler.devstack.wait import wait_until

# Fast enough for a test, slow enough for two loaded cores not to see a busy master as down.
DOWN_AFTER_MS = 2000
FAILOVER_TIMEOUT_MS = 10000


class SentinelSet:
    """A master, `replicas` replicas and `sentinels` sentinels (quorum: a majority) watching
    it as `name`. `url` is the redis+sentinel:// URL of db 0."""

    def __init__(self, *, replicas: int = 1, sentinels: int = 3, name: str = "mymaster") -> None:
        self.name = name
        master = RedisServer()
        self.nodes = [master, *(RedisServer(extra_args=["--replicaof", "127.0.0.1", str(master.port)])
                                for _ in range(replicas))]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.quorum = sentinels // 2 + 1
        self._dir: Path | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.name}/0"

    def sentinel(self, i: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[i], socket_connect_timeout=5, socket_timeout=5)

    def master_port(self) -> int:
        with self.sentinel() as s:
            _ip, port = s.sentinel_get_master_addr_by_name(self.name)
        return int(port)

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def start(self) -> Self:
        for node in self.nodes:
            node.start()
        master = self.nodes[0]
        self._dir = Path(tempfile.mkdtemp(prefix="sentinels-", dir=harness_root()))
        for port in self.sentinel_ports:
            conf = self._dir / f"sentinel-{port}.conf"
            # Sentinel rewrites its own config file: it must be writable, one per sentinel.
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\n"
                f"dir {self._dir}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {master.port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.name} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.name} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {self.name} 1\n")
            with (self._dir / f"sentinel-{port}.log").open("ab") as log:
                self._procs.append(subprocess.Popen(
                    [redis_server_bin(), str(conf), "--sentinel"], cwd=self._dir,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=harness_env(), start_new_session=True))
        register(self)
        self.wait_settled(master.port)
        return self

    def wait_settled(self, master_port: int, timeout: float = 30) -> None:
        """Every sentinel names `master_port` as the master and knows the others and every
        replica, and every replica is in sync with it."""
        others, n_replicas = len(self.sentinel_ports) - 1, len(self.nodes) - 1

        def settled() -> bool:
            for i, proc in enumerate(self._procs):
                if proc.poll() is not None:
                    raise RuntimeError(f"sentinel exited {proc.returncode}: {self.log(i)}")
                try:
                    with self.sentinel(i) as s:
                        m = s.sentinel_master(self.name)
                except (redis.RedisError, OSError):
                    return False
                if int(m["port"]) != master_port or m["num-other-sentinels"] < others or \
                        m["num-slaves"] < n_replicas or "s_down" in m["flags"]:
                    return False
            for node in self.nodes:
                if node.port == master_port or not node.is_running():
                    continue
                with node.client() as r:
                    info = r.info("replication")
                if info.get("master_port") != master_port or info.get("master_link_status") != "up":
                    return False
            return True

        wait_until(settled, timeout, f"sentinels to agree on master :{master_port}", interval=0.1)

    def failover(self, timeout: float = 30) -> int:
        """`SENTINEL FAILOVER`: a replica is promoted, the old master becomes its replica
        (Sentinel tells it to, and it drops its clients). Returns the new master's port."""
        old = self.master_port()
        with self.sentinel() as s:
            s.execute_command("SENTINEL", "FAILOVER", self.name)
        wait_until(lambda: self.master_port() != old, timeout, "a new master")
        new = self.master_port()
        self.wait_settled(new, timeout)
        return new

    def log(self, i: int) -> str:
        assert self._dir is not None
        return tail(self._dir / f"sentinel-{self.sentinel_ports[i]}.log")

    def client(self) -> redis.Redis:
        """A client of the current master (found through the sentinels)."""
        return redis_client(self.url)

    def cleanup(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                signal_popen(proc, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    signal_popen(proc, signal.SIGKILL)
                    proc.wait()
        self._procs = []
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.cleanup()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        unregister(self)

    def _hard_stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                signal_popen(proc, signal.SIGKILL)
                proc.wait()
        self.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
