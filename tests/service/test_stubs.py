"""The committed stubs are exactly what `python -m dexserve.v1.generate` produces."""

from pathlib import Path

from dexserve.v1 import generate


def test_committed_stubs_are_fresh(tmp_path):
    fresh = generate.generate(tmp_path)
    committed = Path(generate.__file__).parent
    stale = [p.name for p in fresh if p.read_bytes() != (committed / p.name).read_bytes()]
    assert not stale, f"stale stubs {stale}: run `make proto` (python -m dexserve.v1.generate)"
