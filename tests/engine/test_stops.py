"""Stop conditions end a request exactly where plain decoding would be cut."""

from __future__ import annotations

from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.contract.request import FinishReason, Finished, GenerationRequest, TokenEvent


def run(eng: DexEngine, req: GenerationRequest) -> tuple[list[int], str, Finished]:
    ids, text, fin = [], [], None
    for ev in eng.generate(req):
        if isinstance(ev, TokenEvent):
            ids.append(ev.token_id)
            text.append(ev.text)
        else:
            fin = ev
            text.append(ev.text)
    return ids, "".join(text), fin


def test_stop_string_cuts_text_and_finishes(tiny_dirs):
    eng = DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, width=2, max_context=128, max_batch=1))
    ids, full, fin = run(eng, GenerationRequest("a", prompt_ids=(4, 5, 6), max_new_tokens=40, ignore_eos=True))
    assert fin.reason is FinishReason.LENGTH and len(ids) == 40
    assert full == eng.tokenizer.decode(ids, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full.index(stop)
    ids2, text2, fin2 = run(eng, GenerationRequest("b", prompt_ids=(4, 5, 6), max_new_tokens=40, ignore_eos=True,
                                                   stop=(stop,)))
    assert fin2.reason is FinishReason.STOP
    assert text2 == full[:cut]
    assert ids2 == ids[: len(ids2)]  # the tokens themselves are the lossless prefix


def test_eos_finishes_and_max_new_tokens_counts(tiny_dirs):
    eng = DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, width=2, max_context=128, max_batch=1))
    ids, _, fin = run(eng, GenerationRequest("c", prompt_ids=(4, 5, 6), max_new_tokens=40, ignore_eos=True))
    eos = ids[5]
    eng.card = type(eng.card)(**{**eng.card.__dict__, "eos_token_ids": (eos,)})  # pretend token ids[5] is EOS
    ids2, _, fin2 = run(eng, GenerationRequest("d", prompt_ids=(4, 5, 6), max_new_tokens=40))
    first = ids.index(eos)
    assert fin2.reason is FinishReason.EOS and ids2 == ids[: first + 1]
    assert fin2.completion_tokens == first + 1 and fin2.prompt_tokens == 3
    ids3, _, fin3 = run(eng, GenerationRequest("e", prompt_ids=(4, 5, 6), max_new_tokens=3, ignore_eos=True))
    assert fin3.reason is FinishReason.LENGTH and ids3 == ids[:3]


def test_context_limit_finishes(tiny_dirs):
    eng = DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, width=2, max_context=12, max_batch=1))
    ids, _, fin = run(eng, GenerationRequest("f", prompt_ids=(4, 5, 6), max_new_tokens=40, ignore_eos=True))
    assert fin.reason is FinishReason.CONTEXT and len(ids) == 12 - 3
