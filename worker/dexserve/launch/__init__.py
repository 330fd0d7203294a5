"""The `dex` subcommands that run or start engines: generate, bench, worker, up.

They are the CLI edge of the worker side: flags and environment become typed
settings here (`EngineConfig`, `WorkerSettings`) and nowhere else. They are
registered with the `dex` entry point through the `dexserve.commands` entry
point group (pyproject.toml), so the service-side CLI never imports them by name.
"""
