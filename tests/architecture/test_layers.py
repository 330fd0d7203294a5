"""The dependency direction worker/ → service/ → proto/, checked by import-linter.

The `dexserve` namespace is split over three folders; import-linter reads one
package tree, so the tests give it a merged tree of symlinks to the real
files (nothing is copied, so what it checks is the code itself).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("proto", "service", "worker")
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")


def merged_tree(out: Path) -> Path:
    for folder in FOLDERS:
        base = ROOT / folder
        for f in (base / "dexserve").rglob("*.py"):
            dst = out / f.relative_to(base)
            dst.parent.mkdir(parents=True, exist_ok=True)
            assert not dst.exists(), f"{f.relative_to(ROOT)} exists in two folders"
            dst.symlink_to(f)
    return out


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_import_contracts_hold(tmp_path):
    res = lint_imports(merged_tree(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    kept = re.findall(r" KEPT$", res.stdout, re.M)
    assert len(kept) >= 4, res.stdout      # every contract in pyproject.toml ran


@pytest.mark.parametrize("module, line, contract", [
    ("gateway/_violation.py", "import dexserve.engine.engine\n", "Layers"),
    ("contract/_violation.py", "import torch\n", "never loads the engine, torch or transformers"),
    ("engine/lattice_helper.py", "import dexserve.engine.engine\n", "No import cycles inside the engine"),
])
def test_import_contracts_catch_a_violation(tmp_path, module, line, contract):
    """A throwaway violation turns the check red, naming the contract it breaks."""
    tree = merged_tree(tmp_path)
    (tree / "dexserve" / module).write_text(line)
    if module.startswith("engine/"):   # a cycle needs both directions
        engine = tree / "dexserve" / "engine" / "engine.py"
        text = engine.read_text()
        engine.unlink()
        engine.write_text(text + "\nimport dexserve.engine.lattice_helper  # noqa\n")
    res = lint_imports(tree)
    assert res.returncode != 0, res.stdout
    broken = res.stdout.split("Broken contracts", 1)[-1]
    assert contract in " ".join(broken.split()), res.stdout


def test_every_package_is_in_exactly_one_folder_and_packaged():
    """setup.py finds every package of the three folders; none is listed by hand."""
    out = subprocess.run([sys.executable, "-c", "import runpy, setuptools, unittest.mock as m\n"
                          "with m.patch.object(setuptools, 'setup', lambda **kw: print(sorted(kw['package_dir'].items()))):\n"
                          "    runpy.run_path('setup.py')"], cwd=ROOT, capture_output=True, text=True, check=True)
    packaged = dict(eval(out.stdout))
    on_disk = {}
    for folder in FOLDERS:
        for init in (ROOT / folder / "dexserve").rglob("__init__.py"):
            pkg = ".".join(init.parent.relative_to(ROOT / folder).parts)
            assert pkg not in on_disk, f"{pkg} in {on_disk.get(pkg)} and {folder}"
            on_disk[pkg] = f"{folder}/{pkg.replace('.', '/')}"
    assert packaged == on_disk


def test_readme_layout_table_matches_the_tree():
    """Every package path the README's layout table names exists, and every
    package of the tree is named there."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| where | what |"):]
    table = table[:table.index("\n\n")]
    named = set(re.findall(r"`((?:proto|service|worker)/[\w/]+?)/?`", table))
    for path in named:
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
    for folder in FOLDERS:
        for init in (ROOT / folder / "dexserve").glob("*/__init__.py"):
            rel = str(init.parent.relative_to(ROOT))
            assert rel in named, f"README's layout table does not name {rel}"


def test_gateway_image_carries_no_engine():
    text = (ROOT / "deploy" / "docker" / "gateway.Dockerfile").read_text()
    copies = re.findall(r"^COPY\s+(\S+)", text, re.M)
    assert "worker/" not in copies and "service/" in copies and "proto/" in copies
    assert "torch" not in re.sub(r"#.*", "", text)
    worker = (ROOT / "deploy" / "docker" / "worker.Dockerfile").read_text()
    assert "['optional-dependencies']['engine']" in worker and "COPY worker/ worker/" in worker
