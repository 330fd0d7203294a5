"""The worker process: queue entries in, engine rounds, token events out.

`loop.Worker` is the loop, `engines.make_engine` picks the engine (`dex` or
the `standin`, both `dexserve.contract.engine.Engine`), `settings.WorkerSettings`
is the process's one settings object, and `dexserve.contract.observer.WorkerObserver`
is where metrics and tracing hook in. Run it with
`dex worker` (flags: `dexserve.launch.worker`).
"""
