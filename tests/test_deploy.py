"""Deployment files, checked offline: hadolint, the Compose spec schema, Kubernetes schemas, promtool."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
K8S = ROOT / "deploy" / "k8s"


def _metric_names() -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import Metrics

    m = Metrics()
    for d in ("medical",):  # label children so every family renders samples
        m.alpha.labels(d), m.weight.labels(d)
    m.stage.labels("compose"), m.success.labels("stop"), m.requests_mode.labels("constellation")
    names = set()
    for fam in text_string_to_metric_families(m.render().decode()):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return names


def _exprs_use_real_metrics(exprs: list[str]) -> None:
    names = _metric_names()
    for e in exprs:
        for ref in set(re.findall(r"constellation_[a-z0-9_]+", e)):
            assert ref in names, f"{ref} (in {e!r}) is not a metric the server exposes"


def test_dockerfile_lints_clean_and_keeps_its_promises():
    p = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG VARIANT=gpu" in text and "nvidia/cuda" in text and "VARIANT=cpu" in text
    assert re.search(r"^USER 10001", text, re.M), "runs as a non-root user"
    assert "HEALTHCHECK" in text and "/health" in text
    assert 'VOLUME ["/models"]' in text
    assert "constellation demo build" in text  # the demo is baked into the CPU image


def test_compose_file_is_valid_against_the_compose_spec():
    p = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    c = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gpu = c["services"]["constellation"]
    dev = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["capabilities"] == ["gpu"]
    assert c["services"]["constellation-cpu"]["profiles"] == ["cpu"]
    assert {"prometheus", "grafana"} <= set(c["services"])
    for vol in c["services"]["grafana"]["volumes"] + c["services"]["prometheus"]["volumes"]:
        assert (ROOT / vol.split(":")[0]).exists(), vol


def test_dashboard_shows_what_operators_need_from_real_metrics():
    dash = json.loads((ROOT / "deploy/grafana/dashboards/constellation.json").read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for want in ("requests", "latency", "tokens / s", "queue", "domain", "entropy", "fallback"):
        assert want in titles, want
    _exprs_use_real_metrics([t["expr"] for p in dash["panels"] for t in p["targets"]])


def test_alert_rules_pass_promtool_and_match_the_prometheusrule():
    promtool = shutil.which("promtool")
    assert promtool, "promtool is needed (make setup installs Debian's prometheus package)"
    p = subprocess.run([promtool, "check", "rules", "deploy/prometheus/alerts.yml"], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names == {"ConstellationQueueGrowing", "ConstellationErrorRate", "ConstellationHighFallbackRate"}
    _exprs_use_real_metrics([r["expr"] for g in rules["groups"] for r in g["rules"]])
    pr = yaml.safe_load((K8S / "base/prometheusrule.yaml").read_text())
    assert pr["kind"] == "PrometheusRule" and pr["spec"] == rules


def _docs(path: Path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubernetes_manifests_validate():
    import kubernetes_validate

    kinds = {}
    for f in sorted((K8S / "base").glob("*.yaml")):
        for d in _docs(f):
            kinds[d["kind"]] = d
            if d["apiVersion"].startswith(("monitoring.coreos.com", "kustomize.config")):
                continue  # CRDs / kustomize: no upstream schema
            kubernetes_validate.validate(d, "1.37.0", strict=True)
    listed = set(yaml.safe_load((K8S / "base/kustomization.yaml").read_text())["resources"])
    assert listed == {f.name for f in (K8S / "base").glob("*.yaml") if f.name != "kustomization.yaml"}
    for k in ("Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "Secret", "PodDisruptionBudget",
              "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"):
        assert k in kinds, k
    dep = kinds["Deployment"]["spec"]["template"]["spec"]
    c = dep["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # long enough to load weights
    drain = float(c["args"][c["args"].index("--drain-timeout") + 1])
    assert dep["terminationGracePeriodSeconds"] > drain
    assert c["env"][0]["valueFrom"]["secretKeyRef"]["name"] == kinds["Secret"]["metadata"]["name"]
    hpa_metric = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert hpa_metric == "constellation_num_requests_waiting" and hpa_metric in _metric_names()
    assert kinds["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"
    # the ConfigMap's constellation config is one the server accepts
    from index_store.config import ConstellationConfig
    import tomllib

    ConstellationConfig.model_validate(tomllib.loads(kinds["ConfigMap"]["data"]["constellation.toml"]))


def test_gpu_overlay_requests_a_gpu_and_still_validates():
    import kubernetes_validate

    base = next(d for d in _docs(K8S / "base/deployment.yaml"))
    patch = next(d for d in _docs(K8S / "overlays/gpu/gpu.yaml"))
    kust = yaml.safe_load((K8S / "overlays/gpu/kustomization.yaml").read_text())
    assert kust["resources"] == ["../../base"] and kust["patches"] == [{"path": "gpu.yaml"}]
    merged = json.loads(json.dumps(base))  # strategic merge of the one container, by name
    spec, pspec = merged["spec"]["template"]["spec"], patch["spec"]["template"]["spec"]
    spec["tolerations"] = pspec["tolerations"]
    c = next(x for x in spec["containers"] if x["name"] == pspec["containers"][0]["name"])
    c["resources"] = pspec["containers"][0]["resources"]
    c["image"] = "constellation:" + kust["images"][0]["newTag"]
    kubernetes_validate.validate(merged, "1.37.0", strict=True)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_deploy_guide_exists_and_walks_to_a_scaled_deployment():
    text = (ROOT / "docs/deploy.md").read_text()
    for step in ("nvidia", "docker compose", "kubectl apply -k", "HorizontalPodAutoscaler", "prometheus-adapter"):
        assert step.lower() in text.lower(), step


def test_live_catalog_overlay_has_one_writer_and_validates():
    """docs/catalog.md's arrangement: serving replicas read the config from the (read-only) volume
    and poll it; one admin replica, never scaled, mounts it read-write with the admin key."""
    import kubernetes_validate

    over = K8S / "overlays/live-catalog"
    kust = yaml.safe_load((over / "kustomization.yaml").read_text())
    assert kust["resources"] == ["../../base", "admin.yaml"]
    docs = {d["kind"]: d for d in _docs(over / "admin.yaml")}
    for d in docs.values():
        kubernetes_validate.validate(d, "1.37.0", strict=True)
    admin = docs["Deployment"]["spec"]
    assert admin["replicas"] == 1 and admin["strategy"]["type"] == "Recreate"
    c = admin["template"]["spec"]["containers"][0]
    assert {e["name"] for e in c["env"]} == {"CONSTELLATION_API_KEY", "CONSTELLATION_ADMIN_KEY"}
    assert not any(m.get("readOnly") for m in c["volumeMounts"] if m["name"] == "models")
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    # the serving replicas: the base Deployment with the patched args, the volume still read-only
    base = next(d for d in _docs(K8S / "base/deployment.yaml"))
    patch = next(d for d in _docs(over / "serving.yaml"))
    merged = json.loads(json.dumps(base))
    serving = merged["spec"]["template"]["spec"]["containers"][0]
    serving["args"] = patch["spec"]["template"]["spec"]["containers"][0]["args"]
    kubernetes_validate.validate(merged, "1.37.0", strict=True)
    assert serving["args"][serving["args"].index("--config") + 1] == "/models/constellation.toml"
    assert float(serving["args"][serving["args"].index("--catalog-poll") + 1]) > 0
    assert all(m.get("readOnly") for m in serving["volumeMounts"] if m["name"] == "models")
    assert next(d for d in _docs(over / "pvc.yaml"))["spec"]["accessModes"] == ["ReadWriteMany"]
    # the flags the manifests pass are the server's
    from server.cli_parser import parser

    for args in (serving["args"], c["args"]):
        parser().parse_args(["serve", *args])
