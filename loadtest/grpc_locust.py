"""What the locust files share (`locustfile.py`, `soak_locustfile.py`; locust puts this folder on
sys.path): gevent-aware gRPC, the gateway address a `--host` names, and the request events."""

from __future__ import annotations

import grpc.experimental.gevent as grpc_gevent
from locust import events

# gRPC's C core must cooperate with gevent (locust monkey-patches on import): without this, calls of
# all users run one at a time and `-t` overruns. Importing this module does it, before any channel.
grpc_gevent.init_gevent()

NAME = "Generate"


def grpc_target(host: str) -> str:
    """`grpc://h:p`, `http://h:p`, `dns:///h:p` or `h:p` → `h:p`."""
    for scheme in ("grpc://", "http://", "dns:///"):
        host = host.removeprefix(scheme)
    return host.rstrip("/")


def fire(kind: str, seconds: float, length: int = 0, exc: BaseException | None = None) -> None:
    """One locust request event: `kind` is TTFT, ITL or FULL; all are named `Generate`."""
    events.request.fire(request_type=kind, name=NAME, response_time=seconds * 1000.0,
                        response_length=length, exception=exc, context={})
