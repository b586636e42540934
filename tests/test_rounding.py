"""Float32 arithmetic in the spec's order, on every backend, with values that separate it from its
likely mistakes (float64 sums, sums in another order)."""

import pytest
import torch

import eplb_triton as eplb

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
