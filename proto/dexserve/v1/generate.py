"""Regenerate the stubs next to dex.proto: `python -m dexserve.v1.generate`.

The one command that produces dex_pb2.py, dex_pb2.pyi and dex_pb2_grpc.py.
Run with `-I proto` so generated imports read `from dexserve.v1 import dex_pb2`,
matching the installed package layout. `--out DIR` writes elsewhere (the
staleness test compares a fresh generation with the committed files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2]   # .../proto
PROTO_FILE = "dexserve/v1/dex.proto"
STUBS = ("dex_pb2.py", "dex_pb2.pyi", "dex_pb2_grpc.py")


def generate(out_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc; return the generated stub paths."""
    import grpc_tools
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}",
        f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}",
        str(PROTO_ROOT / PROTO_FILE),
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return [out_root / "dexserve" / "v1" / name for name in STUBS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="root to write dexserve/v1/*_pb2* under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
