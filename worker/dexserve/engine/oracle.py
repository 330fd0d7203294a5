"""The EAD oracle (DEX.md, "Cost model"), computed from an `ar` run's records.

In `ar` mode every anchor runs all K segments, and each row record carries the
top candidate read out at the boundary the row reached. A token's Earliest
Available Depth is the first boundary whose readout (of its predecessor)
equals it. With perfect foresight a commit then comes EAD rounds after the
previous one (K for the first commit and for tokens no boundary saw).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from dexserve.contract.records import FALLBACK, RoundRecord
from dexserve.engine.stats import CommitTally


@dataclass
class OracleResult(CommitTally):
    def add(self, other: "OracleResult") -> None:
        self.rounds += other.rounds
        self.commits += other.commits
        for b, n in other.by_boundary.items():
            self.by_boundary[b] = self.by_boundary.get(b, 0) + n


def ead_oracle(records: Iterable[RoundRecord], explorers: int) -> OracleResult:
    """Oracle rounds for one request decoded alone in `ar` mode."""
    readouts: dict[int, dict[int, int]] = defaultdict(dict)  # position -> depth -> top candidate
    commits: list[tuple[int, int]] = []                      # (position, token) in commit order
    for rec in records:
        for depth, rows in enumerate(rec.explorers, start=1):
            for row in rows:
                readouts[row.position][depth] = row.readout
        for c in rec.commits:
            commits.append((c.position, c.token))
    result = OracleResult(explorers)
    for i, (position, token) in enumerate(commits):
        seen = readouts[position - 1]
        ead = next((j for j in range(1, explorers) if seen.get(j) == token), FALLBACK)
        result.commits += 1
        if i == 0:
            result.rounds += explorers      # the first token climbs the whole stack
        prev_cost = explorers if ead == FALLBACK else ead
        result.by_boundary[ead] = result.by_boundary.get(ead, 0) + 1
        if i + 1 < len(commits):
            result.rounds += prev_cost      # the next commit comes EAD rounds later
    return result
