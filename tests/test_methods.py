"""Methods beyond the greedy (docs/algorithm.md section 10): refined, relabelled, incremental.

The reference and the CPU path must agree exactly; the properties (never worse than the start,
the budget, relabelling changes no GPU load) are checked on generated cases by independent
routes (brute force over permutations, float64 loads summed here, counts recomputed here).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import DATA, FIXED_CASES, REAL_CONFIGS, Case, assert_same, assert_valid_placement, cases, make_loads
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb_triton as eplb
from eplb_triton import cpu, reference
from eplb_triton._validation import select_policy
from eplb_triton.io import read_loads
from eplb_triton.placement import slot_order_ranks

FILES = sorted(DATA.glob("*.json")) if DATA.is_dir() else []
needs_data = pytest.mark.skipif(not FILES, reason=f"real loads not found at {DATA} (../shared/data is absent)")


def peak64(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, P: int) -> list[float]:
    """Largest GPU load per layer, float64 shares of the float32 loads summed in slot order (10.1),
    computed here with Python floats, independently of the package's helpers."""
    w = weight.to(torch.float32).double().tolist()
    out = []
    for layer, row in enumerate(phy2log.tolist()):
        S = len(row) // P
        cnt = logcnt[layer].tolist()
        loads = []
        for p in range(P):
            total = 0.0
            for q in range(p * S, p * S + S):
                total += w[layer][row[q]] / float(cnt[row[q]])
            loads.append(total)
        out.append(max(loads))
    return out


def greedy_start(w: torch.Tensor, c: Case):
    _, G, N = select_policy(c.G, c.N)
    return reference.rebalance_experts_hierarchical(w, c.R, G, N, c.P), N


def old_placement(c: Case, seed: int) -> torch.Tensor:
    """A valid placement of other loads: the placement in service."""
    return eplb.rebalance_experts(make_loads(c.L, c.E, "skewed", seed), c.R, c.G, c.N, c.P, backend="cpu")[0]


# ----------------------------------------------------------------------------------------------
# the search: CPU path == reference, exactly
# ----------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(c=cases(max_layers=4, max_experts=24), budget=st.integers(0, 40), old_seed=st.integers(0, 1000))
def test_search_cpu_equals_reference(c, budget, old_seed):
    w = c.weight()
    (phy, rank, cnt), N = greedy_start(w, c)
    want = reference.search(w, phy, rank, cnt, c.P, N)
    got = cpu.search(w.float().numpy(), phy.numpy(), rank.numpy(), cnt.numpy(), c.P, N)
    assert_same(tuple(torch.from_numpy(a) for a in got), want, ("phy2log", "phyrank", "logcnt"))
    # from an old placement under a budget
    old = old_placement(c, old_seed)
    orank, ocnt = slot_order_ranks(old, c.E)
    want = reference.search(w, old, orank, ocnt, c.P, N, old, budget)
    got = cpu.search(w.float().numpy(), old.numpy(), orank.numpy(), ocnt.numpy(), c.P, N, old.numpy(), budget)
    assert_same(tuple(torch.from_numpy(a) for a in got), want, ("phy2log", "phyrank", "logcnt"))


@pytest.mark.parametrize("c", FIXED_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("method", ["greedy", "refined"])
def test_api_backends_agree(c, method):
    w = c.weight()
    old = old_placement(c, 7)
    for kwargs in ({}, {"old_phy2log": old}, {"old_phy2log": old, "max_moves": c.R // 4}):
        if method == "greedy" and not kwargs:
            continue
        want = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="reference", method=method, **kwargs)
        got = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="cpu", method=method, **kwargs)
        assert_same(got, want, ("phy2log", "log2phy", "logcnt"))
        assert_valid_placement(*got, c.E, c.R, c.G, c.N, c.P)


# ----------------------------------------------------------------------------------------------
# properties: never worse, the budget, relabelling
# ----------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(c=cases(max_layers=4, max_experts=32))
def test_refined_never_worse_than_greedy(c):
    w = c.weight()
    greedy = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="cpu")
    refined = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="cpu", method="refined")
    assert_valid_placement(*refined, c.E, c.R, c.G, c.N, c.P)
    for g, r in zip(peak64(w, greedy[0], greedy[2], c.P), peak64(w, refined[0], refined[2], c.P), strict=True):
        assert r <= g


@settings(max_examples=60, deadline=None)
@given(c=cases(max_layers=4, max_experts=32), frac=st.floats(0, 1), method=st.sampled_from(["greedy", "refined"]))
def test_incremental_within_budget_and_never_worse_than_old(c, frac, method):
    w = c.weight()
    old = old_placement(c, c.seed % 1000 + 1)
    k = int(frac * c.R)
    phy, log2phy, cnt = eplb.rebalance_experts(
        w, c.R, c.G, c.N, c.P, backend="cpu", method=method, old_phy2log=old, max_moves=k
    )  # fmt: skip
    assert_valid_placement(phy, log2phy, cnt, c.E, c.R, c.G, c.N, c.P)
    assert ((phy != old).sum(dim=1) <= k).all(), "at most max_moves slots differ from old_phy2log"
    old_cnt = torch.zeros_like(cnt).scatter_add_(1, old, torch.ones_like(old))
    for new, before in zip(peak64(w, phy, cnt, c.P), peak64(w, old, old_cnt, c.P), strict=True):
        assert new <= before
    if k == 0:
        assert torch.equal(phy, old)


@settings(max_examples=40, deadline=None)
@given(c=cases(max_layers=3, max_experts=24), method=st.sampled_from(["greedy", "refined"]))
def test_relabel_keeps_loads_and_moves_less(c, method):
    w = c.weight()
    old = old_placement(c, c.seed % 1000 + 3)
    plain = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="cpu", method=method)
    moved = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="cpu", method=method, old_phy2log=old)
    assert_valid_placement(*moved, c.E, c.R, c.G, c.N, c.P)
    assert torch.equal(moved[2], plain[2]), "relabelling keeps the replica counts"
    # every GPU's multiset of experts is one of the plan's (so the GPU loads are a permutation)
    S = c.R // c.P
    gpus = lambda phy: sorted(tuple(sorted(phy[q : q + S])) for q in range(0, len(phy), S))  # noqa: E731
    for a, b, o in zip(moved[0].tolist(), plain[0].tolist(), old.tolist(), strict=True):
        assert gpus(a) == gpus(b)
        assert sum(x != y for x, y in zip(a, o, strict=True)) <= sum(x != y for x, y in zip(b, o, strict=True))


def _kept_by_best_permutation(new: list[int], old: list[int], P: int) -> int:
    """Brute force: the most slots any renumbering of GPUs (then slot-stable order) keeps."""
    S = len(new) // P
    blocks = [new[p * S : p * S + S] for p in range(P)]
    olds = [old[p * S : p * S + S] for p in range(P)]

    def overlap(a, b):
        return sum(min(a.count(e), b.count(e)) for e in set(a))

    return max(sum(overlap(blocks[perm[p]], olds[p]) for p in range(P)) for perm in itertools.permutations(range(P)))


@pytest.mark.parametrize("seed", range(6))
def test_relabel_is_optimal_over_gpu_permutations(seed):
    # global policy, P <= 5 GPUs: brute force over all 120 numberings
    c = Case(1, 10, 20, 1, 1, 5, "skewed", seed)
    w = c.weight()
    old = old_placement(c, seed + 50)
    phy = eplb.rebalance_experts(w, c.R, 1, 1, c.P, backend="cpu", old_phy2log=old)[0][0].tolist()
    plain = eplb.rebalance_experts(w, c.R, 1, 1, c.P, backend="cpu")[0][0].tolist()
    kept = sum(a == b for a, b in zip(phy, old[0].tolist(), strict=True))
    assert kept == _kept_by_best_permutation(plain, old[0].tolist(), c.P)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_assignment_is_optimal(n):
    gen = torch.Generator().manual_seed(n)
    overlap = torch.randint(0, 4, (40, n, n), generator=gen)
    col = cpu.assign_max_overlap(overlap.numpy())
    for b in range(40):
        assert sorted(col[b].tolist()) == list(range(n))
        best = max(sum(int(overlap[b, i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n)))
        assert sum(int(overlap[b, i, col[b, i]]) for i in range(n)) == best


def test_search_moves_on_a_hand_case():
    # Two GPUs, two slots each, no redundancy, w = [5, 4, 3, 2], start {5, 4}, {3, 2} (loads 9, 5).
    # Swaps of GPU 0's slot i with GPU 1's slot j, value max((9 - si) + sj, (5 - sj) + si):
    # (0, 2): max(7, 7) = 7; (0, 3): max(6, 8) = 8; (1, 2): max(8, 6) = 8; (1, 3): max(7, 7) = 7.
    # Value 7 ties between (0, 2) and (1, 3): the lower i wins, slots 0 and 2 exchange experts.
    w = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    phy = torch.tensor([[0, 1, 2, 3]])
    rank = torch.zeros_like(phy)
    cnt = torch.ones((1, 4), dtype=torch.int64)
    for out in (
        reference.search(w, phy, rank, cnt, 2, 1),
        tuple(torch.from_numpy(a) for a in cpu.search(w.numpy(), phy.numpy(), rank.numpy(), cnt.numpy(), 2, 1)),
    ):
        assert out[0].tolist() == [[2, 1, 0, 3]]
    # a budget of one slot forbids the swap (two slots change); no shift exists (no copies)
    out = reference.search(w, phy, rank, cnt, 2, 1, phy, 1)
    assert out[0].tolist() == [[0, 1, 2, 3]]


def test_shift_moves_a_copy_to_the_heavy_expert():
    # One GPU pair, two slots each. Expert 0 (load 8) alone, expert 1 (load 2) with 2 copies:
    # {0, 1}, {1, 2}: loads 8 + 1 = 9 and 1 + 2 = 3. Shifting a copy of 1 (the donor, share 1) to
    # expert 0 gives 0 two copies (4 each): best slot is 2 (GPU 1): {0, 1'}, {0, 2} with 1' = 2.
    w = torch.tensor([[8.0, 2.0, 2.0]])
    phy = torch.tensor([[0, 1, 1, 2]])
    rank = torch.tensor([[0, 0, 1, 0]])
    cnt = torch.tensor([[1, 2, 1]])
    out = reference.search(w, phy, rank, cnt, 2, 1)
    assert out[0].tolist() == [[0, 1, 0, 2]]
    assert out[2].tolist() == [[2, 1, 1]]
    assert out[1].tolist() == [[0, 0, 1, 0]]  # the freed copy's rank goes to the remaining copy of 1
    got = cpu.search(w.numpy(), phy.numpy(), rank.numpy(), cnt.numpy(), 2, 1)
    assert [a.tolist() for a in got] == [o.tolist() for o in out]


# ----------------------------------------------------------------------------------------------
# the API: arguments, arrays, validation
# ----------------------------------------------------------------------------------------------


def test_greedy_is_unchanged_and_hierarchical_takes_the_methods():
    c = FIXED_CASES[0]
    w = c.weight()
    assert_same(
        eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="cpu", method="greedy"),
        reference.rebalance_experts(w, c.R, c.G, c.N, c.P),
    )
    old = old_placement(c, 3)
    h = eplb.rebalance_experts_hierarchical(
        w, c.R, c.G, c.N, c.P, backend="cpu", method="refined", old_phy2log=old, max_moves=5
    )
    r = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="cpu", method="refined", old_phy2log=old, max_moves=5)
    assert torch.equal(h[0], r[0]) and torch.equal(h[2], r[2])


def test_numpy_in_numpy_out():
    c = FIXED_CASES[0]
    w = c.weight().numpy()
    old = old_placement(c, 3).numpy()
    phy, log2phy, cnt = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="cpu", old_phy2log=old, max_moves=4)
    assert isinstance(phy, np.ndarray) and phy.dtype == np.int64
    assert ((phy != old).sum(axis=1) <= 4).all()


def test_inputs_are_not_mutated():
    c = FIXED_CASES[0]
    w = c.weight()
    old = old_placement(c, 3)
    w0, old0 = w.clone(), old.clone()
    eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="cpu", method="refined", old_phy2log=old, max_moves=3)
    assert torch.equal(w, w0) and torch.equal(old, old0)


VALID_OLD = torch.arange(16).remainder(12).expand(2, 16).contiguous()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "best"}, ValueError, "method must be one of"),
        ({"method": 1}, TypeError, "method must be a str"),
        ({"max_moves": 3}, ValueError, "max_moves needs old_phy2log"),
        ({"old_phy2log": "old"}, TypeError, "old_phy2log must be"),
        ({"old_phy2log": torch.zeros((2, 15), dtype=torch.int64)}, ValueError, r"old_phy2log must have shape"),
        (
            {"old_phy2log": torch.full((2, 16), 12)},
            ValueError,
            r"expert ids in \[0, 12\) or -1 \(an empty slot\), found 12",
        ),
        ({"old_phy2log": torch.full((2, 16), 12), "max_moves": 2}, ValueError, r"expert ids in \[0, 12\), found 12"),
        ({"old_phy2log": torch.full((2, 16), -2)}, ValueError, r"found -2"),
        ({"old_phy2log": torch.full((2, 16), -1), "max_moves": 2}, ValueError, r"has empty slots \(-1\)"),
        ({"old_phy2log": torch.zeros((2, 16), dtype=torch.float32)}, TypeError, "integer dtype"),
        (
            {"old_phy2log": torch.zeros((2, 16), dtype=torch.int64), "min_gain": 0.1},
            ValueError,
            "expert 1 is missing from layer 0",
        ),
        ({"old_phy2log": VALID_OLD, "max_moves": -1}, ValueError, "max_moves"),
        ({"old_phy2log": VALID_OLD, "max_moves": True}, TypeError, "max_moves"),
        ({"old_phy2log": VALID_OLD, "max_moves": 2.0}, TypeError, "max_moves"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    w = FIXED_CASES[0].weight()
    with pytest.raises(error, match=match):
        eplb.rebalance_experts(w, 16, 4, 2, 8, backend="cpu", **kwargs)


# ----------------------------------------------------------------------------------------------
# real loads
# ----------------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("config", REAL_CONFIGS, ids=lambda c: c[0])
def test_real_loads_refined_never_worse_and_cpu_equals_reference(config):
    _, R, G, N, P = config
    w = read_loads(FILES[0]).weight
    greedy = eplb.rebalance_experts(w, R, G, N, P, backend="cpu")
    refined = eplb.rebalance_experts(w, R, G, N, P, backend="cpu", method="refined")
    assert all(
        r <= g for r, g in zip(peak64(w, refined[0], refined[2], P), peak64(w, greedy[0], greedy[2], P), strict=True)
    )
    few = w[:3]
    assert_same(
        eplb.rebalance_experts(few, R, G, N, P, backend="cpu", method="refined"),
        eplb.rebalance_experts(few, R, G, N, P, backend="reference", method="refined"),
    )


@needs_data
def test_real_loads_incremental_cpu_equals_reference():
    w0, w1 = read_loads(FILES[0]).weight[:3], read_loads(FILES[1]).weight[:3]
    for _, R, G, N, P in REAL_CONFIGS:
        old = eplb.rebalance_experts(w0, R, G, N, P, backend="cpu")[0]
        kw = dict(old_phy2log=old, max_moves=R * 15 // 100, method="refined")
        got = eplb.rebalance_experts(w1, R, G, N, P, backend="cpu", **kw)
        assert_same(got, eplb.rebalance_experts(w1, R, G, N, P, backend="reference", **kw))
        assert ((got[0] != old).sum(dim=1) <= R * 15 // 100).all()


@pytest.mark.parametrize("c", FIXED_CASES[:6], ids=lambda c: c.id)
def test_triton_backend_agrees_through_the_api(c):
    # the kernels on the interpreter (tests/test_search_kernel.py covers the search kernel in depth)
    w = c.weight()
    old = old_placement(c, 11)
    for kwargs in ({"method": "refined"}, {"method": "refined", "old_phy2log": old, "max_moves": c.R // 3}):
        want = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="reference", **kwargs)
        got = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="triton", **kwargs)
        assert_same(got, want, ("phy2log", "log2phy", "logcnt"))


def test_planner_plans_refined_and_incremental_like_the_api():
    from eplb_triton import EplbPlanner

    c = FIXED_CASES[0]
    w = c.weight().float()
    old = old_placement(c, 4)
    planner = EplbPlanner(c.L, c.E, c.R, c.G, c.N, c.P, device="cpu", method="refined", max_moves=3)
    phy2log, log2phy, logcnt = planner.plan(w, old)
    want = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="cpu", method="refined", old_phy2log=old, max_moves=3)
    assert torch.equal(phy2log, want[0]) and torch.equal(logcnt, want[2])
    X = want[1].shape[2]
    assert torch.equal(log2phy[:, :, :X], want[1]) and (log2phy[:, :, X:] == -1).all()
    with pytest.raises(ValueError, match="max_moves needs old_phy2log"):
        planner.plan(w)
    # the planner's own buffer as the placement in service: read before the kernel rewrites it
    w2 = w.flip(1).contiguous()
    in_service = planner.phy2log.clone()
    want = eplb.rebalance_experts(
        w2, c.R, c.G, c.N, c.P, backend="cpu", method="refined", old_phy2log=in_service, max_moves=3
    )
    phy2log, _, logcnt = planner.plan(w2, planner.phy2log)
    assert torch.equal(phy2log, want[0]) and torch.equal(logcnt, want[2])
    assert int((phy2log != in_service).sum(dim=1).max()) <= 3


@settings(max_examples=40, deadline=None)
@given(c=cases(max_layers=5, max_experts=24), frac=st.floats(0, 1))
def test_skipping_assignments_that_cannot_fit_changes_nothing(c, frac):
    # pipeline._may_fit skips the relabelling of layers whose full plan must move more than
    # max_moves slots; computing every layer must give the same result
    from eplb_triton import pipeline

    w = c.weight()
    old = old_placement(c, c.seed % 1000 + 5)
    k = int(frac * c.R)
    got = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="cpu", old_phy2log=old, max_moves=k)
    original = pipeline._may_fit
    pipeline._may_fit = lambda *args: None  # every layer
    try:
        want = eplb.rebalance_experts(w, c.R, c.G, c.N, c.P, backend="cpu", old_phy2log=old, max_moves=k)
    finally:
        pipeline._may_fit = original
    assert_same(got, want, ("phy2log", "log2phy", "logcnt"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy computes with the NaNs
@pytest.mark.parametrize("P", [3, 4, 6])
def test_search_kernel_on_nan_rows_stays_in_bounds(P):
    # all-NaN loads with P not a power of two: tl.max skips NaN, so the peak was a padding lane's
    # -inf, the fullest GPU came out as NO_INDEX = 2**30, and slot a * S overflowed int32: the kernel
    # read 16 GiB before phy2log's row (the bounds checker's finding; the interpreter segfaulted).
    # No fullest GPU must end the row's search. Restored from commit 853aee5, which dropped it.
    from eplb_triton import EplbPlanner

    E, R = P, 2 * P
    planner = EplbPlanner(2, E, R, 1, 1, P, device="cpu", method="refined")
    before = planner.phy2log.clone()
    w = torch.stack([torch.arange(1.0, E + 1), torch.full((E,), float("nan"))])
    phy2log, _, _ = planner.plan(w)
    assert planner.invalid.tolist() == [0, 1]
    assert torch.equal(phy2log[1], before[1])
    want = eplb.rebalance_experts(w[:1], R, 1, 1, P, backend="cpu", method="refined")[0]
    assert torch.equal(phy2log[:1], want)
    # the launcher alone, without the planner's mask: the NaN row comes back as it went in
    from eplb_triton import launch

    phy, rank, cnt = launch.search(w, phy2log, planner.phyrank, planner.logcnt, P, 1)
    assert torch.equal(phy[1], phy2log[1]) and torch.equal(cnt[1], planner.logcnt[1])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_min_gain_keeps_layers_whose_plan_gains_too_little(backend):
    # layer 0: the old placement is already as good as a plan (no gain: kept); layer 1: a plan that
    # gains a lot (taken). The gate's threshold decides layer 2 (a gain between 5% and 30%).
    R, G, N, P = 12, 2, 1, 4
    old = eplb.rebalance_experts(torch.ones(3, 8), R, G, N, P, backend="cpu")[0]
    w = torch.tensor([[10.0] * 8, [0, 20, 0, 0, 40, 0, 10, 10], [0, 0, 0, 0, 12, 10, 10, 10]])
    plan = eplb.rebalance_experts(w, R, G, N, P, backend="cpu", old_phy2log=old)
    peak = lambda phy, cnt: eplb.metrics.gpu_loads(w, phy, cnt, P).amax(1)  # noqa: E731
    old_cnt = torch.zeros(3, 8, dtype=torch.int64).scatter_add_(1, old, torch.ones_like(old))
    gain = 1 - peak(plan[0], plan[2]) / peak(old, old_cnt)
    assert gain[0] == 0 and gain[1] > 0.3 and 0.05 < gain[2] < 0.3, gain
    for min_gain, taken in ((0.0, [False, True, True]), (0.05, [False, True, True]), (0.3, [False, True, False])):
        got = eplb.rebalance_experts(w, R, G, N, P, backend=backend, old_phy2log=old, min_gain=min_gain)
        for layer in range(3):
            want = plan if taken[layer] else (old, None, old_cnt)
            assert torch.equal(got[0][layer], want[0][layer]) and torch.equal(got[2][layer], want[2][layer])
        assert_valid_placement(*got, 8, R, G, N, P)


def test_min_gain_argument_rules():
    w = torch.ones(1, 4)
    old = torch.tensor([[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="min_gain needs old_phy2log"):
        eplb.rebalance_experts(w, 4, 1, 1, 2, min_gain=0.1)
    for bad, error in ((1.0, ValueError), (-0.1, ValueError), (True, TypeError), ("0.1", TypeError)):
        with pytest.raises(error, match="min_gain"):
            eplb.rebalance_experts(w, 4, 1, 1, 2, old_phy2log=old, min_gain=bad)
