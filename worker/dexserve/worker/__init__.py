"""The worker process: queue entries in, engine rounds, token events out.

`loop.Worker` is the loop, `engines.make_engine` picks the engine (`dex` or
the `standin`), `observer.WorkerObserver` is where metrics and tracing hook in.
Run it with `python -m dexserve.worker` or `dex worker`.
"""
