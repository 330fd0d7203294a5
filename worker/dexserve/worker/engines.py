"""Which engine a worker runs: `dex` (the real one) or `standin`.

Both satisfy `dexserve.contract.engine.Engine`; the worker loop and its
telemetry see only that protocol. The stand-in never imports torch.
"""

from __future__ import annotations

from dexserve.contract.engine import Engine
from dexserve.engine.config import AUTO_BATCH_CAP
from dexserve.worker.settings import WorkerSettings


def make_engine(settings: WorkerSettings) -> Engine:
    if settings.engine == "standin":
        from dexserve.worker.standin import InstantEngine

        cfg = settings.engine_config
        # no KV to budget: an auto batch is a CPU worker's
        return InstantEngine.load(settings.model, cfg.limits, max_batch=cfg.max_batch or AUTO_BATCH_CAP["cpu"],
                                  step_delay_s=settings.standin.delay_s, poison=settings.standin.poison,
                                  logprobs=settings.standin.logprobs)
    if settings.engine == "dex":
        from dexserve.engine.engine import DexEngine

        return DexEngine.load(settings.model, settings.engine_config)
    raise ValueError(f"unknown engine {settings.engine!r} (dex | standin)")
