"""Every validation rule of docs/algorithm.md gives a clear ValueError/TypeError naming the argument."""

import numpy as np
import pytest
import torch

import eplb_triton as eplb
from eplb_triton._validation import Config, select_policy

W = torch.ones(2, 12)


@pytest.mark.parametrize(
    "args, exc, message",
    [
        ((W, 13, 4, 2, 4), ValueError, r"num_replicas \(13\) must be a multiple of num_gpus \(4\)"),
        ((W, 8, 4, 2, 4), ValueError, r"num_replicas \(8\) must be >= num_logical_experts \(12"),
        (
            (W, 16, 5, 1, 8),
            ValueError,
            r"num_logical_experts \(12, weight.shape\[1\]\) must be a multiple of num_groups \(5\)",
        ),
        ((W, 16, 6, 3, 8), ValueError, r"num_gpus \(8\) must be a multiple of num_nodes \(3\)"),
        ((W, 0, 4, 2, 8), ValueError, r"num_replicas \(0\) must be a positive integer"),
        ((W, 16, -4, 2, 8), ValueError, r"num_groups \(-4\) must be a positive integer"),
        ((W, 16, 4, 0, 8), ValueError, r"num_nodes \(0\) must be a positive integer"),
        ((W, 16, 4, 2, 0), ValueError, r"num_gpus \(0\) must be a positive integer"),
        ((W, 16.0, 4, 2, 8), TypeError, r"num_replicas must be an int, got float"),
        ((W, 16, 4, True, 8), TypeError, r"num_nodes must be a Python int, got bool"),
        ((W, 16, "4", 2, 8), TypeError, r"num_groups must be an int, got str"),
        ((W, 16, 4, 2, torch.tensor(8)), TypeError, r"num_gpus must be a Python int, got Tensor"),
        (("12 experts", 16, 4, 2, 8), TypeError, r"weight must be a torch.Tensor, a numpy.ndarray or a nested list"),
        ((W.numpy() > 0, 16, 4, 2, 8), TypeError, r"weight must have a real dtype .* got numpy bool"),
        (([[1, 2], [3]], 16, 4, 2, 8), TypeError, r"weight must be a rectangular nested list"),
        ((torch.ones(12), 16, 4, 2, 8), ValueError, r"weight must be 2-D .* got 1-D"),
        ((torch.ones(1, 2, 12), 16, 4, 2, 8), ValueError, r"weight must be 2-D .* got 3-D"),
        ((torch.ones(2, 0), 16, 4, 2, 8), ValueError, r"weight must have at least one expert"),
        ((torch.ones(2, 12, dtype=torch.bool), 16, 4, 2, 8), TypeError, r"weight must have a real dtype"),
        ((torch.ones(2, 12, dtype=torch.complex64), 16, 4, 2, 8), TypeError, r"weight must have a real dtype"),
    ],
    ids=lambda v: None,
)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_shape_and_count_rules(args, exc, message, backend):
    with pytest.raises(exc, match=message) as info:
        eplb.rebalance_experts(*args, backend=backend)
    # callers written for DeepSeek's eplb catch AssertionError
    assert isinstance(info.value, AssertionError) == (exc is ValueError)


@pytest.mark.parametrize(
    "value, shown",
    [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf"), (-1.0, "-1.0"), (1e39, "inf")],
)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_value_rules(value, shown, backend):
    w = torch.ones(2, 12, dtype=torch.float64)
    w[1, 5] = value
    with pytest.raises(ValueError, match=rf"weight must be finite and >= 0 in float32, found {shown} at \[1, 5\]"):
        eplb.rebalance_experts(w, 16, 4, 2, 8, backend=backend)


def test_negative_integer_loads():
    w = torch.ones(2, 12, dtype=torch.int32)
    w[0, 0] = -3
    with pytest.raises(ValueError, match=r"found -3.0 at \[0, 0\]"):
        eplb.rebalance_experts(w, 16, 4, 2, 8)


def test_hierarchical_requires_groups_multiple_of_nodes():
    with pytest.raises(
        ValueError, match=r"num_groups \(3\) must be a multiple of num_nodes \(2\) for the hierarchical"
    ):
        eplb.rebalance_experts_hierarchical(torch.ones(1, 12), 16, 3, 2, 8)
    with pytest.raises(ValueError, match=r"num_physical_experts \(13\) must be a multiple of num_gpus \(4\)"):
        eplb.rebalance_experts_hierarchical(torch.ones(1, 12), 13, 4, 2, 4)


def test_building_block_rules():
    with pytest.raises(
        ValueError, match=r"number of items \(12, weight.shape\[1\]\) must be a multiple of num_packs \(5\)"
    ):
        eplb.balanced_packing(W, 5)
    with pytest.raises(ValueError, match=r"num_packs \(0\) must be a positive integer"):
        eplb.balanced_packing(W, 0)
    with pytest.raises(ValueError, match=r"num_phy \(11\) must be >= the number of logical experts \(12"):
        eplb.replicate_experts(W, 11)
    with pytest.raises(ValueError, match=r"weight must be finite"):
        eplb.replicate_experts(torch.tensor([[1.0, float("nan")]]), 3)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'cpu', 'reference', 'triton', got 'gpu'"):
        eplb.rebalance_experts(W, 16, 4, 2, 8, backend="gpu")


def test_a_triton_older_than_the_floor_is_not_used(monkeypatch):
    from eplb_triton import backends

    for found, shown in (((3, 5), "3.5"), (None, "none")):
        monkeypatch.setattr(backends, "triton_version", lambda found=found: found)
        assert not backends.triton_available()
        assert backends.resolve("auto", torch.device("cuda")).name == "cpu", "auto falls back to the CPU path"
        with pytest.raises(ValueError, match=rf"backend='triton' needs triton >= 3.6, found {shown}"):
            eplb.rebalance_experts(W, 16, 4, 2, 8, backend="triton")
    monkeypatch.setattr(backends, "triton_version", lambda: (3, 6))
    assert backends.triton_available()


def test_numpy_integer_counts_are_accepted():
    got = eplb.rebalance_experts(W, np.int64(16), np.int32(4), 2, 8)
    assert got[0].shape == (2, 16)


def test_one_group_one_node_is_labelled_global():
    assert select_policy(1, 1) == ("global", 1, 1)
    assert Config(1, 4, 4, 1, 1, 1).policy == "global"
    assert select_policy(2, 1) == ("hierarchical", 2, 1)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_value_error_names_the_first_bad_entry(backend):
    # row-major order: [0, 7] comes before [1, 5]
    w = torch.ones(2, 12)
    w[0, 7] = -1.0
    w[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"found -1.0 at \[0, 7\]"):
        eplb.rebalance_experts(w, 16, 4, 2, 8, backend=backend)
