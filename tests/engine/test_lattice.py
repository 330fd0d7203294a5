"""The lattice state machine alone, against a scripted readout."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from dexserve.engine.lattice import Lattice, LatticeConfig, LatticeError, Readout
from dexserve.engine.oracle import ead_oracle
from dexserve.contract.records import FALLBACK
from engine.scripted import ScriptedModel, drive


def make(K: int, W: int = 64, slots: int = 512, mode: str = "dex", decs: bool = True, policy: str = "priority",
         max_context: int = 1 << 20) -> Lattice:
    bounds = {"dex": frozenset(range(1, K)), "ar": frozenset()}.get(mode)
    if bounds is None:
        bounds = frozenset({int(mode.split(":")[1])})
    return Lattice(LatticeConfig(explorers=K, widths=(W,) * K, slots=slots, spawn_boundaries=bounds, decs=decs,
                                 policy=policy, max_context=max_context))


def test_ar_mode_takes_K_rounds_per_token() -> None:
    m = ScriptedModel(explorers=4)
    lat = make(4, mode="ar")
    lat.add_request("a", 0, token=7, position=3)
    got, records = drive(lat, m, {"a": 10})
    assert got["a"] == m.autoregressive(7, 3, 10)
    assert len(records) == 40
    assert all(not r.spawns for r in records)
    assert all(c.boundary == FALLBACK for r in records for c in r.commits)


def test_perfect_first_boundary_reaches_one_round_per_token() -> None:
    m = ScriptedModel(explorers=4, accept=(1.0, 1.0, 1.0))
    lat = make(4)
    lat.add_request("a", 0, token=1, position=0)
    got, records = drive(lat, m, {"a": 30})
    assert got["a"] == m.autoregressive(1, 0, 30)
    # the first token climbs K segments, every later one is 1 round behind its predecessor
    assert len(records) == 4 + 29
    assert [c.boundary for r in records for c in r.commits][1:] == [1] * 29


def test_collapse_keeps_exactly_the_matching_subtree_and_reuses_it() -> None:
    m = ScriptedModel(explorers=3, accept=(0.6, 0.8))
    lat = make(3)
    lat.add_request("a", 0, token=5, position=0)
    for _ in range(40):
        anchor = lat.requests["a"].anchor
        before = {n.id: n.done for n in lat.nodes.values()}
        subtree_of = {c.token: {n.id for n in c.subtree()} for c in anchor.children.values()}
        plan = lat.plan()
        ran = {row.node for rows in plan.rows for row in rows}
        rec = lat.absorb(m.run(plan))
        lat.check_invariants()
        if not rec.commits:
            continue
        (commit,) = rec.commits
        (collapse,) = rec.collapses
        kept = subtree_of.get(commit.token, set())
        # the kept subtree survives with all its state; every other child's subtree is gone
        for nid in kept:
            assert nid in lat.nodes
            assert lat.nodes[nid].done == before[nid] + (1 if nid in ran else 0)
        dropped = set().union(*[s for t, s in subtree_of.items() if t != commit.token]) if subtree_of else set()
        assert not dropped & set(lat.nodes)
        assert collapse.kept == len(kept)
        assert collapse.dropped == len(dropped)
        if kept:
            assert lat.requests["a"].anchor.token == commit.token
            assert commit.boundary != FALLBACK
        else:
            assert commit.boundary == FALLBACK
            assert lat.requests["a"].anchor.done == 0


def test_kept_nodes_never_rerun_a_segment() -> None:
    m = ScriptedModel(explorers=4, accept=(0.5, 0.7, 0.9))
    lat = make(4, W=3, slots=10)
    lat.add_request("a", 0, token=2, position=0)
    seen: set[tuple[int, int]] = set()
    for _ in range(200):
        plan = lat.plan()
        for seg, rows in enumerate(plan.rows):
            for row in rows:
                assert (row.node, seg) not in seen, "a segment was recomputed"
                seen.add((row.node, seg))
        lat.absorb(m.run(plan))
        lat.check_invariants()


def test_fallback_starts_fresh_anchor() -> None:
    m = ScriptedModel(explorers=2, accept=(0.0,), candidates=1)
    lat = make(2)
    lat.add_request("a", 0, token=3, position=0)
    got, records = drive(lat, m, {"a": 5})
    assert got["a"] == m.autoregressive(3, 0, 5)
    commits = [c for r in records for c in r.commits]
    # boundary 1 never proposes the right token: every commit is a fallback, K rounds apart
    assert [c.boundary for c in commits] == [FALLBACK] * 5
    assert len(records) == 2 * 5
    assert sum(r.wasted_node_segments for r in records) == sum(len(r.spawns) for r in records)


def test_capacity_limits_rows_and_slots() -> None:
    m = ScriptedModel(explorers=4, accept=(0.3, 0.3, 0.3))
    lat = make(4, W=2, slots=6)
    lat.add_request("a", 0, token=1, position=0)
    lat.add_request("b", 1, token=9, position=4)
    got, records = drive(lat, m, {"a": 25, "b": 25})
    assert got["a"] == m.autoregressive(1, 0, 25)
    assert got["b"] == m.autoregressive(9, 4, 25)
    assert max(r.live_nodes for r in records) <= 6
    assert all(len(rows) <= 2 for r in records for rows in r.explorers)


def test_causal_violation_is_detected() -> None:
    m = ScriptedModel(explorers=3, accept=(1.0, 1.0))
    lat = make(3)
    lat.add_request("a", 0, token=1, position=0)
    for _ in range(3):
        lat.absorb(m.run(lat.plan()))
    child = next(iter(lat.requests["a"].anchor.children.values()))
    child.done = child.parent.done  # corrupt: child as deep as its parent
    with pytest.raises(LatticeError, match="causal"):
        lat.check_invariants()


def test_readout_must_match_plan() -> None:
    lat = make(2)
    lat.add_request("a", 0, token=1, position=0)
    lat.plan()
    with pytest.raises(LatticeError):
        lat.absorb(Readout(((), ())))


def test_no_node_past_the_context() -> None:
    m = ScriptedModel(explorers=3, accept=(1.0, 1.0))
    lat = make(3, max_context=6)
    lat.add_request("a", 0, token=1, position=0)
    got, records = drive(lat, m, {"a": 5})
    assert got["a"] == m.autoregressive(1, 0, 5)
    assert all(s.position < 6 for r in records for s in r.spawns)


def test_unlimited_width_without_decs_equals_ead_oracle() -> None:
    """DEX.md: with unlimited W and top-1 candidates, DEX equals the EAD oracle."""
    for seed in range(5):
        m = ScriptedModel(explorers=4, accept=(0.4, 0.6, 0.8), seed=seed)
        ar = make(4, mode="ar")
        ar.add_request("a", 0, token=seed, position=0)
        _, ar_records = drive(ar, m, {"a": 40})
        oracle = ead_oracle(ar_records, 4)
        dex = make(4, decs=False)
        dex.add_request("a", 0, token=seed, position=0)
        got, dex_records = drive(dex, m, {"a": 40})
        assert len(dex_records) == oracle.rounds
        assert got["a"] == m.autoregressive(seed, 0, 40)


def test_decs_proposes_distinct_tokens_per_node() -> None:
    m = ScriptedModel(explorers=4, accept=(0.2, 0.2, 0.2))
    lat = make(4, decs=True)
    lat.add_request("a", 0, token=4, position=0)
    _, records = drive(lat, m, {"a": 20})
    by_parent: dict[int, list[int]] = {}
    for r in records:
        for s in r.spawns:
            by_parent.setdefault(s.parent, []).append(s.token)
    assert all(len(toks) == len(set(toks)) for toks in by_parent.values())


@settings(max_examples=120, deadline=None)
def drive_and_check_ar(lat, m, seed: int, requests: int, new: int, slots: int) -> list:
    """Run `requests` requests of `new` tokens to the end; each equals ar, and the
    lattice never holds more live nodes than its slots. Returns the round records."""
    for i in range(requests):
        lat.add_request(f"r{i}", i, token=seed + i, position=i)
    got, records = drive(lat, m, {f"r{i}": new for i in range(requests)})
    for i in range(requests):
        assert got[f"r{i}"] == m.autoregressive(seed + i, i, new)
    assert max(r.live_nodes for r in records) <= slots
    return records


@given(K=st.integers(2, 6), W=st.integers(1, 8), extra_slots=st.integers(0, 12), decs=st.booleans(),
       policy=st.sampled_from(["priority", "oldest"]), mode_pick=st.integers(0, 10), seed=st.integers(0, 10_000),
       requests=st.integers(1, 3), acc=st.lists(st.floats(0, 1), min_size=5, max_size=5))
def test_lossless_and_invariants_for_any_setting(K, W, extra_slots, decs, policy, mode_pick, seed, requests, acc):
    mode = "dex" if mode_pick < 6 else ("ar" if mode_pick < 8 else f"select:{1 + mode_pick % (K - 1)}")
    m = ScriptedModel(explorers=K, accept=tuple(acc[: K - 1]), seed=seed)
    lat = make(K, W=W, slots=requests + extra_slots, mode=mode, decs=decs, policy=policy)
    records = drive_and_check_ar(lat, m, seed, requests, 12, slots=requests + extra_slots)
    if requests == 1:
        assert len(records) >= 12  # at most one commit per round per request


class _GuessModel(ScriptedModel):
    """Every boundary reads out the same two candidates for the next token:
    (y, w) when the first guess is right, (w, y) when only the runner-up is."""

    def __init__(self, explorers: int, second_right: bool) -> None:
        super().__init__(explorers=explorers, candidates=2)
        object.__setattr__(self, "second_right", second_right)

    def readout(self, token: int, position: int, depth: int) -> tuple[int, ...]:
        y = self.next_token(token, position)
        if depth == self.explorers:
            return (y,)
        w = (y + 1) % self.vocab
        return (w, y) if self.second_right else (y, w)


def _second_guess_spawns(K: int, W: int, second_right: bool, commits: int = 40, warmup: int = 10):
    m = _GuessModel(K, second_right)
    lat = make(K, W=W, slots=K * W + 1)
    lat.add_request("a", 0, token=3, position=0)
    got, records = drive(lat, m, {"a": commits})
    assert got["a"] == m.autoregressive(3, 0, commits)
    # skip the rounds before `warmup` commits: the policy has not learned yet
    seen, start = 0, 0
    for i, r in enumerate(records):
        seen += len(r.commits)
        if seen >= warmup:
            start = i + 1
            break
    late = records[start:]
    # with DECS, boundary 1 spawns the first guess; every deeper boundary can only add a second guess
    second = sum(1 for r in late for s in r.spawns if s.boundary >= 2)
    return lat, second, late


def test_budget_declines_a_worthless_second_guess_only_when_rows_bind() -> None:
    K = 4
    # the first guess is always right, so a DECS second guess is never committed
    lat, second, late = _second_guess_spawns(K, W=1, second_right=False)
    assert lat.acceptance.rate(2, 1) < 0.1 and lat.acceptance.rate(1, 0) > 0.9
    assert second == 0, "a worthless second guess took one of the W=1 rows"
    assert sum(len(rows) for r in late for rows in r.explorers) <= K * len(late)
    # rows to spare: DECS still spends them on second guesses
    _, second_free, late_free = _second_guess_spawns(K, W=8, second_right=False)
    assert second_free >= len(late_free)


def test_budget_takes_a_second_guess_worth_its_row() -> None:
    K = 3
    # only the runner-up is ever right: the second guess (at boundary 2) is the one to run, even at W=1
    lat, second, late = _second_guess_spawns(K, W=1, second_right=True)
    assert lat.acceptance.rate(2, 1) > 0.9 and lat.acceptance.rate(1, 0) < 0.1
    commits = [c for r in late for c in r.commits]
    assert second > 0
    assert sum(c.boundary == 2 for c in commits) >= 0.9 * len(commits)
    # ...which is what makes it faster than decoding without DECS
    m = _GuessModel(K, True)
    plain = make(K, W=1, slots=K + 1, decs=False)
    plain.add_request("a", 0, token=3, position=0)
    _, plain_records = drive(plain, m, {"a": 40})
    dex = make(K, W=1, slots=K + 1)
    dex.add_request("a", 0, token=3, position=0)
    _, dex_records = drive(dex, m, {"a": 40})
    assert len(dex_records) < len(plain_records)


@settings(max_examples=150, deadline=None)
@given(K=st.integers(2, 8), widths=st.lists(st.integers(1, 12), min_size=8, max_size=8),
       extra_slots=st.integers(0, 40), decs=st.booleans(), seed=st.integers(0, 10_000),
       requests=st.integers(1, 3), candidates=st.integers(1, 7),
       acc=st.lists(st.floats(0, 1), min_size=7, max_size=7))
def test_budget_aware_policy_stays_equal_to_ar(K, widths, extra_slots, decs, seed, requests, candidates, acc):
    """Whatever the learned values decide to spawn or decline, the output is ar's."""
    m = ScriptedModel(explorers=K, accept=tuple(acc[: K - 1]), seed=seed, candidates=candidates)
    lat = Lattice(LatticeConfig(explorers=K, widths=tuple(widths[:K]), slots=requests + extra_slots,
                                spawn_boundaries=frozenset(range(1, K)), decs=decs, policy="priority"))
    records = drive_and_check_ar(lat, m, seed, requests, 20, slots=requests + extra_slots)
    assert all(len(rows) <= w for r in records for rows, w in zip(r.explorers, widths))


def test_reserved_slots_stay_free_for_a_joining_request() -> None:
    """Spawning leaves `reserved` slots free (the anchors of requests whose prompts
    are still prefilling), so a request joins as soon as it is ready; the tokens
    are the same either way."""
    m = ScriptedModel(explorers=4, accept=(0.9, 0.9, 0.9))
    peak = {}   # most live nodes in any round
    for reserved in (0, 1):
        lat = make(4, W=4, slots=4)
        lat.reserved = reserved
        lat.add_request("a", 0, token=1, position=0)
        got, records = drive(lat, m, {"a": 20})
        assert got["a"] == m.autoregressive(1, 0, 20)
        assert max(r.live_nodes for r in records) <= 4 - reserved
        peak[reserved] = max(r.live_nodes for r in records)
    assert peak[0] == 4, "without a reservation one request takes every slot"
    lat = make(4, W=4, slots=4)
    lat.reserved = 1
    lat.add_request("a", 0, token=1, position=0)
    first = []
    for _ in range(8):   # rounds while "b" prefills: "a" never takes the reserved slot
        first += [c.token for c in lat.absorb(m.run(lat.plan())).commits]
        assert lat.can_add()
    lat.add_request("b", 1, token=9, position=3)
    lat.reserved = 0
    got, _ = drive(lat, m, {"a": 12, "b": 10})
    assert first + got["a"] == m.autoregressive(1, 0, len(first) + 12)
    assert got["b"] == m.autoregressive(9, 3, 10)
