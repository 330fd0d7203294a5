"""Soak under faults: `python loadtest/soak.py [--minutes 20] [--workers 3] [--users 6] [--out FILE]`.

Starts Redis (AOF, appendfsync always) and `dex up --workers N` with the shipped model and the real
engine (default engine flags plus `--engine-args`), warms every worker, then runs locust headless
(`loadtest/soak_locustfile.py`: gevent-aware gRPC, resumable clients) for `--minutes` while a chaos
loop, after a fault-free first part (`--fault-free`, a fraction of the run), kills a worker with
SIGKILL every `--kill-every MIN MAX` seconds (one holding requests, when one does), crashes Redis
once (SIGKILL, restarted on its AOF, at `--redis-restart-at`) and stops the gateway once (SIGTERM:
it drains and `dex up` starts it again; clients resume with `resume_from`, at `--gateway-restart-at`).

Every stream is checked token for token against the engine's own output in mode `ar` for the same
prompt and sampling (greedy and seeded sampling, computed in this process with `DexEngine` before
the run). The report (JSON to `--out`, a table on stdout): streams completed, failed by status,
lost (no end: a hang past the deadline, or no finish; must be 0), spliced (a gap, a repeat or
tokens other than `ar`'s; must be 0), TTFT and inter-token latency in the fault-free part and
under faults, the stall each fault caused (fault -> next token of the streams it stopped), and the
memory (RSS) of every process at the start and the end. Exit status 0 when nothing was lost or
spliced and streams completed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "soak_locustfile.py"
SAMPLED = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
PREFIX = "dex"
SPACING_S = 10.0      # no worker kill this close to a Redis or gateway restart


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0, help="locust run time")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--users", type=int, default=6, help="concurrent locust users (streams)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=24, help="held-out prompts used (each greedy and sampled)")
    p.add_argument("--fault-free", type=float, default=0.2, help="fraction of the run before the first fault")
    p.add_argument("--kill-every", type=float, nargs=2, default=(30.0, 60.0), metavar=("MIN", "MAX"),
                   help="seconds between worker kills (uniform)")
    p.add_argument("--max-kills", type=int, default=None, help="stop killing after this many")
    p.add_argument("--redis-restart-at", type=float, default=0.5, help="fraction of the run; <0: never")
    p.add_argument("--redis-down-s", type=float, default=1.0, help="seconds Redis stays down")
    p.add_argument("--gateway-restart-at", type=float, default=0.75, help="fraction of the run; <0: never")
    p.add_argument("--engine-args", default="--threads 1",
                   help="worker engine flags beyond the defaults (default: --threads 1, as N workers share the cores)")
    p.add_argument("--model", default=None, help="default: the shipped model")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0, help="of the chaos loop's choices")
    p.add_argument("--run-dir", default=None, help="logs, expectations, per-stream results (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    return p.parse_args(argv)


# ---- expectations ---------------------------------------------------------------------------------

def expectations(args, model: str) -> list[dict]:
    """The engine's own tokens for every case, in mode `ar` (what every DEX mode must equal)."""
    from dexserve.contract.request import GenerationRequest, SamplingParams
    from dexserve.engine.config import EngineConfig
    from dexserve.engine.engine import DexEngine

    prompts = [json.loads(l)["prompt"] for l in (Path(model) / "heldout_prompts.jsonl").read_text().splitlines()
               if l.strip()][:args.prompts]
    cases = [{"prompt": prompt, "max_new_tokens": args.max_new_tokens, **sampling, "token_ids": []}
             for i, prompt in enumerate(prompts)
             for sampling in ({"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}, {**SAMPLED, "seed": 1000 + i})]
    batch = 8       # requests decoded together (each one's tokens do not depend on its neighbours)
    engine = DexEngine.load(model, EngineConfig(mode="ar", explorers=2, width=1, max_batch=batch, compile=False))
    try:
        for lo in range(0, len(cases), batch):
            for n, case in enumerate(cases[lo:lo + batch], lo):
                engine.add(GenerationRequest(str(n), case["prompt"], case["max_new_tokens"],
                                             SamplingParams(**{k: case[k] for k in ("temperature", "top_k", "top_p",
                                                                                    "seed")})))
            while engine.active:
                for t in engine.step().tokens:
                    cases[int(t.request_id)]["token_ids"].append(t.token_id)
    finally:
        engine.close()
    return cases


# ---- processes ------------------------------------------------------------------------------------

def children(ppid: int) -> dict[int, list[str]]:
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != ppid:
                continue
            out[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError, IndexError):
            continue
    return out


def role_pids(up_pid: int, role: str) -> list[int]:
    return sorted(pid for pid, cmd in children(up_pid).items() if role in cmd)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def memory(procs: dict[str, int], up_pid: int) -> dict[str, dict]:
    """RSS of Redis, dex up, the gateway, every worker and its own children (explorers), locust."""
    rows = dict(procs)
    for pid in role_pids(up_pid, "gateway"):
        rows[f"gateway {pid}"] = pid
    for pid in role_pids(up_pid, "worker"):
        rows[f"worker {pid}"] = pid
        for child in children(pid):
            rows[f"worker {pid} child {child}"] = child
    return {name: {"pid": pid, "rss_mb": rss_mb(pid)} for name, pid in rows.items()}


def wait_line(log: Path, needle: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {needle!r} in {log}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def holders(client) -> set[int]:
    """PIDs of workers holding requests now (consumer names are host-pid)."""
    from dexserve.queue.protocol import GROUP, consumer_host_prefix

    prefix = consumer_host_prefix(socket.gethostname())
    try:
        info = client.xpending(f"{PREFIX}:requests", GROUP)
    except Exception:
        return set()
    out = set()
    for c in info.get("consumers") or []:
        name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
        if int(c["pending"]) > 0 and name.startswith(prefix) and name[len(prefix):].isdigit():
            out.add(int(name[len(prefix):]))
    return out


def warm_up(address: str, cases: list[dict], n: int) -> float:
    """`n` concurrent streams, twice, so every worker has run (and compiled) before the clock starts."""
    import threading

    from dexserve.client import stream_generate

    t0 = time.monotonic()
    for _round in range(2):
        errors = []

        def one(i):
            c = cases[i % len(cases)]
            try:
                list(stream_generate(address, c["prompt"], max_new_tokens=c["max_new_tokens"], temperature=c["temperature"],
                                     top_k=c["top_k"], top_p=c["top_p"], seed=c["seed"], timeout=900))
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"warm-up failed: {errors[0]}")
    return round(time.monotonic() - t0, 1)


# ---- report ---------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q * (len(s) - 1))))] * 1000, 1)


def analyse(rows: list[dict], faults: list[dict], fault_start: float | None, run_end: float) -> dict:
    ok = [r for r in rows if r["status"] == "OK" and r["check"] == "ok"]
    lost = [r for r in rows if r["status"] in ("DEADLINE_EXCEEDED", "NO_FINISH")]
    spliced = [r for r in rows if r["check"] != "ok"]
    failed: dict[str, int] = {}
    for r in rows:
        if r["status"] != "OK" and r not in lost:
            failed[r["status"]] = failed.get(r["status"], 0) + 1

    def phase(sel):
        return {"streams": len(sel), "ttft_ms_p50": pct([r["ttft_s"] for r in sel if r["ttft_s"] is not None], 0.5),
                "ttft_ms_p99": pct([r["ttft_s"] for r in sel if r["ttft_s"] is not None], 0.99),
                "itl_ms_p50": pct([r["itl_s"] for r in sel if r["itl_s"] is not None], 0.5),
                "itl_ms_p99": pct([r["itl_s"] for r in sel if r["itl_s"] is not None], 0.99)}

    cut = fault_start if fault_start is not None else run_end
    for f in faults:
        stalls = [round(b - f["at"], 3) for r in rows for a, b in r["gaps"] if a <= f["at"] < b]
        f["stalled_streams"] = len(stalls)
        f["fault_to_next_token_s_max"] = max(stalls) if stalls else None
        f["fault_to_next_token_s_median"] = round(statistics.median(stalls), 3) if stalls else None
    return {"streams": len(rows), "completed": len(ok), "failed_by_status": failed, "lost": len(lost),
            "spliced": len(spliced), "resumed_streams": sum(1 for r in rows if r["resumes"]),
            "spliced_examples": [{k: r[k] for k in ("request_id", "case", "status", "check")} for r in spliced[:5]],
            "lost_examples": [{k: r[k] for k in ("request_id", "case", "status", "detail")} for r in lost[:5]],
            "failed_examples": [{k: r[k] for k in ("request_id", "status", "detail")}
                                for r in rows if r["status"] != "OK" and r not in lost][:5],
            "fault_free": phase([r for r in ok if r["start"] < cut]),
            "under_faults": phase([r for r in ok if r["start"] >= cut])}


def table(report: dict) -> str:
    r = report["results"]
    lines = [f"soak: {report['minutes']} min, {report['workers']} workers, {report['users']} users, "
             f"{report['max_new_tokens']} new tokens, engine flags: defaults {report['engine_args']}",
             "", "| streams | completed | failed (by status) | lost | spliced | resumed |", "|---|---|---|---|---|---|",
             f"| {r['streams']} | {r['completed']} | {r['failed_by_status'] or 0} | {r['lost']} | {r['spliced']} | "
             f"{r['resumed_streams']} |", "",
             "| phase | streams | TTFT p50 / p99 ms | ITL p50 / p99 ms |", "|---|---|---|---|"]
    for name in ("fault_free", "under_faults"):
        p = r[name]
        lines.append(f"| {name.replace('_', ' ')} | {p['streams']} | {p['ttft_ms_p50']} / {p['ttft_ms_p99']} | "
                     f"{p['itl_ms_p50']} / {p['itl_ms_p99']} |")
    lines += ["", "| fault | at s | stalled streams | fault → next token, median / max s |", "|---|---|---|---|"]
    for f in report["faults"]:
        lines.append(f"| {f['kind']} {f.get('pid', '')} | {f['at_s']} | {f['stalled_streams']} | "
                     f"{f['fault_to_next_token_s_median']} / {f['fault_to_next_token_s_max']} |")
    lines += ["", "| process | RSS MB at start | RSS MB at end |", "|---|---|---|"]
    start, end = report["memory"]["start"], report["memory"]["end"]
    for name in list(start) + [n for n in end if n not in start]:
        a, b = start.get(name, {}).get("rss_mb"), end.get(name, {}).get("rss_mb")
        lines.append(f"| {name} | {a if a is not None else '-'} | {b if b is not None else '-'} |")
    return "\n".join(lines)


# ---- the run --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    import redis

    from dexserve.contract.model_card import resolve_model_dir
    from dexserve.queue.embedded import EmbeddedRedis, free_port

    rng = random.Random(args.seed)
    model = str(resolve_model_dir(args.model))
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="dex-soak-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    cases = expectations(args, model)
    (run_dir / "expectations.json").write_text(json.dumps(cases))
    print(f"soak: {len(cases)} cases computed in mode ar in {time.monotonic() - t:.1f} s; run dir {run_dir}", flush=True)

    server = EmbeddedRedis(run_dir / "redis", appendfsync="always").start()
    port, http_port = free_port(), free_port()
    env = {**os.environ, "REDIS_URL": server.url, "HF_HUB_OFFLINE": "1", "DEX_QUEUE_PREFIX": PREFIX}
    up_log = run_dir / "dex-up.log"
    up = subprocess.Popen([sys.executable, "-m", "dexserve.cli", "up", "--workers", str(args.workers), "--port", str(port),
                           "--http-port", str(http_port), "--model", model, *shlex.split(args.engine_args)],
                          stdout=open(up_log, "wb"), stderr=subprocess.STDOUT, env=env)
    address = f"127.0.0.1:{port}"
    locust = None
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    faults: list[dict] = []
    report: dict = {}
    try:
        wait_line(up_log, "serving on", 120, up)
        warm_s = warm_up(address, cases, 2 * args.workers)
        print(f"soak: dex up warm ({warm_s} s); locust for {args.minutes} min", flush=True)
        results = run_dir / "streams.jsonl"
        results.write_text("")
        duration = args.minutes * 60
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users), "-r",
             str(args.users), "-t", f"{max(1, int(duration))}s", "--stop-timeout", str(int(args.request_timeout)),
             "--host", address, "--expectations", str(run_dir / "expectations.json"), "--results", str(results),
             "--request-timeout", str(args.request_timeout), "--csv", str(run_dir / "locust"), "--only-summary",
             "--loglevel", "WARNING"],
            stdout=open(run_dir / "locust.log", "wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        t0 = time.time()
        time.sleep(min(5.0, duration / 10))
        mem_start = memory({"redis": server.proc.pid, "dex up": up.pid, "locust": locust.pid}, up.pid)
        fault_start = t0 + args.fault_free * duration
        end = t0 + duration
        plan = []
        if args.redis_restart_at >= 0:
            plan.append((t0 + args.redis_restart_at * duration, "redis"))
        if args.gateway_restart_at >= 0:
            plan.append((t0 + args.gateway_restart_at * duration, "gateway"))
        next_kill = fault_start
        kills = 0
        while time.time() < end and locust.poll() is None:
            now = time.time()
            due = [p for p in plan if p[0] <= now]
            if due:
                plan.remove(due[0])
                kind = due[0][1]
                if kind == "redis":
                    at = time.time()
                    server.stop(kill=True)
                    time.sleep(args.redis_down_s)
                    server.start()
                    faults.append({"kind": "redis restart (SIGKILL, AOF)", "at": at, "pid": "",
                                   "down_s": round(time.time() - at, 2)})
                else:
                    [gw] = role_pids(up.pid, "gateway") or [None]
                    if gw is not None:
                        at = time.time()
                        os.kill(gw, signal.SIGTERM)
                        faults.append({"kind": "gateway restart (SIGTERM)", "at": at, "pid": gw})
                print(f"soak: {faults[-1]['kind']} at {faults[-1]['at'] - t0:.0f} s", flush=True)
            elif now >= next_kill and (args.max_kills is None or kills < args.max_kills):
                pids = role_pids(up.pid, "worker")
                busy = [p for p in pids if p in holders(client)]
                if pids:
                    victim = rng.choice(busy or pids)
                    at = time.time()
                    os.kill(victim, signal.SIGKILL)
                    kills += 1
                    faults.append({"kind": "worker kill -9", "at": at, "pid": victim, "held_requests": bool(busy)})
                    print(f"soak: killed worker {victim} at {at - t0:.0f} s", flush=True)
                next_kill = time.time() + rng.uniform(*args.kill_every)
                for when, _kind in plan:       # keep kills apart from the other faults, so each stall has one cause
                    if abs(next_kill - when) < SPACING_S:
                        next_kill = when + SPACING_S
            time.sleep(0.2)
        mem_end = memory({"redis": server.proc.pid, "dex up": up.pid, "locust": locust.pid}, up.pid)
        try:
            locust_rc = locust.wait(duration + args.request_timeout + 120)
        except subprocess.TimeoutExpired:
            locust.kill()
            locust_rc = "killed"
        rows = [json.loads(l) for l in results.read_text().splitlines() if l.strip()]
        for f in faults:
            f["at_s"] = round(f["at"] - t0, 1)
        res = analyse(rows, faults, min((f["at"] for f in faults), default=None), end)
        report = {"what": "soak under faults: locust gRPC streams against dex up, every stream checked against ar",
                  "minutes": args.minutes, "workers": args.workers, "users": args.users,
                  "max_new_tokens": args.max_new_tokens, "cases": len(cases), "engine_args": args.engine_args,
                  "kill_every_s": list(args.kill_every), "warm_up_s": warm_s, "cpus": os.cpu_count(),
                  "locust_exit": locust_rc, "run_dir": str(run_dir), "faults": faults, "results": res,
                  "memory": {"start": mem_start, "end": mem_end}}
    finally:
        if locust is not None and locust.poll() is None:
            locust.send_signal(signal.SIGINT)
            try:
                locust.wait(30)
            except subprocess.TimeoutExpired:
                locust.kill()
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(90)
        except subprocess.TimeoutExpired:
            up.kill()
        client.close()
        server.stop()
    print(table(report), flush=True)
    print(json.dumps(report), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    res = report["results"]
    return 0 if res["completed"] > 0 and res["lost"] == 0 and res["spliced"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
