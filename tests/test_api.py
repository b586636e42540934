"""Drop-in behaviour: dtypes, devices, no mutation, empty inputs, invariants on every backend."""

import pytest
import torch
from helpers import FIXED_CASES, assert_same, assert_valid_placement, make_loads

import eplb_triton as eplb
from eplb_triton import reference

CPU_BACKENDS = ["auto", "cpu", "reference"]
ALL_BACKENDS = [*CPU_BACKENDS, "triton"]


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64]
)
def test_any_real_dtype(dtype):
    w = make_loads(3, 12, "uniform-int", 1) % 200  # fits uint8 and is exact in half precision
    want = reference.rebalance_experts(w.to(torch.float32), 16, 4, 2, 8)
    got = eplb.rebalance_experts(w.to(dtype), 16, 4, 2, 8)
    assert_same(got, want)
    assert all(t.dtype == torch.int64 and t.device == w.device for t in got)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float8_loads(dtype, backend):
    w = make_loads(3, 12, "uniform-int", 2) % 8  # exact in both float8 formats
    want = reference.rebalance_experts(w.to(torch.float32), 16, 4, 2, 8)
    assert_same(eplb.rebalance_experts(w.to(dtype), 16, 4, 2, 8, backend=backend), want)
    bad = w.to(torch.float32)
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"weight must be finite and >= 0 in float32, found nan at \[1, 5\]"):
        eplb.rebalance_experts(bad.to(dtype), 16, 4, 2, 8, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_input_not_mutated(backend):
    for w in (make_loads(2, 12, "float", 3), make_loads(2, 12, "ties", 3)):
        before = w.clone()
        eplb.rebalance_experts(w, 16, 4, 2, 8, backend=backend)
        eplb.replicate_experts(w, 16, backend=backend)
        eplb.balanced_packing(w, 4, backend=backend)
        assert torch.equal(w, before)


def test_non_contiguous_and_requires_grad():
    base = make_loads(12, 2, "float", 5).T  # [2, 12] with transposed strides
    assert not base.is_contiguous()
    w = base.clone().requires_grad_(True)
    got = eplb.rebalance_experts(w, 16, 4, 2, 8)
    want = reference.rebalance_experts(base.contiguous(), 16, 4, 2, 8)
    assert_same(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_layers(backend):
    w = torch.zeros(0, 12)
    phy2log, log2phy, logcnt = eplb.rebalance_experts(w, 16, 4, 2, 8, backend=backend)
    assert phy2log.shape == (0, 16) and log2phy.shape == (0, 12, 0) and logcnt.shape == (0, 12)
    assert all(t.dtype == torch.int64 for t in (phy2log, log2phy, logcnt))
    p, r, c = eplb.rebalance_experts_hierarchical(w, 16, 4, 2, 8, backend=backend)
    assert p.shape == r.shape == (0, 16) and c.shape == (0, 12)
    p, r, c = eplb.replicate_experts(w, 16, backend=backend)
    assert p.shape == r.shape == (0, 16) and c.shape == (0, 12)
    p, r = eplb.balanced_packing(w, 4, backend=backend)
    assert p.shape == r.shape == (0, 12)


@pytest.mark.parametrize("case", FIXED_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_invariants(case, backend):
    out = eplb.rebalance_experts(case.weight(), case.R, case.G, case.N, case.P, backend=backend)
    assert_valid_placement(*out, case.E, case.R, case.G, case.N, case.P)


def test_hierarchical_returns_phyrank_consistent_with_log2phy():
    w = make_loads(3, 16, "skewed", 9)
    phy2log, phyrank, logcnt = eplb.rebalance_experts_hierarchical(w, 24, 4, 2, 4)
    _, log2phy, _ = eplb.rebalance_experts(w, 24, 4, 2, 4)
    L, R = phy2log.shape
    slots = log2phy[torch.arange(L)[:, None], phy2log, phyrank]
    assert torch.equal(slots, torch.arange(R).expand(L, R))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_outputs_on_input_device(backend):
    w = make_loads(2, 12, "skewed", 0)
    got = eplb.rebalance_experts(w.cuda(), 16, 4, 2, 8, backend=backend)
    assert all(t.is_cuda for t in got)
    want = reference.rebalance_experts(w, 16, 4, 2, 8)
    assert_same(got, want)


def test_docstring_examples():
    import doctest

    from eplb_triton import api

    result = doctest.testmod(api, extraglobs={"torch": torch})
    assert result.attempted >= 3 and result.failed == 0
