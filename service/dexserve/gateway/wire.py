"""Request decoding that reports bad input instead of failing the call.

Protobuf rejects invalid UTF-8 in `string` fields while deserializing; raised
from a deserializer that becomes INTERNAL. The gateway's deserializer never
raises: it returns `BadRequest` naming the offending field (found by walking
the wire format), which the servicer answers with INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from dexserve.v1 import dex_pb2 as pb


@dataclass(frozen=True)
class BadRequest:
    field: str
    message: str


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def invalid_utf8_field(data: bytes, descriptor=pb.GenerateRequest.DESCRIPTOR) -> str | None:
    """The name of the first string field whose bytes are not UTF-8, if any."""
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                chunk, pos = data[pos:pos + length], pos + length
                field = descriptor.fields_by_number.get(number)
                if field is not None and field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return field.name
            else:
                return None
    except ValueError:
        return None
    return None


def deserialize_generate_request(data: bytes) -> pb.GenerateRequest | BadRequest:
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as exc:
        field = invalid_utf8_field(data)
        if field is not None:
            return BadRequest(field, f"{field}: is not valid UTF-8")
        return BadRequest("request", f"malformed GenerateRequest: {exc}")
