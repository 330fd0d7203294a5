"""The rendered NetworkPolicies, evaluated as the API defines them: the KEDA operator and
Prometheus get in where they must, other namespaces and pods do not.

`admitted` implements networking.k8s.io/v1 ingress semantics: a pod selected by no Ingress
policy admits everything; otherwise a connection is allowed when some rule of some selecting
policy matches both the port and a peer (podSelector alone: the policy's namespace;
namespaceSelector alone: any pod there; both: pods matching both).
"""
from __future__ import annotations

import pytest

from ._chart import GPU_KEDA_VALUES, NAMESPACE, find, render

SERVING_NS = {"kubernetes.io/metadata.name": NAMESPACE}
KEDA = ({"kubernetes.io/metadata.name": "keda"}, {"app": "keda-operator"})
PROMETHEUS = ({"kubernetes.io/metadata.name": "monitoring"}, {"app.kubernetes.io/name": "prometheus"})
OTHER_NS = ({"kubernetes.io/metadata.name": "tenant-b"}, {"app": "keda-operator"})


def _selects(selector: dict | None, labels: dict) -> bool:
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or ():
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict, policy_ns: str, src_ns_labels: dict, src_pod_labels: dict) -> bool:
    if "ipBlock" in peer:
        return False
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns_sel is None:   # podSelector alone: pods of the policy's own namespace
        return src_ns_labels.get("kubernetes.io/metadata.name") == policy_ns and _selects(pod_sel, src_pod_labels)
    return _selects(ns_sel, src_ns_labels) and (pod_sel is None or _selects(pod_sel, src_pod_labels))


def admitted(docs: list[dict], target_labels: dict, port: int, src_ns_labels: dict, src_pod_labels: dict) -> bool:
    selecting = [d for d in docs if d["kind"] == "NetworkPolicy"
                 and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])
                 and _selects(d["spec"]["podSelector"], target_labels)]
    if not selecting:
        return True
    for pol in selecting:
        for rule in pol["spec"].get("ingress") or ():
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if not peers or any(_peer_matches(p, NAMESPACE, src_ns_labels, src_pod_labels) for p in peers):
                return True
    return False


def _pod_labels(docs: list[dict], kind: str, suffix: str) -> dict:
    return find(docs, kind, suffix)["spec"]["template"]["metadata"]["labels"]


@pytest.fixture(scope="module")
def gpu_docs() -> list[dict]:
    return render(GPU_KEDA_VALUES)


def test_keda_operator_reaches_redis_and_others_do_not(gpu_docs) -> None:
    redis = _pod_labels(gpu_docs, "StatefulSet", "-redis")
    assert admitted(gpu_docs, redis, 6379, *KEDA), "the KEDA operator must read the stream"
    assert not admitted(gpu_docs, redis, 6379, *OTHER_NS), "same pod labels, another namespace"
    assert not admitted(gpu_docs, redis, 6379, KEDA[0], {"app": "something-else"}), "another pod in keda's namespace"
    assert not admitted(gpu_docs, redis, 6379, *PROMETHEUS)
    assert not admitted(gpu_docs, redis, 6379, SERVING_NS, {"app": "intruder"}), "a foreign pod in the namespace"
    for suffix in ("-gateway", "-worker"):
        assert admitted(gpu_docs, redis, 6379, SERVING_NS, _pod_labels(gpu_docs, "Deployment", suffix)), suffix


def test_keda_namespace_is_a_value() -> None:
    docs = render(GPU_KEDA_VALUES, sets=("networkPolicy.keda.namespaceSelector.kubernetes\\.io/metadata\\.name=autoscaling",))
    redis = _pod_labels(docs, "StatefulSet", "-redis")
    assert admitted(docs, redis, 6379, {"kubernetes.io/metadata.name": "autoscaling"}, KEDA[1])
    assert not admitted(docs, redis, 6379, *KEDA)


def test_without_keda_only_the_release_reaches_redis() -> None:
    docs = render()
    redis = _pod_labels(docs, "StatefulSet", "-redis")
    assert not admitted(docs, redis, 6379, *KEDA)
    assert admitted(docs, redis, 6379, SERVING_NS, _pod_labels(docs, "Deployment", "-worker"))


def test_prometheus_scrapes_metrics_and_nothing_else(gpu_docs) -> None:
    worker = _pod_labels(gpu_docs, "Deployment", "-worker")
    gateway = _pod_labels(gpu_docs, "Deployment", "-gateway")
    assert admitted(gpu_docs, worker, 9465, *PROMETHEUS)
    assert admitted(gpu_docs, gateway, 9464, *PROMETHEUS)
    for src in (OTHER_NS, KEDA, (SERVING_NS, {"app": "intruder"})):
        assert not admitted(gpu_docs, worker, 9465, *src), src
        assert not admitted(gpu_docs, gateway, 9464, *src), src
    assert not admitted(gpu_docs, worker, 29500, SERVING_NS, worker), "workers take no other connections"
    # gRPC and HTTP (OpenAI-compatible) clients come from anywhere (ingress controllers, other namespaces).
    assert admitted(gpu_docs, gateway, 50051, *OTHER_NS)
    assert admitted(gpu_docs, gateway, 8000, *OTHER_NS)
    assert not admitted(gpu_docs, gateway, 8001, *OTHER_NS), "no other port"


def test_http_door_off_closes_its_port() -> None:
    docs = render(GPU_KEDA_VALUES, sets=("gateway.httpPort=0",))
    gateway = _pod_labels(docs, "Deployment", "-gateway")
    assert admitted(docs, gateway, 50051, *OTHER_NS)
    assert not admitted(docs, gateway, 8000, *OTHER_NS)


def test_prometheus_off_closes_the_metrics_ports() -> None:
    docs = render(sets=("networkPolicy.prometheus.enabled=false",))
    assert not admitted(docs, _pod_labels(docs, "Deployment", "-worker"), 9465, *PROMETHEUS)
    assert not admitted(docs, _pod_labels(docs, "Deployment", "-gateway"), 9464, *PROMETHEUS)


def test_evaluator_semantics() -> None:
    """Guards the evaluator: no selecting policy admits all; an empty rule list denies all."""
    pol = {"kind": "NetworkPolicy", "spec": {"podSelector": {"matchLabels": {"a": "1"}}, "policyTypes": ["Ingress"]}}
    assert admitted([pol], {"a": "2"}, 1, *OTHER_NS)
    assert not admitted([pol], {"a": "1"}, 1, *OTHER_NS)
