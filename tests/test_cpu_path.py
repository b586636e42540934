"""The vectorised CPU path returns exactly what the literal reference returns."""

import numpy as np
import pytest
import torch
from helpers import FIXED_CASES, Case, assert_same, assert_valid_placement, cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb_triton as eplb
from eplb_triton import reference


def _compare_all(case: Case) -> None:
    w = case.weight()
    got = eplb.rebalance_experts(w, case.R, case.G, case.N, case.P, backend="cpu")
    want = reference.rebalance_experts(w, case.R, case.G, case.N, case.P)
    assert_same(got, want, ("phy2log", "log2phy", "logcnt"))
    assert_valid_placement(*got, case.E, case.R, case.G, case.N, case.P)


@pytest.mark.parametrize("case", FIXED_CASES, ids=lambda c: c.id)
def test_fixed_cases(case):
    _compare_all(case)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_generated_cases(case):
    _compare_all(case)


@settings(max_examples=100, deadline=None)
@given(cases(max_layers=4, max_experts=24))
def test_building_blocks(case):
    w = case.weight()
    assert_same(eplb.replicate_experts(w, case.R, backend="cpu"), reference.replicate_experts(w, case.R))
    assert_same(eplb.balanced_packing(w, case.G, backend="cpu"), reference.balanced_packing(w, case.G))
    if case.hierarchical:
        got = eplb.rebalance_experts_hierarchical(w, case.R, case.G, case.N, case.P, backend="cpu")
        want = reference.rebalance_experts_hierarchical(w, case.R, case.G, case.N, case.P)
        assert_same(got, want)


def test_float32_rounding_order():
    # 2**24 + 1 is not a float32: sums must round exactly as the spec's float32 order does.
    w = torch.tensor([[2.0**24, 1.0, 1.0, 1.0, 2.0**24 + 2, 0.0, 3.0, 0.0]], dtype=torch.float64)
    for args in ((8, 4, 2, 2), (8, 2, 2, 4), (12, 1, 1, 4)):
        got = eplb.rebalance_experts(w, *args, backend="cpu")
        want = reference.rebalance_experts(w, *args)
        assert_same(got, want)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_overflowing_pack_loads_stay_exact():
    # Pack loads overflow to inf in float32; full packs must still rank after them.
    big = 3.0e38
    w = torch.tensor([[big, big, big, big, 1.0, 1.0]])
    got = eplb.balanced_packing(w, 2, backend="cpu")
    want = reference.balanced_packing(w, 2)
    assert_same(got, want)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda packs: st.tuples(
            st.just(packs),
            st.integers(1, 5).flatmap(
                lambda cap: st.lists(
                    st.lists(
                        st.sampled_from([0.0, -0.0, 1.0, 2.0, 2.0, 3.5, 3e38, 1e-45]),
                        min_size=packs * cap,
                        max_size=packs * cap,
                    ),
                    min_size=1,
                    max_size=3,
                )
            ),
        )
    )
)
def test_packing_zero_signed_zero_overflow_and_ties(args):
    # the CPU packing's shortcuts (its first round, bit-pattern keys): -0.0 among +0.0, subnormals,
    # float32 sums overflowing to inf, equal weights, any number of positive items per row
    packs, rows = args
    w = torch.tensor(rows, dtype=torch.float32)
    assert_same(eplb.balanced_packing(w, packs, backend="cpu"), reference.balanced_packing(w, packs))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(0, 8), st.integers(1, 3), st.integers(0, 2**16))
def test_slot_order_ranks_numpy_equals_torch(E, extra, L, seed):
    from eplb_triton import cpu
    from eplb_triton.placement import slot_order_ranks

    rng = np.random.default_rng(seed)
    phy = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, extra)])) for _ in range(L)])
    rank, cnt = cpu.slot_order_ranks(phy, E)
    want_rank, want_cnt = slot_order_ranks(torch.from_numpy(phy), E)
    assert np.array_equal(rank, want_rank.numpy()) and np.array_equal(cnt, want_cnt.numpy())
