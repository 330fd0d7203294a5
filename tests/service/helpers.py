"""Small shared pieces of the service tests: direct engine runs and stubs."""

from __future__ import annotations

import grpc

from dexserve.contract.request import Finished, GenerationRequest
from dexserve.v1 import dex_pb2 as pb
from dexserve.v1 import dex_pb2_grpc


def run_direct(engine, req: GenerationRequest) -> tuple[list[int], str, str]:
    """The engine's own output for one request: token ids, text, finish reason."""
    engine.add(req)
    ids, text = [], []
    while True:
        res = engine.step()
        for t in res.tokens:
            if t.request_id == req.request_id:
                ids.append(t.token_id)
                text.append(t.text)
        for f in res.finished:
            if f.request_id == req.request_id:
                assert isinstance(f, Finished)
                text.append(f.text)
                return ids, "".join(text), f.reason.value


def collect(chunks) -> tuple[list[int], str, list[int], int]:
    """Join a stream's chunks; also return the positions seen and the finish reason."""
    ids, text, positions, reason = [], [], [], 0
    for c in chunks:
        positions.extend(range(c.position, c.position + len(c.token_ids)))
        ids.extend(c.token_ids)
        text.append(c.text)
        if c.finish_reason:
            reason = c.finish_reason
    return ids, "".join(text), positions, reason


def stub(address: str) -> tuple[grpc.Channel, dex_pb2_grpc.DexServiceStub]:
    ch = grpc.insecure_channel(address)
    return ch, dex_pb2_grpc.DexServiceStub(ch)


def token_events(client, names, rid: str) -> list[pb.StreamEvent]:
    return [pb.StreamEvent.FromString(f[b"e"]) for _id, f in client.xrange(names.tokens(rid))]
