"""The wheel a user installs is complete: LICENSE, the example config and unit, the alert
rules, the Prometheus example, the Grafana board and the example app all inside it; the
metadata carries the license and classifiers. Built from a copy of the tree, as pip
builds it (links in the repo resolved to the files in the package)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv*", ".venvs", "build", "dist", "*.egg-info",
                              "__pycache__", ".*_cache", ".hypothesis")

# In the wheel -> the repo file it must be byte for byte.
SHIPPED = {
    "reconciler/config.example.toml": "config.example.toml",
    "reconciler/rq-reconciler.service": "deploy/systemd/rq-reconciler.service",
    "reconciler/deploy/prometheus/alerts.yml": "deploy/prometheus/alerts.yml",
    "reconciler/deploy/prometheus/alerts_test.yml": "deploy/prometheus/alerts_test.yml",
    "reconciler/deploy/prometheus/prometheus.example.yml": "deploy/prometheus/prometheus.example.yml",
    "reconciler/deploy/grafana/rq-reconciler.json": "deploy/grafana/rq-reconciler.json",
    "reconciler/examples/README.md": "examples/README.md",
    "reconciler/examples/training_api.py": "examples/training_api.py",
    "reconciler/examples/training_jobs.py": "examples/training_jobs.py",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=SKIP)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    [built] = (tmp / "dist").glob("rq_reconciler-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_holds_the_deploy_files_and_the_examples(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for inside, repo in SHIPPED.items():
        assert inside in names, f"{inside} is not in the wheel"
        assert wheel.read(inside) == (ROOT / repo).read_bytes(), inside
    assert "reconciler/py.typed" in names
    assert any(n.startswith("reconciler/sql/") and n.endswith(".sql") for n in names)


def test_wheel_carries_the_license(wheel: zipfile.ZipFile) -> None:
    [lic] = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    text = wheel.read(lic).decode()
    assert text.startswith("MIT License") and "rq-reconciler contributors" in text
    [meta_name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    meta = Parser().parsestr(wheel.read(meta_name).decode())
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers and "Framework :: AsyncIO" in classifiers
    assert not any(c.startswith("License ::") for c in classifiers)  # PEP 639: the expression says it


def test_repo_paths_are_links_into_the_package() -> None:
    """One copy of each file: the documented repo paths point into reconciler/."""
    for inside, repo in SHIPPED.items():
        path = ROOT / repo
        assert path.resolve() == (ROOT / inside).resolve(), repo
        assert path.is_symlink() or any(p.is_symlink() for p in path.parents), repo
