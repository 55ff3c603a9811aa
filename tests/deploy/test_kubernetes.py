"""deploy/kubernetes/: every core/apps object passes the Kubernetes JSON schema in strict
mode (no unknown field; kubernetes-validate ships the schemas, so no network), and the
layouts hold what the daemon needs: it sees the workers' processes (shared PID namespace
or hostPID), runs as their uid with no capability, listens where the probes and
Prometheus come in, and is as locked down as the systemd unit.

PodMonitor is a CustomResourceDefinition of the Prometheus Operator and no package
available here ships its schema: its required fields and their references (the port
name, the labels it selects) are checked by hand below."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from reconciler import config as rconfig

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
KUBE_VERSION = "1.30"
FILES = sorted(K8S.glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all() -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for p in FILES for d in _docs(p)}


def _pod(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = _all()[f"{kind}/{name}"]["spec"]["template"]["spec"]
    return spec


def _daemon(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = [c for c in pod["containers"] if c["name"] == "rq-reconciler"]
    return c


def test_the_expected_objects_are_there() -> None:
    assert {p.name for p in FILES} >= {"sidecar.yaml", "daemonset.yaml", "configmap.yaml",
                                       "secret.example.yaml", "podmonitor.yaml"}
    assert set(_all()) == {"Deployment/rq-worker", "DaemonSet/rq-reconciler",
                           "ConfigMap/rq-reconciler", "Secret/rq-reconciler",
                           "PodMonitor/rq-reconciler"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_objects_pass_the_kubernetes_schema(path: Path) -> None:
    for doc in _docs(path):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: test_podmonitor below
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_strict_schema_catches_a_mistake() -> None:
    doc = _all()["Deployment/rq-worker"]
    doc["spec"]["template"]["spec"]["shareProcessNamespaces"] = True  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_sidecar_shares_the_workers_pid_namespace_and_uid() -> None:
    pod = _pod("Deployment", "rq-worker")
    assert pod["shareProcessNamespace"] is True
    assert "hostPID" not in pod
    names = [c["name"] for c in pod["containers"]]
    assert names == ["worker", "rq-reconciler"]
    uids = {c.get("securityContext", {}).get("runAsUser", pod["securityContext"]["runAsUser"])
            for c in pod["containers"]}
    assert len(uids) == 1 and uids != {0}, "the daemon must run as the workers' uid"


def test_daemonset_uses_the_hosts_pid_namespace_on_worker_nodes_only() -> None:
    pod = _pod("DaemonSet", "rq-reconciler")
    assert pod["hostPID"] is True
    assert pod["nodeSelector"] == {"rq-reconciler.io/workers": "true"}
    assert "hostNetwork" not in pod and "hostIPC" not in pod
    # Host-PID mode (reconciler.hostpid) reads a pod's hostname by entering its UTS
    # namespace (CAP_SYS_ADMIN) and inspects and signals workers of another uid: root with
    # exactly those capabilities, nothing else.
    assert pod["securityContext"]["runAsUser"] == 0
    (c,) = pod["containers"]
    assert c["securityContext"]["capabilities"] == {
        "drop": ["ALL"], "add": ["SYS_ADMIN", "SYS_PTRACE", "KILL"]}


@pytest.mark.parametrize("kind,name", [("Deployment", "rq-worker"), ("DaemonSet", "rq-reconciler")])
def test_security_context_is_as_strict_as_the_systemd_unit(kind: str, name: str) -> None:
    pod = _pod(kind, name)
    psc = pod["securityContext"]
    if kind != "DaemonSet":  # (its root and capabilities: the test above)
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        # Same uid needs no capability to signal: none is added back (not even KILL).
        if kind != "DaemonSet":
            assert sc["capabilities"] == {"drop": ["ALL"]}
        assert not sc.get("privileged")
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


@pytest.mark.parametrize("kind,name", [("Deployment", "rq-worker"), ("DaemonSet", "rq-reconciler")])
def test_daemon_probes_resources_config_and_secrets(kind: str, name: str, tmp_path: Path) -> None:
    pod = _pod(kind, name)
    c = _daemon(pod)
    cm = _all()["ConfigMap/rq-reconciler"]
    secret = _all()["Secret/rq-reconciler"]
    tmp_cfg = tmp_path / "config.toml"
    tmp_cfg.write_text(cm["data"]["config.toml"])
    cfg = rconfig.load(str(tmp_cfg), environ=secret["stringData"])
    host, port = cfg.metrics.host_port
    # The kubelet's httpGet probes and Prometheus come in on the pod IP.
    assert host == "0.0.0.0"
    (p,) = c["ports"]
    assert (p["name"], p["containerPort"]) == ("metrics", port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    assert c["resources"]["limits"]["memory"] == "128Mi"
    assert c["resources"]["requests"]["memory"] == "64Mi"
    # Config mounted where the image looks, secrets from the Secret's two variables.
    (env,) = [e for e in c["env"] if e["name"] == rconfig.ENV_CONFIG]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert env["value"] == f"{mount['mountPath']}/config.toml" and mount["readOnly"] is True
    vol = next(v for v in pod["volumes"] if v["name"] == "config")
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    assert c["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    assert set(secret["stringData"]) == {rconfig.ENV_REDIS_URL, rconfig.ENV_POSTGRES_DSN}
    assert cfg.redis.url == secret["stringData"][rconfig.ENV_REDIS_URL]
    assert pod["terminationGracePeriodSeconds"] > cfg.cancel.grace_seconds


def test_podmonitor() -> None:
    """By hand, from the Prometheus Operator's PodMonitor CRD (monitoring.coreos.com/v1):
    required spec.selector (a LabelSelector) and podMetricsEndpoints naming a port."""
    objs = _all()
    pm = objs["PodMonitor/rq-reconciler"]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(pm) == {"apiVersion", "kind", "metadata", "spec"}
    spec = pm["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                         "podTargetLabels", "sampleLimit"}
    wanted = spec["selector"]["matchLabels"]
    assert set(spec["selector"]) == {"matchLabels"} and wanted
    for ep in spec["podMetricsEndpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
        assert ep["path"] == "/metrics" and ep["interval"].endswith("s")
    # It selects every pod that runs the daemon, and each has the port it scrapes.
    for kind, name in (("Deployment", "rq-worker"), ("DaemonSet", "rq-reconciler")):
        labels = objs[f"{kind}/{name}"]["spec"]["template"]["metadata"]["labels"]
        assert wanted.items() <= labels.items(), f"{kind}/{name} is not scraped"
        ports = {p["name"] for p in _daemon(_pod(kind, name))["ports"]}
        assert {ep["port"] for ep in spec["podMetricsEndpoints"]} <= ports
