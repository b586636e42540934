"""The reference against the published test vector (docs/algorithm.md) and hand-checked small cases."""

import torch

from eplb_triton import reference

WEIGHT = torch.tensor(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)
PHY2LOG = torch.tensor(
    [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
)
LOGCNT = torch.tensor([[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]])


def test_spec_test_vector():
    phy2log, log2phy, logcnt = reference.rebalance_experts(WEIGHT, 16, 4, 2, 8)
    assert torch.equal(phy2log, PHY2LOG)
    assert torch.equal(logcnt, LOGCNT)
    assert log2phy.shape == (2, 12, 2)


def test_packing_by_hand():
    # 4 > 3 > 2 > 1 into 2 packs of 2: 4 -> p0, 3 -> p1, 2 -> p1 (3 < 4), 1 -> p0 (p1 full).
    pack, rank = reference.balanced_packing(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 2)
    assert pack.tolist() == [[0, 1, 1, 0]]
    assert rank.tolist() == [[0, 0, 1, 1]]


def test_packing_ties_lower_index_first():
    # All equal: items in index order, each to the lowest-index least-loaded pack.
    pack, rank = reference.balanced_packing(torch.ones(1, 6), 3)
    assert pack.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert rank.tolist() == [[0, 0, 0, 1, 1, 1]]


def test_packing_one_item_per_pack_is_identity():
    pack, rank = reference.balanced_packing(torch.tensor([[1.0, 9.0, 5.0]]), 3)
    assert pack.tolist() == [[0, 1, 2]] and rank.tolist() == [[0, 0, 0]]


def test_replication_by_hand():
    # 6/1 = 6 is the largest -> slot 3 = e0; then 6/2 = 3 ties with e2's 3/1: lower e wins -> e0.
    phy2log, rank, cnt = reference.replicate_experts(torch.tensor([[6.0, 2.0, 3.0]]), 5)
    assert phy2log.tolist() == [[0, 1, 2, 0, 0]]
    assert rank.tolist() == [[0, 0, 0, 1, 2]]
    assert cnt.tolist() == [[3, 1, 1]]


def test_global_policy_is_hierarchical_with_one_group_and_node():
    w = torch.tensor([[5, 1, 9, 3, 7, 2]])
    p_global, _, c_global = reference.rebalance_experts(w, 8, 3, 2, 4)  # 3 % 2 != 0 -> global
    p_one, _, c_one = reference.rebalance_experts_hierarchical(w, 8, 1, 1, 4)
    assert torch.equal(p_global, p_one) and torch.equal(c_global, c_one)
