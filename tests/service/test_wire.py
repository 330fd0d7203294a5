"""Lenient request decoding: invalid UTF-8 names its field instead of failing the call."""

from dexserve.gateway.wire import BadRequest, deserialize_generate_request
from dexserve.v1 import dex_pb2 as pb


def test_valid_request_decodes():
    req = pb.GenerateRequest(prompt="héllo", stop=["\n"], max_new_tokens=3)
    assert deserialize_generate_request(req.SerializeToString()) == req


def test_invalid_utf8_names_the_field():
    raw = pb.GenerateRequest(prompt="abc", stop=["zz"], model="m").SerializeToString()
    out = deserialize_generate_request(raw.replace(b"abc", b"a\xffc"))
    assert isinstance(out, BadRequest) and out.field == "prompt"
    out = deserialize_generate_request(raw.replace(b"zz", b"z\xc3"))
    assert isinstance(out, BadRequest) and out.field == "stop"


def test_garbage_is_a_bad_request_not_an_exception():
    out = deserialize_generate_request(b"\xff\xff\xff")
    assert isinstance(out, BadRequest)
