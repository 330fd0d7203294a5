"""The gRPC gateway: validate once, enqueue, stream each committed token.

`servicer` maps messages and status codes, `wire` decodes requests leniently
(invalid UTF-8 → INVALID_ARGUMENT), `auth` checks the bearer token, `server`
assembles the grpc.aio server with health and reflection, `config` reads
flags and environment, `bench` measures the service with the stand-in engine.
"""
