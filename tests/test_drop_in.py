"""The call forms DeepSeek's eplb accepts: the global path's relaxed rules, AssertionError for bad
arguments, numpy arrays and nested lists."""

import numpy as np
import pytest
import torch
from helpers import make_loads

import eplb_triton as eplb
from eplb_triton import EplbArgumentError, reference


@pytest.mark.parametrize(
    ("E", "R", "G", "N", "P"),
    [(4, 8, 3, 2, 4), (4, 6, 3, 2, 3), (12, 16, 5, 2, 8), (6, 9, 4, 3, 3)],
    ids=["E%G", "P%N", "E%G-and-P%N", "G%N-odd"],
)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_global_policy_needs_neither_e_mod_g_nor_p_mod_n(E, R, G, N, P, backend):
    """G % N != 0 runs the global policy (G = N = 1), as DeepSeek's eplb does for these calls."""
    assert G % N != 0 and (E % G != 0 or P % N != 0)
    w = make_loads(2, E, "skewed", E + R)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    phy2log, log2phy, logcnt = eplb.rebalance_experts(w.to(device), R, G, N, P, backend=backend)
    want_phy2log, want_phyrank, want_logcnt = reference.rebalance_experts_hierarchical(w, R, 1, 1, P)
    assert torch.equal(phy2log.cpu(), want_phy2log) and torch.equal(logcnt.cpu(), want_logcnt)
    for layer in range(2):
        for q in range(R):
            assert int(log2phy[layer, want_phy2log[layer, q], want_phyrank[layer, q]]) == q


def test_bad_arguments_are_assertion_errors_too():
    with pytest.raises(AssertionError, match=r"num_replicas \(15\) must be a multiple of num_gpus \(8\)"):
        eplb.rebalance_experts(torch.ones(1, 12), 15, 4, 2, 8)
    with pytest.raises(EplbArgumentError) as info:
        eplb.replicate_experts(torch.ones(1, 12), 11)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AssertionError)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16, np.float32, np.float64])
def test_numpy_in_numpy_out(dtype):
    w = (make_loads(3, 12, "skewed", 7).numpy() % 1000).astype(dtype)
    original = w.copy()
    want = eplb.rebalance_experts(torch.from_numpy(w.astype(np.float64)), 16, 4, 2, 8)
    got = eplb.rebalance_experts(w, 16, 4, 2, 8)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.int64 for a in got)
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b.numpy())
    assert np.array_equal(w, original), "the input is not modified"
    hier = eplb.rebalance_experts_hierarchical(w, 16, 4, 2, 8)
    rep = eplb.replicate_experts(w, 16)
    pack = eplb.balanced_packing(w, 4)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.int64 for a in (*hier, *rep, *pack))


def test_big_endian_long_double_and_read_only_arrays(recwarn):
    w = (make_loads(2, 12, "skewed", 8).numpy() % 1000).astype(np.float32)
    want = eplb.rebalance_experts(w, 16, 4, 2, 8)
    read_only = w.copy()
    read_only.flags.writeable = False
    for variant in (w.astype(">f4"), w.astype(np.longdouble), read_only):
        got = eplb.rebalance_experts(variant, 16, 4, 2, 8)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), variant.dtype
    assert not [r for r in recwarn if "not writable" in str(r.message)]
    gated = eplb.rebalance_experts(w, 16, 4, 2, 8, old_phy2log=want[0], min_gain=np.float32(0.5))
    assert np.array_equal(gated[0], want[0]), "a NumPy float is a number"


def test_nested_lists_give_tensors():
    w = make_loads(2, 12, "skewed", 3)
    got = eplb.rebalance_experts(w.tolist(), 16, 4, 2, 8)
    want = eplb.rebalance_experts(w, 16, 4, 2, 8)
    assert all(isinstance(a, torch.Tensor) for a in got)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    pack, rank = eplb.balanced_packing([[4, 3, 2, 1]], 2)
    assert pack.tolist() == [[0, 1, 1, 0]] and rank.tolist() == [[0, 0, 1, 1]]


def test_the_loads_decide_numpy_out_not_the_old_placement():
    from eplb_triton import metrics

    w = make_loads(2, 12, "skewed", 4)
    old = eplb.rebalance_experts(w.flip(1), 16, 4, 2, 8)[0]
    want = eplb.rebalance_experts(w, 16, 4, 2, 8, old_phy2log=old)
    got = eplb.rebalance_experts(w, 16, 4, 2, 8, old_phy2log=old.numpy())
    assert all(isinstance(a, torch.Tensor) and torch.equal(a, b) for a, b in zip(got, want, strict=True))
    got = eplb.rebalance_experts(w.numpy(), 16, 4, 2, 8, old_phy2log=old)
    assert all(isinstance(a, np.ndarray) and np.array_equal(a, b.numpy()) for a, b in zip(got, want, strict=True))
    loads = metrics.gpu_loads(w, want[0].numpy(), want[2].numpy(), 8)
    assert isinstance(loads, torch.Tensor)


def test_metrics_take_numpy_and_lists_too():
    from eplb_triton import metrics

    w = make_loads(3, 12, "skewed", 5)
    phy2log, _, logcnt = eplb.rebalance_experts(w, 16, 4, 2, 8)
    want = metrics.gpu_loads(w, phy2log, logcnt, 8)
    got = metrics.gpu_loads(w.numpy(), phy2log.numpy(), logcnt.numpy(), 8)
    assert isinstance(got, np.ndarray) and np.array_equal(got, want.numpy())
    assert isinstance(metrics.balancedness(got), np.ndarray)
    moved = metrics.migration_count(phy2log.tolist(), phy2log.flip(1).tolist())
    assert isinstance(moved, torch.Tensor) and torch.equal(moved, metrics.migration_count(phy2log, phy2log.flip(1)))
    assert metrics.summarize(np.array([0.5, 1.0])) == {"mean": 0.75, "worst": 0.5}
