"""Hostile requests against the real validation and the real DexEngine (tiny Llama).

Every field of a GenerateRequest at its extremes goes through exactly what the
service does with it: `with_defaults` → `to_generation_request` →
`validate_request` (the gateway's check, counting prompt tokens with the model's
tokenizer) → `DexEngine.add` and rounds until it finishes. Each request either is
refused with InvalidRequest naming one of its fields, or runs to a finish; either
way the engine then holds nothing (no batch row, lattice request, node or slot),
and a plain request afterwards returns exactly its expected tokens.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dexserve.contract.request import GenerationRequest, InvalidRequest, SamplingParams
from dexserve.contract.validation import validate_request
from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.engine.sampling import fold_seed
from dexserve.queue.codec import to_generation_request, with_defaults
from dexserve.v1 import dex_pb2 as pb

INT32 = (-(2**31), 2**31 - 1)
FIELDS = {f.name for f in pb.GenerateRequest.DESCRIPTOR.fields} | {"prompt_ids"}
MAX_ROUNDS = 200            # a request (at most 32 positions) that has not finished by then is wedged

FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 5e-324, 1e-310, 1e-30, 1e-6, 0.5, 1.0, 2.0, 1e6, 1e300, 1.7976931348623157e308,
                     math.inf, -math.inf, math.nan, -1.0, -1e-300]),
    st.floats(allow_nan=True, allow_infinity=True))
INTS = st.one_of(st.sampled_from([0, 1, -1, 2, 4, 2047, 2048, 2049, INT32[0], INT32[1]]),
                 st.integers(*INT32))
TEXT = st.one_of(st.sampled_from(["", "x", "\x00", "\u202e", "😀" * 3, "a" * 65, "\ud7ff\ue000"]),
                 st.text(min_size=0, max_size=20))


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=draw(st.one_of(st.sampled_from(["def f(x):", "", " ", "\x00\x01", "😀"]),
                                                   st.text(max_size=40))))
    if draw(st.booleans()):
        req.max_new_tokens = draw(INTS)
    req.temperature = draw(FLOATS)
    req.top_k = draw(INTS)
    if draw(st.booleans()):
        req.top_p = draw(FLOATS)
    req.seed = draw(st.one_of(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]),
                              st.integers(0, 2**64 - 1)))
    req.stop.extend(draw(st.lists(TEXT, max_size=10)))
    return req


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    # a small context: a request that passes runs a few dozen rounds at most
    cfg = EngineConfig(explorers=2, width=2, max_batch=2, max_context=32, max_new_tokens=64)
    eng = DexEngine.load(str(tiny_dirs["llama"]), cfg)
    yield eng
    eng.close()


def assert_idle(eng: DexEngine) -> None:
    """An idle engine holds nothing: every batch row free, no request, node or used slot in the lattice."""
    assert eng.active == 0
    assert sorted(eng._free_rows) == list(range(eng.config.max_batch)), "a batch row was not given back"
    assert not eng.lattice.requests and eng.lattice.live_nodes == 0
    assert len(eng.lattice.free_slots) == eng.lattice.config.slots, "a lattice slot was not given back"


def run(eng: DexEngine, req: GenerationRequest) -> list[int]:
    eng.add(req)
    ids: list[int] = []
    for _ in range(MAX_ROUNDS):
        res = eng.step()
        ids += [t.token_id for t in res.tokens if t.request_id == req.request_id]
        if any(f.request_id == req.request_id for f in res.finished):
            return ids
    raise AssertionError(f"request {req} did not finish in {MAX_ROUNDS} rounds")


@pytest.fixture(scope="module")
def reference(engine):
    """A plain greedy and a plain seeded request, run on the fresh engine."""
    plain = [GenerationRequest("g", "def add(a, b):", 4), GenerationRequest("s", "import os", 4,
                                                                          SamplingParams(0.8, 20, 0.9, 7))]
    return [(r, run(engine, r)) for r in plain]


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(generate_requests())
@example(pb.GenerateRequest(prompt="def f(x):", seed=2**64 - 1, temperature=0.7, max_new_tokens=3))
@example(pb.GenerateRequest(prompt="def f(x):", seed=2**63, max_new_tokens=3))
@example(pb.GenerateRequest(prompt="def f(x):", temperature=5e-324, max_new_tokens=3))
@example(pb.GenerateRequest(prompt="def f(x):", temperature=1e300, max_new_tokens=3))
@example(pb.GenerateRequest(prompt="def f(x):", temperature=1.0, top_p=5e-324, max_new_tokens=3))
@example(pb.GenerateRequest(prompt="def f(x):", temperature=1.0, top_k=INT32[1], max_new_tokens=3))
def test_hostile_request_is_refused_by_name_or_served_and_nothing_is_held(engine, reference, req):
    greq = to_generation_request(with_defaults(req, "fuzz", "m"))
    try:
        validate_request(greq, engine.limits, None)
        validate_request(greq, engine.limits, len(engine.encode(greq)))
    except InvalidRequest as exc:
        assert exc.field in FIELDS, f"{exc} names no request field"
        assert str(exc).startswith(f"{exc.field}: ")
        with pytest.raises(InvalidRequest):          # the engine's own check refuses it the same way
            engine.add(greq)
    else:
        ids = run(engine, greq)                      # must finish, with tokens of the vocabulary
        assert 1 <= len(ids) <= greq.max_new_tokens
        assert all(0 <= t < engine.card.vocab_size for t in ids)
    assert_idle(engine)
    for r, want in reference:                        # the engine still serves exactly
        assert run(engine, r) == want
    assert_idle(engine)


def test_a_request_failing_inside_add_gives_back_its_row(engine, monkeypatch):
    """Whatever fails for one request while it is admitted (here the executor refusing its
    sampling parameters) releases its batch row and lattice slot; the others keep going."""
    other = GenerationRequest("other", "def add(a, b):", 4)
    engine.add(other)
    boom = RuntimeError("value cannot be converted to type int64_t without overflow")

    def refuse(index, params):
        raise boom

    monkeypatch.setattr(engine.executor, "set_sampling", refuse)
    for i in range(engine.config.max_batch + 1):     # more failures than rows: none may leak
        with pytest.raises(RuntimeError):
            engine.add(GenerationRequest(f"bad{i}", "x = 1", 4))
    monkeypatch.undo()
    ids = []
    while engine.active:
        ids += [t.token_id for t in engine.step().tokens]
    assert len(ids) == 4
    assert_idle(engine)


def test_all_64_seed_bits_change_the_samples(engine):
    """uint64 seeds are not cut to 32 bits: seeds that differ only in their high half sample
    differently, and every seed (up to 2**64 - 1) runs."""
    assert fold_seed(5) == 5 and fold_seed(2**32 + 5) != 5 and fold_seed(2**63 + 5) != fold_seed(5)
    outs = {}
    for seed in (5, 2**32 + 5, 2**63 + 5, 2**64 - 1):
        outs[seed] = run(engine, GenerationRequest(f"s{seed}", "def f(x):", 4, SamplingParams(1.5, 0, 1.0, seed)))
        assert run(engine, GenerationRequest(f"t{seed}", "def f(x):", 4, SamplingParams(1.5, 0, 1.0, seed))) \
            == outs[seed], "a seed must reproduce its tokens"
    assert len({tuple(v) for v in outs.values()}) == len(outs), f"seeds collided: {outs}"
    assert_idle(engine)
