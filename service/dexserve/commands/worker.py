"""`dex worker`: one worker process (flags in dexserve.worker.config)."""

from dexserve.worker.config import add_arguments, run

__all__ = ["add_arguments", "run"]
