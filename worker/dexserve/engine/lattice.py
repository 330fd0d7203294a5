"""The exploration lattice: DEX's state machine (DEX.md, "One round").

Pure Python: nodes, spawn, commit, collapse and slots. It knows nothing of
tensors, queues or RPCs. Each round it emits a `Plan` (which node runs on which
explorer, in which buffer slot, seeing which ancestors; which finished nodes
to retire into the committed context), and after the explorers ran it
absorbs their `Readout` (expand, commit, collapse) and returns the
`RoundRecord`: a round is `plan()`, the explorers' run, then `absorb()`.

Decisions it makes, and why:
- Only the final-depth token of the anchor is ever committed; a speculative
  node only changes *when* a token is committed, never *which* (lossless).
- Causal: a node runs segment k only after its parent finished segment k in an
  earlier round, and one exactly a segment behind its parent runs only in a
  round where the parent runs too, so an ancestor is always at least one
  segment ahead. A node that cannot run waits; nothing is recomputed.
- When capacity is short (W rows per explorer, N slots), the spawn policy
  decides. `priority` ranks nodes by the estimated chance that they lie on the
  committed path: the product, along the path from the anchor, of each
  child's chance given its parent. That chance is learned online from the
  commits per (depth of the parent's deepest readout, rank of the child's
  token in it): a first guess that deeper boundaries confirm rises, one they
  disown falls, and a DECS second guess is worth what second guesses at that
  depth turned out to be worth. Anchors always come first (their chance is 1),
  ties go to the node that waited longest. Budget-aware spawning: a round's
  proposals are placed most valuable first, and a DECS second guess is
  declined when the first explorer's W rows are held by likelier nodes (with
  rows to spare it is always taken). `oldest` runs nodes in creation order,
  never evicts and never declines (the baseline the DEX note warns about).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Iterable, Literal

from dexserve.contract.records import (FALLBACK, CollapseRecord, CommitRecord, RoundRecord, RowRecord,
                                     SpawnRecord)

Policy = Literal["priority", "oldest"]


class LatticeError(RuntimeError):
    """An invariant broke: always a bug, never a fallback."""


@dataclass(frozen=True)
class LatticeConfig:
    explorers: int                      # K
    widths: tuple[int, ...]             # W per explorer (rows per round)
    slots: int                          # N lattice slots (KV + hidden), shared by all requests
    spawn_boundaries: frozenset[int]    # boundaries allowed to spawn: {} = ar, {J} = select:J, 1..K-1 = dex
    decs: bool = True
    policy: Policy = "priority"
    max_context: int = 1 << 30          # no node at or past this position

    def __post_init__(self) -> None:
        if self.explorers < 1:
            raise ValueError("explorers must be >= 1")
        if len(self.widths) != self.explorers or min(self.widths) < 1:
            raise ValueError(f"widths must be {self.explorers} values >= 1, got {self.widths}")
        if self.slots < 1:
            raise ValueError("slots must be >= 1")
        bad = [b for b in self.spawn_boundaries if not 1 <= b < self.explorers]
        if bad:
            raise ValueError(f"spawn boundaries {bad} outside 1..{self.explorers - 1}")


@dataclass(eq=False)
class Node:
    id: int
    request: "RequestLattice"
    token: int
    position: int
    parent: "Node | None"
    boundary: int              # boundary that spawned it; FALLBACK for roots and fallbacks
    slot: int
    created: int               # round it was created in
    done: int = 0              # segments finished
    children: dict[int, "Node"] = field(default_factory=dict)
    proposed: set[int] = field(default_factory=set)   # tokens its boundaries spawned as children (DECS)
    readouts: list[tuple[int, ...]] = field(default_factory=list)  # ranked candidates at depths 1..done
    last_run: int = -1
    alive: bool = True

    def subtree(self) -> Iterable["Node"]:
        stack = [self]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())


@dataclass(eq=False)
class RequestLattice:
    request_id: str
    index: int          # row of the committed-context buffer (0..R-1)
    anchor: Node | None = None


@dataclass(frozen=True)
class PlanRow:
    node: int
    request_id: str
    request_index: int
    token: int
    position: int
    slot: int
    ctx_len: int                  # committed positions [0, ctx_len) are in the context buffer
    ancestor_slots: tuple[int, ...]  # lattice slots of its uncommitted ancestors, anchor first, then itself


@dataclass(frozen=True)
class Retire:
    slot: int
    request_index: int
    position: int


@dataclass(frozen=True)
class Plan:
    round: int
    rows: tuple[tuple[PlanRow, ...], ...]   # per explorer
    retire: tuple[Retire, ...]              # copy these slots to the context before running


@dataclass(frozen=True)
class Readout:
    """Per explorer, per planned row: candidate tokens ranked best first."""

    candidates: tuple[tuple[tuple[int, ...], ...], ...]


class AcceptanceModel:
    """Online estimate of P(the token committed after node n is t), from n's
    deepest readout so far: by that readout's depth d (1..K-1) and the rank r
    of t in it (0 = the top-1 "first guess", 1 = the next distinct token, the
    DECS "second guess", ...; `miss` = t is not among the ranked candidates).

    Learned online from the commits: when an anchor commits y, each of its
    readouts (one per depth) scores every rank it lists (hit iff that
    candidate is y), and each child token missing from a readout scores the
    `miss` bucket of that depth. A child whose token is confirmed by a deeper
    readout of its parent rises to that depth's first-guess rate; one the
    deeper readout disowns falls.
    """

    def __init__(self, explorers: int, ranks: int | None = None, prior_total: float = 2.0) -> None:
        self.ranks = max(2, ranks if ranks is not None else explorers - 1)
        self.miss = self.ranks                       # bucket index for "not in the readout"
        rows = explorers + 1
        # priors: top-1 1/2, rank r 1/(2(r+1)), miss 1/20: weak, overridden after a few commits
        self.hits = [[prior_total / (2 * (r + 1)) for r in range(self.ranks)] + [prior_total / 20]
                     for _ in range(rows)]
        self.total = [[prior_total] * (self.ranks + 1) for _ in range(rows)]

    def rank(self, readout: tuple[int, ...], token: int) -> int:
        for r, t in enumerate(readout[: self.ranks]):
            if t == token:
                return r
        return self.miss

    def rate(self, depth: int, rank: int) -> float:
        return self.hits[depth][rank] / self.total[depth][rank]

    def observe(self, depth: int, rank: int, hit: bool) -> None:
        self.total[depth][rank] += 1
        self.hits[depth][rank] += 1 if hit else 0

    def observe_commit(self, node: "Node", token: int) -> None:
        """`node` finished every segment and its final-depth token is `token`."""
        for depth, readout in enumerate(node.readouts, start=1):
            for r, t in enumerate(readout[: self.ranks]):
                self.observe(depth, r, t == token)
            for child in node.children:
                if child not in readout[: self.ranks]:
                    self.observe(depth, self.miss, child == token)

    def child_rate(self, parent: "Node", token: int) -> float:
        """P(token is the token committed after `parent`), from parent's deepest readout."""
        if not parent.readouts:
            return self.rate(0, self.miss)
        readout = parent.readouts[-1]
        return self.rate(len(parent.readouts), self.rank(readout, token))


class _RowBudget:
    """The W rows of the first explorer as the spawn policy sees them: the
    scores of the W most likely nodes due at segment 1."""

    def __init__(self, width: int, scores: Iterable[float]) -> None:
        self.width = width
        self.top: list[float] = []
        for s in scores:
            self.add(s)

    def add(self, score: float) -> None:
        if len(self.top) < self.width:
            heapq.heappush(self.top, score)
        elif score > self.top[0]:
            heapq.heapreplace(self.top, score)

    def has_room(self, score: float) -> bool:
        """Would a node of this score get one of the W rows?"""
        return len(self.top) < self.width or score > self.top[0]


class Lattice:
    def __init__(self, config: LatticeConfig) -> None:
        self.config = config
        self.requests: dict[str, RequestLattice] = {}
        self.free_slots: list[int] = list(range(config.slots - 1, -1, -1))
        # slots spawning leaves free for requests about to join (their anchors): set by the
        # owner to the requests admitted but not yet added (their prompts still prefilling)
        self.reserved = 0
        self.nodes: dict[int, Node] = {}
        self.round = 0
        self._next_id = 0
        self._pending_retire: list[Retire] = []
        self._plan: Plan | None = None
        self.acceptance = AcceptanceModel(config.explorers)

    # ---- requests -------------------------------------------------------
    def add_request(self, request_id: str, index: int, token: int, position: int) -> None:
        """Start a request whose last prompt token is `token` at `position`;
        positions before it must already be in the context (prefilled)."""
        if request_id in self.requests:
            raise LatticeError(f"request {request_id} already in the lattice")
        if not self.free_slots:
            raise LatticeError("no free lattice slot for a new request")
        req = RequestLattice(request_id, index)
        req.anchor = self._new_node(req, token, position, None, FALLBACK)
        self.requests[request_id] = req

    def can_add(self) -> bool:
        """Is there a slot for a new request's anchor? (`reserved` keeps spawning from
        taking the last ones; a request that finds none waits a round, when commits
        have retired slots.)"""
        return bool(self.free_slots)

    def remove_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id)
        if req.anchor is not None:
            self._drop(req.anchor)
        self._pending_retire = [r for r in self._pending_retire if r.request_index != req.index]

    @property
    def live_nodes(self) -> int:
        return len(self.nodes)

    # ---- one round: plan, (explorers run), absorb -----------------------
    #
    # A round has two phases with one boundary between them:
    #
    #   plan()          -> Plan         which node runs where (scheduling)
    #   [explorers run the Plan]
    #   absorb(Readout) -> RoundRecord  expand, commit, collapse (the state change)
    #
    # `plan` only reads the lattice and writes nothing but the issued plan, so
    # everything it decides is a function of the state `absorb` left behind;
    # `absorb` only consumes the plan it is given back and the readouts. That
    # is the seam where planning of round t+1 can later be overlapped with the
    # explorers' run of round t.

    def plan(self) -> Plan:
        """The planning phase: choose the rows of the next round.

        Reads: the live nodes (`done`, `parent`, `children`, `last_run`,
        `created`), the learned acceptance model (priority scores) and the
        per-explorer widths. Writes: the issued plan (`_plan`, handed back to
        `absorb`) and hands the pending retires (`_pending_retire`, slots of
        nodes committed by the last `absorb`) to that plan. It mutates no node,
        spawns nothing, commits nothing and learns nothing.
        """
        K = self.config.explorers
        scores = self._scores()
        eligible: list[list[Node]] = [[] for _ in range(K)]
        for n in self.nodes.values():
            if n.done >= K:
                raise LatticeError(f"node {n.id} finished all segments but is still live")
            seg = n.done  # 0-based index of the segment it runs next
            if n.parent is not None and n.parent.alive and n.parent.done <= seg:
                continue  # causal: parent has not finished this segment yet
            eligible[seg].append(n)
        # deepest explorer first: a node whose parent is exactly one segment
        # ahead runs only if its parent runs too, so every ancestor stays at
        # least one segment ahead (with unequal widths a parent can lose its row
        # while its child wins one; the child could not go further anyway)
        rows: list[tuple[PlanRow, ...]] = [()] * K
        running: set[int] = set()
        for seg in reversed(range(K)):
            ready = [n for n in eligible[seg]
                     if n.parent is None or n.parent.done > seg + 1 or n.parent.id in running]
            chosen = self._rank(ready, scores)[: self.config.widths[seg]]
            running.update(n.id for n in chosen)
            rows[seg] = tuple(self._row(n) for n in chosen)
        self._plan = Plan(self.round, tuple(rows), tuple(self._pending_retire))
        self._pending_retire = []
        return self._plan

    def absorb(self, readout: Readout) -> RoundRecord:
        """The absorbing phase: consume the explorers' readouts for the issued plan.

        In this order (DEX.md, "One round"): mark every planned node one segment
        further; commit the final-depth token of each anchor that finished
        segment K and collapse its children to the one carrying it (or start a
        fallback node), learning acceptance from the outcome; then expand the
        survivors that finished a segment k < K with their boundary-k
        candidate(s), as far as the spawn policy and the slots allow.

        Reads: the plan issued by `plan()` and `readout` (per explorer, per
        row, ranked candidates). Writes: node state (`done`, `last_run`,
        readouts, children), anchors, the slot free list, the acceptance model,
        the pending retires for the next plan and the round counter. Returns the
        round's record. Nothing in here depends on the next plan.
        """
        plan = self._plan
        if plan is None:
            raise LatticeError("absorb() without plan()")
        self._plan = None
        K = self.config.explorers
        if len(readout.candidates) != K or any(len(c) != len(r) for c, r in zip(readout.candidates, plan.rows)):
            raise LatticeError("readout does not match the plan's rows")
        ran: list[tuple[Node, int, tuple[int, ...]]] = []
        explorers_rec: list[tuple[RowRecord, ...]] = []
        for seg, (rows, cands) in enumerate(zip(plan.rows, readout.candidates)):
            rec = []
            for row, cand in zip(rows, cands):
                n = self.nodes.get(row.node)
                if n is None or n.done != seg:
                    raise LatticeError(f"planned node {row.node} changed before its readout")
                n.done = seg + 1
                n.last_run = self.round
                if n.done < K:
                    n.readouts.append(tuple(cand))
                ran.append((n, seg + 1, cand))
                rec.append(RowRecord(n.request.request_id, n.id, n.position, n.slot, cand[0]))
            explorers_rec.append(tuple(rec))

        commits: list[CommitRecord] = []
        collapses: list[CollapseRecord] = []
        wasted = 0
        # 1. commit and collapse first: expansions of dropped nodes would be waste
        for n, depth, cand in ran:
            if depth != K:
                continue
            req = n.request
            if req.anchor is not n:
                raise LatticeError(f"node {n.id} reached the final depth but is not its request's anchor")
            y = cand[0]
            keep = n.children.get(y)
            dropped = 0
            self.acceptance.observe_commit(n, y)
            for child in list(n.children.values()):
                if child is not keep:
                    dropped_nodes = list(child.subtree())
                    dropped += len(dropped_nodes)
                    wasted += sum(d.done for d in dropped_nodes)
                    self._drop(child)
            n.children.clear()
            self._retire(n)
            if keep is not None:
                keep.parent = None
                req.anchor = keep
                boundary = keep.boundary
                kept = sum(1 for _ in keep.subtree())
            else:
                req.anchor = self._new_node(req, y, n.position + 1, None, FALLBACK)
                boundary = FALLBACK
                kept = 0
            commits.append(CommitRecord(req.request_id, n.position + 1, y, boundary, req.anchor.id))
            collapses.append(CollapseRecord(req.request_id, n.position + 1, kept, dropped))

        # 2. expand the survivors, the most valuable proposal first
        proposals = []
        for n, depth, cand in ran:
            if depth == K or not n.alive:
                continue
            token = self._proposal(n, depth, cand)
            if token is not None:
                proposals.append((n, depth, token, token != cand[0]))
        spawns: list[SpawnRecord] = []
        if proposals:
            scores = self._scores()
            if self.config.policy == "priority":
                proposals.sort(key=lambda p: -scores.get(p[0].id, 0.0) * self.acceptance.child_rate(p[0], p[2]))
            budget = _RowBudget(self.config.widths[0], (scores.get(n.id, 0.0) for n in self.nodes.values()
                                                        if n.done == 0))
            for n, depth, token, second in proposals:
                if not n.alive:
                    continue  # evicted for a more likely spawn of this round
                child = self._spawn(n, token, depth, scores, budget if second else None)
                if child is not None:
                    budget.add(scores[child.id])
                    spawns.append(SpawnRecord(n.request.request_id, n.id, child.id, child.position, token, depth))

        self.round += 1
        return RoundRecord(round=plan.round, explorers=tuple(explorers_rec), spawns=tuple(spawns),
                           commits=tuple(commits), collapses=tuple(collapses), wasted_node_segments=wasted,
                           live_nodes=len(self.nodes))

    # ---- internals ------------------------------------------------------
    def _proposal(self, n: Node, boundary: int, cand: tuple[int, ...]) -> int | None:
        if boundary not in self.config.spawn_boundaries or n.position + 1 >= self.config.max_context:
            return None
        if self.config.decs:
            # the best token this node has not spawned yet (a token an earlier
            # boundary read out but could not place is proposed again here)
            for tok in cand:
                if tok not in n.proposed:
                    return tok
            return None
        tok = cand[0]
        n.proposed.add(tok)
        return None if tok in n.children else tok

    def _spawn(self, parent: Node, token: int, boundary: int, scores: dict[int, float],
               budget: "_RowBudget | None" = None) -> Node | None:
        """Spawn `token` under `parent`. A DECS second guess comes with the
        first explorer's row `budget`: under the priority policy it is declined
        when the rows are taken by nodes at least as likely to be committed."""
        if token in parent.children:
            return None
        want = scores.get(parent.id, 0.0) * self.acceptance.child_rate(parent, token)
        if budget is not None and self.config.policy == "priority" and not budget.has_room(want):
            return None
        if len(self.free_slots) <= self.reserved and not self._evict_for(parent, want, scores):
            return None   # (an eviction frees a slot for this child: the reserved ones stay free)
        child = self._new_node(parent.request, token, parent.position + 1, parent, boundary)
        parent.children[token] = child
        parent.proposed.add(token)
        scores[child.id] = want
        return child

    def _evict_for(self, parent: Node, want: float, scores: dict[int, float]) -> bool:
        """Priority policy: free the slot of the least likely leaf if the new
        child (chance `want`) is more likely to be on the committed path."""
        if self.config.policy != "priority":
            return False
        leaves = [n for n in self.nodes.values()
                  if not n.children and n.parent is not None and n is not n.request.anchor]
        if not leaves:
            return False
        victim = min(leaves, key=lambda n: (scores.get(n.id, 0.0), -n.created))
        if scores.get(victim.id, 0.0) >= want or victim is parent:
            return False
        del victim.parent.children[victim.token]
        self._drop(victim)
        return True

    def _new_node(self, req: RequestLattice, token: int, position: int, parent: Node | None, boundary: int) -> Node:
        if not self.free_slots:
            raise LatticeError("no free lattice slot")
        if position >= self.config.max_context:
            raise LatticeError(f"position {position} is past the context ({self.config.max_context})")
        node = Node(self._next_id, req, token, position, parent, boundary, self.free_slots.pop(), self.round)
        self._next_id += 1
        self.nodes[node.id] = node
        return node

    def _drop(self, root: Node) -> None:
        for n in list(root.subtree()):
            n.alive = False
            self.nodes.pop(n.id, None)
            self.free_slots.append(n.slot)

    def _retire(self, n: Node) -> None:
        """n finished every segment: its K/V moves to the context, its slot is freed.
        The copy runs at the start of the next round, before any write to the slot."""
        n.alive = False
        del self.nodes[n.id]
        self.free_slots.append(n.slot)
        self._pending_retire.append(Retire(n.slot, n.request.index, n.position))

    def _scores(self) -> dict[int, float]:
        """Chance of lying on the committed path, relative to each anchor."""
        scores: dict[int, float] = {}
        for req in self.requests.values():
            if req.anchor is None:
                continue
            stack = [(req.anchor, 1.0)]
            while stack:
                n, s = stack.pop()
                scores[n.id] = s
                for c in n.children.values():
                    stack.append((c, s * self.acceptance.child_rate(n, c.token)))
        return scores

    def _rank(self, nodes: list[Node], scores: dict[int, float]) -> list[Node]:
        if self.config.policy == "oldest":
            return sorted(nodes, key=lambda n: (n.created, n.id))
        return sorted(nodes, key=lambda n: (-scores.get(n.id, 0.0), n.last_run, n.id))

    def _row(self, n: Node) -> PlanRow:
        chain = []
        a: Node | None = n
        while a is not None:
            chain.append(a.slot)
            a = a.parent
        chain.reverse()
        anchor = n.request.anchor
        assert anchor is not None
        return PlanRow(node=n.id, request_id=n.request.request_id, request_index=n.request.index, token=n.token,
                       position=n.position, slot=n.slot, ctx_len=anchor.position, ancestor_slots=tuple(chain))

    def check_invariants(self) -> None:
        """Causal and structural invariants; tests call this every round."""
        K = self.config.explorers
        for req in self.requests.values():
            anchor = req.anchor
            if anchor is None or not anchor.alive or anchor.parent is not None:
                raise LatticeError(f"request {req.request_id} has no live root anchor")
        used = set()
        for n in self.nodes.values():
            if n.slot in used:
                raise LatticeError(f"slot {n.slot} used twice")
            used.add(n.slot)
            if n.parent is not None:
                if not n.parent.alive:
                    raise LatticeError(f"node {n.id} has a dead parent")
                if n.parent.done <= n.done:
                    raise LatticeError(f"causal violation: node {n.id} done={n.done}, parent done={n.parent.done}")
                if n.position != n.parent.position + 1:
                    raise LatticeError(f"node {n.id} at wrong position")
            if not 0 <= n.done < K:
                raise LatticeError(f"node {n.id} done={n.done} out of range")
        if len(used) + len(self.free_slots) != self.config.slots:
            raise LatticeError("slot accounting is off")
