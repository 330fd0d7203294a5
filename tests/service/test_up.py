"""`dex up` starts Redis, the gateway and workers; SIGTERM stops all of it."""

import os
import signal
import subprocess
import sys
import time

from dexserve.client import stream_generate
from dexserve.queue.embedded import free_port

from .helpers import collect


def test_dex_up_serves_and_stops_cleanly(standin_model, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "dexserve.cli", "up", "--engine", "standin", "--model",
                             str(standin_model), "--port", str(port), "--workers", "2", "--data-dir",
                             str(tmp_path / "redis")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "serving on" in line:
                break
        assert f"127.0.0.1:{port}" in "".join(lines)
        redis_pid = int(next(l for l in lines if l.startswith("redis")).split("pid ")[1].split(",")[0])
        result = None
        while time.monotonic() < deadline and result is None:
            try:
                result = collect(stream_generate(f"127.0.0.1:{port}", "hello", max_new_tokens=4, timeout=20))
            except Exception:
                time.sleep(0.3)   # the gateway is still starting
        assert result[2] == [0, 1, 2, 3]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    try:
        os.kill(redis_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "dex up left its Redis running"
