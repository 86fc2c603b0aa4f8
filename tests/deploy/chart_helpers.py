"""Render the Helm chart (helm/hybridserve) and validate what it renders, offline.

Built-in kinds go through kubernetes-validate's strict schemas (Kubernetes K8S_VERSION); the RayService
and the ServiceMonitor through the openAPIV3Schema of their CRDs, kept in helm/crds-schema/ (KubeRay and
prometheus-operator releases named in each file's `$comment`), made strict the way `kubectl --validate=
strict` is: an unknown field is an error, not silently pruned.
"""
from __future__ import annotations

import copy
import functools
import json
import subprocess
from pathlib import Path

import yaml

from tests.deploy.helm_bin import helm_path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "hybridserve"
CRD_SCHEMAS = REPO / "helm" / "crds-schema"
VALUES_FILES = ("values-super-1node.yaml", "values-super-2nodes.yaml", "values-cpu.yaml")
K8S_VERSION = "1.33.0"          # image volumes (model.source.image.method volume) are in its API
RELEASE, NAMESPACE = "hs", "serving"


class RenderError(RuntimeError):
    """helm failed; the message is its stderr."""


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm_path()), *args], capture_output=True, text=True, timeout=120)


@functools.lru_cache(maxsize=64)
def _render(values_files: tuple[str, ...], sets: tuple[str, ...], release: str, set_strings: tuple[str, ...]) -> str:
    args = ["template", release, str(CHART), "--namespace", NAMESPACE, "--kube-version", K8S_VERSION]
    for f in values_files:
        args += ["-f", str(CHART / f) if not Path(f).is_absolute() else f]
    for s in sets:
        args += ["--set", s]
    for s in set_strings:
        args += ["--set-string", s]
    p = run_helm(*args)
    if p.returncode != 0:
        raise RenderError(p.stderr.strip())
    return p.stdout


def render(values_files=(), sets=(), release: str = RELEASE, set_strings=()) -> list[dict]:
    """The chart's objects (fresh copies: callers may change them)."""
    text = _render(tuple(values_files), tuple(sets), release, tuple(set_strings))
    return [d for d in yaml.safe_load_all(text) if d]


def render_error(values_files=(), sets=(), release: str = RELEASE, set_strings=()) -> str:
    """helm's error for values that must be refused (fails the test when helm renders them)."""
    try:
        render(values_files, sets, release, set_strings)
    except RenderError as e:
        return str(e)
    raise AssertionError(f"helm rendered values it should refuse: files={values_files} sets={sets}")


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def app_args(docs: list[dict]) -> dict:
    apps = serve_config(docs)["applications"]
    assert len(apps) == 1
    return apps[0]["args"]


def head_spec(docs: list[dict]) -> dict:
    return one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]


def worker_groups(docs: list[dict]) -> dict[str, dict]:
    return {g["groupName"]: g for g in one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


# ---- schemas ----------------------------------------------------------------------------------------------
def _strict(node):
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema that refuses unknown fields."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) if k not in ("properties", "patternProperties") else
           {name: _strict(sub) for name, sub in v.items()} for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "type" not in out:
        out["type"] = ["integer", "string"]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(name: str):
    import jsonschema

    schema = json.loads((CRD_SCHEMAS / name).read_text())
    schema = _strict({k: v for k, v in schema.items() if not k.startswith("x-kubernetes-group")})
    schema.pop("$comment", None)
    cls = jsonschema.validators.validator_for({"$schema": "http://json-schema.org/draft-07/schema#"})
    cls.check_schema(schema)
    return cls(schema)


CRD_FILES = {("ray.io/v1", "RayService"): "rayservice.v1.schema.json",
             ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.v1.schema.json"}


def validate_object(doc: dict) -> None:
    """Raise AssertionError naming the object and the path of the first error."""
    key = (doc["apiVersion"], doc["kind"])
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if key in CRD_FILES:
        errors = sorted(crd_validator(CRD_FILES[key]).iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            raise AssertionError(f"{name} does not match its CRD schema: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]))
        if doc["kind"] == "RayService":      # the pod templates against Kubernetes' own (strict) Pod schema
            rc = doc["spec"]["rayClusterConfig"]
            groups = [("head", rc["headGroupSpec"])] + [(g["groupName"], g) for g in rc.get("workerGroupSpecs", [])]
            for group, spec in groups:
                tmpl = copy.deepcopy(spec["template"])
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {**tmpl.get("metadata", {}), "name": f"{doc['metadata']['name']}-{group}"},
                       "spec": tmpl["spec"]}
                _k8s_validate(pod, f"{name} pod template of group {group}")
        return
    _k8s_validate(doc, name)


def _k8s_validate(doc: dict, name: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{name} is not a valid Kubernetes {K8S_VERSION} object: "
                             f"{'.'.join(map(str, e.path))}: {e.message}") from None
