"""Shared helpers for chart tests: render with the real helm binary, validate output.

Why a session-scoped cache: `helm template` costs ~0.2 s a call and the same two value
sets are inspected by many tests; rendering once keeps the suite well under a minute.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dexserve"
CRDS = ROOT / "deploy" / "crds"
GPU_KEDA_VALUES = CHART / "ci" / "gpu-keda-values.yaml"
# Every values file in ci/: each is linted, rendered and validated.
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
K8S_VERSION = "1.33"
RELEASE = "dex"
NAMESPACE = "serving"

HELM = shutil.which("helm")
if HELM is None:  # `make test` installs it; a missing helm is a broken setup, never a skip
    raise RuntimeError("helm not on PATH: run `bash deploy/tools/install-helm.sh .tools` and put .tools/bin on PATH")

# Kinds validated against a stored CRD schema (deploy/crds) instead of kubernetes-validate.
CRD_SCHEMAS: dict[tuple[str, str], str] = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_v1alpha1_triggerauthentication.json",
    ("karpenter.sh/v1", "NodePool"): "karpenter.sh_v1_nodepool.json",
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real helm binary; no mocks, so template/schema errors surface as failures."""
    assert HELM, "helm not on PATH"
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check, timeout=60)


@lru_cache(maxsize=None)
def _render_cached(values_files: tuple[str, ...], sets: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for f in values_files:
        args += ["-f", f]
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def render(*values_files: Path | str, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rendered manifests as dicts (deep copies, safe to mutate)."""
    return copy.deepcopy(list(_render_cached(tuple(str(f) for f in values_files), tuple(sets))))


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(hits) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def _strict(schema: Any) -> Any:
    """Close every object schema that lists properties, like the API server's strict field
    validation (unknown fields are errors, not silently pruned)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    path = CRDS / CRD_SCHEMAS[(api_version, kind)]
    return _strict(json.loads(path.read_text()))


def validate_manifest(doc: dict[str, Any]) -> str:
    """Validate one manifest; returns which validator ran. Raises on invalid or unknown kind."""
    import jsonschema
    import kubernetes_validate

    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.Draft7Validator(crd_schema(*key)).validate(doc)
        return "crd"
    # SchemaNotFoundError for kinds we have no schema for: the caller treats that as failure.
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return "kubernetes-validate"
