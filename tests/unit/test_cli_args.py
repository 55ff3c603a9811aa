"""The command line's own rules: --config before or after the command, a hint for a missing
config file, and --config refused (with its reason) by the commands that read none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.cli import main


def bad_config(tmp_path: Path) -> Path:
    """A config that fails validation on jobs.table: exit 2 before any connection."""
    path = tmp_path / "c.toml"
    path.write_text('[redis]\nurl = "redis://127.0.0.1:1/0"\n[jobs]\ntable = "x; drop"\n')
    return path


@pytest.mark.parametrize("cmd", ["run", "sweep", "check", "migrate", "cancel"])
def test_config_before_the_command_is_the_same_as_after(
        tmp_path: Path, cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(bad_config(tmp_path))
    extra = ["7"] if cmd == "cancel" else []
    assert main(["--config", cfg, cmd, *extra]) == 2
    before = capsys.readouterr().err
    assert main([cmd, *extra, "--config", cfg]) == 2
    after = capsys.readouterr().err
    assert before == after
    assert "config error: jobs.table:" in before


def test_config_after_the_command_wins_over_before(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(bad_config(tmp_path))
    assert main(["--config", str(tmp_path / "missing.toml"), "check", "--config", cfg]) == 2
    assert "jobs.table" in capsys.readouterr().err


def test_a_missing_config_file_points_to_example_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["--config", str(missing), "check"]) == 2
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err
    assert f"rq-reconciler example-config > {missing}" in err


@pytest.mark.parametrize("argv", [
    ["demo", "--config", "x.toml"],
    ["--config", "x.toml", "demo"],
    ["demo", "--keep", "--config", "x.toml"],
    ["example-config", "--config", "x.toml"],
    ["--config", "x.toml", "example-unit"],
])
def test_commands_that_read_no_config_refuse_it(argv: list[str]) -> None:
    # A subprocess: argparse exits, and a demo that was not refused would start servers.
    p = subprocess.run([sys.executable, "-m", "reconciler", *argv], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 2
    cmd = next(a for a in argv if not a.startswith("-") and a != "x.toml")
    assert f"error: {cmd} takes no --config" in p.stderr
    assert p.stdout == ""
