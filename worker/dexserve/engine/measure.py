"""`dex bench`'s measurements: every mode on the same prompts, same engine.

One engine (weights and buffers loaded once) is reconfigured per mode, so
`ar`, every `select:J` and `dex` run the same code path on the same model; the
EAD oracle is folded from the `ar` run's records. Prompts run one at a time,
so rounds per token (RPT) and tokens/s are per-stream figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dexserve.contract.model_card import ModelCard
from dexserve.engine.oracle import OracleResult, ead_oracle
from dexserve.contract.records import RoundRecord
from dexserve.contract.request import GenerationRequest, SamplingParams
from dexserve.engine.stats import RunStats

if TYPE_CHECKING:
    from dexserve.engine.engine import DexEngine


def load_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows]
    return prompts[:limit] if limit else prompts


@dataclass
class ModeResult:
    mode: str
    stats: RunStats
    tokens: int = 0
    seconds: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)
    oracle: OracleResult | None = None

    def summary(self, reference: list[list[int]] | None) -> dict:
        s = self.stats
        return {
            "rpt": s.rpt, "tokens": self.tokens, "tokens_per_s": round(self.tokens / self.seconds, 2) if self.seconds else None,
            "accept_hist": s.accept_hist, "fallback_rate": s.fallback_rate,
            "wasted_node_segments": s.wasted_node_segments, "node_segments": s.node_segments,
            "mean_occupancy": s.mean_occupancy, "rounds": s.rounds,
            "ms_per_round": round(1e3 * (self.seconds / s.rounds), 4) if s.rounds else None,
            "executor_ms_per_round": round(1e3 * s.seconds / s.rounds, 4) if s.rounds else None,
            "lattice_ms_per_round": round(1e3 * s.lattice_seconds / s.rounds, 4) if s.rounds else None,
            "identical_to_ar": None if reference is None else self.outputs == reference,
        }


def run_mode(engine: DexEngine, mode: str, decs: bool, prompts: list[str], max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), with_oracle: bool = False) -> ModeResult:
    engine.reconfigure(mode, decs)
    result = ModeResult(mode=mode, stats=engine.stats)
    oracle = OracleResult(engine.executor.spec.explorers) if with_oracle else None
    for i, prompt in enumerate(prompts):
        records = _decode(engine, result, f"bench-{i}", prompt, max_new_tokens, sampling)
        if oracle is not None:
            oracle.add(ead_oracle(records, engine.executor.spec.explorers))
    result.oracle = oracle
    return result


@dataclass(frozen=True)
class Turn:
    """One contender of `run_paired`: an engine, the mode it runs, and the intra-op threads of
    this process while it runs (None: as they are)."""
    engine: DexEngine
    mode: str
    decs: bool = True
    threads: int | None = None


def run_paired(turns: list[Turn], prompts: list[str], max_new_tokens: int,
               sampling: SamplingParams = SamplingParams()) -> list[ModeResult]:
    """Several engines on the same prompts, taking turns prompt by prompt: on a machine whose
    speed drifts over minutes, each contender sees the same spells, so their ratio holds where
    one-after-the-other timings do not."""
    import torch

    results, before = [], torch.get_num_threads()
    for t in turns:
        t.engine.reconfigure(t.mode, t.decs)
        results.append(ModeResult(mode=t.mode, stats=t.engine.stats))
    try:
        for i, prompt in enumerate(prompts):
            for t, result in zip(turns, results):
                if t.threads:
                    torch.set_num_threads(t.threads)
                _decode(t.engine, result, f"bench-{i}", prompt, max_new_tokens, sampling)
    finally:
        torch.set_num_threads(before)
    return results


def _decode(engine: DexEngine, result: ModeResult, request_id: str, prompt: str, max_new_tokens: int,
            sampling: SamplingParams) -> list[RoundRecord]:
    """One prompt to the end on an idle engine, timed into `result`; its round records."""
    req = GenerationRequest(request_id=request_id, prompt=prompt, max_new_tokens=max_new_tokens, sampling=sampling)
    records: list[RoundRecord] = []
    tokens: list[int] = []
    t0 = time.perf_counter()
    engine.add(req)
    done = False
    while not done:
        res = engine.step()
        if res.record is not None:
            records.append(res.record)
        tokens.extend(ev.token_id for ev in res.tokens)
        done = bool(res.finished)
    result.seconds += time.perf_counter() - t0
    result.tokens += len(tokens)
    result.outputs.append(tokens)
    return records


def hf_baseline(model_dir: Path, prompts: list[str], max_new_tokens: int,
                assistant_early_exit: int | None = None) -> tuple[float, int, list[list[int]]]:
    """Hugging Face `generate` greedy (optionally LayerSkip self-speculation) on
    the same prompts: (seconds, tokens, outputs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    seconds, tokens, outputs = 0.0, 0, []
    kwargs = {"assistant_early_exit": assistant_early_exit} if assistant_early_exit else {}
    eos = model.generation_config.eos_token_id
    for prompt in prompts:
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos, **kwargs)
        seconds += time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        tokens += len(new)
        outputs.append(new)
    return seconds, tokens, outputs


def matmul_floor(card: ModelCard, repeats: int = 200) -> dict:
    """The weight matmuls of one decoded token and nothing else (one row through
    every projection of every layer, plus the LM head), in this process's thread
    count, timed two ways: through BLAS (`F.linear`, what Hugging Face runs) and as
    the engine's compiled CPU decode step computes them (`model.row_dots`,
    compiled). The faster is the floor for any engine that reads these fp32
    weights per token, to set beside the engine's and Hugging Face's tokens/s."""
    import torch
    import torch.nn.functional as F

    from dexserve.engine.model import load_weights, row_dots

    w = load_weights(card, range(card.num_layers), need_embed=True)
    mats = [m for lw in w.layers.values() for m in (lw.qkv, lw.o, lw.gate_up, lw.down)] + [w.lm_head]
    rows = {m.shape[1]: torch.randn(1, m.shape[1]) for m in mats}

    def blas() -> None:
        for m in mats:
            F.linear(rows[m.shape[1]], m)

    def dots(mats: list[torch.Tensor], rows: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [row_dots(rows[m.shape[1]], m, None) for m in mats]

    compiled = torch.compile(dots, fullgraph=True, dynamic=False)

    def ms_per_token(fn) -> float:
        with torch.no_grad():
            for _ in range(10):
                fn()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            return 1e3 * (time.perf_counter() - t0) / repeats

    out = {"weight_mib_per_token": round(sum(m.numel() * m.element_size() for m in mats) / 2**20, 2)}
    for name, fn in (("blas", blas), ("row_dots", lambda: compiled(mats, rows))):
        ms = ms_per_token(fn)
        out[f"{name}_ms_per_token"], out[f"{name}_tokens_per_s"] = round(ms, 4), round(1e3 / ms, 2)
    out["tokens_per_s"] = max(out["blas_tokens_per_s"], out["row_dots_tokens_per_s"])
    return out


def side_by_side(columns: dict[str, dict[str, dict]]) -> dict[str, dict[str, object]]:
    """`dex bench`'s comparison of runs of the same prompts with and without
    boundary adapters: {column: {mode: summary}} (the summaries above, plus the
    EAD oracle's) -> {row: {column: value}}. Rows: each boundary's free-running
    agreement with the committed token (from the `ar` run's records, through
    the EAD oracle), then RPT, tokens/s and the identical-to-ar check per mode."""
    rows: dict[str, dict[str, object]] = {}
    for col, modes in columns.items():
        for d, v in modes.get("ead-oracle", {}).get("agreement_by_boundary", {}).items():
            rows.setdefault(f"agreement: depth {d}", {})[col] = v
    for col, modes in columns.items():
        for mode, r in modes.items():
            if "rpt" in r:
                rows.setdefault(f"RPT: {mode}", {})[col] = r["rpt"]
    for key, label in (("tokens_per_s", "tokens/s"), ("identical_to_ar", "identical to ar")):
        for col, modes in columns.items():
            for mode, r in modes.items():
                if r.get(key) is not None and mode != "ead-oracle":
                    rows.setdefault(f"{label}: {mode}", {})[col] = r[key]
    return rows
