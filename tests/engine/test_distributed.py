"""Explorers in K processes, over torch.distributed (gloo) or shared memory,
commit exactly what the reference executor does; a dead explorer fails its
requests clearly and the engine recovers."""

from __future__ import annotations

import os
import signal

import pytest

from engine.conftest import shipped_available
from engine.decoding import decode
from dexserve.engine.tokenizer import load_tokenizer
from dexserve.engine.engine import DexEngine, EngineConfig, EngineFailure
from dexserve.contract.model_card import shipped_model_dir
from dexserve.contract.request import GenerationRequest, SamplingParams

PROMPTS = [(5, 77, 300, 12, 900, 41), (1,), tuple(range(1, 40))]
SAMPLINGS = [SamplingParams(), SamplingParams(0.9, 20, 0.9, 7)]



def models(tiny_dirs):
    yield str(tiny_dirs["qwen3"])
    if shipped_available():
        yield str(shipped_model_dir())


@pytest.mark.parametrize("transport", ["torch", "shm"])
@pytest.mark.parametrize("K", [2, 3])
def test_distributed_equals_reference(tiny_dirs, K, transport):
    for path in models(tiny_dirs):
        cfg = dict(explorers=K, width=4, max_context=96, max_batch=3, prefill_chunk=16)
        ref = DexEngine.load(path, EngineConfig(**cfg))
        dist = DexEngine.load(path, EngineConfig(**cfg, executor="distributed", transport=transport))
        try:
            prompts = [p for p in PROMPTS]
            for sampling in SAMPLINGS:
                for mode in ("dex", "ar", "select:1"):
                    ref.reconfigure(mode, True)
                    dist.reconfigure(mode, True)
                    assert decode(dist, prompts, sampling) == decode(ref, prompts, sampling), (path, mode, sampling)
        finally:
            dist.close()


@pytest.mark.parametrize("transport", ["torch", "shm"])
def test_dead_explorer_fails_request_and_engine_recovers(tiny_dirs, transport):
    path = str(tiny_dirs["llama"])
    eng = DexEngine.load(path, EngineConfig(explorers=2, width=2, max_context=64, max_batch=1, executor="distributed",
                                         transport=transport))
    try:
        expected = decode(DexEngine.load(path, EngineConfig(explorers=2, width=2, max_context=64, max_batch=1)),
                          [(3, 4, 5)], SamplingParams())
        eng.add(GenerationRequest("doomed", prompt_ids=(9, 9, 9), max_new_tokens=40, ignore_eos=True))
        for _ in range(3):
            eng.step()
        (pid,) = eng.executor.pids()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineFailure) as exc:
            for _ in range(50):
                eng.step()
        assert "doomed" in exc.value.request_ids
        assert "explorer" in str(exc.value)
        assert eng.active == 0
        assert decode(eng, [(3, 4, 5)], SamplingParams()) == expected  # fresh explorers serve the next request
        assert eng.executor.pids() and eng.executor.pids()[0] != pid
    finally:
        eng.close()


def test_shm_transport_is_refused_where_it_cannot_work(tiny_dirs):
    with pytest.raises(ValueError, match="transport shm is for CPU explorers"):
        DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, executor="distributed", transport="shm",
                                                          device="cuda", max_batch=1))


@pytest.mark.parametrize("transport", ["torch", "shm"])
def test_explorers_exit_when_their_coordinator_is_killed(tiny_dirs, tmp_path, transport):
    """kill -9 of the worker must not leave explorer processes spinning on the host."""
    import subprocess
    import sys
    import time

    script = tmp_path / "coordinator.py"
    script.write_text(
        "import sys, time\n"
        "from dexserve.engine.engine import DexEngine, EngineConfig\n"
        "if __name__ == '__main__':\n"
        "    eng = DexEngine.load(sys.argv[1], EngineConfig(explorers=3, width=1, max_context=32, max_batch=1,\n"
        "                                               executor='distributed', transport=sys.argv[2]))\n"
        "    print(*eng.executor.pids(), flush=True)\n"
        "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_dirs["llama"]), transport],
                            stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("transport", ["torch", "shm"])
def test_idle_explorers_outlive_the_answer_timeout(tiny_dirs, transport):
    """A worker may sit idle far longer than an explorer may take to answer: the
    explorers must still be there (and exact) for the next request."""
    import time
    from datetime import timedelta

    from dexserve.engine.distributed import DistributedExecutor
    from dexserve.contract.model_card import ModelCard

    path = str(tiny_dirs["llama"])
    cfg = EngineConfig(explorers=2, width=2, max_context=64, max_batch=1)
    expected = decode(DexEngine.load(path, cfg), [(3, 4, 5)], SamplingParams())
    card = ModelCard.load(path)
    ex = DistributedExecutor(card, DexEngine.executor_spec(card, cfg), transport=transport, timeout=timedelta(seconds=2))
    eng = DexEngine(card, cfg, ex, load_tokenizer(card))
    try:
        assert decode(eng, [(3, 4, 5)], SamplingParams()) == expected
        time.sleep(5)  # idle for more than twice the timeout
        assert decode(eng, [(3, 4, 5)], SamplingParams()) == expected
        assert all(p.is_alive() for p in ex.procs)
    finally:
        eng.close()


def test_each_rank_finds_its_own_device(monkeypatch):
    """Explorer processes spawned here number their GPUs by rank; under torchrun a rank's GPU is its
    index on its own host (LOCAL_RANK), since another host's GPUs count from 0 again."""
    from dexserve.engine.distributed.explorer import rank_device

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert rank_device(3, "cpu").type == "cpu"
    assert str(rank_device(0, "cuda")) == "cuda:0" and str(rank_device(3, "cuda")) == "cuda:3"
    monkeypatch.setenv("LOCAL_RANK", "1")          # not under torchrun: a stray LOCAL_RANK is not ours
    assert str(rank_device(3, "cuda")) == "cuda:3"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")          # torchrun over two hosts of two GPUs: rank 3 is host 2's GPU 1
    assert str(rank_device(3, "cuda")) == "cuda:1"
