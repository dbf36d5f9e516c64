"""The Helm chart deploy/helm/microserve, loaded, schema-checked, linted and rendered by Helm's own Go SDK (through
helm-python-sdk, no helm binary), for every values file in its ci/ folder.

Every rendered manifest is validated: the Kubernetes kinds against the API's own schemas (kubernetes-validate,
strict, so an unknown field fails), ServiceMonitor and ScaledObject against the models that cloudcoil generates from
the Prometheus operator's and KEDA's CRDs (plus a check that no field was dropped as unknown), and InferencePool,
whose CRD no package ships, against the shape of its v1 API written out below.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "microserve"
VALUES = {path.name.removesuffix("-values.yaml"): path for path in sorted((CHART / "ci").glob("*-values.yaml"))}
# The chart's floor (Chart.yaml kubeVersion) and a recent release.
KUBE_VERSIONS = ("1.27", "1.35")
RELEASE, NAMESPACE = "demo", "models"

# InferencePool (inference.networking.k8s.io/v1), from the Gateway API Inference Extension's API reference.
_LABEL_VALUE = {"type": "string", "maxLength": 63, "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
INFERENCE_POOL_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["selector", "targetPorts"],
    "properties": {
        "selector": {
            "type": "object",
            "additionalProperties": False,
            "required": ["matchLabels"],
            "properties": {"matchLabels": {"type": "object", "additionalProperties": _LABEL_VALUE}},
        },
        "targetPorts": {
            "type": "array",
            "minItems": 1,
            "maxItems": 8,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["number"],
                "properties": {"number": _PORT},
            },
        },
        "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
        "endpointPickerRef": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "port"],  # port is required for kind Service, the default
            "properties": {
                "group": {"type": "string", "maxLength": 253},
                "kind": {"type": "string", "maxLength": 63},
                "name": {"type": "string", "minLength": 1, "maxLength": 253},
                "port": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["number"],
                    "properties": {"number": _PORT},
                },
                "failureMode": {"enum": ["FailOpen", "FailClose"]},
            },
        },
    },
}


def load_values(name: str) -> dict[str, Any]:
    return helm.values_from_yaml(VALUES[name].read_text())


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders for ``values`` (NOTES.txt aside)."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


@pytest.fixture(scope="module")
def manifests(chart: helm.Chart) -> dict[str, list[dict[str, Any]]]:
    return {name: render(chart, load_values(name)) for name in VALUES}


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1, found
    return found[0]


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = workload(docs)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "microserve")


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def test_the_four_required_values_files_are_there() -> None:
    assert {"default", "gpu", "autoscaling", "api-keys"} <= set(VALUES), sorted(VALUES)


# -- Helm's own checks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUES))
def test_values_pass_the_schema_and_lint_is_clean(chart: helm.Chart, name: str) -> None:
    values = load_values(name)
    chart.validate_schema(values)
    report = helm.lint(CHART, values, strict=True, kube_version="v1.35.0")
    assert report["total_charts_linted"] == 1
    # Severity 1 is information (a chart icon is recommended); 2 (warning) and 3 (error) must not occur.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"cache": {"type": "hostPath"}}, "type"),
        ({"microserve": {"drainTimeout": -1}}, "drainTimeout"),
        ({"microserve": {"model": []}}, "model"),
        ({"gpu": {"count": "one"}}, "count"),
        ({"autoscaling": {"targetAverageValue": "lots"}}, "targetAverageValue"),
        ({"inferencePool": {"endpointPicker": {"failureMode": "Retry"}}}, "failureMode"),
        ({"replicas": 2}, "replicas"),
    ],
)
def test_schema_rejects_bad_values_naming_the_key(chart: helm.Chart, override: dict[str, Any], named: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=named):
        chart.validate_schema(override)


def test_both_autoscalers_at_once_is_an_error(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmError, match="exclude each other"):
        chart.render({"autoscaling": {"enabled": True}, "keda": {"enabled": True}}, name=RELEASE)


def test_api_keys_without_keys_or_secret_is_an_error(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmError, match=r"apiKeys\.keys"):
        chart.render({"apiKeys": {"enabled": True}}, name=RELEASE)


# -- every manifest against its schema ---------------------------------------------------------------------------


def _dropped(given: Any, kept: Any, path: str = "") -> list[str]:
    """Keys of ``given`` that a model did not keep: fields its schema does not know."""
    if isinstance(given, dict) and isinstance(kept, dict):
        out: list[str] = []
        for key, value in given.items():
            out += [f"{path}.{key}"] if key not in kept else _dropped(value, kept[key], f"{path}.{key}")
        return out
    if isinstance(given, list) and isinstance(kept, list):
        return [p for i, (a, b) in enumerate(zip(given, kept, strict=True)) for p in _dropped(a, b, f"{path}[{i}]")]
    return []


def validate_custom_resource(doc: dict[str, Any]) -> None:
    kind = doc["kind"]
    if kind == "InferencePool":
        assert doc["apiVersion"] == "inference.networking.k8s.io/v1"
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
        jsonschema.validate(doc["spec"], INFERENCE_POOL_SPEC)
        return
    if kind == "ServiceMonitor":
        from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

        model: Any = ServiceMonitor
    elif kind == "ScaledObject":
        from cloudcoil.models.keda.v1alpha1 import ScaledObject

        model = ScaledObject
    else:
        raise AssertionError(f"no schema for {doc['apiVersion']} {kind}")
    parsed = model.model_validate(doc)
    kept = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert not _dropped(doc, kept), f"{kind}: unknown fields {_dropped(doc, kept)}"


@pytest.mark.parametrize("name", sorted(VALUES))
def test_every_manifest_is_valid(manifests: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = manifests[name]
    assert docs
    for doc in docs:
        try:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            validate_custom_resource(doc)


def test_the_values_files_cover_every_kind(manifests: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {doc["kind"] for docs in manifests.values() for doc in docs}
    assert kinds >= {
        "Deployment",
        "StatefulSet",
        "Service",
        "ServiceAccount",
        "Secret",
        "PersistentVolumeClaim",
        "Ingress",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "ScaledObject",
        "InferencePool",
    }, kinds


def test_a_broken_manifest_fails_validation() -> None:
    # The validator is strict: a misspelt field in a Deployment fails, as it would fail `kubectl apply`.
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "x"},
                "spec": {"replica": 1, "selector": {}, "template": {}},
            },
            "1.35",
            strict=True,
        )


# -- what users rely on ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUES))
def test_probes_ask_microserves_health_routes(manifests: dict[str, list[dict[str, Any]]], name: str) -> None:
    container = server_container(manifests[name])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = {
        probe: container[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {
        "startupProbe": "/v1/health/ready",
        "livenessProbe": "/v1/health/live",
        "readinessProbe": "/v1/health/ready",
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    assert str(ports["http"]) == env_of(container)["MICROSERVE_PORT"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("name", sorted(VALUES))
def test_grace_period_is_above_the_drain_timeout(manifests: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = manifests[name]
    pod = workload(docs)["spec"]["template"]["spec"]
    container = server_container(docs)
    drain = float(env_of(container)["MICROSERVE_DRAIN_TIMEOUT"])
    assert drain == float(load_values(name).get("microserve", {}).get("drainTimeout", 30))
    # The preStop pause runs inside the grace period too, before SIGTERM starts the drain.
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][1]) if "lifecycle" in container else 0.0
    assert pod["terminationGracePeriodSeconds"] > pause + drain, (pod["terminationGracePeriodSeconds"], pause, drain)


def test_drain_timeout_drives_the_grace_period(chart: helm.Chart) -> None:
    for drain in (0, 7.5, 300):
        docs = render(chart, {"microserve": {"drainTimeout": drain}})
        pod = workload(docs)["spec"]["template"]["spec"]
        assert env_of(server_container(docs))["MICROSERVE_DRAIN_TIMEOUT"] == str(drain)
        assert pod["terminationGracePeriodSeconds"] > 5 + drain


def test_hpa_scales_on_requests_waiting_per_pod(manifests: dict[str, list[dict[str, Any]]]) -> None:
    docs = manifests["autoscaling"]
    hpa = only(docs, "HorizontalPodAutoscaler")
    target = workload(docs)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": target["kind"],
        "name": target["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    # The autoscaler owns the replica count.
    assert "replicas" not in target["spec"]
    assert not [doc for doc in manifests["default"] if doc["kind"] == "HorizontalPodAutoscaler"]


def test_keda_reads_the_same_signal(manifests: dict[str, list[dict[str, Any]]]) -> None:
    docs = manifests["keda-gateway"]
    scaled = only(docs, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    fullname = workload(docs)["metadata"]["name"]
    assert trigger["metadata"]["query"] == f'sum(num_requests_waiting{{namespace="{NAMESPACE}",service="{fullname}"}})'
    assert trigger["metadata"]["threshold"] == "4"
    assert scaled["spec"]["scaleTargetRef"]["name"] == fullname
    assert not [doc for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"]
    # The query's service label is the one the ServiceMonitor's scrape gives the series.
    assert only(docs, "Service")["metadata"]["name"] == fullname
    only(docs, "ServiceMonitor")


def test_gpu_values_ask_for_a_gpu_on_gpu_nodes(manifests: dict[str, list[dict[str, Any]]]) -> None:
    docs = manifests["gpu"]
    container = server_container(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":0.1.0-cuda")
    pod = workload(docs)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["runtimeClassName"] == "nvidia"
    # A cache per pod: a StatefulSet with a claim template, and its governing headless Service.
    statefulset = workload(docs)
    assert statefulset["kind"] == "StatefulSet"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "cache" and claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    headless = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert [d["metadata"]["name"] for d in headless] == [statefulset["spec"]["serviceName"]]
    for name in ("default", "autoscaling", "api-keys"):
        assert "nvidia.com/gpu" not in json.dumps(manifests[name]), name


def test_api_keys_come_from_a_mounted_secret_never_an_env_value(manifests: dict[str, list[dict[str, Any]]]) -> None:
    docs = manifests["api-keys"]
    keys = load_values("api-keys")["apiKeys"]["keys"]
    secret = only(docs, "Secret")
    assert base64.b64decode(secret["data"]["keys"]).decode().splitlines() == keys
    pod = workload(docs)["spec"]["template"]["spec"]
    container = server_container(docs)
    (volume,) = [v for v in pod["volumes"] if "secret" in v and v["secret"]["secretName"] == secret["metadata"]["name"]]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    env = env_of(container)
    assert env["MICROSERVE_API_KEY_FILE"] == f"{mount['mountPath']}/keys"
    assert "MICROSERVE_API_KEYS" not in env
    # No key, nor its digest, is written anywhere in the workload: not in env, args or annotations.
    text = json.dumps(workload(docs))
    for key in keys:
        assert key not in text and key.removeprefix("sha256:") not in text
    assert env["MICROSERVE_METRICS_PUBLIC"] == "false"
    # A change of keys rolls the pods, which read the file once at start.
    assert "checksum/api-keys" in workload(docs)["spec"]["template"]["metadata"]["annotations"]


def test_default_values_run_as_the_images_user_with_a_read_only_root(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    docs = manifests["default"]
    pod = workload(docs)["spec"]["template"]["spec"]
    assert workload(docs)["kind"] == "Deployment"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    container = server_container(docs)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/cache", "/tmp"} <= mounts
    (seed,) = pod["initContainers"]
    assert seed["command"][:1] == ["cp"] and seed["volumeMounts"] == [{"name": "cache", "mountPath": "/seed"}]
    service = only(docs, "Service")
    labels = workload(docs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert only(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_inference_pool_selects_the_pods_on_the_serving_port(manifests: dict[str, list[dict[str, Any]]]) -> None:
    docs = manifests["keda-gateway"]
    pool = only(docs, "InferencePool")
    labels = workload(docs)["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port = next(p["containerPort"] for p in server_container(docs)["ports"] if p["name"] == "http")
    assert pool["spec"]["targetPorts"] == [{"number": port}]
    assert pool["spec"]["endpointPickerRef"] == {
        "name": "microserve-epp",
        "port": {"number": 9002},
        "failureMode": "FailOpen",
    }


def test_notes_say_how_to_call_the_service(chart: helm.Chart) -> None:
    notes = chart.render(load_values("api-keys"), name=RELEASE, namespace=NAMESPACE)["microserve/templates/NOTES.txt"]
    assert "kubectl -n models port-forward svc/demo-microserve 8000:8000" in notes
    assert "/v1/chat/completions" in notes and "Authorization: Bearer" in notes
    assert "demo-microserve-api-keys" in notes
