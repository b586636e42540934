"""Every public function that reaches a kernel takes non-contiguous views for every tensor argument.

Each argument is passed as a strided view (a column of a wider tensor, or a transposed copy), and
the result must equal the one for contiguous copies; accumulated outputs (``counts``, ``invalid``)
must land in the view's own elements and nowhere else in the tensor it views.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_loads

import eplb_triton as eplb
from eplb_triton.backends import CPU, TRITON

BACKENDS = ["cpu", "triton"]


def strided(t: torch.Tensor, fill: int | float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(view, base)``: a non-contiguous view equal to ``t`` (every other column of ``base``)."""
    base = torch.full((*t.shape[:-1], 2 * t.shape[-1]) if t.dim() else (2,), fill, dtype=t.dtype)
    view = base[..., ::2] if t.dim() else base[0]
    view.copy_(t)
    assert t.dim() == 0 or t.numel() <= 1 or not view.is_contiguous()
    return view, base


def column(t: torch.Tensor, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(view, base)``: ``t`` (1-D) as column 1 of a ``[n, 3]`` tensor filled with ``fill``."""
    base = torch.full((t.shape[0], 3), fill, dtype=t.dtype)
    base[:, 1] = t
    return base[:, 1], base


@pytest.mark.parametrize("backend", BACKENDS)
def test_record_dispatch_takes_views_for_every_argument(backend):
    E, R = 5, 8
    w = make_loads(1, E, "skewed", 3)
    phy2log, log2phy, logcnt = eplb.rebalance_experts(w, R, 1, 1, 2, backend="cpu")
    log2phy, logcnt = log2phy[0], logcnt[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, E + 1, (37, 3), generator=gen)  # some invalid ids
    want_counts = torch.zeros(E, dtype=torch.int64)
    want_invalid = torch.zeros(1, dtype=torch.int64)
    want = eplb.record_dispatch(ids, log2phy, logcnt, want_counts, invalid=want_invalid, backend="cpu")

    ids_v, _ = strided(ids)
    log2phy_v, _ = strided(log2phy, -7)
    logcnt_v, _ = column(logcnt, 99)
    counts_v, counts_base = column(torch.zeros(E, dtype=torch.int64), 5)
    invalid_base = torch.full((3,), 5, dtype=torch.int64)
    invalid_v = invalid_base[1:2]
    invalid_v.zero_()
    got = eplb.record_dispatch(ids_v, log2phy_v, logcnt_v, counts_v, invalid=invalid_v, backend=backend)
    assert torch.equal(got, want)
    assert torch.equal(counts_v, want_counts)
    assert (counts_base[:, [0, 2]] == 5).all(), "counts written outside the view"
    assert torch.equal(invalid_v, want_invalid)
    assert invalid_base[0] == 5 and invalid_base[2] == 5, "invalid written outside the view"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rebalance_functions_take_views(backend):
    L, E, R, G, N, P = 3, 12, 16, 4, 2, 8
    w = make_loads(L, E, "skewed", 1)
    w_t = w.t().contiguous().t()  # column-major
    w_s, _ = strided(w)
    for view in (w_t, w_s):
        assert not view.is_contiguous()
        for fn, args in (
            (eplb.rebalance_experts, (R, G, N, P)),
            (eplb.rebalance_experts_hierarchical, (R, G, N, P)),
            (eplb.replicate_experts, (R,)),
            (eplb.balanced_packing, (4,)),
        ):
            want = fn(w, *args, backend="cpu")
            got = fn(view, *args, backend=backend)
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b), fn.__name__


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. torch's searchsorted warning on non-contiguous rows
@pytest.mark.parametrize("backend", BACKENDS)
def test_methods_take_views_of_the_old_placement(backend):
    L, E, R, G, N, P = 2, 6, 12, 1, 1, 3
    w = make_loads(L, E, "skewed", 2)
    old = eplb.rebalance_experts(make_loads(L, E, "skewed", 5), R, G, N, P, backend="cpu")[0]
    old_v, _ = strided(old)
    w_v, _ = strided(w)
    old_t = old.T.contiguous().T  # column-major rows
    for kwargs in (dict(method="refined"), dict(old_phy2log=old), dict(old_phy2log=old, max_moves=3)):
        want = eplb.rebalance_experts(w, R, G, N, P, backend="cpu", **kwargs)
        for view in (old_v, old_t):
            if "old_phy2log" in kwargs:
                kwargs["old_phy2log"] = view
            got = eplb.rebalance_experts(w_v, R, G, N, P, backend=backend, **kwargs)
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b), kwargs


def test_planner_takes_views():
    L, E, R, G, N, P = 2, 6, 12, 1, 1, 3
    w = make_loads(L, E, "skewed", 4)
    old = eplb.rebalance_experts(make_loads(L, E, "skewed", 6), R, G, N, P, backend="cpu")[0]
    planner = eplb.EplbPlanner(L, E, R, G, N, P, device="cpu", method="refined", max_moves=4)
    want = [t.clone() for t in planner.plan(w, old)]
    w_v, _ = strided(w)
    old_v, _ = strided(old)
    got = planner.plan(w_v, old_v)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [CPU, TRITON], ids=lambda b: b.name)
def test_assignment_takes_views(backend):
    gen = torch.Generator().manual_seed(1)
    overlap = torch.randint(0, 9, (3, 5, 5), generator=gen)
    want = CPU.assign(overlap)
    skip, _ = strided(torch.tensor([False, True, False]))
    got = backend.assign(overlap.transpose(1, 2).contiguous().transpose(1, 2), skip)
    assert torch.equal(got[[0, 2]], want[[0, 2]]) and torch.equal(got[1], torch.arange(5))


def test_balancer_record_takes_views():
    bal = eplb.OnlineBalancer(1, 5, 8, 1, 1, 2, device="cpu", backend="triton", rebalance_interval=4)
    ref = eplb.OnlineBalancer(1, 5, 8, 1, 1, 2, device="cpu", backend="cpu", rebalance_interval=4)
    ids = torch.randint(0, 5, (21, 2), generator=torch.Generator().manual_seed(2))
    ids_v, _ = strided(ids)
    assert torch.equal(bal.record(0, ids_v), ref.record(0, ids))
    assert torch.equal(bal.counts, ref.counts)
