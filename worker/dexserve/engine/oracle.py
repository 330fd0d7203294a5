"""The EAD oracle (DEX.md, "Cost model"), computed from an `ar` run's records.

In `ar` mode every anchor runs all K segments, and each row record carries the
top candidate read out at the boundary the row reached. A token's Earliest
Available Depth is the first boundary whose readout (of its predecessor)
equals it. With perfect foresight a commit then comes EAD rounds after the
previous one (K for the first commit and for tokens no boundary saw).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from dexserve.contract.records import FALLBACK, RoundRecord
from dexserve.engine.stats import CommitTally


@dataclass
class OracleResult(CommitTally):
    # per boundary j: commits whose token the readout at j (of its predecessor) already equalled
    hits: dict[int, int] = field(default_factory=dict)

    def add(self, other: "OracleResult") -> None:
        self.rounds += other.rounds
        self.commits += other.commits
        for b, n in other.by_boundary.items():
            self.by_boundary[b] = self.by_boundary.get(b, 0) + n
        for b, n in other.hits.items():
            self.hits[b] = self.hits.get(b, 0) + n

    @property
    def agreement(self) -> dict[str, float]:
        """Per boundary: the share of committed tokens its top-1 readout matched (free-running, greedy)."""
        return {str(j): round(self.hits.get(j, 0) / self.commits, 4) if self.commits else 0.0
                for j in range(1, self.explorers)}


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
        for j in range(1, explorers):
            if seen.get(j) == token:
                result.hits[j] = result.hits.get(j, 0) + 1
        result.commits += 1
        if i == 0:
            result.rounds += explorers      # the first token climbs the whole stack
        prev_cost = explorers if ead == FALLBACK else ead
        result.by_boundary[ead] = result.by_boundary.get(ead, 0) + 1
        if i + 1 < len(commits):
            result.rounds += prev_cost      # the next commit comes EAD rounds later
    return result
