"""`dex`: one entry point; its subcommands are registered, not imported by name.

Each subcommand is a module named in the `dexserve.commands` entry-point group
(pyproject.toml) that exposes `HELP`, `add_arguments(parser)` and
`run(args) -> int`. The gateway's command lives in the service layer
(`dexserve.commands.gateway`); the engine's (`generate`, `bench`, `worker`,
`up`) live with the worker (`dexserve.launch.*`), so this module never imports
upward. In an install without the engine (the gateway image) those modules are
absent and their commands say how to get them. Command modules keep their
heavy imports (torch, grpc, redis) inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points
from types import ModuleType

GROUP = "dexserve.commands"


def commands() -> dict[str, str]:
    """name → module, in the order the entry points list them."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


class _Missing:
    """A registered command whose module is not installed here."""

    def __init__(self, name: str, exc: ImportError) -> None:
        self.HELP = f"(not installed here: {exc.name or exc})"
        self.name, self.exc = name, exc

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("rest", nargs=argparse.REMAINDER)

    def run(self, args: argparse.Namespace) -> int:
        print(f"dex {self.name}: needs the engine install, which this environment lacks ({self.exc}); "
              "install it with: pip install 'dexserve[engine]'", file=sys.stderr)
        return 2


def _load(name: str, module: str) -> ModuleType | _Missing:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".") or exc.name in ("torch",)):
            return _Missing(name, exc)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dex", description="dexserve: lossless depth-exploration decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    registered = commands()
    if not registered:
        raise SystemExit("dex: no commands are registered (is dexserve installed? pip install -e .)")
    for name, module in registered.items():
        cmd = _load(name, module)
        p = sub.add_parser(name, help=cmd.HELP, description=cmd.HELP)
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    sys.exit(args._command.run(args))


if __name__ == "__main__":
    main()
