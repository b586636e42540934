"""eplb_triton.bounds: the certified lower bound is never above the true optimum, and is tighter.

The oracle is exhaustive: every count vector (``c_e >= 1``, ``sum c = R``), every assignment of
the replicas to GPUs of ``S`` slots, and for the hierarchical policy every split of the groups over
the nodes; loads in float64 as ``metrics.gpu_loads`` adds them.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb_triton as eplb
from eplb_triton import bounds
from eplb_triton._validation import EplbArgumentError, select_policy

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deepseek-v3-sglang"


# ----------------------------------------------------------------------------------------------
# Exhaustive oracle
# ----------------------------------------------------------------------------------------------


def _compositions(R: int, E: int):
    for cuts in itertools.combinations(range(1, R), E - 1):
        b = (0, *cuts, R)
        yield tuple(b[i + 1] - b[i] for i in range(E))


def _best_assignment(shares: list[float], S: int, ub: float) -> float:
    """Smallest max GPU load over all ways to put the replicas on GPUs of ``S`` slots (< ub, else ub)."""
    shares = sorted(shares, reverse=True)
    n = len(shares)
    best = [ub]
    used = [False] * n

    def rec(cur: float) -> None:
        if cur >= best[0]:
            return
        if all(used):
            best[0] = cur
            return
        i = used.index(False)
        used[i] = True
        rest = [j for j in range(i + 1, n) if not used[j]]
        for combo in itertools.combinations(rest, S - 1):
            load = shares[i]
            for j in combo:
                load = load + shares[j]
            if load >= best[0]:
                continue
            for j in combo:
                used[j] = True
            rec(max(cur, load))
            for j in combo:
                used[j] = False
        used[i] = False

    rec(0.0)
    return best[0]


def _flat_optimum(w: list[float], R: int, P: int) -> float:
    S = R // P
    best = float("inf")
    for c in _compositions(R, len(w)):
        shares = [w[e] / c[e] for e in range(len(w)) for _ in range(c[e])]
        if max(shares) >= best:
            continue
        best = min(best, _best_assignment(shares, S, best))
    return best


def _group_splits(G: int, k: int):
    def rec(items):
        if not items:
            yield ()
            return
        first, rest = items[0], items[1:]
        for others in itertools.combinations(rest, k - 1):
            remaining = tuple(i for i in rest if i not in others)
            for tail in rec(remaining):
                yield ((first, *others), *tail)

    yield from rec(tuple(range(G)))


def optimum(w, R: int, G: int, N: int, P: int) -> float:
    """The exact smallest max GPU load over all valid placements of the policy that runs."""
    label, G, N = select_policy(G, N)
    w = [float(x) for x in w]
    if label == "global":
        return _flat_optimum(w, R, P)
    gs, k = len(w) // G, G // N
    node = {}
    for split in _group_splits(G, k):
        for block in split:
            if block not in node:
                node[block] = _flat_optimum([w[g * gs + i] for g in block for i in range(gs)], R // N, P // N)
    return min(max(node[b] for b in split) for split in _group_splits(G, k))


def test_oracle_pairing_is_sorted():
    """The oracle's assignment search agrees with the classic fact for two slots: largest with smallest."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        shares = list(rng.integers(0, 20, 8).astype(float))
        s = sorted(shares)
        assert _best_assignment(shares, 2, float("inf")) == max(s[i] + s[-1 - i] for i in range(4))


# ----------------------------------------------------------------------------------------------
# Never above the optimum (tiny generated cases)
# ----------------------------------------------------------------------------------------------


@st.composite
def tiny_case(draw):
    """A tiny placement problem of either policy, R <= 9, with loads that tie, vanish or dominate."""
    E = draw(st.integers(1, 5))
    R = draw(st.integers(E, 9))
    P = draw(st.sampled_from([p for p in range(1, R + 1) if R % p == 0]))
    G = draw(st.sampled_from([g for g in range(1, E + 1) if E % g == 0]))
    N = draw(st.sampled_from([n for n in range(1, G + 1) if G % n == 0 and P % n == 0] + [G + 1]))
    kind = draw(st.sampled_from(["int", "pow", "float"]))
    if kind == "int":
        w = draw(st.lists(st.integers(0, 30), min_size=E, max_size=E))
    elif kind == "pow":
        w = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 8, 100]), min_size=E, max_size=E))
    else:
        w = draw(st.lists(st.floats(0, 1000, width=32), min_size=E, max_size=E))
    return np.array(w, np.float64), R, G, N, P


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_case())
def test_never_above_optimum(case):
    w, R, G, N, P = case
    opt = optimum(w, R, G, N, P)
    bound = float(bounds.lower_bound(w[None], R, G, N, P)[0])
    assert bound <= opt, (w.tolist(), R, G, N, P, bound, opt)


def test_never_above_optimum_two_slots_exhaustive():
    """Every integer load vector of 3 experts in 0..9 on 2 GPUs of 2 slots, and of 4 experts in 0..5 on 3 GPUs."""
    for E, P, top in [(3, 2, 10), (4, 3, 6)]:
        R = 2 * P
        ws = np.array(list(itertools.product(range(top), repeat=E)), np.float64)
        got = bounds.lower_bound(ws, R, 1, 1, P)
        for w, b in zip(ws, got, strict=True):
            assert b <= _flat_optimum(list(w), R, P), (w.tolist(), R, P, b)


def test_hierarchical_never_above_optimum_exhaustive():
    """4 groups of one expert on 2 nodes of one GPU (2 slots each): all loads in 0..6."""
    ws = np.array(list(itertools.product(range(7), repeat=4)), np.float64)
    got = bounds.lower_bound(ws, 4, 4, 2, 2)
    for w, b in zip(ws, got, strict=True):
        assert b <= optimum(w, 4, 4, 2, 2), (w.tolist(), b)


# ----------------------------------------------------------------------------------------------
# Tighter than max(total / P, t*) where it matters; exact where it can be
# ----------------------------------------------------------------------------------------------


def _old(w: np.ndarray, R: int, P: int) -> np.ndarray:
    return np.maximum(w.sum(axis=1) / P, bounds.max_share_bound(w, R))


@pytest.mark.parametrize(
    ("w", "R", "P", "opt"),
    [
        # 11 must be split in two (5.5 > any T / 2 below 7.5), and both halves need a partner <= T - 5.5:
        # only 1 and 2 are left, so the optimum is 5.5 + 2 = 7.5; the mean is 7, t* = 5.5.
        ([11, 1, 2], 4, 2, 7.5),
        # counts (2, 1, 1) give 3.5, 3.5, 6, 2 -> 8; (1, 2, 1) give 7, 3, 3, 2 -> 9; the mean is 7.5.
        ([7, 6, 2], 4, 2, 8.0),
    ],
)
def test_pairing_strictly_tighter(w, R, P, opt):
    w = np.array([w], np.float64)
    new = float(bounds.lower_bound(w, R, 1, 1, P)[0])
    old = float(_old(w, R, P)[0])
    assert old < new <= opt
    assert new >= opt * (1 - 1e-3)  # within the bisection's resolution of the optimum
    assert _flat_optimum(list(w[0]), R, P) == opt


def test_hierarchical_strictly_tighter():
    """Three experts of 10 in four groups of one on two nodes: two of them must share a node's one GPU."""
    w = np.array([[10.0, 10.0, 10.0, 0.0]])
    new = float(bounds.lower_bound(w, 4, 4, 2, 2)[0])
    assert float(_old(w, 4, 2)[0]) == 15.0
    assert new == pytest.approx(20.0, rel=1e-8) and new <= 20.0 == optimum(w[0], 4, 4, 2, 2)


def test_one_slot_per_gpu_is_exact():
    """S = 1: the optimum is t* (each GPU holds one replica), and the bound is t* up to the margin."""
    rng = np.random.default_rng(1)
    w = rng.integers(0, 100, (20, 5)).astype(np.float64)
    got = bounds.lower_bound(w, 8, 1, 1, 8)
    for row, b in zip(w, got, strict=True):
        opt = _flat_optimum(list(row), 8, 8)
        assert opt * (1 - 2e-9) <= b <= opt


def test_min_counts_exact():
    """The smallest count whose float64 share fits, also when the load is an exact multiple of the level."""
    rng = np.random.default_rng(5)
    w = np.concatenate([rng.integers(0, 60, 400), [10, 10, 12, 7, 0]]).astype(np.float64)
    t = np.concatenate([rng.integers(1, 13, 400), [5, 2, 4, 7, 3]]).astype(np.float64)
    got = bounds.min_counts(w[:, None], t[:, None])[:, 0]
    want = [next(c for c in range(1, 100) if we / c <= te) for we, te in zip(w, t, strict=True)]
    assert got.tolist() == want


def test_max_share_bound_is_the_float64_greedy_share():
    """Part 1's t*: never above the float64 largest share of the greedy's counts, and within 1e-12 of it."""
    rng = np.random.default_rng(2)
    for R, E in [(288, 256), (320, 256), (72, 64), (1000, 10), (16, 12)]:
        w = (rng.pareto(1.5, (30, E)) * 100).astype(np.float32)
        cnt = eplb.replicate_experts(torch.from_numpy(w), R, backend="cpu")[2].numpy()
        t64 = (w.astype(np.float64) / cnt).max(axis=1)
        tb = bounds.max_share_bound(w.astype(np.float64), R)
        assert np.all(tb <= t64) and np.all(tb >= t64 * (1 - 1e-12))


# ----------------------------------------------------------------------------------------------
# Consistency with placements and with the policy rule
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("E", "R", "G", "N", "P"),
    [(256, 288, 8, 18, 144), (256, 288, 8, 4, 32), (256, 288, 1, 1, 32), (256, 320, 8, 1, 64), (64, 96, 8, 4, 48)],
)
def test_between_old_bound_and_placements(E, R, G, N, P):
    """Random heavy-tailed loads: old-style bound <= new bound <= greedy and refined peaks."""
    rng = np.random.default_rng(R + G + N + P)
    w = (rng.pareto(1.2, (12, E)) * 50).astype(np.float32)
    new = bounds.lower_bound(w, R, G, N, P)
    assert np.all(new >= _old(w.astype(np.float64), R, P) * (1 - 2e-9))
    for method in ("greedy", "refined"):
        phy, _, cnt = eplb.rebalance_experts(torch.from_numpy(w), R, G, N, P, backend="cpu", method=method)
        peak = eplb.metrics.gpu_loads(torch.from_numpy(w), phy, cnt, P).amax(dim=1).numpy()
        assert np.all(new <= peak)


def test_policy_rule():
    """G % N != 0 runs the global policy; one node is the global problem too."""
    rng = np.random.default_rng(3)
    w = rng.integers(0, 1000, (6, 24)).astype(np.float64)
    flat = bounds.lower_bound(w, 48, 1, 1, 24)
    assert np.array_equal(bounds.lower_bound(w, 48, 3, 2, 24), flat)  # 3 % 2 != 0: global
    assert np.array_equal(bounds.lower_bound(w, 48, 4, 1, 24), flat)  # one node
    hier = bounds.lower_bound(w, 48, 4, 2, 24)
    assert np.all(hier >= flat * (1 - 1e-12))  # more constrained placements


def test_fallback_for_many_splits(monkeypatch):
    """Above MAX_PARTITIONS the weaker documented bound is used; it stays between the flat and the exact one."""
    rng = np.random.default_rng(4)
    w = rng.integers(0, 1000, (5, 16)).astype(np.float64)
    exact = bounds.lower_bound(w, 32, 8, 4, 8)
    monkeypatch.setattr(bounds, "MAX_PARTITIONS", 10)
    weak = bounds.lower_bound(w, 32, 8, 4, 8)
    assert np.all(weak <= exact) and np.all(weak >= bounds.lower_bound(w, 32, 1, 1, 8))


def test_zero_and_empty_layers():
    assert bounds.lower_bound(np.zeros((3, 8)), 16, 2, 2, 8).tolist() == [0.0, 0.0, 0.0]
    assert bounds.lower_bound(np.zeros((0, 8)), 16, 2, 2, 8).shape == (0,)


def test_argument_errors():
    with pytest.raises(EplbArgumentError, match=r"num_replicas \(12\) must be a multiple of num_gpus \(5\)"):
        bounds.lower_bound(np.ones((2, 8)), 12, 1, 1, 5)
    with pytest.raises(EplbArgumentError, match=r"num_replicas \(6\) must be >= num_logical_experts"):
        bounds.lower_bound(np.ones((2, 8)), 6, 1, 1, 3)
    with pytest.raises(EplbArgumentError, match="weight must be finite and >= 0"):
        bounds.lower_bound(np.array([[1.0, -1.0]]), 2, 1, 1, 1)
    with pytest.raises(EplbArgumentError, match=r"weight must be 2-D"):
        bounds.lower_bound(np.ones(8), 8, 1, 1, 4)
    with pytest.raises(TypeError, match="num_replicas must be an int"):
        bounds.lower_bound(np.ones((2, 8)), 16.0, 1, 1, 8)
    with pytest.raises(EplbArgumentError, match="weight must be finite"):
        eplb.metrics.lower_bound(torch.tensor([[1.0, float("nan")]]), 2, 1)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real loads not present ({DATA})")
def test_real_loads_between_old_bound_and_refined():
    """DeepSeek-V3 loads: the new bound lies between the old one and the refined placement, every layer."""
    rows = json.loads((DATA / "decode_in1000out1000.json").read_text())["logical_count"][3:61]
    w = np.array(rows, np.float32)
    for R, G, N, P in [(288, 8, 18, 144), (288, 8, 4, 32)]:
        new = bounds.lower_bound(w, R, G, N, P)
        phy, _, cnt = eplb.rebalance_experts(torch.from_numpy(w), R, G, N, P, backend="cpu", method="refined")
        peak = eplb.metrics.gpu_loads(torch.from_numpy(w), phy, cnt, P).amax(dim=1).numpy()
        assert np.all(new <= peak)
        assert np.all(new >= _old(w.astype(np.float64), R, P) * (1 - 2e-9))
        assert new.mean() > _old(w.astype(np.float64), R, P).mean() * 1.03  # the point of it: >= 3% tighter
