"""The local search kernel (docs/algorithm.md section 10.2) == the literal reference, exactly.

On CPU the kernel runs on the interpreter (conftest.py), on small shapes: <= 16 experts, <= 32
slots. Starts are the greedy placements (global and hierarchical), or, with a move budget, another
valid placement (the greedy of other loads) that the search must not drift too far from; the
pair-swap tests also start from random valid placements and a hand case. The ahead-of-time
compile of the kernel for sm_80 / sm_90 is in tests/test_compile_targets.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb_triton as eplb
from eplb_triton import cpu, launch, reference
from eplb_triton.placement import slot_order_ranks

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def layouts(draw, hierarchical: bool) -> tuple[int, int, int, int, int]:
    """(E, R, G, N, P): N = 1 for the global policy; every divisibility the policies need."""
    N = draw(st.sampled_from([2, 4])) if hierarchical else 1
    E = N * draw(st.integers(1, 16 // N))
    G = draw(st.sampled_from([g for g in _divisors(E) if g % N == 0])) if hierarchical else 1
    R = N * draw(st.integers(E // N, 32 // N))
    P = draw(st.sampled_from([p for p in _divisors(R) if p % N == 0 and p > 1] or [N]))
    return E, R, G, N, P


@st.composite
def loads(draw, L: int, E: int) -> torch.Tensor:
    """Small integers: zeros and ties everywhere (equal loads, equal shares, equal values)."""
    top = draw(st.sampled_from([1, 3, 10, 1000]))
    values = draw(st.lists(st.integers(0, top), min_size=L * E, max_size=L * E))
    return torch.tensor(values, dtype=torch.float32).reshape(L, E)


def _greedy(w: torch.Tensor, R: int, G: int, N: int, P: int):
    return eplb.rebalance_experts_hierarchical(w, R, G, N, P, backend="cpu")


def _search_all(w, phy, rank, cnt, P, N, old=None, budget=None):
    """(kernel, reference); the inputs must come back untouched and the CPU path must agree."""
    before = [t.clone() for t in (phy, rank, cnt)]
    got = launch.search(w, phy, rank, cnt, P, N, old, budget)
    for t, b in zip((phy, rank, cnt), before, strict=True):
        assert torch.equal(t, b), "the search mutated its inputs"
    want = reference.search(w, phy, rank, cnt, P, N, old, budget)
    arrays = [None if t is None else t.numpy() for t in (phy, rank, cnt, old)]
    numpy = cpu.search(w.numpy(), *arrays[:3], P, N, arrays[3], budget)
    for g, r, c, name in zip(got, want, numpy, ("phy2log", "phyrank", "logcnt"), strict=True):
        assert g.dtype == torch.int64 and g.shape == r.shape, name
        assert torch.equal(g.cpu(), r), f"{name}: kernel {g.tolist()} != reference {r.tolist()}"
        assert np.array_equal(c, r.numpy()), f"{name}: cpu path differs from the reference"
    return got


def _count_pair_swaps(monkeypatch) -> list[int]:
    """Patches the CPU path's pair swap to record how many rows made one per call; returns the record."""
    made = []
    pair_swap = cpu._pair_swap

    def counting(*args):
        found = pair_swap(*args)
        made.append(int(found.sum()))
        return found

    monkeypatch.setattr(cpu, "_pair_swap", counting)
    return made


def _assert_valid(phy, rank, cnt):
    L, E = cnt.shape
    for layer in range(L):
        assert torch.equal(torch.bincount(phy[layer], minlength=E), cnt[layer])
        assert (cnt[layer] >= 1).all()
        for e in range(E):  # ranks of an expert are 0 .. cnt - 1
            assert sorted(rank[layer][phy[layer] == e].tolist()) == list(range(int(cnt[layer, e])))


@SETTINGS
@given(data=st.data())
def test_global_start(data):
    E, R, _, _, P = data.draw(layouts(hierarchical=False))
    L = data.draw(st.integers(1, 2))
    w = data.draw(loads(L, E))
    phy, rank, cnt = _greedy(w, R, 1, 1, P)
    _assert_valid(*_search_all(w, phy, rank, cnt, P, 1))


@SETTINGS
@given(data=st.data())
def test_hierarchical_start(data):
    E, R, G, N, P = data.draw(layouts(hierarchical=True))
    L = data.draw(st.integers(1, 2))
    w = data.draw(loads(L, E))
    phy, rank, cnt = _greedy(w, R, G, N, P)
    _assert_valid(*_search_all(w, phy, rank, cnt, P, N))


def _start_from(old: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``old`` itself as the start: ranks in slot order of occurrence, counts by bincount."""
    rank = torch.zeros_like(old)
    for layer in range(old.shape[0]):
        seen = [0] * E
        for q, e in enumerate(old[layer].tolist()):
            rank[layer, q] = seen[e]
            seen[e] += 1
    cnt = torch.stack([torch.bincount(row, minlength=E) for row in old])
    return old.clone(), rank, cnt


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_budget(data):
    E, R, _, _, P = data.draw(layouts(hierarchical=False))
    w, w_old = data.draw(loads(1, E)), data.draw(loads(1, E))
    old = _greedy(w_old, R, 1, 1, P)[0]
    phy, rank, cnt = _start_from(old, E)
    for budget in sorted({0, 1, 2, data.draw(st.integers(0, R)), R}):
        got = _search_all(w, phy, rank, cnt, P, 1, old, budget)
        assert int((got[0] != old).sum()) <= budget
        _assert_valid(*got)


def test_budget_hand_picked():
    """One hot expert placed badly: unlimited, the search moves several slots; each budget caps it."""
    w = torch.tensor([[100.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    old = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5]])  # expert 0 three times on GPU 0 (of 4)
    phy, rank, cnt = _start_from(old, 6)
    free = _search_all(w, phy, rank, cnt, 4, 1)
    assert int((free[0] != old).sum()) >= 2
    for budget in range(0, 9):
        got = _search_all(w, phy, rank, cnt, 4, 1, old, budget)
        assert int((got[0] != old).sum()) <= budget
    assert torch.equal(_search_all(w, phy, rank, cnt, 4, 1, old, 0)[0], old)


def test_one_gpu_returns_the_start():
    w = torch.tensor([[5.0, 0.0, 3.0], [1.0, 1.0, 9.0]])
    phy, rank, cnt = _greedy(w, 6, 1, 1, 1)
    got = _search_all(w, phy, rank, cnt, 1, 1)
    for g, s in zip(got, (phy, rank, cnt), strict=True):
        assert torch.equal(g, s)


@pytest.mark.parametrize(
    "w, R, P",
    [
        (torch.full((2, 4), 7.0), 8, 4),  # all equal and already balanced
        (torch.zeros((1, 6)), 12, 3),  # no load at all
        (torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 4, 2),  # 4+1 | 3+2: no swap and no shift lowers 5
    ],
    ids=["equal", "zeros", "optimal"],
)
def test_no_move_applies(w, R, P):
    phy, rank, cnt = _greedy(w, R, 1, 1, P)
    got = _search_all(w, phy, rank, cnt, P, 1)
    for g, s in zip(got, (phy, rank, cnt), strict=True):
        assert torch.equal(g, s)


def test_pair_swap_when_no_single_move_helps():
    """Two GPUs of four slots, one copy per expert (no shift): {9, 7, 2, 1} = 19 and {7, 5, 3, 2} = 17.
    Every single swap trades a difference of 0, 2 or more (or a negative one): none lowers 19. The
    pair swaps that trade 1 ((9, 2) for (7, 3), (9, 1) for (7, 2), (7, 2) for (5, 3), (7, 1) for
    (5, 2)) all reach 18 | 18; the lowest (i1, i2, j1, j2) = (0, 2, 4, 6) wins."""
    w = torch.tensor([[9.0, 7.0, 2.0, 1.0, 7.0, 5.0, 3.0, 2.0]])
    phy = torch.arange(8)[None]
    rank, cnt = torch.zeros_like(phy), torch.ones_like(phy)
    got = _search_all(w, phy, rank, cnt, 2, 1)
    assert got[0].tolist() == [[4, 1, 6, 3, 0, 5, 2, 7]]
    assert got[1].tolist() == [[0] * 8] and torch.equal(got[2], cnt)
    # the same start on two nodes of one GPU each has no GPU of a's node to swap with
    assert torch.equal(_search_all(w, phy, rank, cnt, 2, 2)[0], phy)
    # with a budget, pair swaps are not searched: no single move, so the start comes back
    assert torch.equal(_search_all(w, phy, rank, cnt, 2, 1, phy, 8)[0], phy)


def test_pair_swap_that_lowers_only_its_rounded_value_ends_the_search(monkeypatch):
    """Expert 1 on both sides of a pair swap: its value ``(peak - out) + in`` rounds one ulp below the
    peak, but the loads summed again give the same peak on the other GPU. Without the stop rule
    the search traded the same four slots back and forth until the round limit (9 pair swaps
    here); now the round after it ends the search, in every backend."""
    w = torch.tensor(
        [[8.01136589050293, 1.0402673482894897, 7.2043609619140625, 1.890579104423523,
          3.757253885269165, 0.32662132382392883, 1.2976833581924438, 7.293476104736328]]
    )  # fmt: skip
    phy = torch.tensor([[7, 5, 1, 0, 4, 2, 5, 6, 1, 7, 7, 7, 1, 1, 3, 2]])
    rank = torch.tensor([[0, 0, 1, 0, 0, 0, 1, 0, 3, 1, 2, 3, 2, 0, 0, 1]])
    cnt = torch.tensor([[1, 4, 2, 1, 1, 2, 1, 4]])
    made = _count_pair_swaps(monkeypatch)
    got = _search_all(w, phy, rank, cnt, 4, 1)
    assert sum(made) == 1
    _assert_valid(*got)


@pytest.mark.parametrize("S, N", [(4, 1), (5, 2), (8, 2), (16, 1)])
def test_pair_swaps_on_random_starts(S, N, monkeypatch):
    """Random placements (each node's experts in random slots, one expert of each node with two
    copies) leave work for pair swaps: the three backends agree, and the CPU path makes some."""
    gen = np.random.default_rng(S * 10 + N)
    P = N * (2 if S >= 8 else 3)
    L = 1 if S > 8 else 3  # the interpreter runs S = 16's pair swaps slowly: one layer
    per_node = S * P // N  # slots of a node, holding per_node - 1 experts
    E = N * (per_node - 1)
    rows = []
    for _ in range(L):
        row = [gen.permutation(np.r_[np.arange(per_node - 1), 0]) + n * (per_node - 1) for n in range(N)]
        rows.append(np.concatenate(row))
    phy = torch.tensor(np.stack(rows))
    rank, cnt = slot_order_ranks(phy, E)
    # with 16 slots per GPU, single moves balance loads of 1..39 alone: cubes are coarser
    w = torch.tensor(gen.integers(1, 40, (L, E)) ** (3 if S > 8 else 1), dtype=torch.float32)
    made = _count_pair_swaps(monkeypatch)
    got = _search_all(w, phy, rank, cnt, P, N)
    _assert_valid(*got)
    assert sum(made) > 0, "no pair swap was made"
    if N > 1:  # every copy of an expert stays on its node
        node_of = torch.arange(S * P) // per_node
        for layer in range(L):
            for e in range(E):
                assert node_of[got[0][layer] == e].unique().numel() == 1


def test_float64_shares_decide():
    """Shares that round differently in float32 and float64, with a swap and a shift in reach."""
    w = torch.tensor([[16777216.0, 1.0, 1.0, 3.0, 7.0, 0.1, 0.3]])
    phy, rank, cnt = _greedy(w, 14, 1, 1, 7)
    _assert_valid(*_search_all(w, phy, rank, cnt, 7, 1))


def test_many_layers_one_launch():
    """Layers are independent programs: a batch equals the layers searched one at a time."""
    w = torch.tensor(np.random.default_rng(3).integers(0, 50, (5, 8)), dtype=torch.float32)
    phy, rank, cnt = _greedy(w, 16, 1, 1, 4)
    got = _search_all(w, phy, rank, cnt, 4, 1)
    for layer in range(5):
        one = launch.search(w[layer : layer + 1], phy[layer : layer + 1], rank[layer : layer + 1],
                            cnt[layer : layer + 1], 4, 1)  # fmt: skip
        for g, o in zip(got, one, strict=True):
            assert torch.equal(g[layer : layer + 1], o)
