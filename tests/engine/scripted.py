"""A scripted "model" for testing the lattice alone.

The next token after (token, position) is a fixed hash: like a real model, a
wrong branch has continuations of its own. Boundary j's readout ranks the
true next token at a rank drawn from another hash, so acceptance varies by
boundary and by node. No tensors anywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from dexserve.engine.lattice import Lattice, Plan, Readout


def _h(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class ScriptedModel:
    explorers: int
    vocab: int = 50
    seed: int = 0
    accept: tuple[float, ...] = ()   # P(top-1 at boundary j is right), j = 1..K-1
    candidates: int = 3

    def next_token(self, token: int, position: int) -> int:
        return _h(self.seed, "final", token, position) % self.vocab

    def readout(self, token: int, position: int, depth: int) -> tuple[int, ...]:
        y = self.next_token(token, position)
        if depth == self.explorers:
            return (y,)
        p = self.accept[depth - 1] if self.accept else 0.5
        u = (_h(self.seed, "rank", token, position, depth) % 10_000) / 10_000
        wrong = [t for t in ((_h(self.seed, "w", token, position, depth, i) % self.vocab) for i in range(8)) if t != y]
        wrong = list(dict.fromkeys(wrong))[: self.candidates]
        if u < p:
            return tuple([y] + wrong)[: self.candidates]
        rank = 1 + (_h(self.seed, "r2", token, position, depth) % (self.candidates + 1))
        ranked = wrong[:]
        if rank < self.candidates:
            ranked.insert(rank, y)
        return tuple(ranked[: self.candidates]) or (y,)

    def autoregressive(self, token: int, position: int, count: int) -> list[int]:
        out = []
        for _ in range(count):
            token = self.next_token(token, position)
            position += 1
            out.append(token)
        return out

    def run(self, plan: Plan) -> Readout:
        return Readout(tuple(
            tuple(self.readout(r.token, r.position, depth) for r in rows)
            for depth, rows in enumerate(plan.rows, start=1)))


def drive(lattice: Lattice, model: ScriptedModel, want: dict[str, int], check=True, max_rounds: int = 10_000):
    """Run rounds until each request has `want[id]` commits; returns (commits per request, records)."""
    got: dict[str, list[int]] = {rid: [] for rid in want}
    records = []
    for _ in range(max_rounds):
        if all(len(got[r]) >= want[r] for r in want):
            break
        plan = lattice.plan()
        for rows, width in zip(plan.rows, lattice.config.widths):
            assert len(rows) <= width
        rec = lattice.absorb(model.run(plan))
        records.append(rec)
        if check:
            lattice.check_invariants()
        for c in rec.commits:
            got[c.request_id].append(c.token)
            if len(got[c.request_id]) >= want[c.request_id]:
                lattice.remove_request(c.request_id)
    else:
        raise AssertionError("lattice made no progress")
    return got, records
