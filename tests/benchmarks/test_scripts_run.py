"""Every benchmark script behind a README figure still runs against the current code.

Each runs as the README runs it (`python worker/benchmarks/<script>.py`), on a tiny
workload, and must write its JSON with the fields the report reads; the figures
themselves come from `bash worker/benchmarks/run.sh` on a quiet machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "worker" / "benchmarks"
pytestmark = pytest.mark.slow

SCRIPTS = {
    "round_overhead": (["--rounds", "40", "--repeats", "1", "--configs", "2x1,4x8"], lambda d: d["runs"]),
    "rpt_vs_width": (["--limit", "2", "--max-new-tokens", "8", "--explorers", "2,4", "--widths", "4"],
                     lambda d: d["results"]),
    "step_scaling": (["--no-compile", "--ks", "1,2", "--widths", "1", "--calls", "5", "--repeats", "1"],
                     lambda d: d["markdown"]),
    "prefill_pipeline": (["--limit", "2", "--passes", "1", "--no-compile"], lambda d: d["ms_per_prompt"]["distributed"]),
    "prefill_itl": (["--prompt-tokens", "200", "--new-tokens", "40", "--lead-rounds", "4", "--passes", "1",
                     "--prefill-chunk", "16", "--no-compile"],
                    lambda d: d["streams_identical_across_settings"] and d["settings"]["prefill_share=1"]),
    "speedup": (["--limit", "1", "--max-new-tokens", "6", "--repeats", "1", "--exits", "2", "--project", "",
                 "--no-compile"], lambda d: d["summary"]["dex_vs_best_single_process"]
                and d["summary"]["bounds"]["no_coordination_rpt_1_tokens_per_s"] > 0
                and len(d["summary"]["dex_vs_best_single_process_paired_repeats"]) == 1
                and d["runs"]["dex-K2-2proc-1t"]["round_split_ms"]["step"] > 0),
    "recovery": (["--trials", "1", "--tokens", "40", "--kill-after", "6", "--engine-args",
                  "--no-compile --threads 1 --explorers 2 --width 2"], lambda d: d["configs"][0]["trials_s"]),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_runs(script, tmp_path):
    args, field = SCRIPTS[script]
    out = tmp_path / f"{script}.json"
    res = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args, "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert field(json.loads(out.read_text()))


def test_report_renders_every_result_file():
    res = subprocess.run([sys.executable, str(BENCH / "report.py")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for heading in ("Rounds per token against the width W", "Explorers on separate devices",
                    "Coordination per round (null step)", "Explorer steps against 1/K of the full step"):
        assert heading in res.stdout


def test_adapters_benchmark_runs(tmp_path):
    """worker/benchmarks/adapters.py on a tiny random 'standard' model with adapters trained for it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny

    model = save_tiny("llama", tmp_path / "tiny", layers=4)
    corpus = tmp_path / "train.jsonl"
    res = subprocess.run([sys.executable, str(BENCH / "adapters.py"), "corpus", "--out", str(corpus)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["train_files"] > 1000
    # adapters on the model's own outputs, as the benchmark trains them (`--self-generate`)
    ad = tmp_path / "ad.safetensors"
    res = subprocess.run([sys.executable, "-m", "dexserve.cli", "train-adapter", "--model", str(model), "--data",
                          str(corpus), "-K", "4", "--steps", "3", "--seq", "32", "--batch", "2", "--out", str(ad),
                          "--self-generate", "8", "--generate-tokens", "16", "--generate-batch", "8",
                          "--no-progress", "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(ad.with_suffix(".json").read_text())["data_source"] == "self-generated"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def f(x):\n"}) + "\n")
    out = tmp_path / "adapters.json"
    res = subprocess.run([sys.executable, str(BENCH / "adapters.py"), "run", "--standard", str(model), "--adapters",
                          f"full={ad}", "--prompts", str(prompts), "--limit", "1", "--max-new-tokens", "4", "--ks",
                          "2,4", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"standard", "standard+full", "shipped-early-exit"}
    assert all(r["by_k"][k]["identical_to_ar"] for r in doc["results"].values() for k in ("2", "4"))
    assert doc["adapter_training"]["standard+full"]["steps"] == 3


def test_service_bench_drives_both_doors():
    """`service_bench.py --door both` (stand-in engine): every stream through gRPC and through the
    OpenAI-compatible HTTP door delivers all its tokens."""
    res = subprocess.run([sys.executable, str(BENCH / "service_bench.py"), "--door", "both", "--concurrency", "1", "3",
                          "--tokens", "5", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert [(lv["door"], lv["streams"]) for lv in report["levels"]] == [("grpc", 1), ("http", 1), ("grpc", 3),
                                                                         ("http", 3)]
    assert all(lv["tokens"] == 5 * lv["streams"] and lv["ttft_ms_p50"] > 0 for lv in report["levels"])
