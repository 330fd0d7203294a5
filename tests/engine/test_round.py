"""The null step (a step that costs nothing, for measuring a round's
coordination) runs the real lattice and yields the records its scripted model
implies, on both executors; torchrun ranks > 0 take rank 0's settings."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys

import pytest

from dexserve.engine.distributed import DistributedExecutor
from dexserve.engine.tokenizer import load_tokenizer
from dexserve.engine.config import EngineConfig
from dexserve.engine.engine import DexEngine
from dexserve.engine.executor import ReferenceExecutor
from dexserve.contract.model_card import ModelCard
from dexserve.engine.nullstep import null_missed, null_next
from dexserve.contract.records import FALLBACK
from dexserve.contract.request import GenerationRequest


def null_engine(path: str, K: int, W: int, executor: str = "reference") -> DexEngine:
    card = ModelCard.load(path)
    cfg = EngineConfig(explorers=K, width=W, max_context=96, max_batch=2, prefill_chunk=16)
    spec = dataclasses.replace(DexEngine.executor_spec(card, cfg), null_step=True)
    ex = ReferenceExecutor(card, spec) if executor == "reference" else DistributedExecutor(card, spec, transport="shm")
    return DexEngine(card, cfg, ex, load_tokenizer(card))


def run(eng: DexEngine, prompts, new: int = 20):
    tokens = {f"p{i}": [] for i in range(len(prompts))}
    records = []
    for i, p in enumerate(prompts):
        eng.add(GenerationRequest(f"p{i}", prompt_ids=p, max_new_tokens=new, ignore_eos=True))
    while eng.active:
        res = eng.step()
        eng.lattice.check_invariants()
        records.append(res.record)
        for ev in res.tokens:
            tokens[ev.request_id].append(ev.token_id)
    return [tokens[f"p{i}"] for i in range(len(prompts))], records


def chain(prompt, new: int, vocab: int) -> list[int]:
    out, tok, pos = [], prompt[-1], len(prompt) - 1
    for _ in range(new):
        tok = null_next(tok, pos, vocab)
        pos += 1
        out.append(tok)
    return out


@pytest.mark.parametrize("K", [2, 3])
def test_null_step_runs_the_real_lattice(tiny_dirs, K):
    path = str(tiny_dirs["llama"])
    vocab = ModelCard.load(path).vocab_size
    prompts = [(5, 6, 7), (11,)]
    eng = null_engine(path, K, 4)
    tokens, records = run(eng, prompts)
    # the committed tokens are the scripted model's final-depth chain
    assert tokens == [chain(p, 20, vocab) for p in prompts]
    commits = [c for r in records for c in r.commits]
    boundaries = {c.boundary for c in commits}
    # boundary 1 ranks the final token first except on one node in four: it commits
    # at boundary 1, and the misses fall back (K=2, one candidate) or commit at boundary 2
    assert 1 in boundaries
    assert (FALLBACK in boundaries) if K == 2 else (2 in boundaries)
    misses = sum(null_missed(c.token, c.position) for c in commits)
    assert 0 < misses < len(commits)
    assert any(r.spawns for r in records) and any(c.dropped for r in records for c in r.collapses)
    rounds = len(records)
    assert rounds < K * len(commits)  # faster than ar through the same K segments


def test_null_step_distributed_equals_reference(tiny_dirs):
    path = str(tiny_dirs["llama"])
    ref_tokens, ref_records = run(null_engine(path, 3, 4), [(5, 6, 7), (11,)])
    eng = null_engine(path, 3, 4, "distributed")
    try:
        tokens, records = run(eng, [(5, 6, 7), (11,)])
    finally:
        eng.close()
    assert tokens == ref_tokens
    assert [(r.spawns, r.commits, r.collapses) for r in records] == \
        [(r.spawns, r.commits, r.collapses) for r in ref_records]


RANKS = """
import os, sys, dataclasses, torch
torch.set_num_threads(3)
if os.environ["RANK"] != "0":
    from dexserve.engine.distributed.torchrun import main
    main([])
    sys.exit(0)
from dexserve.engine.config import EngineConfig
from dexserve.engine.engine import DexEngine
from dexserve.engine.distributed import DistributedExecutor
from dexserve.engine.tokenizer import load_tokenizer
from dexserve.contract.model_card import ModelCard
from dexserve.contract.request import GenerationRequest
card = ModelCard.load(sys.argv[1])
cfg = EngineConfig(explorers=2, width=2, max_context=64, max_batch=1, compile=True, cuda_graphs=False)
spec = dataclasses.replace(DexEngine.executor_spec(card, cfg), null_step=True)
eng = DexEngine(card, cfg, DistributedExecutor(card, spec), load_tokenizer(card))
toks = [e.token_id for e in eng.generate(GenerationRequest("a", prompt_ids=(3, 4), max_new_tokens=5, ignore_eos=True))
        if hasattr(e, "token_id")]
print("TOKENS", *toks, flush=True)
eng.close()
"""


def test_torchrun_ranks_take_rank0_settings(tiny_dirs, tmp_path):
    """Rank 1 never sees the engine flags; it must still run with rank 0's
    compile / CUDA-graph / null-step settings and thread count."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(port), str(script), str(tiny_dirs["llama"])],
                          capture_output=True, text=True, timeout=180, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    path = str(tiny_dirs["llama"])
    assert f"TOKENS {' '.join(map(str, chain((3, 4), 5, ModelCard.load(path).vocab_size)))}" in out
    line = next(ln for ln in out.splitlines() if "explorer rank 1 settings" in ln)
    assert "threads=3" in line and "compile=True" in line and "cuda_graphs=False" in line and "null_step=True" in line
