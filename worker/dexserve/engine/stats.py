"""Run statistics folded from round records (never recomputed elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dexserve.contract.records import FALLBACK, RoundRecord


def rounds_per_token(rounds: int, commits: int) -> float | None:
    return round(rounds / commits, 4) if commits else None


def acceptance_histogram(by_boundary: dict[int, int], explorers: int) -> dict[str, int]:
    """Commits by the boundary their node was spawned at, `fallback` for none."""
    hist = {str(b): by_boundary.get(b, 0) for b in range(1, explorers)}
    hist["fallback"] = by_boundary.get(FALLBACK, 0)
    return hist


@dataclass
class CommitTally:
    """Rounds, commits and the boundary each commit came from: what RPT and the
    acceptance histogram are made of (for a real run or for the EAD oracle)."""

    explorers: int
    rounds: int = 0
    commits: int = 0
    by_boundary: dict[int, int] = field(default_factory=dict)

    @property
    def rpt(self) -> float | None:
        """Rounds per committed token (meaningful for one request at a time)."""
        return rounds_per_token(self.rounds, self.commits)

    @property
    def accept_hist(self) -> dict[str, int]:
        return acceptance_histogram(self.by_boundary, self.explorers)


@dataclass
class RunStats(CommitTally):
    fallbacks: int = 0
    node_segments: int = 0
    wasted_node_segments: int = 0
    spawns: int = 0
    occupancy_sum: int = 0
    seconds: float = 0.0
    lattice_seconds: float = 0.0
    prefill_seconds: float = 0.0   # prompt prefill (the engine adds it: it is not part of a round)

    def observe(self, rec: RoundRecord) -> None:
        self.rounds += 1
        self.commits += len(rec.commits)
        self.node_segments += rec.node_segments
        self.wasted_node_segments += rec.wasted_node_segments
        self.spawns += len(rec.spawns)
        self.occupancy_sum += rec.live_nodes
        self.seconds += rec.seconds
        self.lattice_seconds += rec.lattice_seconds
        for c in rec.commits:
            self.by_boundary[c.boundary] = self.by_boundary.get(c.boundary, 0) + 1
            if c.boundary == FALLBACK:
                self.fallbacks += 1

    @property
    def fallback_rate(self) -> float | None:
        return round(self.fallbacks / self.commits, 4) if self.commits else None

    @property
    def mean_occupancy(self) -> float | None:
        return round(self.occupancy_sum / self.rounds, 3) if self.rounds else None

    @property
    def seconds_per_round(self) -> float | None:
        return self.seconds / self.rounds if self.rounds else None
