"""Container HEALTHCHECK for the dexserve images (stdlib + grpcio only, no shell needed).

`healthcheck.py gateway`: grpc.health.v1 Check on 127.0.0.1:$DEX_PORT (default 50051),
healthy only when the overall service ("") reports SERVING - the same signal the chart's
Kubernetes grpc probes use.
`healthcheck.py worker`: HTTP GET 127.0.0.1:$DEX_METRICS_PORT/healthz (default 9465) == 200.
Exit 0 healthy, 1 unhealthy (Docker's contract).
"""
from __future__ import annotations

import os
import sys
import urllib.request


def check_gateway(timeout: float = 3.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = os.environ.get("DEX_PORT", "50051")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def check_worker(timeout: float = 3.0) -> bool:
    port = os.environ.get("DEX_METRICS_PORT", "9465")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def main(argv: list[str]) -> int:
    checks = {"gateway": check_gateway, "worker": check_worker}
    if len(argv) != 2 or argv[1] not in checks:
        print(f"usage: {argv[0]} gateway|worker", file=sys.stderr)
        return 2
    return 0 if checks[argv[1]]() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
