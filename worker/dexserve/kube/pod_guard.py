"""Mark the worker's own pod busy/idle so scale-down never picks a busy worker.

While a worker holds a request its pod carries

* ``controller.kubernetes.io/pod-deletion-cost: "1000000"`` - the ReplicaSet controller
  deletes the lowest-cost pods first when KEDA/HPA lowers the replica count, so idle
  workers go before busy ones;
* ``karpenter.sh/do-not-disrupt: "true"`` - Karpenter will not consolidate or expire
  the node under it.

When idle, both annotations are *removed* (JSON merge patch with ``null``) rather than
set to "0"/"false": an absent deletion cost already means 0, and removing leaves the pod
exactly as the Deployment created it. Starting state is unknown, so the first call always
patches - this clears annotations left behind by a crashed container of the same pod.

Outside a cluster (no KUBERNETES_SERVICE_HOST, or no DEX_POD_NAME/DEX_POD_NAMESPACE from
the downward API) the guard is a no-op. The CLI edge (`dex worker`) reads those variables
into a `PodRef` (`PodRef.from_env(os.environ)`), part of the worker's settings. API errors are logged and swallowed: losing the
hint must never take down a worker. RBAC needed: get+patch on pods in the namespace.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
DO_NOT_DISRUPT = "karpenter.sh/do-not-disrupt"
BUSY_DELETION_COST = "1000000"
# The client's default Content-Type for PATCH is the first JSON-ish type it knows,
# application/json-patch+json, which the API server rejects for a dict body. Be explicit.
MERGE_PATCH = "application/merge-patch+json"
# PATCH verbs PodGuard needs; the chart's Role must grant exactly these on pods.
REQUIRED_VERBS = frozenset({"get", "patch"})

BUSY_PATCH: dict[str, Any] = {
    "metadata": {"annotations": {DELETION_COST: BUSY_DELETION_COST, DO_NOT_DISRUPT: "true"}}
}
IDLE_PATCH: dict[str, Any] = {"metadata": {"annotations": {DELETION_COST: None, DO_NOT_DISRUPT: None}}}


@dataclass(frozen=True)
class PodRef:
    """The worker's own pod, as the chart's downward-API environment names it."""

    name: str = ""
    namespace: str = ""
    in_cluster: bool = False      # KUBERNETES_SERVICE_HOST is set

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "PodRef":
        """Called at the CLI edge with the process environment."""
        return cls(env.get("DEX_POD_NAME", ""), env.get("DEX_POD_NAMESPACE", ""),
                   bool(env.get("KUBERNETES_SERVICE_HOST")))


class PodGuard:
    """Idempotent busy/idle marker for the current pod; cheap to call on every request."""

    def __init__(
        self,
        api: Optional[Any] = None,
        name: str = "",
        namespace: str = "",
        request_timeout: tuple[float, float] = (2.0, 5.0),
    ) -> None:
        self._api = api  # kubernetes.client.CoreV1Api, or None when disabled
        self.name = name
        self.namespace = namespace
        self._timeout = request_timeout
        self._state: Optional[bool] = None  # None: unknown, True: busy, False: idle
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._api is not None

    @property
    def busy(self) -> Optional[bool]:
        """Last state the API server acknowledged (None before the first successful patch)."""
        return self._state

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "PodGuard":
        """`for_pod` of the pod this environment names."""
        return cls.for_pod(PodRef.from_env(environ))

    @classmethod
    def for_pod(cls, pod: PodRef) -> "PodGuard":
        """Enabled only inside a cluster with the downward-API env the chart sets."""
        name, namespace = pod.name, pod.namespace
        if not pod.in_cluster or not name or not namespace:
            log.info("PodGuard disabled: not running in a cluster with DEX_POD_NAME/DEX_POD_NAMESPACE")
            return cls()
        try:
            from kubernetes import client, config

            config.load_incluster_config()
            api = client.CoreV1Api()
        except Exception:  # noqa: BLE001 - a broken SA mount must not stop the worker
            log.exception("PodGuard disabled: in-cluster Kubernetes config failed")
            return cls()
        return cls(api, name, namespace)

    def mark_busy(self) -> None:
        """Call when the worker takes a request."""
        self._transition(True)

    def mark_idle(self) -> None:
        """Call when the worker holds no request."""
        self._transition(False)

    async def amark_busy(self) -> None:
        """mark_busy without blocking the event loop."""
        if self.enabled and self._state is not True:
            await asyncio.to_thread(self.mark_busy)

    async def amark_idle(self) -> None:
        """mark_idle without blocking the event loop."""
        if self.enabled and self._state is not False:
            await asyncio.to_thread(self.mark_idle)

    def _transition(self, busy: bool) -> None:
        if self._api is None:
            return
        with self._lock:
            if self._state is busy:
                return
            body = BUSY_PATCH if busy else IDLE_PATCH
            try:
                self._api.patch_namespaced_pod(
                    name=self.name,
                    namespace=self.namespace,
                    body=body,
                    _content_type=MERGE_PATCH,
                    _request_timeout=self._timeout,
                )
            except Exception as exc:  # noqa: BLE001 - log, keep serving, retry next call
                self._state = None
                log.warning("PodGuard: marking pod %s/%s %s failed: %s",
                            self.namespace, self.name, "busy" if busy else "idle", exc)
                return
            self._state = busy
