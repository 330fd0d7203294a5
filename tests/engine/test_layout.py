"""The auto layout: with default flags the engine picks K and the executor from the model and the
devices here (EngineConfig.laid_out, pure), and a default engine decodes exactly as ar does."""
from __future__ import annotations

import os

import pytest

from dexserve.contract.request import GenerationRequest, SamplingParams, TokenEvent
from dexserve.engine.config import AUTO_EXPLORERS, EngineConfig
from dexserve.engine.engine import DexEngine
from dexserve.engine.memory import host_cores, parallel_devices


@pytest.mark.parametrize("explorers, executor, devices, layers, want", [
    (0, "auto", 2, 8, (AUTO_EXPLORERS, "distributed")),   # the default on a 2-core host: one process per explorer
    (0, "auto", 16, 8, (AUTO_EXPLORERS, "distributed")),
    (0, "auto", 1, 8, (AUTO_EXPLORERS, "reference")),     # one core (or one GPU): the explorers share it
    (0, "auto", 4, 1, (1, "reference")),                  # a one-layer model: K=1, plain decoding
    (2, "auto", 8, 8, (2, "reference")),                  # a K the user chose stays in this process...
    (4, "distributed", 1, 8, (4, "distributed")),         # ...unless they ask for processes
    (0, "distributed", 1, 8, (AUTO_EXPLORERS, "distributed")),
    (0, "reference", 8, 8, (AUTO_EXPLORERS, "reference")),
])
def test_laid_out(explorers, executor, devices, layers, want) -> None:
    cfg = EngineConfig(explorers=explorers, executor=executor).laid_out(devices, layers)
    assert (cfg.explorers, cfg.executor) == want
    assert cfg.laid_out(devices, layers) == cfg                # settled: a second pass changes nothing


@pytest.mark.parametrize("kw, match", [({"explorers": -1}, "explorers must be"),
                                       ({"executor": "threads"}, "unknown executor 'threads'")])
def test_laid_out_rejects_bad_values(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw).laid_out(2, 8)


def test_host_cores_is_what_this_process_may_use() -> None:
    assert 1 <= host_cores() <= len(os.sched_getaffinity(0))
    assert parallel_devices("cpu") == host_cores()     # (this host has a writable /dev/shm)
    assert parallel_devices("cuda:3") == 1


def test_no_shared_memory_keeps_the_explorers_in_one_process(monkeypatch, tmp_path) -> None:
    from dexserve.engine import memory

    monkeypatch.setattr(memory, "SHM_DIR", str(tmp_path / "missing"))
    assert parallel_devices("cpu") == 1
    assert EngineConfig().laid_out(parallel_devices("cpu"), 8).executor == "reference"


def test_the_default_engine_is_laid_out_for_this_host_and_equals_ar(tiny_dirs) -> None:
    path = str(tiny_dirs["llama"])
    default = DexEngine.load(path, EngineConfig(max_context=64, max_batch=1, prefill_chunk=8))
    try:
        assert default.config.explorers == AUTO_EXPLORERS
        assert default.info.executor == default.config.executor == \
            ("distributed" if host_cores() >= AUTO_EXPLORERS else "reference")
        got = decode(default)
    finally:
        default.close()
    ar = DexEngine.load(path, EngineConfig(explorers=1, executor="reference", mode="ar", max_context=64, max_batch=1,
                                           prefill_chunk=8))
    try:
        assert got == decode(ar)
    finally:
        ar.close()


def decode(engine: DexEngine) -> list[list[int]]:
    outs = []
    for i, (prompt, sampling) in enumerate([("def f(x):", SamplingParams()),
                                            ("import os\n", SamplingParams(temperature=0.8, seed=5))]):
        events = engine.generate(GenerationRequest(f"r{i}", prompt, 16, sampling))
        outs.append([ev.token_id for ev in events if isinstance(ev, TokenEvent)])
    return outs


def test_dex_bench_with_default_flags_sets_dex_beside_single_process_ar(tiny_dirs, tmp_path, capsys) -> None:
    """`dex bench` with no layout flags runs the auto layout; on one process per explorer it also times
    plain decoding in one process (`ar-1proc`), the baseline DEX has to beat, and checks it equals ar."""
    import json

    from dexserve.cli import main as dex_main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def f(x):", "import os\n")))
    with pytest.raises(SystemExit) as exit_:
        dex_main(["bench", "--model", str(tiny_dirs["llama"]), "--prompts", str(prompts), "--max-new-tokens", "8",
                  "--max-context", "64", "--no-compile", "--modes", "dex", "--json"])
    assert exit_.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    distributed = host_cores() >= AUTO_EXPLORERS
    assert (doc["config"]["explorers"], doc["config"]["executor"]) == \
        (AUTO_EXPLORERS, "distributed" if distributed else "reference")
    assert doc["modes"]["dex"]["identical_to_ar"] is True
    assert ("ar-1proc" in doc["modes"]) == distributed
    if distributed:
        assert doc["modes"]["ar-1proc"]["identical_to_ar"] is True and doc["modes"]["ar-1proc"]["rpt"] == 1.0
