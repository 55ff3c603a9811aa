"""deploy/: the systemd unit, the Prometheus rules and the Grafana dashboard.

External tools: ``systemd-analyze`` (package systemd) and ``promtool`` (package
prometheus; ``scripts/install-ci-tools.sh`` installs both). A missing tool skips its tests
on a developer's machine, but fails them under CI=true: CI must not go green by skipping.
No network is used.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter, Gauge, Histogram, Summary
from prometheus_client.metrics import MetricWrapperBase

from reconciler.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "rq-reconciler.service"
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "alerts_test.yml"
PROM_EXAMPLE = REPO / "deploy" / "prometheus" / "prometheus.example.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "rq-reconciler.json"

MAX_EXPOSURE = 3.0
TIMEOUT = 120

# Label values the SPEC fixes; used to populate labelled metrics and to check the
# exact-match label values that rules and panels select on.
SPEC_LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "outcome": ("cancelled", "already_finished", "failed"),
    "reason": ("synced", "orphaned", "cancelled", "started"),
    "result": ("ok", "failed", "breaker"),
    "source": ("cancel_notify", "keyspace", "local_worker", "timer"),
    "backend": ("redis", "postgres"),
}
EXAMPLE_LABEL_VALUES: dict[str, tuple[str, ...]] = {
    **SPEC_LABEL_VALUES,
    "status": ("queued", "running"),
    "from_status": ("queued", "running"),
    "to_status": ("running", "completed", "failed", "cancelled"),
    "signal": ("SIGTERM", "SIGKILL"),
}
# Labels Prometheus adds at scrape time; `le` is on every histogram bucket.
TARGET_LABELS = frozenset({"job", "instance"})

METRIC_TOKEN = re.compile(r"(?<![A-Za-z0-9_:])(?:rq_reconciler|process)_[A-Za-z0-9_:]*")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')


# --------------------------------------------------------------------------- helpers


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (scripts/install-ci-tools.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + "; under CI a missing tool is a failure, not a skip")
        pytest.skip(msg)
    return path


def _run(*argv: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
        check=False,
    )


def _populated_metrics() -> Metrics:
    """A Metrics whose every labelled metric has children (else they export no sample)."""
    m = Metrics()
    metrics = [v for v in vars(m).values() if isinstance(v, MetricWrapperBase)]
    assert metrics, "found no metric objects on Metrics()"
    for metric in metrics:
        labelnames: tuple[str, ...] = tuple(getattr(metric, "_labelnames", ()))
        if not labelnames:
            continue
        choices = [EXAMPLE_LABEL_VALUES.get(ln, ("x",)) for ln in labelnames]
        for i in range(max(len(c) for c in choices)):
            child = metric.labels(*(c[i % len(c)] for c in choices))
            if isinstance(child, Counter):
                child.inc()
            elif isinstance(child, Gauge):
                child.set(1)
            elif isinstance(child, Histogram | Summary):
                child.observe(0.1)
            else:  # pragma: no cover - a new metric type: make the test say so
                raise AssertionError(f"don't know how to populate {type(child)}")
    return m


def _exported_samples() -> dict[str, frozenset[str]]:
    """Every sample name the daemon exports -> the label names it carries."""
    out: dict[str, set[str]] = {}
    for family in _populated_metrics().registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in out.items()}


def _metric_problems(exprs: Iterable[str], exported: dict[str, frozenset[str]]) -> list[str]:
    """What in these PromQL texts names a metric, label or label value the daemon lacks.

    Names are compared with the exact sample names of the exposition, so a missing or
    wrong suffix (`rq_reconciler_cancel_requests` for a counter, `_count` on a gauge) is
    caught as well as a typo.
    """
    problems: list[str] = []
    for expr in exprs:
        for tok in METRIC_TOKEN.finditer(expr):
            name = tok.group(0)
            if name not in exported:
                problems.append(f"unknown metric {name!r} in: {expr}")
                continue
            rest = expr[tok.end() :].lstrip()
            if not rest.startswith("{"):
                continue
            selector = rest[1 : rest.index("}")]
            for label, op, value in MATCHER.findall(selector):
                if label not in exported[name] | TARGET_LABELS:
                    problems.append(f"{name} has no label {label!r} in: {expr}")
                elif op == "=" and label in SPEC_LABEL_VALUES and value not in SPEC_LABEL_VALUES[label]:
                    problems.append(f"{name}{{{label}={value!r}}} is not a value the SPEC defines")
    return problems


def _yaml_values(text: str, key: str) -> list[str]:
    """The values of `key:` in a simple YAML file: inline scalars and >- / | blocks.

    Enough for our own rule files (no PyYAML among the dependencies).
    """
    lines = text.splitlines()
    values: list[str] = []
    key_re = re.compile(rf"^(\s*)(?:- )?{re.escape(key)}:\s*(.*)$")
    for i, line in enumerate(lines):
        m = key_re.match(line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value[:1] in (">", "|"):
            block = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                block.append(nxt.strip())
            values.append(" ".join(b for b in block if b))
        else:
            if value[:1] in ("'", '"') and value[-1:] == value[:1]:
                value = value[1:-1]
            values.append(value)
    return values


def _rule_exprs() -> list[str]:
    exprs = _yaml_values(RULES.read_text(), "expr")
    n_rules = len(re.findall(r"^\s*- (?:alert|record):", RULES.read_text(), re.M))
    assert len(exprs) == n_rules > 0, "could not read every expr in alerts.yml"
    return exprs


def _test_series() -> list[str]:
    series = [s for s in _yaml_values(RULES_TEST.read_text(), "series") if "rq_reconciler_" in s]
    assert series, "alerts_test.yml has no rq_reconciler_* input series"
    return series


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if "expr" in t]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var.get("query")
            exprs.append(q["query"] if isinstance(q, dict) else str(q))
    return exprs


def _unit_for_tools(tmp_path: Path, extra: str = "") -> Path:
    """The unit, with ExecStart pointing at a binary that exists on this machine.

    `systemd-analyze verify` rejects an ExecStart whose binary is missing, and the unit
    names the install location /usr/local/bin/rq-reconciler. Use this venv's console
    script when installed (it is the real thing), else /bin/true. Nothing else changes:
    User=rq stays, whether or not that user exists here.
    """
    exe = Path(sys.executable).parent / "rq-reconciler"
    target = str(exe) if os.access(exe, os.X_OK) else "/bin/true"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/rq-reconciler " in text
    text = text.replace("ExecStart=/usr/local/bin/rq-reconciler ", f"ExecStart={target} ", 1)
    if extra:
        text = text.replace("[Service]\n", f"[Service]\n{extra}\n", 1)
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def _verify_problems(unit: Path) -> list[str]:
    r = _run(_tool("systemd-analyze"), "verify", "--man=no", str(unit))
    # Any message that names our unit is a finding (unknown key, bad value, missing
    # binary, ...). Messages about other units of the host are not ours to judge.
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if unit.name in ln]
    if r.returncode != 0:
        problems.append(f"systemd-analyze verify exited {r.returncode}: {r.stderr.strip()}")
    return problems


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _syscall_group(name: str, cache: dict[str, set[str]]) -> set[str]:
    if name in cache:
        return cache[name]
    r = _run(_tool("systemd-analyze"), "syscall-filter", name)
    assert r.returncode == 0, r.stderr
    out: set[str] = set()
    for line in r.stdout.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        out |= _syscall_group(item, cache) if item.startswith("@") else {item}
    cache[name] = out
    return out


# --------------------------------------------------------------------------- systemd


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert _verify_problems(_unit_for_tools(tmp_path)) == []


def test_verify_check_can_fail(tmp_path: Path) -> None:
    """The check above is not vacuous: a bad key and a bad value are reported."""
    bad = _unit_for_tools(tmp_path, extra="NoSuchSetting=1\nRestart=sometimes")
    problems = _verify_problems(bad)
    assert any("NoSuchSetting" in p for p in problems), problems
    assert any("Restart" in p or "sometimes" in p for p in problems), problems


def test_unit_security_exposure(tmp_path: Path) -> None:
    tool = _tool("systemd-analyze")
    if "--offline" not in _run(tool, "security", "--help").stdout:
        msg = "this systemd-analyze has no `security --offline` (needs systemd >= 250)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    unit = _unit_for_tools(tmp_path)
    r = _run(tool, "security", "--offline=yes", "--no-pager", str(unit))
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout
    exposure = float(m.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}\n{r.stdout}"


def test_unit_contract_and_deliberate_omissions() -> None:
    s = _unit_settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["on-failure"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["ExecStart"] == ["/usr/local/bin/rq-reconciler run --config /etc/rq-reconciler/config.toml"]
    # The daemon drains for at most 30 s; systemd must wait longer before SIGKILL.
    assert int(s["TimeoutStopSec"][0]) > 30
    assert s["KillMode"] == ["mixed"]
    assert s["User"] and s["Group"]
    assert s["CapabilityBoundingSet"] == [""] and s["AmbientCapabilities"] == [""]
    assert s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"]
    # Each of these would break the daemon's job (see the unit's comments).
    assert "PrivateNetwork" not in s  # Redis and Postgres
    assert "PrivateUsers" not in s  # /proc inspection of the workers' processes
    assert "ProcSubset" not in s  # psutil needs /proc/stat for create times
    assert "ProtectProc" not in s  # an unseen live worker would look dead
    assert "RemoveIPC" not in s  # shares its user with the workers
    assert "AF_NETLINK" not in " ".join(s["RestrictAddressFamilies"])


def test_syscall_filter_keeps_signalling_allowed() -> None:
    """kill/pidfd_* must survive SystemCallFilter= (they stop the work-horses)."""
    cache: dict[str, set[str]] = {}
    allowed: set[str] = set()
    for value in _unit_settings()["SystemCallFilter"]:
        deny = value.startswith("~")
        names = set(
            itertools.chain.from_iterable(
                _syscall_group(tok, cache) if tok.startswith("@") else {tok}
                for tok in value.lstrip("~").split()
            )
        )
        allowed = allowed - names if deny else allowed | names
    needed = {"kill", "tgkill", "pidfd_open", "pidfd_send_signal", "wait4", "waitid"}
    assert needed <= allowed, f"denied: {sorted(needed - allowed)}"


# --------------------------------------------------------------------------- promtool


def test_promtool_check_rules() -> None:
    r = _run(_tool("promtool"), "check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules() -> None:
    r = _run(_tool("promtool"), "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_rule_tests_cover_every_alert_firing_and_quiet() -> None:
    alerts = set(re.findall(r"^\s*- alert:\s*(\S+)", RULES.read_text(), re.M))
    assert len(alerts) == 8, alerts
    text = RULES_TEST.read_text()
    for alert in sorted(alerts):
        blocks = re.findall(rf"alertname: {alert}\n(.*?)(?=\n\s*- eval_time:|\n\s*- name:|\Z)", text, re.S)
        assert any("exp_alerts" in b for b in blocks), f"{alert}: no test that it fires"
        assert any("exp_alerts" not in b for b in blocks), f"{alert}: no test that it stays quiet"


def test_promtool_check_config_example() -> None:
    r = _run(_tool("promtool"), "check", "config", PROM_EXAMPLE.name, cwd=PROM_EXAMPLE.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "job_name: rq-reconciler" in PROM_EXAMPLE.read_text()


def test_promtool_check_metrics_on_the_exposition() -> None:
    body = _populated_metrics().render()
    r = _run(_tool("promtool"), "check", "metrics", stdin=body)
    assert r.returncode == 0, (r.stdout + r.stderr) + "\n" + body.decode()


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses every panel query (Grafana variables replaced by plain values)."""
    exprs = _dashboard_exprs(_dashboard())
    subst = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "6h",
        "$job": ".+",
        "$instance": ".+",
    }
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        for k, v in subst.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, f"unsubstituted variable in {expr}"
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text("\n".join(lines) + "\n")
    r = _run(_tool("promtool"), "check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- names


def test_rules_and_dashboard_name_only_exported_metrics() -> None:
    exported = _exported_samples()
    assert "rq_reconciler_cancel_requests_total" in exported  # the populate step worked
    texts = [*_rule_exprs(), *_test_series(), *_dashboard_exprs(_dashboard())]
    assert sum(len(METRIC_TOKEN.findall(t)) for t in texts) > 20
    assert _metric_problems(texts, exported) == []


def test_metric_name_check_can_fail() -> None:
    """Typos, wrong suffixes, unknown labels and values are all reported."""
    exported = _exported_samples()
    bad = [
        "rq_reconciler_jobs_stuk > 0",  # typo
        "rate(rq_reconciler_cancel_requests[5m])",  # counter without _total
        "rq_reconciler_jobs_stuck_count",  # histogram suffix on a gauge
        "rq_reconciler_sweep_duration_seconds > 1",  # histogram without a suffix
        'rq_reconciler_backend_up{service="redis"}',  # no such label
        'rq_reconciler_cancel_requests_total{outcome="error"}',  # no such outcome
    ]
    problems = _metric_problems(bad, exported)
    assert len(problems) == len(bad), problems
    good = [
        'increase(rq_reconciler_cancel_requests_total{outcome="failed",job="x"}[5m])',
        "rq_reconciler_sweep_duration_seconds_bucket",
        'rq_reconciler_build_info{version=~".+"}',
    ]
    assert _metric_problems(good, exported) == []


# The process's own series the dashboard must show (prometheus_client's ProcessCollector
# exports a few more: virtual memory, start time; and python_* from its other collectors).
PROCESS_FAMILIES = {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"}


def test_dashboard_shows_every_exported_metric() -> None:
    exported = _exported_samples()
    assert set(exported) >= PROCESS_FAMILIES
    families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in exported
                if n.startswith("rq_reconciler_")} | PROCESS_FAMILIES
    shown = " ".join(_dashboard_exprs(_dashboard()))
    missing = sorted(f for f in families if not re.search(rf"{f}(_bucket|_count|_sum)?\b", shown))
    assert missing == [], f"no panel shows {missing}"


# --------------------------------------------------------------------------- grafana


def test_grafana_dashboard_shape() -> None:
    dash = _dashboard()
    assert dash["uid"] == "rq-reconciler"
    assert 36 <= dash["schemaVersion"] <= 41
    assert any(i["name"] == "DS_PROMETHEUS" for i in dash.get("__inputs", []))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    panels = dash["panels"]
    assert panels, "no panels"
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        assert p.get("title"), p
        targets = [t for t in p.get("targets", []) if t.get("expr", "").strip()]
        assert targets, f"panel {p['title']!r} has no query"
        for ds in [p.get("datasource"), *(t.get("datasource") for t in targets)]:
            assert ds is None or ds.get("uid") == "${DS_PROMETHEUS}", (p["title"], ds)
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, (p["title"], g)
