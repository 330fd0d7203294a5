"""The GPU check (worker/benchmarks/gpu_check.sh) cannot rot: its CPU dry mode
runs here through the same wrapper and code path, without the editable install,
and it fails when a token is wrong."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "worker" / "benchmarks" / "gpu_check.sh"
KS = ("2", "4", "8")

def gpu_check(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The wrapper, with a Python that cannot see the editable install: `-S`
    skips site (and so every .pth file, the editable finder among them) and
    PYTHONPATH names the site-packages folders for torch and transformers only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHON"] = f"{sys.executable} -S"
    env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())
    return subprocess.run(["bash", str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd="/")


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu-check") / "dry.json"
    proc = gpu_check(out, "--device", "cpu", "--dry")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_dry_mode_passes_every_check(dry):
    proc, doc = dry
    assert doc["passed"] and doc["complete"] and not doc["skipped"]
    assert doc["checks"] and all(c["passed"] for c in doc["checks"])
    assert "checks passed" in proc.stdout and "| K | mode |" in proc.stdout  # the table


def test_dry_mode_runs_from_the_source_tree_without_service_modules(dry):
    _, doc = dry
    imp = doc["imports"]
    assert imp["from_source_tree"] and not imp["editable_finder_active"]
    assert imp["engine_module"] == str(ROOT / "worker" / "dexserve" / "engine" / "engine.py")
    assert imp["forbidden_loaded"] == []


def test_dry_mode_reports_every_section_for_k_2_4_8(dry):
    _, doc = dry
    for key in ("environment", "workload", "hf_generate", "by_k", "distributed", "imports", "checks"):
        assert key in doc, key
    assert doc["environment"]["torch"] == torch.__version__
    assert sorted(doc["by_k"]) == sorted(KS)
    for K in KS:
        r = doc["by_k"][K]
        k = int(K)
        assert r["capture"]["use_graph"] is False  # CPU: eager
        eq = r["equality"]
        assert all(m["equal_to_ar"] for m in eq["modes"].values()) and "dex" in eq["modes"]
        assert eq["graph_vs_eager"]["dex_tokens_equal"] and eq["graph_vs_eager"]["ar_tokens_equal"]
        assert eq["ar_vs_hf"]["equal"] is True
        tm = r["timing"]
        for mode in ("ar", "dex"):
            t = tm[mode]
            for field in ("tokens_per_s", "rpt", "ms_per_round", "host_overhead_us_per_round", "step_us_per_round"):
                assert isinstance(t[field], (int, float)) and t[field] > 0, (K, mode, field)
            assert len(t["step_us_per_explorer"]) == k
        assert tm["ar"]["rpt"] == k  # ar: K rounds per token
        assert 1 <= tm["dex"]["rpt"] <= k
        iso = tm["isolated_step_us_per_explorer"]["eager"]
        assert len(iso) == k and all(x > 0 for x in iso)
    dist = doc["distributed"]["by_k"]
    assert dist and all(r[m]["equal_to_reference_ar"] for r in dist.values() for m in ("ar", "dex"))


def test_dry_mode_checks_a_random_adapter_at_the_deepest_grid(dry):
    proc, doc = dry
    assert doc["adapters"]["boundaries"] == list(range(1, 8))       # the shipped model's 8 layers, K=8's grid
    assert [K for K in KS if "adapters" in doc["by_k"][K]] == ["8"]  # dry: the largest K only
    ad = doc["by_k"]["8"]["adapters"]
    assert ad["capture"]["use_graph"] is False
    eq = ad["equality"]
    assert eq["dex_graph_vs_eager"] and eq["dex_equal_to_ar"] and eq["ar_equal_to_ar_without_adapters"]
    assert eq["adapters_change_readouts"] is True
    names = {c["name"] for c in doc["checks"] if c["passed"]}
    assert {"K=8 adapters: dex == ar without adapters", "K=8 adapters change the boundary readouts"} <= names
    tm = ad["timing"]
    assert tm["ar"]["rpt"] == 8 and 1 <= tm["dex"]["rpt"] <= 8
    assert len(tm["dex"]["step_us_per_explorer"]) == 8 and all(x > 0 for x in tm["dex"]["step_us_per_explorer"])
    assert len(tm["isolated_step_us_per_explorer"]["adapter_cost_us_per_explorer"]) == 8
    assert "| 8 | dex + adapters |" in proc.stdout and "| 8 | adapter cost per step" in proc.stdout


@pytest.mark.parametrize("flag,failing,still_equal", [
    ("--inject-mismatch", {"K=2 dex == ar", "K=2 dex eager == eager (CPU: no graphs)"},
     lambda doc: doc["by_k"]["2"]["adapters"]["equality"]["dex_equal_to_ar"]),
    ("--inject-adapter-mismatch", {"K=2 adapters: dex == ar without adapters",
                                   "K=2 adapters: dex eager == eager (CPU: no graphs)"},
     lambda doc: doc["by_k"]["2"]["equality"]["modes"]["dex"]["equal_to_ar"]),
])
def test_the_check_fails_when_a_token_is_wrong(tmp_path, flag, failing, still_equal):
    """A flipped dex token, without adapters or with them, fails exactly its two checks and the exit status."""
    out = tmp_path / "bad.json"
    proc = gpu_check(out, "--device", "cpu", "--dry", "--explorers", "2", "--no-hf", "--distributed", "off", flag)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["passed"] is False
    assert {c["name"] for c in doc["checks"] if not c["passed"]} == failing
    assert still_equal(doc) is True     # the other case still passed
    assert "FAILED" in proc.stdout


def test_cuda_asked_without_a_gpu_is_an_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = gpu_check(tmp_path / "x.json", "--device", "cuda")
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_mode_on_the_gpu(tmp_path):
    """The GPU check itself (smaller workload): graphs captured, every equality holds."""
    out = tmp_path / "gpu.json"
    proc = gpu_check(out, "--limit", "4", "--new-tokens", "32", "--time-budget", "300")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["passed"] and doc["complete"]
    for r in doc["by_k"].values():
        assert r["capture"]["use_graph"] and r["capture"]["every_step_captured"]
        assert r["equality"]["graph_vs_eager"]["graphs"] is True
        # the adapter inside the captured steps: replayed == eager == ar, at every K
        ad = r["adapters"]
        assert ad["capture"]["use_graph"] and ad["capture"]["every_step_captured"]
        assert ad["equality"]["dex_graph_vs_eager"] and ad["equality"]["dex_equal_to_ar"]
        assert ad["equality"]["adapters_change_readouts"]
        assert "replay_only" in ad["timing"]["isolated_step_us_per_explorer"]


def test_a_dex_mismatch_reports_the_reference_margin_there(tmp_path):
    """Where dex and ar part, the check records Hugging Face's top-1 minus top-2 logit at ar's prefix:
    near zero says a numerical tie between kernels, large says a lattice error."""
    out = tmp_path / "bad.json"
    proc = gpu_check(out, "--device", "cpu", "--dry", "--explorers", "2", "--distributed", "off", "--no-adapters",
                     "--inject-mismatch")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    failed = {c["name"]: c for c in doc["checks"] if not c["passed"]}
    assert "K=2 dex == ar" in failed
    margin = doc["by_k"]["2"]["equality"]["modes"]["dex"]["hf_top2_margin_at_diff"]
    assert isinstance(margin, float) and margin >= 0
