"""Every Kubernetes manifest validates strictly offline, and the configs in them are kinoray's own."""

import importlib
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from kinoray.models.config import KinorayConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
KUBERNETES_VERSION = "1.32.0"


def schema_dir():
    for candidate in (os.environ.get("KINORAY_K8S_SCHEMAS"), ROOT.parent / "shared" / "k8s-schemas"):
        if candidate and Path(candidate, "rayservice_v1.json").exists():
            return Path(candidate)
    pytest.skip("KubeRay CRD schemas not found at ../shared/k8s-schemas or $KINORAY_K8S_SCHEMAS")


def strict(schema):
    """Unknown fields are errors (as `kubeconform -strict`), except under preserve-unknown-fields;
    required fields that have a default may be left out (the API server fills them in)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    props = out.get("properties")
    if props is not None and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if props is not None and "required" in out:
        out["required"] = [r for r in out["required"] if "default" not in props.get(r, {})]
    return out


def crd_schemas():
    d = schema_dir()
    return {
        kind: strict(json.loads((d / f"{kind.lower()}_v1.json").read_text()))
        for kind in ("RayCluster", "RayJob", "RayService")
    }


def built(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed: overlays cannot be built here")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=True
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def base_documents():
    docs = []
    for path in sorted((K8S / "base").glob("*.yaml")):
        if path.name in ("kustomization.yaml", "job.yaml"):
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    # What the base's configMapGenerator makes.
    settings = next(
        g for g in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["configMapGenerator"]
    )
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": settings["name"]},
            "data": dict(item.split("=", 1) for item in settings["literals"]),
        }
    )
    for name, files in (
        ("kinoray-config", ["job.yaml"]),
        ("kinoray-grafana-dashboard", ["grafana-dashboard.json"]),
    ):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name},
                "data": {f: (K8S / "base" / f).read_text() for f in files},
            }
        )
    return docs


def validate(doc, schemas):
    kind = doc["kind"]
    if kind in schemas:
        assert doc["apiVersion"] == "ray.io/v1"
        jsonschema.validate(doc, schemas[kind])
    elif kind == "PodMonitor":
        # The Prometheus Operator's CRD is not shipped here: check the fields it needs.
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(doc["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
        assert all(
            set(e) <= {"port", "interval", "path", "scheme"} for e in doc["spec"]["podMetricsEndpoints"]
        )
        assert doc["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    else:
        import kubernetes_validate

        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def all_variants():
    yield "base", base_documents()
    for overlay in OVERLAYS:
        yield overlay, built(overlay)


@pytest.mark.parametrize("variant", ["base", *OVERLAYS])
def test_every_manifest_validates_strictly(variant):
    schemas = crd_schemas()
    docs = base_documents() if variant == "base" else built(variant)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap"] * 3 + ["PodMonitor", "RayCluster", "RayJob", "RayService"]
    for doc in docs:
        validate(doc, schemas)
        # Pod templates are core objects: validate them as Pods too.
        for template in pod_templates(doc):
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": template["spec"]}
            validate(pod, schemas)


def test_a_typo_is_caught():
    schemas = crd_schemas()
    doc = next(d for d in base_documents() if d["kind"] == "RayCluster")
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        validate(doc, schemas)


def pod_templates(doc):
    spec = doc.get("spec", {})
    cluster = (
        spec.get("rayClusterConfig")
        or spec.get("rayClusterSpec")
        or (spec if doc["kind"] == "RayCluster" else None)
    )
    if not cluster:
        return []
    return [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster.get("workerGroupSpecs", [])
    ]


@pytest.mark.parametrize("variant", ["base", *OVERLAYS])
def test_serve_config_and_job_entrypoint_are_kinorays_own(variant):
    from kinoray.cli import build_parser

    docs = base_documents() if variant == "base" else built(variant)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    service = by_kind["RayService"][0]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    for app in serve_config["applications"]:
        module, attr = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attr)
        config = KinorayConfig.model_validate(app["args"]["config"])
        builder(app["args"])  # builds the application graph, as Serve does on the cluster
        assert config.serve.host == "0.0.0.0"

    job = by_kind["RayJob"][0]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "kinoray"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "batch" and args.prompts[0].startswith("s3://") and args.output.startswith("s3://")
    configmap = next(d for d in by_kind["ConfigMap"] if d["metadata"]["name"] == "kinoray-config")
    cluster = by_kind["RayCluster"][0]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "kinoray-config")[
        "mountPath"
    ]
    assert head["volumes"][0]["configMap"]["name"] == "kinoray-config"
    assert os.path.dirname(args.config) == mount
    job_config = KinorayConfig.model_validate(
        yaml.safe_load(configmap["data"][os.path.basename(args.config)])
    )

    # Every custom resource a stage asks for is offered by a worker group of its cluster.
    def offered(cluster_spec):
        return {k for g in cluster_spec["workerGroupSpecs"] for k in g.get("resources", {})}

    for cfg, cluster_spec in ((job_config, cluster["spec"]), (config, service["spec"]["rayClusterConfig"])):
        for stage in (cfg.encoder, cfg.denoiser, cfg.decoder):
            assert set(stage.resources) <= offered(cluster_spec)


def test_storage_credentials_come_from_a_secret_reference():
    text = "\n".join(p.read_text() for p in K8S.rglob("*.yaml"))
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text
    for doc in base_documents():
        for template in pod_templates(doc):
            for c in template["spec"]["containers"]:
                assert {"secretRef": {"name": "kinoray-storage"}} in c["envFrom"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_overlay_names_its_buckets_in_one_place(overlay, tmp_path):
    """Buckets set once in the overlay's kinoray-settings reach the job's entrypoint and, as
    $KINORAY_STORAGE, the Serve app's job store."""
    import shutil as sh

    copy = tmp_path / "k8s"
    sh.copytree(K8S, copy)
    kustomization = copy / "overlays" / overlay / "kustomization.yaml"
    text = kustomization.read_text()
    for key, url in (
        ("PROMPTS", "s3://acme-in/p.parquet"),
        ("OUTPUT", "s3://acme-out/r2"),
        ("STORAGE", "gs://acme-api"),
    ):
        text = "\n".join(
            f"      - KINORAY_{key}={url}" if line.strip().startswith(f"- KINORAY_{key}=") else line
            for line in text.splitlines()
        )
    kustomization.write_text(text + "\n")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed: overlays cannot be built here")
    out = subprocess.run(
        [kubectl, "kustomize", str(copy / "overlays" / overlay)], capture_output=True, text=True, check=True
    )
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    job = next(d for d in docs if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[2] == "s3://acme-in/p.parquet" and argv[argv.index("--output") + 1] == "s3://acme-out/r2"
    settings = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kinoray-settings"
    )
    assert settings["data"]["KINORAY_STORAGE"] == "gs://acme-api"
    service = next(d for d in docs if d["kind"] == "RayService")
    for template in pod_templates(service):
        refs = [e.get("configMapRef", {}).get("name") for e in template["spec"]["containers"][0]["envFrom"]]
        assert "kinoray-settings" in refs
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert "storage" not in serve_config["applications"][0]["args"]["config"]["serve"]


def test_the_serve_store_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("KINORAY_STORAGE", "gs://acme-api")
    assert KinorayConfig().serve.storage == "gs://acme-api"
