"""KubeRay manifests: rendered == committed, valid against the CRDs and Kubernetes' own models,
one serve config, secure pods, and secrets only from a git-ignored env file."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cluster import k8s
from cluster.cli import main

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRD_DIR = ROOT / "tests" / "data" / "kuberay-crds"
CRD_FILES = {"RayCluster": "raycluster_v1.json", "RayJob": "rayjob_v1.json"}
CRD_FILES["RayService"] = "rayservice_v1.json"


# ----- helpers ------------------------------------------------------------------------------
def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every committed manifest file (not the kustomization) → its objects."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def objects() -> list[dict[str, Any]]:
    return [o for docs in manifests().values() for o in docs]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in objects() if o["kind"] == kind]


def v1_schema(crd: dict[str, Any]) -> dict[str, Any]:
    """The openAPIV3Schema of version v1, whether given a whole CRD or just the schema."""
    if crd.get("kind") == "CustomResourceDefinition":
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        return version["schema"]["openAPIV3Schema"]
    return crd


def strict(schema: Any) -> Any:
    """Forbid unknown fields, as `kubectl apply` (strict field validation) does; Kubernetes
    structural schemas leave ``additionalProperties`` out, so a plain validation would not."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = json.loads((CRD_DIR / CRD_FILES[kind]).read_text())
    schema = strict(v1_schema(crd))
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict[str, Any]) -> list[str]:
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


MODELS = {
    "Namespace": "V1Namespace",
    "PersistentVolumeClaim": "V1PersistentVolumeClaim",
    "ConfigMap": "V1ConfigMap",
    "StatefulSet": "V1StatefulSet",
    "Service": "V1Service",
}
QUANTITY_MAPS = {"limits", "requests", "capacity"}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def model_errors(data: Any, type_name: str, path: str = "") -> list[str]:
    """Check ``data`` against the `kubernetes` client's model ``type_name``: every field known,
    every primitive of the right type, and (by deserialising with client-side validation on)
    every required field present."""
    import kubernetes.client as kc

    # The client spells containers "List[X]"/"Dict[str, X]" (older releases "list[X]"/"dict(")
    if type_name.lower().startswith("list["):
        if not isinstance(data, list):
            return [f"{path}: expected a list"]
        inner = type_name[5:-1]
        return [e for i, d in enumerate(data) for e in model_errors(d, inner, f"{path}[{i}]")]
    if type_name.lower().startswith(("dict(", "dict[")):
        if not isinstance(data, dict):
            return [f"{path}: expected a mapping"]
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        if path.rsplit(".", 1)[-1] in QUANTITY_MAPS:
            inner = "object"  # quantities are int-or-string in the API
        return [e for k, v in data.items() for e in model_errors(v, inner, f"{path}.{k}")]
    if type_name in ("object", "datetime"):
        return []
    if type_name in PRIMITIVES:
        ok = isinstance(data, PRIMITIVES[type_name]) and not (
            type_name in ("int", "float") and isinstance(data, bool)
        )
        return [] if ok else [f"{path}: expected {type_name}, got {data!r}"]
    klass = getattr(kc, type_name)
    if not isinstance(data, dict):
        return [f"{path}: expected a {type_name} mapping"]
    fields = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    errors = [f"{path}.{k}: unknown field of {type_name}" for k in data if k not in fields]
    for key, value in data.items():
        if key in fields:
            sub = klass.openapi_types[fields[key]]
            errors += model_errors(value, sub, f"{path}.{key}")
    if not path:
        try:
            # Required fields and enums are checked by the models' setters.
            kc.ApiClient()._ApiClient__deserialize(data, type_name)
        except (ValueError, TypeError) as err:
            errors.append(f"{type_name}: {err}")
    return errors


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod the manifests create, including KubeRay's."""
    specs = []
    for obj in objects():
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = obj.get("spec", {})
        clusters = []
        if obj["kind"] == "RayCluster":
            clusters.append(spec)
        elif obj["kind"] == "RayJob":
            clusters.append(spec["rayClusterSpec"])
            specs.append((f"{name} submitter", spec["submitterPodTemplate"]["spec"]))
        elif obj["kind"] == "RayService":
            clusters.append(spec["rayClusterConfig"])
        elif obj["kind"] == "StatefulSet":
            specs.append((name, spec["template"]["spec"]))
        for c in clusters:
            specs.append((f"{name} head", c["headGroupSpec"]["template"]["spec"]))
            for group in c["workerGroupSpecs"]:
                specs.append((f"{name} {group['groupName']}", group["template"]["spec"]))
    return specs


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists as {"a.b.0.c": leaf}."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


# ----- rendered == committed ----------------------------------------------------------------
def test_rendered_manifests_equal_committed(tmp_path):
    assert main(["k8s", "render", "--out", str(tmp_path)]) == 0
    rendered = sorted(p.name for p in tmp_path.iterdir())
    assert rendered == sorted(k8s.render())
    for name in rendered:
        assert (tmp_path / name).read_text() == (K8S / name).read_text(), (
            f"k8s/{name} is stale: run `taskray k8s render`"
        )


def test_k8s_check_passes_on_committed_and_fails_on_drift(tmp_path, capsys):
    assert main(["k8s", "check"]) == 0
    k8s.write(tmp_path)
    assert main(["k8s", "check", "--out", str(tmp_path)]) == 0
    path = tmp_path / "rayservice.yaml"
    path.write_text(path.read_text().replace("num_replicas: 1", "num_replicas: 3", 1))
    capsys.readouterr()
    assert main(["k8s", "check", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "num_replicas: 3" in out and "out of date" in out


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(manifests())
    assert kust["namespace"] == "taskray"


# ----- schema validation ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_kuberay_objects_validate_against_crds(kind):
    found = by_kind(kind)
    assert found, f"no {kind} in k8s/"
    for obj in found:
        assert obj["apiVersion"] == "ray.io/v1"
        assert crd_errors(obj) == []
        assert model_errors(obj["metadata"], "V1ObjectMeta") == []


def test_crd_validation_is_strict():
    (cluster,) = by_kind("RayCluster")
    typo = copy.deepcopy(cluster)
    typo["spec"]["enableInTreeAutoscalling"] = True
    assert any("enableInTreeAutoscalling" in e for e in crd_errors(typo))
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert any("maxReplicas" in e for e in crd_errors(wrong))
    bad_version = copy.deepcopy(cluster)
    bad_version["spec"]["autoscalerOptions"]["version"] = "v3"
    assert crd_errors(bad_version)


def test_core_objects_validate_against_kubernetes_models():
    kinds = set()
    for obj in objects():
        if obj["apiVersion"].startswith("ray.io/"):
            continue
        kinds.add(obj["kind"])
        assert obj["kind"] in MODELS, f"add a model for {obj['kind']}"
        assert model_errors(obj, MODELS[obj["kind"]]) == [], obj["kind"]
    assert {"ConfigMap", "StatefulSet", "Service", "PersistentVolumeClaim"} <= kinds


def test_model_validation_catches_mistakes():
    (sts,) = by_kind("StatefulSet")
    unknown = copy.deepcopy(sts)
    unknown["spec"]["replica"] = 1
    assert any("replica" in e for e in model_errors(unknown, "V1StatefulSet"))
    missing = copy.deepcopy(sts)
    del missing["spec"]["selector"]
    assert any("selector" in e for e in model_errors(missing, "V1StatefulSet"))
    typed = copy.deepcopy(sts)
    typed["spec"]["replicas"] = "one"
    assert any("replicas" in e for e in model_errors(typed, "V1StatefulSet"))


# ----- one source of truth --------------------------------------------------------------------
def test_serve_config_is_configs_serve_yaml_plus_documented_overlay():
    (service,) = by_kind("RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    source = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    got, want = flatten(embedded), flatten(source)
    assert set(got) == set(want), "the in-cluster config must have the same keys"
    differing = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    bundle = "applications.0.args.models.0.bundle"
    assert differing == {
        "http_options.host": ("127.0.0.1", "0.0.0.0"),
        "proxy_location": ("HeadOnly", "EveryNode"),
        bundle: (want[bundle], f"{k8s.APP_DIR}/{want[bundle]}"),
    }
    assert set(k8s.IN_CLUSTER_OVERLAY) == {"http_options.host", "proxy_location"}
    # The bundle lands on the shared runs volume that train jobs write.
    assert got[bundle].startswith(k8s.RUNS_DIR + "/")


def test_serve_config_passes_rays_schema():
    from ray.serve.schema import ServeDeploySchema

    (service,) = by_kind("RayService")
    ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))


def test_rayjob_trains_the_config_from_its_configmap():
    (job,) = by_kind("RayJob")
    (cm,) = by_kind("ConfigMap")
    name = Path(k8s.TRAIN_CONFIG).name
    assert cm["data"][name] == (ROOT / k8s.TRAIN_CONFIG).read_text()
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    entry = spec["entrypoint"].split()
    assert entry[:3] == ["taskray", "train", f"{k8s.TRAIN_CONFIG_MOUNT}/{name}"]
    assert entry[entry.index("--output") + 1].startswith(k8s.RUNS_DIR + "/")
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert mounts["train-config"] == k8s.TRAIN_CONFIG_MOUNT
    assert volumes["train-config"]["configMap"]["name"] == cm["metadata"]["name"]
    # The overridden paths exist in the checkout the image copies.
    assert (ROOT / entry[entry.index("--train") + 1].removeprefix(k8s.APP_DIR + "/")).is_file()


# ----- cluster shape ----------------------------------------------------------------------------
def test_raycluster_cpu_head_autoscaled_gpu_workers():
    for spec in [o["spec"] for o in by_kind("RayCluster")] + [
        o["spec"]["rayClusterSpec"] for o in by_kind("RayJob")
    ]:
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["autoscalerOptions"]["version"] == "v2"
        assert spec["authOptions"]["mode"] == "token"
        assert spec["rayVersion"] == k8s.RAY_VERSION
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"]["limits"]
        (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
        limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] >= 1
        assert 0 <= gpu["minReplicas"] < gpu["maxReplicas"]


def test_every_pod_is_non_root_with_requests_and_limits():
    specs = pod_specs()
    assert len(specs) >= 8
    for where, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] == 1000, where
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where
            assert sc["allowPrivilegeEscalation"] is False, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (where, kind)
    for spec in [o["spec"] for o in by_kind("RayCluster")] + [
        o["spec"]["rayClusterConfig"] for o in by_kind("RayService")
    ]:
        autoscaler = spec["autoscalerOptions"]
        assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"requests", "limits"} <= set(autoscaler["resources"])


def test_serving_pods_probe_readyz_and_healthz():
    (service,) = by_kind("RayService")
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        ready, alive = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
        assert (ready["path"], ready["port"]) == ("/readyz", 8000)
        assert (alive["path"], alive["port"]) == ("/healthz", 8000)
        env = {e["name"]: e for e in container["env"]}
        assert env["TASKRAY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == k8s.SECRET


def test_qdrant_statefulset_with_volume_service_and_secret_key():
    (sts,) = by_kind("StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("qdrant/qdrant:")
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in container["volumeMounts"]
    }
    env = {e["name"]: e for e in container["env"]}
    assert env["QDRANT__SERVICE__API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == k8s.SECRET
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    assert (
        services[sts["spec"]["serviceName"]]["spec"]["selector"]
        == (sts["spec"]["selector"]["matchLabels"])
    )


# ----- secrets and the image --------------------------------------------------------------------
def test_secrets_only_from_a_git_ignored_env_file():
    assert by_kind("Secret") == []
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (gen,) = kust["secretGenerator"]
    assert gen["name"] == k8s.SECRET and gen["envs"] == ["secrets.env"]
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "k8s/secrets.env"], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, "k8s/secrets.env must be git-ignored"
    example = (K8S / "secrets.env.example").read_text()
    keys = dict(
        line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#")
    )
    referenced = {
        value
        for obj in objects()
        for path, value in flatten(obj).items()
        if path.endswith("secretKeyRef.key")
    }
    assert referenced == set(keys) == {"TASKRAY_API_KEY", "QDRANT_API_KEY"}
    assert all(value.startswith("REPLACE-ME") for value in keys.values())


def test_dockerfile_matches_the_ray_pin():
    docker = (K8S / "Dockerfile").read_text()
    pin = re.search(r'"ray\[[^\]]*\]>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "ray pin not found in pyproject.toml"
    base = re.search(r"ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py311\n", docker)
    assert base and base.group(1).startswith(pin.group(1) + ".")
    assert base.group(1) == k8s.RAY_VERSION
    assert "pip install --no-cache-dir ." in docker
    assert f"WORKDIR {k8s.APP_DIR}" in docker
    assert re.search(r"^USER 1000$", docker, re.M)
    for image in {c["image"] for _, s in pod_specs() for c in s["containers"]}:
        assert image.startswith(("taskray:", "qdrant/qdrant:")), image
