"""Chunked prefill inside the round loop: a prompt admitted while other
requests decode is prefilled a chunk at a time between their rounds, so they
keep committing; nothing it changes is visible in the tokens (every request
still equals `ar` run alone), and a request cancelled mid-prefill gives back
everything it took."""

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


def _alone(model: str, req: GenerationRequest) -> list[int]:
    eng = DexEngine.load(model, _cfg(mode="ar", max_batch=1))
    try:
        return [ev.token_id for ev in eng.generate(req) if hasattr(ev, "token_id")]
    finally:
        eng.close()


def _scripted_clock(eng: DexEngine, chunk: float = 1.0, round_: float = 1.0) -> list[str]:
    """The engine's clock, scripted: every prefill call takes `chunk`, every round
    `round_`. Returns the log of calls ("prefill" / "round"), in order."""
    now, log = [0.0], []
    ex = eng.executor

    def timed(fn, cost: float, name: str):
        def call(*args, **kwargs):
            now[0] += cost
            log.append(name)
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


@pytest.mark.parametrize("executor", ["reference", "distributed"])
def test_running_streams_commit_while_a_long_prompt_prefills(tiny_dirs, executor):
    model = str(tiny_dirs["llama"])
    early = [_req("a", (5, 6, 7), 40), _req("b", (9, 8), 40, seed=11)]
    late = _req("long", LONG, 12, seed=3)
    # a chunk costs what a round costs, and the share is one round: one chunk per round
    eng = DexEngine.load(model, _cfg(executor=executor, prefill_share=1.0))
    log = _scripted_clock(eng)
    try:
        out, during = _interleaved(eng, early, late)
    finally:
        eng.close()
    assert len(during) == 10, "40 prompt positions in chunks of 4, one chunk per round"
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
        assert len(during) == 6, "22 positions, one chunk of 4 per round"
    else:
        assert len(during) == 11, "a chunk every other round (the first at once)"
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
    """A chunk that costs five rounds: with prefill_share 1 it runs every fifth round,
    alone (a running stream's gap grows by one chunk, never more), so prefill takes
    the share of the rounds' time; with a share of 5 rounds, one chunk per round."""
    eng = DexEngine.load(str(tiny_dirs["llama"]), _cfg(prefill_share=share))
    log = _scripted_clock(eng, chunk=5.0, round_=1.0)
    early = [_req("a", (5, 6, 7), 80), _req("b", (9, 8), 80)]
    out, during = _interleaved(eng, early, _req("long", LONG, 4))
    steps = "".join("P" if c == "prefill" else "r" for c in log)
    admitted = steps.index("r" * 3) + 3      # the early prompts went in whole, then three rounds
    chunks = [i for i, c in enumerate(steps[admitted:]) if c == "P"]
    assert len(chunks) == 10, steps                                          # 40 positions, chunks of 4
    assert "PP" not in steps[admitted:], "never two chunks between two rounds"
    assert all(b - a == every + 1 for a, b in zip(chunks[1:], chunks[2:])), steps[admitted:]
    for r in early:
        assert out[r.request_id] == _alone(str(tiny_dirs["llama"]), r)
