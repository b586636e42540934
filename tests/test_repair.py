"""The count repair of a budgeted replan with two slots per GPU (docs/algorithm.md 10.8).

The NumPy path and the kernel (on the interpreter without a GPU) must equal the literal reference
exactly, ties included; the properties (the budget, valid counts, never worse than the budgeted
search, strictly better where it changes a layer) are checked with loads and counts recomputed
here. A test also shows that the repair does something: on layers where the budgeted search
stops, it lowers the largest GPU load.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DATA, LOAD_KINDS, assert_same, assert_valid_placement, make_loads
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb_triton as eplb
from eplb_triton import cpu, launch, reference
from eplb_triton.io import read_loads
from eplb_triton.placement import slot_order_ranks

FILES = sorted(DATA.glob("*.json")) if DATA.is_dir() else []
needs_data = pytest.mark.skipif(not FILES, reason=f"real loads not found at {DATA} (../shared/data is absent)")


def random_placement(L: int, E: int, R: int, rng: np.random.Generator) -> torch.Tensor:
    """``[L, R]``: every expert at least once, the other slots random experts, slots shuffled."""
    rows = [rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, R - E)])) for _ in range(L)]
    return torch.tensor(np.stack(rows), dtype=torch.int64)


def counts_of(phy: torch.Tensor, E: int) -> torch.Tensor:
    return torch.zeros((phy.shape[0], E), dtype=torch.int64).scatter_add_(1, phy, torch.ones_like(phy))


def peaks(w: torch.Tensor, phy: torch.Tensor, cnt: torch.Tensor) -> list[float]:
    """Largest GPU load per layer (two slots per GPU), float64 shares of the float32 loads, in Python."""
    w64 = w.to(torch.float32).double().tolist()
    out = []
    for layer, row in enumerate(phy.tolist()):
        c = cnt[layer].tolist()
        s = [w64[layer][e] / c[e] for e in row]
        out.append(max(s[q] + s[q + 1] for q in range(0, len(row), 2)))
    return out


def budgeted_search(w: torch.Tensor, old: torch.Tensor, P: int, k: int):
    """The repair's start, as the pipeline makes it: the search from ``old`` under the budget."""
    rank, cnt = slot_order_ranks(old, w.shape[1])
    return reference.search(w, old, rank, cnt, P, 1, old, k)


@st.composite
def problems(draw):
    P = draw(st.integers(2, 8))
    R = 2 * P
    E = draw(st.integers(max(1, P // 2), R))
    L = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    w = make_loads(L, E, draw(st.sampled_from(LOAD_KINDS)), seed)
    old = random_placement(L, E, R, rng)
    if draw(st.booleans()):  # the full plan's counts, as the pipeline passes them
        target = eplb.rebalance_experts(
            w, R, 1, 1, P, backend="cpu", method=draw(st.sampled_from(["greedy", "refined"]))
        )[2]
    else:
        target = counts_of(random_placement(L, E, R, rng), E)
    return w, old, target, P, draw(st.integers(0, R))


@settings(max_examples=150, deadline=None)
@given(problem=problems())
def test_cpu_equals_reference_and_keeps_the_rules(problem):
    w, old, target, P, k = problem
    E = w.shape[1]
    start = budgeted_search(w, old, P, k)
    want = reference.repair(w, *start, old, target, k)
    got = cpu.repair(w.float().numpy(), *(t.numpy() for t in start), old.numpy(), target.numpy(), k)
    got = tuple(torch.from_numpy(a) for a in got)
    assert_same(got, want, ("phy2log", "phyrank", "logcnt"))
    phy, rank, cnt = got
    assert ((phy != old).sum(dim=1) <= k).all(), "at most max_moves slots differ from old_phy2log"
    assert torch.equal(cnt, counts_of(phy, E)) and (cnt >= 1).all()
    for layer, (new, before) in enumerate(zip(peaks(w, phy, cnt), peaks(w, start[0], start[2]), strict=True)):
        if torch.equal(phy[layer], start[0][layer]):
            assert torch.equal(rank[layer], start[1][layer])
        else:  # a changed layer is strictly better, its replicas numbered in slot order
            assert new < before
            assert torch.equal(rank[layer], slot_order_ranks(phy[layer : layer + 1], E)[0][0])
    if k == 0:
        assert all(torch.equal(a, b) for a, b in zip(got, start, strict=True))


def test_repair_lowers_the_peak_where_the_budgeted_search_stops():
    # the loads drift from those the placement was planned for; a quarter of the slots may move
    L, E, P = 24, 24, 16
    R, k = 2 * P, 8
    w_old, w = make_loads(L, E, "skewed", 1), make_loads(L, E, "skewed", 2)
    old = eplb.rebalance_experts(w_old, R, 1, 1, P, backend="cpu")[0]
    target = eplb.rebalance_experts(w, R, 1, 1, P, backend="cpu", method="refined")[2]
    start = tuple(t.numpy() for t in budgeted_search(w, old, P, k))
    phy, _, cnt = cpu.repair(w.float().numpy(), *start, old.numpy(), target.numpy(), k)
    before = peaks(w, torch.from_numpy(start[0]), torch.from_numpy(start[2]))
    after = peaks(w, torch.from_numpy(phy), torch.from_numpy(cnt))
    assert all(a <= b for a, b in zip(after, before, strict=True))
    assert sum(a < b for a, b in zip(after, before, strict=True)) >= L // 4, "the repair lowers many layers"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_api_runs_the_repair_and_backends_agree(backend):
    L, E, P = 3, 12, 8
    R, k = 2 * P, 5
    w = make_loads(L, E, "skewed", 5)
    old = eplb.rebalance_experts(make_loads(L, E, "skewed", 6), R, 1, 1, P, backend="cpu")[0]
    kw = dict(method="refined", old_phy2log=old, max_moves=k)
    got = eplb.rebalance_experts(w, R, 1, 1, P, backend="cpu", **kw)
    assert_valid_placement(*got, E, R, 1, 1, P)
    assert_same(eplb.rebalance_experts(w, R, 1, 1, P, backend=backend, **kw), got, ("phy2log", "log2phy", "logcnt"))
    # the pipeline's composition: the budgeted search, its repair toward the refined counts
    start = budgeted_search(w, old, P, k)
    target = eplb.rebalance_experts(w, R, 1, 1, P, backend="cpu", method="refined")[2]
    repaired = reference.repair(w, *start, old, target, k)
    for layer, (api, rep) in enumerate(zip(peaks(w, got[0], got[2]), peaks(w, repaired[0], repaired[2]), strict=True)):
        assert api <= rep, f"layer {layer}: the API's result is worse than the repaired search"


def test_hierarchical_and_more_slots_skip_the_repair(monkeypatch):
    calls = []
    real = cpu.repair
    monkeypatch.setattr(cpu, "repair", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    w = make_loads(2, 8, "skewed", 3)
    for R, G, N, P in ((16, 4, 2, 8), (24, 1, 1, 8), (16, 1, 1, 8)):
        old = eplb.rebalance_experts(make_loads(2, 8, "skewed", 4), R, G, N, P, backend="cpu")[0]
        eplb.rebalance_experts(w, R, G, N, P, backend="cpu", old_phy2log=old, max_moves=4)
    assert len(calls) == 1, "only two slots per GPU under the global policy run the repair"


@needs_data
def test_real_loads_stale_pair_cpu_equals_reference():
    # decode loads on a prefill file's placement: the budgeted search stops far from the full plan
    w0, w1 = read_loads(FILES[1]).weight[:4], read_loads(FILES[2]).weight[:4]
    R, G, N, P = 288, 8, 18, 144
    old = eplb.rebalance_experts(w0, R, G, N, P, backend="cpu")[0]
    kw = dict(old_phy2log=old, max_moves=R * 15 // 100, method="refined")
    got = eplb.rebalance_experts(w1, R, G, N, P, backend="cpu", **kw)
    assert_same(got, eplb.rebalance_experts(w1, R, G, N, P, backend="reference", **kw))


# ----------------------------------------------------------------------------------------------
# the kernel (kernels/_repair.py) against the reference
# ----------------------------------------------------------------------------------------------


def all_backends(w, start, old, target, k, skip=None):
    """The reference's result; the NumPy path and the kernel must equal it, the inputs stay
    untouched, and every output entry of the kernel is written (outputs poisoned with -1 first)."""
    inputs = (*start, old, target)
    before = [t.clone() for t in inputs]
    want = reference.repair(w, *start, old, target, k, skip)
    got_cpu = cpu.repair(
        w.float().numpy(), *(t.numpy() for t in inputs), k, None if skip is None else skip.numpy()
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty_like", lambda t, **kw: torch.full_like(t, -1, **kw))
        got = launch.repair(w, *start, old, target, k, skip)
    for t, b in zip(inputs, before, strict=True):
        assert torch.equal(t, b), "the repair mutated its inputs"
    for g, c, r, name in zip(got, got_cpu, want, ("phy2log", "phyrank", "logcnt"), strict=True):
        assert g.dtype == torch.int64 and g.shape == r.shape, name
        assert torch.equal(g.cpu(), r), f"{name}: kernel {g.tolist()} != reference {r.tolist()}"
        assert np.array_equal(c, r.numpy()), f"{name}: cpu path {c.tolist()} != reference {r.tolist()}"
    return want


def kernel_case(seed: int):
    """A small two-slots-per-GPU problem: loads of every kind, a random old placement, the refined
    plan's counts as the target, a budget from 1 to R."""
    rng = np.random.default_rng(seed)
    P = int(rng.integers(2, 9))
    R = 2 * P
    E = int(rng.integers(max(1, P // 2), R + 1))
    L = int(rng.integers(1, 4))
    w = make_loads(L, E, LOAD_KINDS[seed % len(LOAD_KINDS)], seed)
    old = random_placement(L, E, R, rng)
    target = eplb.rebalance_experts(w, R, 1, 1, P, backend="cpu", method="refined")[2]
    k = int(rng.integers(1, R + 1))
    return w, budgeted_search(w, old, P, k), old, target, k


@pytest.mark.parametrize("seed", range(16))
def test_kernel_equals_reference(seed):
    all_backends(*kernel_case(seed))


def test_kernel_changes_layers_and_ranks_follow_slot_order():
    # the drifting loads of the test above: many layers change, so the kernel's writes are exercised
    L, E, P = 6, 12, 8
    R, k = 2 * P, 4
    w = make_loads(L, E, "skewed", 2)
    old = eplb.rebalance_experts(make_loads(L, E, "skewed", 1), R, 1, 1, P, backend="cpu")[0]
    target = eplb.rebalance_experts(w, R, 1, 1, P, backend="cpu", method="refined")[2]
    start = budgeted_search(w, old, P, k)
    phy, rank, _ = all_backends(w, start, old, target, k)
    changed = (phy != start[0]).any(dim=1)
    assert changed.sum() >= 2, "the case must exercise the kernel's result rows"
    assert torch.equal(rank[changed], slot_order_ranks(phy[changed], E)[0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy computes with the NaNs
def test_kernel_skipped_and_nan_layers_come_back_as_they_went_in():
    w, start, old, target, k = kernel_case(3)
    L = w.shape[0]
    skip = torch.zeros(L, dtype=torch.bool)
    skip[0] = True
    out = all_backends(w, start, old, target, k, skip)
    assert all(torch.equal(o[0], s[0]) for o, s in zip(out, start, strict=True))
    # NaN loads never reach it through the API (validation; the planner skips flagged layers), but
    # the kernel alone stays in bounds and leaves such a layer as it is
    w = w.clone()
    w[0] = float("nan")
    got = launch.repair(w, *start, old, target, k)
    for g, s in zip(got, start, strict=True):
        assert torch.equal(g[0], s[0])


def test_planner_keeps_a_nan_layer_and_plans_the_others():
    # the planner (Triton backend, no host read) flags a layer with a NaN load and keeps its
    # placement; the repair skips it rather than checking the loads on the host and raising
    planner = eplb.EplbPlanner(2, 6, 8, 1, 1, 4, device="cpu", max_moves=3)
    start = eplb.EplbPlanner(2, 6, 8, 1, 1, 4, device="cpu")  # a first plan without a budget
    old = start.plan(torch.tensor([[1.0, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1]]))[0].clone()
    planner.plan(torch.tensor([[1.0, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1]]), old)
    old = planner.phy2log.clone()
    w = torch.tensor([[1.0, 1, 1, 1, 1, 9], [float("nan"), 1, 1, 1, 1, 1]])
    phy, _, _ = planner.plan(w, old)
    assert planner.invalid.tolist() == [0, 1]
    assert torch.equal(phy[1], old[1])
    assert (phy[0] != old[0]).sum() <= 3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # a missing expert's share divides by zero
def test_kernel_stays_in_bounds_on_an_old_placement_that_breaks_the_contract():
    # EplbPlanner does not read old_phy2log's values (no host synchronisation): ids outside [0, E)
    # or a missing expert are the caller's broken contract. The kernel, which gathers by the old
    # experts, must still stay inside its rows (the interpreter's bounds check fails the test if not).
    w, start, old, target, k = kernel_case(2)  # skewed loads: every layer runs its passes
    E = w.shape[1]
    bad = old.clone()
    bad[-1, 0], bad[-1, 1] = E + 3, -1  # the last layer: past the ends of its rows, into nothing
    got = launch.repair(w, *start, bad, target, k)
    assert all(t.shape == s.shape for t, s in zip(got, start, strict=True))
