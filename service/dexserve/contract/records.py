"""The FSM record: what one lattice round did (DEX.md, "The FSM record").

The lattice emits one `RoundRecord` per round. It is the single source for
the token publisher, the OpenTelemetry events, the Prometheus metrics and
`dex bench`: nothing downstream recomputes what is in here.
"""

from __future__ import annotations

from dataclasses import dataclass

FALLBACK = 0  # `boundary` of a node started fresh after a miss (no boundary proposed it)


@dataclass(frozen=True)
class RowRecord:
    """One node run by one explorer in this round."""

    request_id: str
    node: int
    position: int
    slot: int
    readout: int    # top candidate at the boundary it reached (the final token at depth K)


@dataclass(frozen=True)
class SpawnRecord:
    request_id: str
    parent: int
    node: int
    position: int   # the child's position
    token: int
    boundary: int   # 1..K-1: the boundary whose readout proposed it


@dataclass(frozen=True)
class CommitRecord:
    """A final-depth token. `boundary` is the boundary the node now carrying
    that token was spawned from, FALLBACK (0) if none carried it."""

    request_id: str
    position: int   # position of the committed token in the sequence
    token: int
    boundary: int
    node: int       # the node that becomes the anchor (carries `token`)


@dataclass(frozen=True)
class CollapseRecord:
    request_id: str
    position: int
    kept: int       # nodes in the kept subtree (0 on fallback)
    dropped: int    # nodes dropped with the other children's subtrees


@dataclass(frozen=True)
class RoundRecord:
    round: int
    explorers: tuple[tuple[RowRecord, ...], ...]  # per explorer 1..K, the nodes it ran
    spawns: tuple[SpawnRecord, ...]
    commits: tuple[CommitRecord, ...]
    collapses: tuple[CollapseRecord, ...]
    wasted_node_segments: int   # segments that had been computed on the nodes dropped this round
    live_nodes: int             # lattice occupancy after the round
    seconds: float = 0.0        # wall time of the executor's part of the round
    lattice_seconds: float = 0.0  # wall time of plan + absorb (the state machine)

    @property
    def node_segments(self) -> int:
        return sum(len(rows) for rows in self.explorers)
