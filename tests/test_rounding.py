"""Float32 arithmetic in the spec's order, on every backend, with values that separate it from its
likely mistakes (float64 sums, sums in another order)."""

import pytest
import torch

import eplb_triton as eplb
from eplb_triton import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_group_loads_are_float32_sums_in_expert_order(backend):
    # Groups of three experts. In float32, left to right: 2^24 + 1 rounds back to 2^24 (ties to
    # even), twice, so group 0 weighs 2^24 and group 1 (2^24 + 2) is heavier. In float64, or summed
    # right to left (1 + 1 + 2^24), group 0 weighs 2^24 + 2 too, and the tie sends it first.
    # Packing 4 groups into 2 nodes, heaviest first, into the lighter open node:
    #   g1 (2^24+2) -> node 0; g0 (2^24) -> node 1; g2 (1) -> node 1 (2^24 < 2^24+2); g3 -> node 0 (node 1 full).
    w = torch.tensor([[2**24, 1, 1, 2**24 + 2, 0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.int64)
    phy2log, _, logcnt = eplb.rebalance_experts(w.to(DEVICE), 16, 4, 2, 8, backend=backend)
    node0, node1 = phy2log[0, :8].tolist(), phy2log[0, 8:].tolist()
    assert set(node0) == {3, 4, 5, 9, 10, 11}, "groups 1 and 3 on node 0"
    assert set(node1) == {0, 1, 2, 6, 7, 8}, "groups 0 and 2 on node 1"
    assert int(logcnt.sum()) == 16


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_pack_loads_are_float32_sums(backend):
    # Items (already in decreasing order) a = 2^24 + 2, b = 2^24, three 1s, three 0s; 2 packs of 4.
    # float32: a -> p0; b -> p1; each 1 -> p1, and 2^24 + 1 rounds back to 2^24 (ties to even), so
    # p1 stays lighter than p0 and takes all three 1s (full); the 0s go to p0.
    # float64 pack loads: p1 reaches 2^24 + 2 == p0 after two 1s, the tie sends the third 1 to p0.
    w = torch.tensor([[2.0**24 + 2, 2.0**24, 1, 1, 1, 0, 0, 0]])
    pack, rank = eplb.balanced_packing(w.to(DEVICE), 2, backend=backend)
    assert pack.tolist() == [[0, 1, 1, 1, 1, 0, 0, 0]]
    assert rank.tolist() == [[0, 0, 1, 2, 3, 1, 2, 3]]


def test_reference_converts_to_float32_directly():
    # int64 2^60 + 2^36 + 1 is nearest to float32 2^60 + 2^37 (the float32 spacing there is 2^37 and
    # it lies past the midpoint). Through float64 it first rounds to 2^60 + 2^36, an exact midpoint,
    # which ties to even: 2^60, equal to item 0. Direct: item 1 is heavier -> p0; item 0 -> p1;
    # item 2 -> p1 (the lighter); item 3 -> p0 (p1 full).
    w = torch.tensor([[2**60, 2**60 + 2**36 + 1, 0, 0]], dtype=torch.int64)
    want_pack, want_rank = [[1, 0, 1, 0]], [[0, 0, 1, 1]]
    pack, rank = reference.balanced_packing(w, 2)
    assert pack.tolist() == want_pack and rank.tolist() == want_rank
    for backend in ("reference", "cpu"):
        pack, rank = eplb.balanced_packing(w, 2, backend=backend)
        assert pack.tolist() == want_pack and rank.tolist() == want_rank
