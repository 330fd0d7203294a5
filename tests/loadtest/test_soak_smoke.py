"""The soak script (`loadtest/soak.py`) runs end to end in half a minute: `dex up` with two real-engine
workers, locust streams checked against `ar`, one worker killed with -9, Redis crashed and restarted
on its AOF, the gateway restarted; nothing lost or spliced, and the report has every part. The full
soak (20 minutes) is run by hand; this keeps the script from rotting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_script_short_run(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "soak.py"), "--minutes", "0.5", "--workers", "2", "--users", "1",
         "--prompts", "2", "--max-new-tokens", "8", "--fault-free", "0.2", "--kill-every", "3", "3",
         "--max-kills", "1", "--redis-restart-at", "0.45", "--gateway-restart-at", "0.75",
         "--engine-args", "--no-compile --threads 1 --explorers 2 --width 2", "--run-dir", str(tmp_path / "run"),
         "--out", str(out)], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    res = report["results"]
    assert res["lost"] == 0 and res["spliced"] == 0 and res["completed"] > 0, res
    kinds = [f["kind"] for f in report["faults"]]
    assert kinds.count("worker kill -9") == 1 and any(k.startswith("redis restart") for k in kinds) \
        and any(k.startswith("gateway restart") for k in kinds), kinds
    assert res["fault_free"]["streams"] > 0 and res["under_faults"]["streams"] > 0, res
    names = set(report["memory"]["start"]) | set(report["memory"]["end"])
    assert {"redis", "dex up", "locust"} <= names and any(n.startswith("worker") for n in names)
    assert "| streams | completed |" in proc.stdout
