"""`dex train-adapter` (dexserve.training.adapters): distillation into boundary
adapters on tiny random checkpoints, resume, the card, and the loader's
refusal of adapters made for another model or another grid."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from dexserve.cli import main as dex_main
from dexserve.contract.model_card import ModelCard, ModelLoadError
from dexserve.engine.adapters import ADAPTER_FILE, AdapterCard, card_path, model_hash, read_adapter_file
from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.training.adapters import AdapterTrainingError, AdapterTrainingSettings, train
from dexserve.training.corpus import stdlib_root


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """~40k characters of Python source, the domain of the shipped tokenizer."""
    root = stdlib_root()
    text = "".join((root / f).read_text() for f in ("json/decoder.py", "json/encoder.py", "textwrap.py"))
    path = tmp_path_factory.mktemp("data") / "code.txt"
    path.write_text(text[:40000])
    return path


def settings(model, data, out, **kw) -> AdapterTrainingSettings:
    base = dict(model=str(model), data=(str(data),), explorers=4, steps=30, out=str(out), batch=4, seq=32,
                lr=1e-2, warmup=2, heldout_every=10, heldout_sequences=4, shuffle_buffer=16, checkpoint_every=5,
                progress=False, threads=1)
    return AdapterTrainingSettings(**(base | kw))


def mean(xs) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("rank", [None, 4])
def test_training_lowers_the_distillation_loss_and_writes_a_card(tiny_dirs, text_file, tmp_path, rank):
    model = tiny_dirs["llama"]
    out = tmp_path / "ad.safetensors"
    result = train(settings(model, text_file, out, rank=rank))
    for d in ("1", "2", "3"):
        first = mean([row[d] for row in result.losses[:3]])
        last = mean([row[d] for row in result.losses[-3:]])
        assert last < first, f"depth {d}: loss {first:.4f} -> {last:.4f} did not go down"
        assert result.card.heldout_kl[d] >= 0
    card = AdapterCard.read(card_path(out))
    assert card.base_model_hash == model_hash(model) and card.base_model_hash.startswith("sha256:")
    assert card.boundaries == [1, 2, 3] and card.rank == rank and card.steps == 30
    assert card.data_tokens == 30 * 4 * 32 and card.heldout_tokens == 4 * 32
    assert set(card.heldout_agreement) == set(card.heldout_agreement_before) == {"1", "2", "3"}
    tensors = read_adapter_file(out, hidden=64, layers=4)
    assert sorted(tensors) == [1, 2, 3]
    w, v, b = tensors[2]
    assert (w.shape, v is None) == ((64, 64), True) if rank is None else (w.shape, v.shape) == ((64, 4), (4, 64))
    eng = DexEngine.load(str(model), EngineConfig(explorers=4, max_context=64, max_batch=1, adapters=str(out)))
    assert eng.adapters.path == str(out) and eng.adapters.rank == rank
    assert eng.adapters.base_model_hash == card.base_model_hash


def test_resume_continues_and_equals_an_uninterrupted_run(tiny_dirs, text_file, tmp_path):
    model = tiny_dirs["qwen2"]
    whole = train(settings(model, text_file, tmp_path / "whole.safetensors", steps=12))

    def interrupt(step: int) -> None:
        if step == 7:
            raise KeyboardInterrupt

    part = settings(model, text_file, tmp_path / "part.safetensors", steps=12)
    with pytest.raises(KeyboardInterrupt):
        train(part, on_step=interrupt)
    assert torch.load(tmp_path / "part.ckpt", weights_only=True)["step"] == 7
    assert not (tmp_path / "part.safetensors").exists()
    resumed = train(replace(part, resume=True))
    assert resumed.card.steps == 12 and len(resumed.losses) == 12
    assert resumed.losses == whole.losses                     # the same steps on the same batches
    a = read_adapter_file(tmp_path / "whole.safetensors", 64, 4)
    b = read_adapter_file(tmp_path / "part.safetensors", 64, 4)
    assert all(torch.equal(a[d][0], b[d][0]) and torch.equal(a[d][2], b[d][2]) for d in a)


def test_resume_refuses_a_checkpoint_made_with_other_settings(tiny_dirs, text_file, tmp_path):
    model = tiny_dirs["llama"]
    s = settings(model, text_file, tmp_path / "x.safetensors", steps=5)
    train(s)
    with pytest.raises(AdapterTrainingError, match=r"rank: checkpoint None, now 8"):
        train(replace(s, rank=8, resume=True))
    with pytest.raises(AdapterTrainingError, match="no checkpoint"):
        train(replace(s, out=str(tmp_path / "y.safetensors"), resume=True))


@pytest.fixture(scope="module")
def llama_adapters(tiny_dirs, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ad") / "llama.safetensors"
    train(settings(tiny_dirs["llama"], text_file, out, steps=3, explorers=2))   # grid K=2: depth 2 only
    return out


def test_adapters_for_another_base_model_are_refused(tiny_dirs, llama_adapters, tmp_path):
    other = tiny_dirs["qwen2"]   # same hidden size and layers: only the hash tells them apart
    with pytest.raises(ModelLoadError, match="base model hash mismatch") as err:
        DexEngine.load(str(other), EngineConfig(explorers=2, max_context=64, max_batch=1, adapters=str(llama_adapters)))
    assert model_hash(other) in str(err.value) and "llama" in str(err.value)
    # found next to a model (the default), the same check applies
    moved = tmp_path / "qwen2-with-llama-adapters"
    shutil.copytree(other, moved)
    shutil.copy(llama_adapters, moved / ADAPTER_FILE)
    shutil.copy(card_path(llama_adapters), card_path(moved / ADAPTER_FILE))
    with pytest.raises(ModelLoadError, match="base model hash mismatch"):
        DexEngine.load(str(moved), EngineConfig(explorers=2, max_context=64, max_batch=1))
    # and `--adapters none` serves the model without them
    eng = DexEngine.load(str(moved), EngineConfig(explorers=2, max_context=64, max_batch=1, adapters="none"))
    assert eng.adapters is None


def test_adapters_for_another_grid_are_refused(tiny_dirs, llama_adapters):
    with pytest.raises(ModelLoadError, match=r"grid mismatch") as err:
        DexEngine.load(str(tiny_dirs["llama"]),
                       EngineConfig(explorers=4, max_context=64, max_batch=1, adapters=str(llama_adapters)))
    assert "have boundaries [2]" in str(err.value) and "depth(s) [1, 3]" in str(err.value)
    eng = DexEngine.load(str(tiny_dirs["llama"]),
                         EngineConfig(explorers=2, max_context=64, max_batch=1, adapters=str(llama_adapters)))
    assert eng.adapters.boundaries == (2,)


def test_card_that_disagrees_with_its_file_is_refused(tiny_dirs, llama_adapters, tmp_path):
    f = tmp_path / "ad.safetensors"
    shutil.copy(llama_adapters, f)
    card = json.loads(card_path(llama_adapters).read_text())
    card["boundaries"] = [1, 2]
    card_path(f).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match=r"lists boundaries \[1, 2\], the file holds \[2\]"):
        DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, max_context=64, max_batch=1, adapters=str(f)))


def test_missing_adapter_path_is_named(tiny_dirs, tmp_path):
    with pytest.raises(ModelLoadError, match="nope.safetensors not found"):
        DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(max_context=64, max_batch=1,
                                                             adapters=str(tmp_path / "nope.safetensors")))


def test_cli_names_the_bad_flag(tiny_dirs, text_file, tmp_path, capsys):
    model = str(tiny_dirs["llama"])
    with pytest.raises(SystemExit) as exit_:
        dex_main(["train-adapter", "--model", model, "--data", str(tmp_path / "missing.txt"), "-K", "2", "--steps", "1"])
    assert exit_.value.code == 2 and "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        dex_main(["train-adapter", "--model", model, "--data", str(text_file), "--boundaries", "4", "--steps", "1"])
    assert exit_.value.code == 2 and "--boundaries: depth(s) [4] outside 1..3" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "def f():\\n    return 1\\n"}\n{"body": "x"}\n')
    with pytest.raises(SystemExit) as exit_:
        dex_main(["train-adapter", "--model", model, "--data", str(bad), "-K", "2", "--steps", "1", "--seq", "4"])
    assert exit_.value.code == 2 and f"{bad}:2: no string field 'text'" in capsys.readouterr().err


def test_cli_trains_from_jsonl_and_prints_the_card(tiny_dirs, text_file, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    text = text_file.read_text()
    rows.write_text("".join(json.dumps({"text": text[i:i + 2000]}) + "\n" for i in range(0, 20000, 2000)))
    out = tmp_path / "cli.safetensors"
    with pytest.raises(SystemExit) as exit_:
        dex_main(["train-adapter", "--model", str(tiny_dirs["mistral"]), "--data", str(rows), "-K", "4", "--rank", "2",
                  "--steps", "4", "--seq", "32", "--batch", "2", "--out", str(out), "--no-progress", "--json",
                  "--threads", "1"])
    assert exit_.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["out"] == str(out) and doc["rank"] == 2 and doc["boundaries"] == [1, 2, 3] and doc["steps"] == 4
    assert doc["base_model_hash"] == model_hash(ModelCard.load(str(tiny_dirs["mistral"])).path)


def test_generate_json_and_bench_say_which_adapters(tiny_dirs, llama_adapters, capsys):
    model = str(tiny_dirs["llama"])
    common = ["--model", model, "-K", "2", "--no-compile", "--threads", "1", "--max-context", "64"]
    for adapters, want in ((str(llama_adapters), str(llama_adapters)), ("none", None)):
        with pytest.raises(SystemExit) as exit_:
            dex_main(["generate", *common, "--adapters", adapters, "--prompt", "def f(x):", "--max-new-tokens", "4",
                      "--json"])
        assert exit_.value.code == 0
        doc = json.loads(capsys.readouterr().out)
        if want is None:
            assert doc["adapters"] is None
        else:
            card = AdapterCard.read(card_path(llama_adapters))
            assert doc["adapters"]["path"] == want and doc["adapters"]["boundaries"] == [2]
            assert doc["adapters"]["base_model_hash"] == card.base_model_hash
            assert doc["adapters"]["sha256"].startswith("sha256:")
    prompts = llama_adapters.parent / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def f(x):"}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        dex_main(["bench", *common, "--adapters", str(llama_adapters), "--prompts", str(prompts), "--max-new-tokens",
                  "4", "--modes", "dex", "--json"])
    assert exit_.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["adapters"]["path"] == str(llama_adapters)
    assert set(doc["modes"]["ead-oracle"]["agreement_by_boundary"]) == {"1"}
    with pytest.raises(SystemExit) as exit_:   # a grid the adapters do not cover: refused, named
        dex_main(["bench", *common[:2], "-K", "4", *common[4:], "--adapters", str(llama_adapters), "--prompts",
                  str(prompts), "--max-new-tokens", "4", "--json"])
    assert exit_.value.code == 2 and "grid mismatch" in capsys.readouterr().err


def test_data_is_streamed_in_pieces(tmp_path):
    """A plain-text file is read in pieces of about TEXT_PIECE characters (never whole); JSONL row by row."""
    from dexserve.training.adapters import TEXT_PIECE, iter_documents

    big = tmp_path / "big.txt"
    line = "x = compute(a, b)  # a line of code\n"
    big.write_text(line * (5 * TEXT_PIECE // len(line)))
    pieces = iter_documents([str(big)])
    first, end = next(pieces)            # a generator: the rest of the file is not read yet
    assert not end and TEXT_PIECE <= len(first) < TEXT_PIECE + len(line)
    rest = list(pieces)
    assert len(rest) >= 4 and rest[-1][1] and all(not e for _t, e in rest[:-1])
    assert first + "".join(t for t, _e in rest) == big.read_text()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n\n{"text": "b", "id": 2}\n')
    assert list(iter_documents([str(rows)])) == [("a", True), ("b", True)]


@pytest.fixture(scope="module")
def strong_adapters(tiny_dirs, text_file, tmp_path_factory):
    """Adapters for the K=2 grid trained hard enough (high rate) to move the boundary's top-1."""
    out = tmp_path_factory.mktemp("strong") / "llama.safetensors"
    train(settings(tiny_dirs["llama"], text_file, out, steps=20, explorers=2, lr=5e-2))
    return out


def test_bench_reports_agreement_and_rpt_with_and_without_adapters(tiny_dirs, strong_adapters, tmp_path, capsys):
    model = str(tiny_dirs["llama"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def f(x):", "import os\n", "class A:")))
    common = ["bench", "--model", model, "-K", "2", "--no-compile", "--threads", "1", "--max-context", "64",
              "--prompts", str(prompts), "--max-new-tokens", "16", "--modes", "dex"]
    with pytest.raises(SystemExit) as exit_:
        dex_main([*common, "--adapters", str(strong_adapters), "--json"])
    assert exit_.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    cmp_ = doc["comparison"]
    assert set(cmp_["agreement: depth 1"]) == set(cmp_["RPT: dex"]) == {"none", "adapters"}
    # the same agreement the two runs' EAD oracles folded, and the adapters moved it
    assert cmp_["agreement: depth 1"]["none"] == doc["without_adapters"]["modes"]["ead-oracle"]["agreement_by_boundary"]["1"]
    assert cmp_["agreement: depth 1"]["adapters"] == doc["modes"]["ead-oracle"]["agreement_by_boundary"]["1"]
    assert cmp_["agreement: depth 1"]["none"] != cmp_["agreement: depth 1"]["adapters"]
    assert cmp_["RPT: ar"] == {"none": 2.0, "adapters": 2.0}
    # lossless in both columns, against ar without adapters (ar with them included)
    assert cmp_["identical to ar: dex"] == cmp_["identical to ar: ar"] == {"none": True, "adapters": True}
    assert doc["config"]["adapters"]["path"] == str(strong_adapters) and doc["without_adapters"]["modes"]["dex"]["rpt"]
    # the table: both columns, a change column, a row per boundary
    with pytest.raises(SystemExit) as exit_:
        dex_main([*common, "--adapters", str(strong_adapters)])
    table = capsys.readouterr().out
    assert "| | none | adapters | change |" in table and "| agreement: depth 1 |" in table and "| RPT: dex |" in table
    # --adapters none: one column, no second run
    with pytest.raises(SystemExit) as exit_:
        dex_main([*common, "--adapters", "none", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert "without_adapters" not in doc and doc["config"]["adapters"] is None
    assert set(doc["comparison"]["agreement: depth 1"]) == {"none"}
    assert doc["comparison"]["agreement: depth 1"]["none"] == cmp_["agreement: depth 1"]["none"]


def test_bench_finds_adapters_next_to_the_model(tiny_dirs, strong_adapters, tmp_path, capsys):
    """--adapters auto (the default): dex_adapters.safetensors beside the model gives the two columns."""
    moved = tmp_path / "llama-with-adapters"
    shutil.copytree(tiny_dirs["llama"], moved)
    shutil.copy(strong_adapters, moved / ADAPTER_FILE)
    shutil.copy(card_path(strong_adapters), card_path(moved / ADAPTER_FILE))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def f(x):"}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        dex_main(["bench", "--model", str(moved), "-K", "2", "--no-compile", "--threads", "1", "--max-context", "64",
                  "--prompts", str(prompts), "--max-new-tokens", "8", "--modes", "dex", "--json"])
    assert exit_.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["adapters"]["path"] == str(moved / ADAPTER_FILE)
    assert set(doc["comparison"]["RPT: dex"]) == {"none", "adapters"} and "without_adapters" in doc
