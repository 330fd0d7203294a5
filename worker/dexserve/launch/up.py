"""`dex up`: Redis (private, unless REDIS_URL is set), the gateway and N workers on this machine.

The gateway serves gRPC (--port, 50051) and the OpenAI-compatible HTTP door
(--http-port, 8000; 0 turns it off) on --host (127.0.0.1).

Each part is its own process started with the same flags a deployment would
use (`dex gateway`, `dex worker`), so `dex up` exercises the real service.
With --max-workers above --min-workers it scales workers on consumer-group lag
(entries after the group's last-delivered-id; see dexserve.queue.lag), the
signal the Helm chart's KEDA trigger reads: every --scale-interval seconds it
adds one worker while lag > 0, and removes one after lag has stayed 0 for
--scale-down-after seconds (a cooldown, like KEDA's) -- only a worker that
holds no request (XPENDING per consumer), so busy workers are never
interrupted; the removed one gets SIGTERM and drains anyway (finishes or
hands back whatever it took in between). Each change prints a line
`autoscale: workers=N lag=L (up|down|replace)` on stdout.
Without autoscaling, `dex up` keeps --workers workers running: one that dies
(kill -9, a crash) is replaced, printing `supervise: worker pid P exited (CODE);
started pid Q` (a worker that keeps dying at start is restarted with backoff,
RESTART_BACKOFF_S). A gateway that was stopped (SIGTERM: it drains, clients resume
elsewhere) or killed is restarted on the same addresses, printing `supervise: gateway
pid P exited (CODE); started pid Q`; one that exits with an error of its own (a bad
flag, a model the workers do not serve) ends `dex up` with 1.
A Redis outage does not stop the autoscaler: it skips
scaling decisions until Redis answers (workers reconnect by themselves).
Ctrl-C / SIGTERM stops workers first (they finish or hand back), then the
gateway, then Redis.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dexserve.commands.options import (add_http_arguments, add_queue_arguments, http_flags, limit_flags, queue_flags,
                                       queue_from_args)
from dexserve.launch.worker import engine_flags

SCALE_PERIOD_S = 2.0          # default --scale-interval
SCALE_DOWN_AFTER_S = 30.0     # default --scale-down-after
RESTART_BACKOFF_S = (1.0, 30.0)   # first and largest delay before replacing a worker that died young
RESTART_HEALTHY_S = 30.0          # a worker that lived this long resets the backoff


HELP = "Start Redis, the gateway and N workers on this machine."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dexserve.launch.worker import add_engine_arguments

    parser.add_argument("--host", default=os.environ.get("DEX_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEX_PORT", 50051)), help="gRPC port")
    add_http_arguments(parser)
    parser.add_argument("--workers", type=int, default=1, help="workers to start")
    parser.add_argument("--min-workers", type=int, default=None, help="autoscale floor (default: --workers)")
    parser.add_argument("--max-workers", type=int, default=None, help="autoscale ceiling (default: --workers)")
    parser.add_argument("--scale-interval", type=float,
                        default=float(os.environ.get("DEX_SCALE_INTERVAL_S", SCALE_PERIOD_S)),
                        help="seconds between autoscale checks (env DEX_SCALE_INTERVAL_S)")
    parser.add_argument("--scale-down-after", type=float,
                        default=float(os.environ.get("DEX_SCALE_DOWN_AFTER_S", SCALE_DOWN_AFTER_S)),
                        help="seconds of zero lag before removing a worker (env DEX_SCALE_DOWN_AFTER_S)")
    parser.add_argument("--data-dir", default=None, help="private Redis data dir (default: a temp dir)")
    parser.add_argument("--auth-token", default=os.environ.get("DEX_AUTH_TOKEN") or None)
    add_engine_arguments(parser)
    add_queue_arguments(parser)
    parser.set_defaults(redis_url=os.environ.get("REDIS_URL"))  # None here means: start a private Redis


class Stack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.redis = None
        self.gateway: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.draining: list[subprocess.Popen] = []   # removed by the autoscaler, still finishing their requests
        self.stopping = False
        self._started: dict[int, float] = {}          # worker pid -> monotonic start time
        self._restart_delay = RESTART_BACKOFF_S[0]
        self._next_restart = 0.0

    def start(self, n_workers: int | None = None) -> None:
        args = self.args
        if not args.redis_url:
            from dexserve.queue.embedded import EmbeddedRedis

            data = Path(args.data_dir or tempfile.mkdtemp(prefix="dex-redis-"))
            self.redis = EmbeddedRedis(data).start()
            args.redis_url = self.redis.url
            print(f"redis     {self.redis.url} (pid {self.redis.proc.pid}, data {data})", flush=True)
        gw_cmd = [sys.executable, "-m", "dexserve.cli", "gateway", "--host", args.host, "--port", str(args.port),
                  *http_flags(args), *limit_flags(args), *queue_flags(args)]
        if args.model:
            gw_cmd += ["--model", args.model]
        env = dict(os.environ)
        if args.auth_token:
            env["DEX_AUTH_TOKEN"] = args.auth_token
        self._gateway_cmd, self._gateway_env = gw_cmd, env
        self.gateway = subprocess.Popen(gw_cmd, env=env)
        for _ in range(args.workers if n_workers is None else n_workers):
            self.add_worker()

    def add_worker(self) -> None:
        cmd = [sys.executable, "-m", "dexserve.cli", "worker", *engine_flags(self.args), *queue_flags(self.args)]
        proc = subprocess.Popen(cmd)
        self.workers.append(proc)
        self._started[proc.pid] = time.monotonic()

    def reap(self) -> int:
        """Forget workers that exited (printing each one); returns how many died since the last call.
        A worker that died young delays the next replacement (doubling, RESTART_BACKOFF_S)."""
        now = time.monotonic()
        alive, died = [], 0
        for w in self.workers:
            code = w.poll()
            if code is None:
                alive.append(w)
                continue
            died += 1
            lived = now - self._started.pop(w.pid, now)
            print(f"supervise: worker pid {w.pid} exited ({code}) after {lived:.0f} s", flush=True)
            if lived < RESTART_HEALTHY_S:
                self._next_restart = now + self._restart_delay
                self._restart_delay = min(self._restart_delay * 2, RESTART_BACKOFF_S[1])
            else:
                self._restart_delay = RESTART_BACKOFF_S[0]
        self.workers = alive
        self.draining = [w for w in self.draining if w.poll() is None]   # reaps the finished ones
        return died

    def replace_dead(self, target: int) -> int:
        """Start workers until `target` run (once the restart backoff allows); returns how many started."""
        started = 0
        if self.stopping or time.monotonic() < self._next_restart:
            return 0
        while len(self.workers) < target:
            self.add_worker()
            started += 1
            print(f"supervise: started worker pid {self.workers[-1].pid} ({len(self.workers)}/{target})", flush=True)
        return started

    def remove_worker(self, busy: set[int] = frozenset()) -> bool:
        """SIGTERM the newest worker that holds nothing; False if all are busy.
        It drains (finishes or hands back what it took meanwhile) and is waited for in stop()."""
        idle = [w for w in self.workers if w.pid not in busy]
        if not idle:
            return False
        proc = idle[-1]
        self.workers.remove(proc)
        self._started.pop(proc.pid, None)
        proc.send_signal(signal.SIGTERM)
        self.draining.append(proc)
        return True

    def healthy(self) -> bool:
        """A gateway runs: one stopped by a signal (or cleanly, by SIGTERM) is started again on the same
        addresses (clients reconnect and resume); False when it failed by itself (exit code > 0)."""
        if self.gateway is None:
            return False
        code = self.gateway.poll()
        if code is None:
            return True
        if self.stopping or code > 0:
            return False
        old = self.gateway.pid
        self.gateway = subprocess.Popen(self._gateway_cmd, env=self._gateway_env)
        print(f"supervise: gateway pid {old} exited ({code}); started pid {self.gateway.pid}", flush=True)
        return True

    def autoscale(self, lo: int, hi: int) -> None:
        import redis as redis_sync

        from dexserve.queue.lag import group_lag
        from dexserve.queue.protocol import TRANSIENT

        names, _ = queue_from_args(self.args)
        client = redis_sync.Redis.from_url(self.args.redis_url)
        idle_since = time.monotonic()
        while not self.stopping and self.healthy():
            self.reap()
            try:
                lag = group_lag(client, names)
            except TRANSIENT as exc:   # Redis restarting: no scaling decision, but keep the floor
                print(f"autoscale: redis unavailable ({exc}); holding at {len(self.workers)} workers", flush=True)
                if self.replace_dead(lo):
                    print(f"autoscale: workers={len(self.workers)} lag=? (replace)", flush=True)
                time.sleep(self.args.scale_interval)
                continue
            now = time.monotonic()
            if lag > 0:
                idle_since = now
                if len(self.workers) < hi:
                    self.add_worker()
                    print(f"autoscale: workers={len(self.workers)} lag={lag} (up)", flush=True)
            elif (len(self.workers) > lo and now - idle_since >= self.args.scale_down_after
                  and self.remove_worker(self._busy_pids(client, names))):
                idle_since = now          # one step per cooldown, as KEDA/HPA stabilisation does
                print(f"autoscale: workers={len(self.workers)} lag={lag} (down)", flush=True)
            if self.replace_dead(lo):
                print(f"autoscale: workers={len(self.workers)} lag={lag} (replace)", flush=True)
            time.sleep(self.args.scale_interval)

    @staticmethod
    def _busy_pids(client, names) -> set[int]:
        """PIDs of workers holding entries (consumer name is host-pid, the worker's default)."""
        from dexserve.queue.protocol import GROUP, consumer_host_prefix

        prefix = consumer_host_prefix(socket.gethostname())
        try:
            consumers = client.xpending(names.requests, GROUP).get("consumers") or []
        except Exception:
            return set()
        busy = set()
        for c in consumers:
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if int(c.get("pending", 0)) > 0 and name.startswith(prefix) and name[len(prefix):].isdigit():
                busy.add(int(name[len(prefix):]))
        return busy

    def stop(self) -> None:
        self.stopping = True
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in self.workers + self.draining:
            try:
                w.wait(35)
            except subprocess.TimeoutExpired:
                w.kill()
        if self.gateway and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(10)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
        if self.redis is not None:
            self.redis.stop()


def run(args: argparse.Namespace) -> int:
    lo = args.min_workers if args.min_workers is not None else args.workers
    hi = args.max_workers if args.max_workers is not None else max(args.workers, lo)
    if not 0 <= lo <= hi:
        print(f"dex up: need 0 <= --min-workers ({lo}) <= --max-workers ({hi})", file=sys.stderr)
        return 2
    n_start = min(max(args.workers, lo), hi)
    stack = Stack(args)

    def on_signal(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start(n_start)
        scaling = f" (autoscale {lo}..{hi})" if hi > lo else ""
        http = f" (gRPC) and http://{args.host}:{args.http_port}/v1 (OpenAI HTTP)" if args.http_port else ""
        print(f"dex up: serving on {args.host}:{args.port}{http} with {n_start} worker(s){scaling}; requests queue "
              "until a worker logs 'ready' (its engine loaded); Ctrl-C to stop", flush=True)
        if hi > lo:
            stack.autoscale(lo, hi)
        while stack.healthy():
            stack.reap()
            stack.replace_dead(n_start)
            time.sleep(0.5)
        print("gateway exited", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
