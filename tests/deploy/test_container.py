"""deploy/container/: the image is built (without a registry: build-local.sh) and run for real.

Needs root, podman, buildah, debootstrap (Debian packages; scripts/install-ci-tools.sh
installs them), Debian's package mirror and PyPI (the build's pip). Missing tools skip
these tests on a developer's machine but fail them under CI=true, as in test_deploy.py.
The image runs as it would in production: read-only root filesystem, no capabilities, no
new privileges, its own non-root user, the config file mounted read-only and the secrets
in the environment; `--network host` reaches the throwaway Redis/PostgreSQL on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.devstack import free_port, redis_client

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "deploy" / "container" / "build-local.sh"
IMAGE = "localhost/rq-reconciler:test"
UID = 10001
# A first build makes the debootstrap base (about a minute) and fetches wheels from PyPI.
BUILD_TIMEOUT = 900
TOOLS = ("podman", "buildah", "debootstrap")

_missing = [t for t in TOOLS if shutil.which(t) is None]
_why = (f"needs {', '.join(_missing)} (apt-get install podman buildah debootstrap runc)"
        if _missing else "needs root (debootstrap, a rootful podman)" if os.geteuid() != 0 else "")
if _why and os.environ.get("CI") != "true":
    pytestmark = [pytest.mark.skip(reason=_why)]
else:
    pytestmark = [pytest.mark.timeout(BUILD_TIMEOUT + 300)]


def _opts(flag: str) -> list[str]:
    out = subprocess.run([str(BUILD), flag], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[list[str], list[str]]]:
    """The built image; yields (podman's global options, `run` options) for this machine."""
    if _why:
        pytest.fail(f"CI=true but the image cannot be built here: {_why}")
    t0 = time.monotonic()
    p = subprocess.run([str(BUILD), IMAGE], capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert p.returncode == 0, f"build-local.sh failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    print(f"image built in {time.monotonic() - t0:.1f} s: {p.stderr.strip().splitlines()[-1]}")
    yield _opts("--print-opts"), _opts("--print-run-opts")
    subprocess.run(["podman", "rmi", "--force", IMAGE], capture_output=True, check=False)


def _run(image: tuple[list[str], list[str]], *args: str, config: Path | None = None,
         env: dict[str, str] | None = None, detach: bool = False, name: str | None = None,
         rm: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`podman run` as production would: read-only root, no capabilities, no new privileges."""
    glob, run_opts = image
    argv = ["podman", *glob, "run", *(["--rm"] if rm else []), *run_opts, "--network", "host", "--pull=never",
            "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--health-interval", "disable"]
    if detach:
        argv += ["--detach"]
    if name:
        argv += ["--name", name]
    if config is not None:
        argv += ["--volume", f"{config}:/etc/rq-reconciler/config.toml:ro"]
    for k, v in (env or {}).items():
        argv += ["--env", f"{k}={v}"]
    return subprocess.run([*argv, IMAGE, *args], capture_output=True, text=True, timeout=timeout)


def _config(tmp: Path, **sections: dict[str, object]) -> Path:
    """A config without secrets (they come from the environment), readable by the image's
    user (bind-mounted as a file: the directories above it are not traversed)."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = tmp / f"config-{uuid.uuid4().hex[:6]}.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)
    return path


def _secrets(redis_url: str, pg_dsn: str) -> dict[str, str]:
    # The throwaway cluster trusts loopback: the password is accepted and unused, and must
    # never be printed.
    dsn = pg_dsn.replace("postgresql://postgres@", "postgresql://postgres:Sekrit-Pw-42@")
    assert dsn != pg_dsn
    return {"RQ_RECONCILER_REDIS_URL": redis_url, "RQ_RECONCILER_POSTGRES_DSN": dsn}


def test_image_is_non_root_and_read_only_friendly(image: tuple[list[str], list[str]]) -> None:
    glob, _ = image
    meta = json.loads(subprocess.run(["podman", *glob, "image", "inspect", IMAGE],
                                     capture_output=True, text=True, check=True).stdout)[0]
    cfg = meta["Config"]
    assert cfg["User"] == f"{UID}:{UID}"
    assert cfg["Entrypoint"] == ["rq-reconciler"] and cfg["Cmd"] == ["run"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["RQ_RECONCILER_CONFIG"] == "/etc/rq-reconciler/config.toml"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert "9464/tcp" in cfg["ExposedPorts"]
    assert cfg["StopSignal"] == "SIGTERM"
    _, run_opts = image
    probe = subprocess.run(
        ["podman", *glob, "run", "--rm", *run_opts, "--read-only", "--cap-drop", "ALL",
         "--network", "none", "--pull=never", "--entrypoint", "python", IMAGE, "-c",
         "import os, sys, reconciler, tempfile; tempfile.NamedTemporaryFile().close(); "
         "print(os.getuid(), os.getgid(), os.access(sys.prefix, os.W_OK), "
         "os.access('/etc/rq-reconciler', os.W_OK), reconciler.__file__)"],
        capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    uid, gid, prefix_w, etc_w, mod = probe.stdout.split()
    assert (uid, gid, prefix_w, etc_w) == (str(UID), str(UID), "False", "False")
    assert mod.startswith("/opt/rq-reconciler/") and "/site-packages/" in mod
    # Its HEALTHCHECK, in the Docker format (the OCI format has no field for it).
    assert meta["Healthcheck"]["Test"] == ["CMD", "rq-reconciler-healthcheck"]


def test_help_and_example_config(image: tuple[list[str], list[str]]) -> None:
    p = _run(image, "--help")
    assert p.returncode == 0, p.stderr
    for cmd in ("run", "sweep", "cancel", "migrate", "check"):
        assert cmd in p.stdout
    p = _run(image, "example-config")
    assert p.returncode == 0, p.stderr
    shipped = (REPO / "reconciler" / "config.example.toml").read_text()
    assert p.stdout.strip() == shipped.strip()
    assert tomllib.loads(p.stdout)["metrics"]["listen"] == "127.0.0.1:9464"


def test_migrate_and_check_against_real_backends(image: tuple[list[str], list[str]], tmp_path: Path,
                                                 redis_url: str, pg_dsn: str) -> None:
    cfg = _config(tmp_path, metrics={"listen": f"127.0.0.1:{free_port()}"})
    env = _secrets(redis_url, pg_dsn)
    p = _run(image, "migrate", config=cfg, env=env)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}"
    p = _run(image, "check", config=cfg, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert lines and all("FAIL" not in ln for ln in lines), out
    assert sum("OK" in ln for ln in lines) >= 4, out
    assert "Sekrit-Pw-42" not in out
    # A config error is exit 2, naming the key, before any connection.
    bad = _config(tmp_path, sweep={"interval_seconds": "soon"})
    p = _run(image, "check", config=bad, env=env)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "sweep.interval_seconds" in p.stdout + p.stderr


def test_run_is_healthy_and_stops_cleanly(image: tuple[list[str], list[str]], tmp_path: Path,
                                          redis_url: str, pg_dsn: str) -> None:
    glob, _ = image
    port = free_port()
    cfg = _config(tmp_path, metrics={"listen": f"127.0.0.1:{port}"},
                  log={"format": "json", "level": "info"})
    env = _secrets(redis_url, pg_dsn)
    assert _run(image, "migrate", config=cfg, env=env).returncode == 0
    name = f"rqr-test-{uuid.uuid4().hex[:8]}"
    p = _run(image, config=cfg, env=env, detach=True, name=name, rm=False)  # CMD: run
    assert p.returncode == 0, p.stderr
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline:
            health = subprocess.run(["podman", *glob, "healthcheck", "run", name],
                                    capture_output=True, text=True, timeout=30)
            if health.returncode == 0:
                break
            time.sleep(0.5)
        assert health is not None and health.returncode == 0, (
            f"never healthy: {health and health.stdout + health.stderr}\n"
            + subprocess.run(["podman", *glob, "logs", name], capture_output=True, text=True).stderr)
        with redis_client(redis_url) as r:  # it asked Redis for keyspace events ("auto")
            flags = str(r.config_get("notify-keyspace-events")["notify-keyspace-events"])
        assert "K" in flags
        stop = subprocess.run(["podman", *glob, "stop", "--time", "30", name],
                              capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        code = subprocess.run(["podman", *glob, "inspect", "--format", "{{.State.ExitCode}}", name],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert code == "0", f"exit {code} after SIGTERM (0 = a clean drain)"
    finally:
        logs = subprocess.run(["podman", *glob, "logs", name], capture_output=True, text=True)
        subprocess.run(["podman", *glob, "rm", "--force", name], capture_output=True)
    events = [json.loads(ln) for ln in (logs.stdout + logs.stderr).splitlines()
              if ln.startswith("{")]
    names = [e.get("event") for e in events]
    assert "starting" in names and "stopped" in names, names
    assert "Sekrit-Pw-42" not in logs.stdout + logs.stderr
