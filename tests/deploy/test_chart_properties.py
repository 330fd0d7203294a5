"""Key properties of the rendered chart (what the issue asks for, asserted on real output)."""
from __future__ import annotations

import re
import shutil

import pytest
import yaml

from dexserve.kube.pod_guard import BUSY_PATCH, REQUIRED_VERBS

from ._chart import CHART, CI_VALUES, GPU_KEDA_VALUES, find, helm, kinds, render


PROFILES = {"defaults": (), "gpu-keda": (GPU_KEDA_VALUES,)}
ALL_PROFILES = {"defaults": (), **{f.stem: (f,) for f in CI_VALUES}}


def _pod_spec(docs, suffix: str) -> dict:
    return find(docs, "Deployment", suffix)["spec"]["template"]["spec"]


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container["env"]}


@pytest.mark.parametrize("values", PROFILES.values(), ids=PROFILES.keys())
def test_gpu_request_equals_explorers(values) -> None:
    explorers = yaml.safe_load((GPU_KEDA_VALUES if values else CHART / "values.yaml").read_text())["worker"]["explorers"]
    c = _pod_spec(render(*values), "-worker")["containers"][0]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == str(explorers)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(explorers)
    env = _env(c)
    assert env["DEX_EXPLORERS"]["value"] == str(explorers)
    assert c["args"] == ["worker"]  # every engine setting is environment (dexserve.launch.engine_options)
    assert env["DEX_DEVICE"]["value"] == "cuda"
    # K explorers on K GPUs: the distributed executor, rank k on cuda:k over NCCL; one explorer: one process.
    assert env["DEX_EXECUTOR"]["value"] == ("distributed" if explorers > 1 else "reference")
    assert env["DEX_TRANSPORT"]["value"] == ("torch" if explorers > 1 else "auto")
    assert env["NCCL_IB_DISABLE"]["value"] == "1" and "NCCL_DEBUG" in env


def test_shared_placement_runs_k_explorers_on_one_gpu() -> None:
    c = _pod_spec(render(sets=("worker.explorers=4", "worker.gpu.placement=shared")), "-worker")["containers"][0]
    env = _env(c)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (env["DEX_DEVICE"]["value"], env["DEX_EXECUTOR"]["value"], env["DEX_EXPLORERS"]["value"]) == \
        ("cuda", "reference", "4")


def test_cpu_workers_default_to_one_process_per_explorer() -> None:
    env = _env(_pod_spec(render(sets=("worker.gpu.enabled=false",)), "-worker")["containers"][0])
    assert (env["DEX_DEVICE"]["value"], env["DEX_EXECUTOR"]["value"], env["DEX_EXPLORERS"]["value"]) == \
        ("cpu", "distributed", "2")
    one = _env(_pod_spec(render(sets=("worker.gpu.enabled=false", "worker.explorers=1")), "-worker")["containers"][0])
    assert one["DEX_EXECUTOR"]["value"] == "reference"     # one explorer: plain decoding in one process


def test_cpu_workers_without_gpus() -> None:
    docs = render(sets=("worker.gpu.enabled=false", "worker.explorers=2", "worker.engine.executor=distributed",
                        "worker.engine.transport=shm"))
    spec = _pod_spec(docs, "-worker")
    c = spec["containers"][0]
    env = _env(c)
    assert not any("nvidia.com/gpu" in (c["resources"].get(k) or {}) for k in ("requests", "limits"))
    assert (env["DEX_DEVICE"]["value"], env["DEX_EXECUTOR"]["value"], env["DEX_TRANSPORT"]["value"]) == \
        ("cpu", "distributed", "shm")
    assert "NCCL_DEBUG" not in env
    assert "nodeAffinity" not in spec["affinity"], "CPU workers must not be pinned to GPU nodes"


@pytest.mark.parametrize("key, env_name, value", [
    ("worker.engine.width", "DEX_WIDTH", "16"), ("worker.engine.maxBatch", "DEX_MAX_BATCH", "12"),
    ("worker.engine.dtype", "DEX_DTYPE", "bfloat16"), ("worker.engine.threads", "DEX_THREADS", "3"),
    ("worker.engine.kvMemoryGiB", "DEX_KV_MEMORY", "24.5"),
    ("serving.maxContext", "DEX_MAX_CONTEXT", "2048")])
def test_every_engine_value_reaches_the_worker_env(key, env_name, value) -> None:
    c = _pod_spec(render(sets=(f"{key}={value}",)), "-worker")["containers"][0]
    assert _env(c)[env_name]["value"] == value


def test_engine_env_names_are_what_the_cli_reads() -> None:
    """The chart's environment must be what `dex worker` parses (no silent mismatch)."""
    import argparse
    import os
    from unittest import mock

    from dexserve.contract.model_card import ModelCard
    from dexserve.launch.worker import add_arguments, settings_from_args

    c = _pod_spec(render(GPU_KEDA_VALUES), "-worker")["containers"][0]
    env = {k: v["value"] for k, v in _env(c).items() if "value" in v}
    env["DEX_MODEL_DIR"] = ""  # the checkpoint on the PVC is not here
    with mock.patch.dict(os.environ, env, clear=False):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        cfg = settings_from_args(parser.parse_args(c["args"][1:])).engine_config
    # width and batch auto (sized by the KV budget when the engine loads), context the model's own
    assert (cfg.device, cfg.executor, cfg.transport, cfg.explorers, cfg.width, cfg.max_batch, cfg.dtype,
            cfg.kv_memory_gib) == ("cuda", "distributed", "torch", 4, 0, 0, "bfloat16", 40.0)
    assert env["DEX_MAX_CONTEXT"] == "0"
    assert cfg.max_context == ModelCard.load(None).max_position_embeddings


@pytest.mark.parametrize("flag, sets", [("--compile", ("worker.engine.compile=true",)),
                                        ("--no-cuda-graphs", ("worker.engine.cudaGraphs=false",))])
def test_boolean_engine_values_become_flags(flag, sets) -> None:
    assert flag in _pod_spec(render(sets=sets), "-worker")["containers"][0]["args"]


@pytest.mark.parametrize("n", [1, 3, 8])
def test_gpu_request_tracks_explorers_value(n: int) -> None:
    c = _pod_spec(render(sets=(f"worker.explorers={n}",)), "-worker")["containers"][0]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == str(n) == _env(c)["DEX_EXPLORERS"]["value"]
    assert _env(c)["DEX_EXECUTOR"]["value"] == ("distributed" if n > 1 else "reference")


def test_worker_gpu_pool_placement_and_shm() -> None:
    docs = render(GPU_KEDA_VALUES)
    spec = _pod_spec(docs, "-worker")
    pool = find(docs, "NodePool")["metadata"]["name"]
    assert spec["nodeSelector"]["karpenter.sh/nodepool"] == pool
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0]["values"] == [pool]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"]
    sp = spec["containers"][0]["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] >= 600, "startup probe must allow >= 10 min for model load"
    assert spec["terminationGracePeriodSeconds"] >= 300


def test_karpenter_nodepool_gpu_taint_families_limits() -> None:
    np_ = find(render(GPU_KEDA_VALUES), "NodePool")["spec"]
    tspec = np_["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"} in tspec["taints"]
    fam = next(r for r in tspec["requirements"] if r["key"] == "karpenter.k8s.aws/instance-family")
    assert fam["operator"] == "In" and fam["values"]  # CEL rule: 'In' needs values
    assert np_["limits"]["nvidia.com/gpu"]
    assert tspec["nodeClassRef"] == {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"}


def test_keda_redis_streams_stream_length_and_scale_to_zero() -> None:
    docs = render(GPU_KEDA_VALUES)
    so = find(docs, "ScaledObject")["spec"]
    assert so["scaleTargetRef"]["name"] == find(docs, "Deployment", "-worker")["metadata"]["name"]
    assert so["minReplicaCount"] == 0 and so["maxReplicaCount"] == 16
    (trig,) = so["triggers"]
    assert trig["type"] == "redis-streams"
    md = trig["metadata"]
    # The stream/group KEDA watches are the ones the workers read (dexserve.queue.protocol).
    from dexserve.queue.protocol import GROUP, QueueNames

    assert md["stream"] == QueueNames().requests == "dex:requests"
    # XLEN mode: KEDA picks it only when no consumerGroup is given (with one it reads XPENDING).
    assert "consumerGroup" not in md and GROUP == "dex-workers"
    assert md["streamLength"] == "8" and md["activationLagCount"] == "0"
    assert "pendingEntriesCount" not in md and "lagCount" not in md
    assert md["addressFromEnv"] == "REDIS_ADDRESS"
    worker_env = _env(_pod_spec(docs, "-worker")["containers"][0])
    assert "REDIS_ADDRESS" in worker_env, "addressFromEnv reads the scale target's env"
    behavior = so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > 0
    ta = find(docs, "TriggerAuthentication")
    assert trig["authenticationRef"]["name"] == ta["metadata"]["name"]
    (ref,) = ta["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password" and ref["name"] == find(docs, "Secret", "-redis")["metadata"]["name"]
    # KEDA owns replicas: the Deployment must not fight it.
    assert "replicas" not in find(docs, "Deployment", "-worker")["spec"]


def test_keda_lag_count_only_on_redis_742_or_later() -> None:
    base = ("keda.enabled=true", "keda.signal=lagCount")
    res = helm("template", "dex", str(CHART), *[a for s in base for a in ("--set", s)], check=False)
    assert res.returncode != 0 and "7.4.2" in res.stderr
    res = helm("template", "dex", str(CHART), *[a for s in base for a in ("--set", s)],
               "--set", "redis.internal.enabled=false", "--set", "redis.external.existingSecret=x", check=False)
    assert res.returncode != 0 and "streamLength" in res.stderr
    so = find(render(sets=(*base, "redis.internal.image.tag=7.4.2")), "ScaledObject")
    md = so["spec"]["triggers"][0]["metadata"]
    assert md["consumerGroup"] == "dex-workers" and md["lagCount"] == "4" and "streamLength" not in md


def test_keda_min_replicas_without_scale_to_zero() -> None:
    so = find(render(GPU_KEDA_VALUES, sets=("keda.scaleToZero=false", "keda.minReplicas=2")), "ScaledObject")
    assert so["spec"]["minReplicaCount"] == 2
    res = helm("template", "dex", str(CHART), "--set", "keda.enabled=true,keda.minReplicas=0", check=False)
    assert res.returncode != 0 and "scaleToZero" in res.stderr


@pytest.mark.parametrize("values", PROFILES.values(), ids=PROFILES.keys())
def test_pdb_selects_workers(values) -> None:
    docs = render(*values)
    pdb = find(docs, "PodDisruptionBudget")
    worker = find(docs, "Deployment", "-worker")
    assert pdb["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]


def test_networkpolicy_lets_only_gateway_and_worker_reach_redis() -> None:
    docs = render()
    netpol = find(docs, "NetworkPolicy", "-redis")["spec"]
    redis = find(docs, "StatefulSet", "-redis")
    assert netpol["podSelector"]["matchLabels"] == redis["spec"]["selector"]["matchLabels"]
    assert netpol["policyTypes"] == ["Ingress"]
    (rule,) = netpol["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    (peer,) = rule["from"]
    (expr,) = peer["podSelector"]["matchExpressions"]
    assert expr["key"] == "app.kubernetes.io/component" and sorted(expr["values"]) == ["gateway", "worker"]
    # Those labels really are on the gateway and worker pods.
    for suffix in ("-gateway", "-worker"):
        labels = find(docs, "Deployment", suffix)["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] in expr["values"]
        assert labels["app.kubernetes.io/instance"] == peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"]


def test_redis_statefulset_aof_and_pvc() -> None:
    sts = find(render(), "StatefulSet", "-redis")["spec"]
    c = sts["template"]["spec"]["containers"][0]
    assert c["image"].startswith("redis:7.2")
    assert "--appendonly" in c["args"] and c["args"][c["args"].index("--appendonly") + 1] == "yes"
    assert sts["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_queue_prefix_flows_to_keda_and_processes() -> None:
    docs = render(GPU_KEDA_VALUES, sets=("queue.prefix=tenant-a",))
    assert find(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["stream"] == "tenant-a:requests"
    for suffix in ("-gateway", "-worker"):
        assert _env(_pod_spec(docs, suffix)["containers"][0])["DEX_QUEUE_PREFIX"]["value"] == "tenant-a"


def test_worker_grace() -> None:
    spec = _pod_spec(render(), "-worker")
    env = _env(spec["containers"][0])
    assert int(env["DEX_SHUTDOWN_GRACE_S"]["value"]) < spec["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("sets, volume", [
    (("model.source=pvc", "model.pvc.claimName=models"),
     {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}),
    (("model.source=hostPath", "model.hostPath.path=/srv/models"),
     {"name": "model", "hostPath": {"path": "/srv/models", "type": "Directory"}}),
    (("model.source=initContainer", "model.initContainer.image=reg/model:1"),
     {"name": "model", "emptyDir": {"sizeLimit": "50Gi"}}),
], ids=["pvc", "hostPath", "initContainer"])
def test_one_model_for_gateway_and_workers(sets, volume) -> None:
    """Both roles mount the same source at /models and read the same DEX_MODEL_DIR."""
    docs = render(sets=(*sets, "model.subPath=m"))
    for suffix in ("-gateway", "-worker"):
        spec = _pod_spec(docs, suffix)
        c = spec["containers"][0]
        assert _env(c)["DEX_MODEL_DIR"]["value"] == "/models/m", suffix
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in c["volumeMounts"], suffix
        assert volume in spec["volumes"], suffix
        inits = spec.get("initContainers", [])
        if "emptyDir" in volume:
            (init,) = inits
            assert init["image"] == "reg/model:1"
            assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
            assert init["securityContext"]["readOnlyRootFilesystem"] is True
        else:
            assert not inits
    for suffix in ("-gateway", "-worker"):  # shipped model: no mount, no env
        assert "DEX_MODEL_DIR" not in _env(_pod_spec(render(), suffix)["containers"][0])


@pytest.mark.parametrize("bad", ["model.source=pvc", "model.source=hostPath", "model.source=initContainer"])
def test_model_source_requires_its_location(bad) -> None:
    assert helm("template", "dex", str(CHART), "--set", bad, check=False).returncode != 0


def test_external_redis_url_from_secret() -> None:
    docs = render(sets=("redis.internal.enabled=false", "redis.external.existingSecret=ext-redis"))
    assert "StatefulSet" not in kinds(docs)
    assert not [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-redis")]
    for suffix in ("-gateway", "-worker"):
        env = _env(_pod_spec(docs, suffix)["containers"][0])
        assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "ext-redis", "key": "url"}


def test_rbac_grants_exactly_what_pod_guard_needs() -> None:
    docs = render()
    role = find(docs, "Role")
    (rule,) = role["rules"]
    assert rule == {"apiGroups": [""], "resources": ["pods"], "verbs": sorted(REQUIRED_VERBS)}
    # PodGuard only ever touches metadata.annotations of its own pod.
    assert set(BUSY_PATCH) == {"metadata"} and set(BUSY_PATCH["metadata"]) == {"annotations"}
    binding = find(docs, "RoleBinding")
    sa = find(docs, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "serving"}]
    worker = _pod_spec(docs, "-worker")
    assert worker["serviceAccountName"] == sa["metadata"]["name"]
    env = _env(worker["containers"][0])
    assert env["DEX_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["DEX_POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert not any(d["kind"] in {"ClusterRole", "ClusterRoleBinding"} for d in docs)
    assert worker["automountServiceAccountToken"] is True  # the bound token carries the pod name the VAP checks


@pytest.mark.parametrize("values", ALL_PROFILES.values(), ids=ALL_PROFILES.keys())
def test_restricted_security_context(values) -> None:
    docs = render(*values)
    for d in docs:
        if d["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, d["metadata"]["name"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "add" not in sc["capabilities"]
        if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway"):
            assert spec["automountServiceAccountToken"] is False


def test_gateway_grpc_probes_ports_and_env() -> None:
    docs = render(GPU_KEDA_VALUES)
    c = _pod_spec(docs, "-gateway")["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": 50051}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 50051, "http": 8000, "metrics": 9464}
    env = _env(c)
    assert env["DEX_HOST"]["value"] == "0.0.0.0" and env["DEX_PORT"]["value"] == "50051"
    assert env["DEX_HTTP_PORT"]["value"] == "8000"
    assert env["DEX_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "dex-auth", "key": "token"}
    svc = find(docs, "Service", "-gateway")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051
    assert (ports["http"]["port"], ports["http"]["targetPort"], ports["http"]["appProtocol"]) == (8000, "http", "http")
    ing = find(docs, "Ingress")
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"


def test_http_door_ports_follow_values_and_zero_turns_it_off() -> None:
    docs = render(GPU_KEDA_VALUES, sets=("gateway.httpPort=8080", "gateway.service.httpPort=80"))
    c = _pod_spec(docs, "-gateway")["containers"][0]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == 8080
    assert _env(c)["DEX_HTTP_PORT"]["value"] == "8080"
    svc = {p["name"]: p for p in find(docs, "Service", "-gateway")["spec"]["ports"]}
    assert (svc["http"]["port"], svc["http"]["targetPort"]) == (80, "http")
    off = render(GPU_KEDA_VALUES, sets=("gateway.httpPort=0",))
    c = _pod_spec(off, "-gateway")["containers"][0]
    assert "http" not in {p["name"] for p in c["ports"]} and _env(c)["DEX_HTTP_PORT"]["value"] == "0"
    assert "http" not in {p["name"] for p in find(off, "Service", "-gateway")["spec"]["ports"]}


@pytest.mark.parametrize("suffix,port", [("-gateway", 9464), ("-worker", 9465)])
def test_otel_and_metrics_env_on_both_deployments(suffix: str, port: int) -> None:
    docs = render(GPU_KEDA_VALUES)
    tmpl = find(docs, "Deployment", suffix)["spec"]["template"]
    env = _env(tmpl["spec"]["containers"][0])
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability.svc:4317"
    assert env["OTEL_SERVICE_NAME"]["value"] == f"dexserve{suffix}"
    assert "k8s.cluster.name=ci" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
    assert env["DEX_METRICS_PORT"]["value"] == str(port)
    assert tmpl["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    names = list(env)
    # $(VAR) expansion only sees variables defined earlier in the list.
    assert names.index("DEX_POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    if "REDIS_PASSWORD" in env:
        assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")


def test_optional_kinds_render_when_enabled() -> None:
    """ServiceMonitor and GRPCRoute have no stored schema, so they stay off in the validated
    profiles; here their wiring is asserted directly."""
    docs = render(sets=(
        "metrics.serviceMonitor.enabled=true",
        "gateway.grpcRoute.enabled=true",
        "gateway.grpcRoute.parentRefs[0].name=public-gw",
    ))
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    services = [d for d in docs if d["kind"] == "Service"]
    for m in monitors:
        sel = m["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if sel.items() <= s["metadata"]["labels"].items()]
        assert matched and all("metrics" in {p["name"] for p in s["spec"]["ports"]} for s in matched)
    route = find(docs, "GRPCRoute")
    assert route["spec"]["parentRefs"] == [{"name": "public-gw"}]
    assert route["spec"]["rules"][0]["backendRefs"][0]["port"] == 50051


def test_dashboards_configmap_loads_every_json(tmp_path) -> None:
    chart = tmp_path / "dexserve"
    shutil.copytree(CHART, chart)
    for f in (chart / "dashboards").glob("*.json"):
        f.unlink()
    (chart / "dashboards" / "a.json").write_text('{"title": "A"}')
    (chart / "dashboards" / "b.json").write_text('{"title": "B"}')
    (chart / "dashboards" / "notes.txt").write_text("ignored")
    out = helm("template", "dex", str(chart)).stdout
    cms = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "ConfigMap"]
    (cm,) = cms
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(cm["data"]) == {"a.json", "b.json"}
    assert cm["data"]["a.json"] == '{"title": "A"}'


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        p = f"{prefix}.{k}" if prefix else k
        out += _leaf_keys(v, p) if isinstance(v, dict) and v else [p]
    return out


def test_readme_values_table_covers_values_yaml() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    missing = [k for k in _leaf_keys(values) if k not in documented and not any(k.startswith(d + ".") for d in documented)]
    assert not missing, f"README values table lacks: {missing}"


@pytest.mark.parametrize("sets, want", [((), ("0", "1024")),   # 0: the model's own context, read by both
                                        (("serving.maxContext=2048", "serving.maxNewTokens=300"), ("2048", "300"))])
def test_gateway_and_workers_get_the_same_serving_limits(sets, want) -> None:
    """One value, the same DEX_MAX_* environment in both roles (read by dexserve.commands.options)."""
    docs = render(sets=sets)
    for suffix in ("-gateway", "-worker"):
        env = _env(_pod_spec(docs, suffix)["containers"][0])
        assert (env["DEX_MAX_CONTEXT"]["value"], env["DEX_MAX_NEW_TOKENS"]["value"]) == want, suffix


@pytest.mark.parametrize("sets, want, mount", [
    ((), "auto", None),
    (("model.adapters.path=none",), "none", None),
    (("model.adapters.path=/opt/a.safetensors",), "/opt/a.safetensors", None),
    (("model.source=pvc", "model.pvc.claimName=models", "model.adapters.path=ad/dex_adapters.safetensors"),
     "/models/ad/dex_adapters.safetensors", None),
    (("model.adapters.pvc.claimName=adapters", "model.adapters.path=k4.safetensors"), "/adapters/k4.safetensors",
     {"name": "adapters", "persistentVolumeClaim": {"claimName": "adapters", "readOnly": True}}),
], ids=["auto", "none", "absolute", "on-model-volume", "own-pvc"])
def test_worker_adapter_path(sets, want, mount) -> None:
    """`model.adapters` reaches the workers (only) as DEX_ADAPTERS, with its own read-only volume if asked."""
    docs = render(sets=sets)
    spec = _pod_spec(docs, "-worker")
    c = spec["containers"][0]
    assert _env(c)["DEX_ADAPTERS"]["value"] == want
    assert "DEX_ADAPTERS" not in _env(_pod_spec(docs, "-gateway")["containers"][0])
    if mount:
        assert mount in spec["volumes"]
        assert {"name": "adapters", "mountPath": "/adapters", "readOnly": True} in c["volumeMounts"]
    else:
        assert all(v["name"] != "adapters" for v in spec["volumes"])


def test_relative_adapter_path_needs_a_volume() -> None:
    r = helm("template", "dex", str(CHART), "--set", "model.adapters.path=a.safetensors", check=False)
    assert r.returncode != 0 and "model.adapters.path" in r.stderr


def test_worker_reads_the_charts_adapter_env() -> None:
    import argparse
    import os
    from unittest import mock

    from dexserve.launch.worker import add_arguments, settings_from_args

    c = _pod_spec(render(sets=("model.adapters.path=/opt/a.safetensors",)), "-worker")["containers"][0]
    with mock.patch.dict(os.environ, {"DEX_ADAPTERS": _env(c)["DEX_ADAPTERS"]["value"]}):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        assert settings_from_args(parser.parse_args(c["args"][1:])).engine_config.adapters == "/opt/a.safetensors"
