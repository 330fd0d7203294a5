"""helm lint / template and schema validation of every rendered manifest."""
from __future__ import annotations

import pytest

from ._chart import CHART, CI_VALUES, GPU_KEDA_VALUES, helm, kinds, render, validate_manifest


VALUE_SETS = {"defaults": (), **{f.stem: (f,) for f in CI_VALUES}}


def test_every_ci_values_file_is_covered() -> None:
    assert len(CI_VALUES) >= 3 and {f.stem for f in CI_VALUES} <= set(VALUE_SETS)


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint(values: tuple) -> None:
    args = ["lint", str(CHART), "--strict"]
    for f in values:
        args += ["-f", str(f)]
    res = helm(*args, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_manifest_is_valid(values: tuple) -> None:
    """Built-in kinds go through kubernetes-validate (strict), CRD kinds through the stored
    CRD schemas; a kind with no schema raises, so nothing is silently skipped."""
    import kubernetes_validate

    docs = render(*values)
    assert docs, "helm template rendered nothing"
    failures = []
    validated: dict[str, set[str]] = {}
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            validated.setdefault(validate_manifest(doc), set()).add(doc["kind"])
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(f"{name}: no schema to validate against ({exc})")
        except Exception as exc:  # jsonschema / kubernetes-validate ValidationError
            failures.append(f"{name}: {getattr(exc, 'message', exc)}")
    assert not failures, "\n".join(failures)
    # Every kind went through a validator that knows it (kubernetes-validate skips unknown kinds
    # with a warning when run as a CLI; here each one is accounted for).
    assert set().union(*validated.values()) == kinds(docs), validated


def test_gpu_keda_profile_renders_crd_kinds() -> None:
    docs = render(GPU_KEDA_VALUES)
    assert {"ScaledObject", "TriggerAuthentication", "NodePool"} <= kinds(docs)
    assert {"ScaledObject", "NodePool"}.isdisjoint(kinds(render()))


def test_unknown_kind_is_a_failure_not_a_skip() -> None:
    """The validator must refuse kinds it has no schema for (e.g. ServiceMonitor)."""
    import kubernetes_validate

    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"}, "spec": {}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate_manifest(doc)


def test_crd_validation_rejects_bad_scaledobject() -> None:
    """Guards against a stored CRD schema that accepts anything."""
    import jsonschema

    so = next(d for d in render(GPU_KEDA_VALUES) if d["kind"] == "ScaledObject")
    so["spec"]["minReplicaCount"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(so)
    so = next(d for d in render(GPU_KEDA_VALUES) if d["kind"] == "ScaledObject")
    so["spec"]["triggers"][0]["metadata"]["lagCount"] = 4  # metadata values must be strings
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(so)
    so = next(d for d in render(GPU_KEDA_VALUES) if d["kind"] == "ScaledObject")
    so["spec"]["typoField"] = 1  # strict: unknown fields are errors
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(so)


def test_builtin_validation_is_strict() -> None:
    import kubernetes_validate

    dep = next(d for d in render() if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["unknownField"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(dep)


@pytest.mark.parametrize(
    "bad_values",
    [
        "worker:\n  explorers: 0\n",
        "keda:\n  lagCount: 4\n",  # must be a string (KEDA metadata is map[string]string)
        "gateway:\n  image:\n    repository: x\n    tag: latest\n",
        "unknownTopLevel: true\n",
        "worker:\n  gpuCount: 2\n",
    ],
    ids=["explorers-0", "lagCount-int", "tag-latest", "unknown-top", "unknown-worker-key"],
)
def test_schema_violation_fails_template(tmp_path, bad_values: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(bad_values)
    res = helm("template", "dex", str(CHART), "-f", str(f), check=False)
    assert res.returncode != 0, f"helm template accepted invalid values:\n{bad_values}"
    assert "values don't meet the specifications of the schema" in res.stderr or "schema" in res.stderr.lower()


def test_external_redis_requires_secret() -> None:
    res = helm("template", "dex", str(CHART), "--set", "redis.internal.enabled=false", check=False)
    assert res.returncode != 0 and "redis.external.existingSecret is required" in res.stderr
