"""Chunked prefill inside the round loop: a prompt admitted while other
requests decode is prefilled a part of a chunk at a time between their rounds
(a chunk's parts are its explorers, on both executors and both transports
between explorer processes), so they keep committing; nothing it changes is
visible in the tokens (every request still equals `ar` run alone), and a
request cancelled mid-prefill gives back everything it took."""

from __future__ import annotations

import pytest

from dexserve.contract.request import FinishReason, GenerationRequest, SamplingParams
from dexserve.engine.config import EngineConfig
from dexserve.engine.engine import DexEngine

LONG = tuple((7 * i + 3) % 97 + 1 for i in range(41))   # 40 positions to prefill: 10 chunks of 4


def _cfg(**kw) -> EngineConfig:
    base = dict(explorers=2, width=4, max_context=96, max_batch=3, prefill_chunk=4)
    return EngineConfig(**{**base, **kw})


def _req(rid: str, prompt: tuple[int, ...], n: int, seed: int | None = None) -> GenerationRequest:
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=seed) if seed is not None else SamplingParams()
    return GenerationRequest(rid, prompt_ids=prompt, max_new_tokens=n, ignore_eos=True, sampling=sampling)


def _alone(model: str, req: GenerationRequest, **cfg) -> list[int]:
    eng = DexEngine.load(model, _cfg(**{"mode": "ar", "max_batch": 1, **cfg}))
    try:
        return [ev.token_id for ev in eng.generate(req) if hasattr(ev, "token_id")]
    finally:
        eng.close()


def _scripted_clock(eng: DexEngine, chunk: float = 1.0, round_: float = 1.0, parts: list | None = None) -> list[str]:
    """The engine's clock, scripted: every prefill call (a chunk's part, or a
    chunk or prompt whole) takes `chunk`, every round `round_`. Returns the log
    of calls ("prefill" / "round"), in order; `parts` collects each prefill
    call's (start position, part)."""
    now, log = [0.0], []
    ex = eng.executor

    def timed(fn, cost: float, name: str):
        def call(*args, **kwargs):
            now[0] += cost
            log.append(name)
            if parts is not None and name == "prefill":
                parts.append((args[2], kwargs.get("part")))
            return fn(*args, **kwargs)
        return call
    ex.prefill, ex.run = timed(ex.prefill, chunk, "prefill"), timed(ex.run, round_, "round")
    eng._clock = lambda: now[0]
    return log


def _interleaved(eng: DexEngine, early: list[GenerationRequest], late: GenerationRequest):
    """Start `early`, let them decode a few rounds, admit `late`; returns every request's
    tokens and, per round while `late` was still prefilling, which requests committed."""
    out: dict[str, list[int]] = {r.request_id: [] for r in (*early, late)}
    for r in early:
        eng.add(r)
    done: set[str] = set()

    def step():
        res = eng.step()
        for ev in res.tokens:
            out[ev.request_id].append(ev.token_id)
        done.update(f.request_id for f in res.finished)
        return res

    for _ in range(3):
        step()
    eng.add(late)
    during = []
    while eng.prefilling:
        during.append({ev.request_id for ev in step().tokens})
    while len(done) < len(out):
        step()
    return out, during


@pytest.mark.parametrize("executor, transport", [("reference", "auto"), ("distributed", "shm"),
                                                  ("distributed", "torch")], ids=["reference", "shm", "gloo"])
def test_running_streams_commit_while_a_long_prompt_prefills(tiny_dirs, executor, transport):
    model = str(tiny_dirs["llama"])
    early = [_req("a", (5, 6, 7), 40), _req("b", (9, 8), 40, seed=11)]
    late = _req("long", LONG, 12, seed=3)
    # a part costs what a round costs, and the share is one round: one part of a chunk per round
    eng = DexEngine.load(model, _cfg(executor=executor, transport=transport, prefill_share=1.0))
    parts: list = []
    log = _scripted_clock(eng, parts=parts)
    try:
        out, during = _interleaved(eng, early, late)
    finally:
        eng.close()
    assert eng.executor.prefill_parts == 2
    assert len(during) == 10 * 2, "40 prompt positions in chunks of 4, one part of a chunk per round"
    assert parts[-20:] == [(4 * c, k) for c in range(10) for k in range(2)], "the long prompt's parts in order"
    # every prefill call costs 1 on the scripted clock; the statistics hold all of them, apart from rounds
    assert eng.stats.prefill_seconds == log.count("prefill") >= 10
    assert eng.stats.seconds == log.count("round")
    # a token passes K=2 explorers, one per round: each running stream commits at least once
    # in every two rounds of the prefill (with the prefill at admission: not once)
    for a, b in zip(during, during[1:]):
        assert {"a", "b"} <= a | b, during
    for r in (*early, late):
        assert out[r.request_id] == _alone(model, r), r.request_id


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_interleaving_changes_no_token(tiny_dirs, family, share):
    model = str(tiny_dirs[family])
    early = [_req("a", (1, 2, 3, 4, 5, 6), 30, seed=5), _req("b", (2,), 30)]
    late = _req("long", LONG[:23], 10)
    eng = DexEngine.load(model, _cfg(prefill_share=share))
    _scripted_clock(eng)
    try:
        out, during = _interleaved(eng, early, late)
    finally:
        eng.close()
    if share == 0.0:
        assert len(during) == 1, "prefill_share 0 prefills a prompt whole in the next step"
    elif share == 1.0:
        assert len(during) == 12, "22 positions, chunks of 4 in 2 parts (K=2), one part per round"
    else:
        assert len(during) == 23, "a part every other round (the first at once)"
    for r in (*early, late):
        assert out[r.request_id] == _alone(model, r), (family, share, r.request_id)


def test_cancel_mid_prefill_gives_back_its_row(tiny_dirs):
    eng = DexEngine.load(str(tiny_dirs["llama"]), _cfg(max_batch=2, prefill_share=1.0))
    _scripted_clock(eng)
    eng.add(_req("a", (5, 6, 7), 50))
    eng.step()
    eng.add(_req("long", LONG, 8))
    eng.step()
    assert eng.prefilling == 1 and not eng.has_capacity()
    fin = eng.cancel("long")
    assert fin.reason is FinishReason.CANCELLED and fin.completion_tokens == 0
    assert eng.prefilling == 0 and eng.active == 1 and eng.has_capacity()
    assert "long" not in eng.lattice.requests
    # the row is reusable at once, and the running stream never noticed
    eng.add(_req("next", (4, 4, 4), 3))
    while eng.active:
        eng.step()
    assert eng.has_capacity() and eng.prefilling == 0


def test_prefill_settings_are_checked(tiny_dirs):
    with pytest.raises(ValueError, match="prefill_share"):
        DexEngine.load(str(tiny_dirs["llama"]), _cfg(prefill_share=-1.0))
    with pytest.raises(ValueError, match="prefill_chunk"):
        DexEngine.load(str(tiny_dirs["llama"]), _cfg(prefill_chunk=0))


def test_an_idle_engine_starts_the_oldest_prompt_whole(tiny_dirs):
    """A burst into an idle engine: the oldest prompt goes in whole and decodes at once;
    the others follow in chunks between its rounds instead of delaying its first token."""
    model = str(tiny_dirs["llama"])
    reqs = [_req(f"r{i}", LONG[i:], 6) for i in range(3)]
    eng = DexEngine.load(model, _cfg(prefill_share=1.0))
    _scripted_clock(eng)
    try:
        for r in reqs:
            eng.add(r)
        out: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        first = True
        while eng.active:
            for ev in eng.step().tokens:
                out[ev.request_id].append(ev.token_id)
            if first:
                assert set(eng.lattice.requests) == {"r0"} and eng.prefilling == 2
                first = False
    finally:
        eng.close()
    for r in reqs:
        assert out[r.request_id] == _alone(model, r), r.request_id


@pytest.mark.parametrize("share, every", [(1.0, 5), (0.5, 10), (5.0, 1)])
def test_a_chunk_dearer_than_a_round_waits_for_credit(tiny_dirs, share, every):
    """A part of a chunk that costs five rounds: with prefill_share 1 it runs every
    fifth round, alone (a running stream's gap grows by one part, never more), so
    prefill takes the share of the rounds' time; with a share of 5 rounds, one part
    per round."""
    # (the running streams outlast the prompt's 20 parts: 220 rounds at share 0.5)
    eng = DexEngine.load(str(tiny_dirs["llama"]), _cfg(prefill_share=share, max_context=320))
    log = _scripted_clock(eng, chunk=5.0, round_=1.0)
    early = [_req("a", (5,), 300), _req("b", (9,), 300)]   # (one-token prompts: nothing to prefill)
    out, during = _interleaved(eng, early, _req("long", LONG, 4))
    steps = "".join("P" if c == "prefill" else "r" for c in log)
    admitted = steps.index("r" * 3) + 3      # three rounds, then the long prompt arrives
    chunks = [i for i, c in enumerate(steps[admitted:]) if c == "P"]
    assert len(chunks) == 20, steps                           # 40 positions, chunks of 4, 2 parts each
    assert "PP" not in steps[admitted:], "never two parts between two rounds"
    assert all(b - a == every + 1 for a, b in zip(chunks[1:], chunks[2:])), steps[admitted:]
    for r in early:
        assert out[r.request_id] == _alone(str(tiny_dirs["llama"]), r, max_context=320)



@pytest.mark.parametrize("executor", ["reference", "distributed"])
def test_a_chunk_goes_down_the_explorers_one_part_per_round(tiny_dirs, executor):
    """K=4: each chunk runs as 4 parts (explorer k's layers in part k), in order,
    one between two rounds, chunk after chunk. The tokens are `ar`'s, alone."""
    model = str(tiny_dirs["llama"])
    eng = DexEngine.load(model, _cfg(explorers=4, prefill_share=1.0, executor=executor))
    calls: list = []
    log = _scripted_clock(eng, parts=calls)
    early = [_req("a", (5,), 60), _req("b", (9,), 60, seed=4)]   # (one-token prompts: nothing to prefill)
    late = _req("long", LONG, 6, seed=9)
    try:
        out, during = _interleaved(eng, early, late)
    finally:
        eng.close()
    assert calls[calls.index((0, 0)):] == [(4 * c, k) for c in range(10) for k in range(4)]
    assert len(during) == 40
    steps = "".join("P" if c == "prefill" else "r" for c in log)
    assert "PP" not in steps[steps.index("r" * 3):], steps
    for r in (*early, late):
        assert out[r.request_id] == _alone(model, r), r.request_id


@pytest.mark.parametrize("executor, transport", [("reference", "auto"), ("distributed", "shm"),
                                                  ("distributed", "torch")], ids=["reference", "shm", "gloo"])
def test_a_chunk_begun_in_parts_is_finished_before_the_rest_goes_in_whole(tiny_dirs, executor, transport):
    """The running streams end while a chunk is part-way down the explorers: its
    remaining parts run, then the rest of the prompt in one call (on explorer
    processes: pipelined whole chunks after the parts, in the same rows)."""
    model = str(tiny_dirs["llama"])
    eng = DexEngine.load(model, _cfg(explorers=4, prefill_share=1.0, executor=executor, transport=transport))
    calls: list = []
    _scripted_clock(eng, parts=calls)
    early = [_req("a", (5, 6, 7), 5)]
    late = _req("long", LONG, 6, seed=9)
    try:
        out, _ = _interleaved(eng, early, late)
    finally:
        eng.close()
    mine = calls[calls.index((0, 0)):]
    split = [c for c in mine if c[1] is not None]
    assert len(split) % 4 == 0 and 0 < len(split) < 40, mine
    assert split == [(4 * (i // 4), i % 4) for i in range(len(split))]
    assert mine[len(split):] == [(len(split), None)], mine
    assert [c[1] for c in mine[:len(split)]] == [i % 4 for i in range(len(split))]
    for r in (*early, late):
        assert out[r.request_id] == _alone(model, r), r.request_id


@pytest.mark.parametrize("executor", ["reference", "distributed"])
def test_a_request_joins_a_lattice_whose_slots_one_request_filled(tiny_dirs, executor):
    """Three lattice slots, K=4: the running request's proposals take all of them.
    A request admitted then finds its slot kept free (spawning leaves one per
    prompt still prefilling) or waits a round for a commit to free one; it never
    fails, and both requests equal `ar` alone."""
    model = str(tiny_dirs["llama"])
    a, b = _req("a", (5, 6, 7), 30), _req("b", (9, 8, 7, 6), 10, seed=2)
    eng = DexEngine.load(model, _cfg(explorers=4, width=4, slots=3, executor=executor))
    out: dict[str, list[int]] = {"a": [], "b": []}
    try:
        eng.add(a)
        for _ in range(3):
            for ev in eng.step().tokens:
                out[ev.request_id].append(ev.token_id)
        assert not eng.lattice.free_slots, "the running request holds every slot"
        eng.add(b)
        while eng.active:
            for ev in eng.step().tokens:
                out[ev.request_id].append(ev.token_id)
    finally:
        eng.close()
    for r in (a, b):
        assert out[r.request_id] == _alone(model, r), r.request_id


@pytest.mark.parametrize("executor", ["reference", "distributed"])
def test_a_prefill_part_outside_the_explorers_or_the_chunk_is_refused(tiny_dirs, executor):
    eng = DexEngine.load(str(tiny_dirs["llama"]), _cfg(executor=executor))
    try:
        with pytest.raises(ValueError, match="prefill part 2 of a chunk of 4 positions"):
            eng.executor.prefill(0, [1, 2, 3, 4], 0, part=2)          # K=2: parts 0 and 1
        with pytest.raises(ValueError, match="chunks of at most 4"):
            eng.executor.prefill(0, [1, 2, 3, 4, 5], 0, part=0)       # one chunk is 4 positions here
    finally:
        eng.close()
