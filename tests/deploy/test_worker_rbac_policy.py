"""Least privilege for the worker: the Role grants get+patch on pods (RBAC cannot name a pod
that does not exist yet), and the rendered ValidatingAdmissionPolicy narrows every update from
the worker's service account to its own pod's metadata. The policy's CEL is evaluated here with
cel-python on the admission attributes the API server would pass."""
from __future__ import annotations

import copy

import celpy
import pytest

from dexserve.kube.pod_guard import BUSY_PATCH

from ._chart import NAMESPACE, find, render

POD_NAME_KEY = "authentication.kubernetes.io/pod-name"


@pytest.fixture(scope="module")
def rendered():
    docs = render()
    return docs, find(docs, "ValidatingAdmissionPolicy"), find(docs, "ValidatingAdmissionPolicyBinding")


def _eval(expr: str, **activation) -> bool:
    env = celpy.Environment()
    return bool(env.program(env.compile(expr)).evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()}))


def _admit(vap: dict, username: str, extra: dict, old: dict, new: dict) -> bool:
    """True when the policy lets the update through (not matched, or every validation holds)."""
    request = {"userInfo": {"username": username, "extra": extra}, "operation": "UPDATE"}
    if not all(_eval(c["expression"], request=request) for c in vap["spec"]["matchConditions"]):
        return True
    return all(_eval(v["expression"], request=request, object=new, oldObject=old) for v in vap["spec"]["validations"])


def _pod(name: str) -> dict:
    return {"metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "w"}, "annotations": {}},
            "spec": {"containers": [{"name": "worker", "image": "w:1"}]}}


def test_policy_targets_pod_updates_by_the_worker_service_account(rendered) -> None:
    docs, vap, binding = rendered
    sa = find(docs, "ServiceAccount")["metadata"]["name"]
    (rule,) = vap["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["pods"] and rule["operations"] == ["UPDATE"] and rule["apiGroups"] == [""]
    assert vap["spec"]["failurePolicy"] == "Fail"
    assert binding["spec"]["policyName"] == vap["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": NAMESPACE}
    (cond,) = vap["spec"]["matchConditions"]
    assert _eval(cond["expression"], request={"userInfo": {"username": f"system:serviceaccount:{NAMESPACE}:{sa}"}})
    assert not _eval(cond["expression"], request={"userInfo": {"username": f"system:serviceaccount:{NAMESPACE}:default"}})


def test_worker_may_annotate_only_its_own_pod(rendered) -> None:
    docs, vap, _ = rendered
    user = f"system:serviceaccount:{NAMESPACE}:{find(docs, 'ServiceAccount')['metadata']['name']}"
    own = {POD_NAME_KEY: ["dex-worker-abc"]}
    old = _pod("dex-worker-abc")
    new = copy.deepcopy(old)
    new["metadata"]["annotations"].update(BUSY_PATCH["metadata"]["annotations"])   # what PodGuard sends
    assert _admit(vap, user, own, old, new), "PodGuard's own patch must pass"

    other_old, other_new = _pod("dex-worker-xyz"), _pod("dex-worker-xyz")
    other_new["metadata"]["annotations"].update(BUSY_PATCH["metadata"]["annotations"])
    assert not _admit(vap, user, own, other_old, other_new), "another worker's pod"
    assert not _admit(vap, user, {}, old, new), "a token not bound to a pod"

    relabel = copy.deepcopy(old)
    relabel["metadata"]["labels"]["app"] = "hijacked"   # e.g. leave the Service / ReplicaSet
    assert not _admit(vap, user, own, old, relabel)
    respec = copy.deepcopy(old)
    respec["spec"]["containers"][0]["image"] = "evil:1"
    assert not _admit(vap, user, own, old, respec)

    # Other identities are not this policy's business (RBAC decides for them).
    assert _admit(vap, "system:serviceaccount:kube-system:replicaset-controller", {}, other_old, relabel)


def test_policy_is_optional_and_named_per_namespace() -> None:
    assert not [d for d in render(sets=("worker.rbac.ownPodPolicy=false",))
                if d["kind"].startswith("ValidatingAdmissionPolicy")]
    vap = find(render(), "ValidatingAdmissionPolicy")
    assert NAMESPACE in vap["metadata"]["name"], "cluster-scoped: one per release and namespace"
