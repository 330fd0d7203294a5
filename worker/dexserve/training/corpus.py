"""The shipped model's corpus: the Python standard library's own source.

Every machine with CPython has it, so the model can be retrained anywhere
without a download. Files are split into train and held-out by a hash of
their path relative to the stdlib root, so the split does not depend on
where Python is installed and held-out files are never seen in training.
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELDOUT_MODULUS = 20  # 1 file in 20 is held out


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    digest = hashlib.sha1(relpath.encode()).digest()
    return int.from_bytes(digest[:4], "big") % HELDOUT_MODULUS == 0


def stdlib_files(root: Path | None = None) -> list[SourceFile]:
    """All stdlib .py files (site-packages excluded), sorted by path."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or "/site-packages/" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            files.append(SourceFile(rel, text))
    return files


def split(files: list[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    train = [f for f in files if not is_heldout(f.relpath)]
    heldout = [f for f in files if is_heldout(f.relpath)]
    return train, heldout


def heldout_prompts(heldout: list[SourceFile], count: int, seed: int = 0,
                    lines: int = 6, max_chars: int = 400) -> list[dict]:
    """Code prompts cut from held-out files: a few consecutive non-blank lines
    starting at a `def`/`class`/statement line, the way a code model is prompted."""
    rng = random.Random(seed)
    candidates = [f for f in heldout if len(f.text.splitlines()) > lines + 2]
    prompts: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(prompts) < count and attempts < count * 50:
        attempts += 1
        f = rng.choice(candidates)
        src = f.text.splitlines()
        starts = [i for i, ln in enumerate(src[:-lines])
                  if ln.lstrip().startswith(("def ", "class ", "for ", "if ", "with ", "return "))]
        if not starts:
            continue
        i = rng.choice(starts)
        chunk = "\n".join(src[i:i + lines]) + "\n"
        if len(chunk) > max_chars or len(chunk.strip()) < 40 or chunk in seen:
            continue
        seen.add(chunk)
        prompts.append({"id": f"{f.relpath}:{i + 1}", "prompt": chunk})
    return prompts


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
