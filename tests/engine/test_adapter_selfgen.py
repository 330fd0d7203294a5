"""`dex train-adapter --self-generate N`: the base model's own continuations as
adapter data (dexserve.training.selfgen), on tiny random checkpoints."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from engine.conftest import hf_greedy
from engine.test_adapter_training import settings, text_file  # noqa: F401 - the fixture, shared
from dexserve.cli import main as dex_main
from dexserve.contract.model_card import ModelCard
from dexserve.engine.adapters import AdapterCard, card_path
from dexserve.engine.tokenizer import load_tokenizer
from dexserve.training.adapters import train
from dexserve.training.selfgen import data_path, meta_path

P, G = 8, 12


def rows(out) -> list[dict]:
    return [json.loads(line) for line in data_path(out).read_text().splitlines()]


def test_cli_trains_on_the_models_own_greedy_continuations(tiny_dirs, text_file, tmp_path, capsys):  # noqa: F811
    model = str(tiny_dirs["llama"])
    out = tmp_path / "sg.safetensors"
    with pytest.raises(SystemExit) as exit_:
        dex_main(["train-adapter", "--model", model, "--data", str(text_file), "-K", "4", "--self-generate", "10",
                  "--prompt-tokens", str(P), "--generate-tokens", str(G), "--generate-batch", "4", "--steps", "3",
                  "--seq", "16", "--batch", "2", "--heldout-every", "5", "--out", str(out), "--threads", "1",
                  "--no-progress", "--json"])
    assert exit_.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    card = AdapterCard.read(card_path(out))
    assert doc["data_source"] == card.data_source == "self-generated"
    gen = card.self_generated
    assert gen["rows"] == 10 and gen["tokens"] == 10 * G and gen["stopped"] == "rows" and gen["decoding"] == "greedy"
    assert gen["prompts_from"] == [str(text_file)] and card.data == [str(data_path(out))] == [gen["file"]]
    assert card.steps == 3 and card.heldout_tokens > 0
    written = rows(out)
    assert len(written) == 10
    tok = load_tokenizer(ModelCard.load(model))
    for row in written:   # each row: a window of the data, then exactly what greedy decoding (ar) continues it with
        ids = row["ids"]
        assert row["prompt_tokens"] == P and len(ids) == P + G
        assert tuple(ids[P:]) == hf_greedy(model, tuple(ids[:P]), G)
        assert row["text"] == tok.decode(ids)
    assert len({tuple(r["ids"][:P]) for r in written}) == 10   # ten different windows


def test_prompts_file_sampled_and_seeded(tiny_dirs, tmp_path):
    model = str(tiny_dirs["qwen2"])
    prompts = tmp_path / "prompts.jsonl"
    texts = ["def f(x):\n    return x", "import os", "class Parser(object):\n    def __init__(self, text, *, strict=True):"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    s = settings(model, prompts, tmp_path / "a.safetensors", steps=2, seq=8, batch=2, heldout_every=2)
    s = replace(s, data=(), self_generate=50, prompts=str(prompts), prompt_tokens=P, generate_tokens=G,
                temperature=0.8, seed=3)
    first = train(s)
    assert first.card.self_generated["stopped"] == "prompts" and first.card.self_generated["rows"] == 3
    assert first.card.self_generated["decoding"] == "sampled, temperature 0.8"
    tok = load_tokenizer(ModelCard.load(model))
    got = rows(tmp_path / "a.safetensors")
    # each prompt's last P tokens (left-padded in one batch), then G sampled tokens
    assert [r["ids"][:r["prompt_tokens"]] for r in got] == [tok(t, add_special_tokens=False)["input_ids"][-P:]
                                                          for t in texts]
    assert all(len(r["ids"]) == r["prompt_tokens"] + G for r in got)
    train(replace(s, out=str(tmp_path / "b.safetensors")))
    assert rows(tmp_path / "b.safetensors") == got                          # the same seed: the same rows
    train(replace(s, out=str(tmp_path / "c.safetensors"), seed=4))
    assert [r["ids"] for r in rows(tmp_path / "c.safetensors")] != [r["ids"] for r in got]


def test_generation_stops_at_its_share_of_the_minutes(tiny_dirs, text_file, tmp_path):  # noqa: F811
    s = settings(tiny_dirs["llama"], text_file, tmp_path / "t.safetensors", steps=None, minutes=0.01, seq=8,
                 heldout_every=2)
    s = replace(s, self_generate=10**6, prompt_tokens=P, generate_tokens=G, generate_batch=1, generate_share=0.5)
    card = train(s).card
    gen = card.self_generated
    assert gen["stopped"] == "time" and 1 <= gen["rows"] < 10**6
    assert len(rows(tmp_path / "t.safetensors")) == gen["rows"]


def test_resume_reuses_the_generated_rows(tiny_dirs, text_file, tmp_path):  # noqa: F811
    s = settings(tiny_dirs["mistral"], text_file, tmp_path / "r.safetensors", steps=6, seq=16, batch=2)
    s = replace(s, self_generate=12, prompt_tokens=P, generate_tokens=G, generate_batch=6)
    whole = train(replace(s, out=str(tmp_path / "whole.safetensors")))

    def interrupt(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(s, on_step=interrupt)
    stamp = os.stat(data_path(tmp_path / "r.safetensors")).st_mtime_ns
    resumed = train(replace(s, resume=True))
    assert os.stat(data_path(tmp_path / "r.safetensors")).st_mtime_ns == stamp      # not generated again
    assert resumed.losses == whole.losses and resumed.card.self_generated["rows"] == 12
    assert json.loads(meta_path(tmp_path / "r.safetensors").read_text())["rows"] == 12


@pytest.mark.parametrize("argv,error", [
    (["--self-generate", "0"], "--self-generate must be >= 1"),
    (["--prompts", "p.jsonl"], "--prompts: only with --self-generate"),
    (["--self-generate", "4", "--generate-share", "1.5"], "--generate-share must be in (0, 1)"),
    (["--self-generate", "4", "--prompts", "missing.jsonl"], "--prompts: missing.jsonl is not a file"),
])
def test_self_generate_flags_are_checked(tiny_dirs, text_file, argv, error, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exit_:
        dex_main(["train-adapter", "--model", str(tiny_dirs["llama"]), "--data", str(text_file), "-K", "2",
                  "--steps", "1", *argv])
    assert exit_.value.code == 2 and error in capsys.readouterr().err


def test_without_data_or_prompts_the_data_flag_is_named(tiny_dirs, capsys):
    with pytest.raises(SystemExit) as exit_:
        dex_main(["train-adapter", "--model", str(tiny_dirs["llama"]), "-K", "2", "--steps", "1",
                  "--self-generate", "4"])
    assert exit_.value.code == 2 and "--data: give at least one" in capsys.readouterr().err


def test_a_bad_prompts_row_is_named(tiny_dirs, text_file, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "def f():"}\n{"body": "x"}\n')
    with pytest.raises(SystemExit) as exit_:
        dex_main(["train-adapter", "--model", str(tiny_dirs["llama"]), "--data", str(text_file), "-K", "2",
                  "--steps", "1", "--self-generate", "4", "--prompts", str(bad), "--out", str(tmp_path / "a.safetensors")])
    assert exit_.value.code == 2 and f"--prompts: {bad}:2: no string field 'prompt' (or 'text')" in capsys.readouterr().err
