"""`dex`: one entry point; each subcommand lives in `dexserve.commands.<name>`.

A command module exposes `add_arguments(parser)` and `run(args) -> int`; it is
imported only when chosen, so `dex generate` does not pay for gRPC or Redis.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "generate": "Generate text, locally with the engine or from a running service (--server).",
    "bench": "Compare ar, every select:J, dex and the EAD oracle on the same prompts.",
    "up": "Start Redis, the gateway and N workers on this machine.",
    "gateway": "Run the gRPC gateway.",
    "worker": "Run one worker process.",
}


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """Every command is listed; only the chosen one's module is imported."""
    parser = argparse.ArgumentParser(prog="dex", description="dexserve: lossless depth-exploration decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"dexserve.commands.{name}")
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen).parse_args(argv)
    sys.exit(args._module.run(args))


if __name__ == "__main__":
    main()
