"""Bad inputs get a clear error that names the problem, from the API and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.contract.model_card import ModelLoadError
from dexserve.contract.request import GenerationRequest, InvalidRequest, SamplingParams


def dex(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dexserve.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def eng(tiny_dirs) -> DexEngine:
    return DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, width=2, max_context=16, max_batch=1))


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        DexEngine.load(str(tmp_path / "nope"))


def test_partial_checkpoint(tmp_path, tiny_dirs):
    (tmp_path / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="safetensors"):
        DexEngine.load(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="gpt2.*not supported"):
        DexEngine.load(str(tmp_path))


def test_missing_tensor_is_named(tmp_path, tiny_dirs):
    from safetensors.torch import load_file, save_file
    import shutil

    for f in tiny_dirs["llama"].iterdir():
        shutil.copy(f, tmp_path / f.name)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj.weight"):
        DexEngine.load(str(tmp_path))


def test_explorers_beyond_layer_count(tiny_dirs):
    with pytest.raises(ValueError, match="explorers.*layer count"):
        DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=5))


def test_width_below_one(tiny_dirs):
    with pytest.raises(ValueError, match="width"):
        DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(width=-1))   # (0 is auto)


def test_bad_mode(tiny_dirs):
    with pytest.raises(ValueError, match="J must be a boundary in 1..1"):
        DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, mode="select:2"))


def test_prompt_longer_than_context(eng):
    with pytest.raises(InvalidRequest) as exc:
        eng.add(GenerationRequest("long", prompt_ids=tuple(range(1, 17))))
    assert exc.value.field == "prompt"
    assert "16-token context" in str(exc.value)


@pytest.mark.parametrize("sampling,field", [(SamplingParams(temperature=-0.5), "temperature"),
                                            (SamplingParams(temperature=float("nan")), "temperature"),
                                            (SamplingParams(top_p=0.0), "top_p"),
                                            (SamplingParams(top_p=1.5), "top_p"),
                                            (SamplingParams(top_k=-1), "top_k")])
def test_bad_sampling(eng, sampling, field):
    with pytest.raises(InvalidRequest) as exc:
        eng.add(GenerationRequest("s", prompt_ids=(1, 2), sampling=sampling))
    assert exc.value.field == field


def test_bad_request_fields(eng):
    for req, field in ((GenerationRequest("e", prompt=""), "prompt"),
                       (GenerationRequest("m", prompt_ids=(1,), max_new_tokens=0), "max_new_tokens"),
                       (GenerationRequest("m", prompt_ids=(1,), max_new_tokens=10**6), "max_new_tokens"),
                       (GenerationRequest("v", prompt_ids=(99999,)), "prompt_ids"),
                       (GenerationRequest("t", prompt_ids=(1,), stop=("",)), "stop"),
                       (GenerationRequest("t", prompt_ids=(1,), stop=tuple("abcdefghij")), "stop")):
        with pytest.raises(InvalidRequest) as exc:
            eng.add(req)
        assert exc.value.field == field
    assert eng.active == 0  # nothing half-admitted


def test_cli_reports_errors_cleanly(tmp_path, tiny_dirs):
    r = dex("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2 and "model directory not found" in r.stderr and "Traceback" not in r.stderr
    r = dex("generate", "--model", str(tiny_dirs["llama"]), "--prompt", "x", "--explorers", "9")
    assert r.returncode == 2 and "explorers" in r.stderr
    # (eager steps: compiling is not what these test, and it would take minutes on a cold cache)
    r = dex("generate", "--model", str(tiny_dirs["llama"]), "--prompt", "x", "--temperature", "-1", "--no-compile")
    assert r.returncode == 2 and "temperature" in r.stderr
    r = dex("generate", "--model", str(tiny_dirs["llama"]), "--prompt", "x" * 3000, "--max-context", "64",
            "--no-compile")
    assert r.returncode == 2 and "prompt" in r.stderr


def test_cli_json_output(tiny_dirs):
    r = dex("generate", "--model", str(tiny_dirs["llama"]), "--prompt", "def f(x):", "--max-new-tokens", "6",
            "--ignore-eos", "--json", "--explorers", "2", "--threads", "1", "--no-compile")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 6
    assert {"text", "token_ids", "rounds", "rpt", "accept_hist", "fallbacks"} <= set(out)
    assert out["rounds"] >= 6 and out["rpt"] == round(out["rounds"] / 6, 4)
    assert sum(out["accept_hist"].values()) == 6


def test_cli_json_reports_the_layout_it_ran(tiny_dirs):
    """With no layout flags the JSON names the resolved layout (not the flag's 0 = auto), and the
    engine is closed before exit: no explorer process or semaphore outlives the command."""
    r = dex("generate", "--model", str(tiny_dirs["llama"]), "--prompt", "def f(x):", "--max-new-tokens", "4",
            "--ignore-eos", "--json", "--no-compile")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["explorers"] >= 1 and out["executor"] in ("reference", "distributed") and out["width"] >= 1
    assert "leaked" not in r.stderr, r.stderr
