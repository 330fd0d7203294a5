"""`python -m dexserve.worker ...` — the same as `dex worker ...`."""

import argparse
import sys

from dexserve.worker.config import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m dexserve.worker")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
