"""Planning around lost GPUs: rebalance_experts(..., active_gpus=mask) (docs/algorithm.md section 12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_loads

import eplb_triton as eplb
from eplb_triton import metrics, pipeline
from eplb_triton._validation import Config
from eplb_triton.backends import CPU

BACKENDS = ["reference", "cpu", "triton"]
# (L, E, R, G, N, P, lost GPUs): global and hierarchical, a lost GPU in one node or in two
CASES = [
    (2, 12, 16, 4, 2, 8, [2]),
    (2, 12, 16, 4, 2, 8, [0, 7]),
    (2, 12, 18, 5, 2, 6, [4]),  # global (5 % 2 != 0)
    (3, 8, 16, 1, 1, 4, [1, 3]),
    (2, 16, 32, 4, 4, 8, [5]),
]


def _mask(P: int, lost: list[int]) -> list[bool]:
    return [g not in lost for g in range(P)]


def _check_invariants(phy2log, log2phy, logcnt, E, R, G, N, P, lost):
    L, S = phy2log.shape[0], R // P
    dead = torch.tensor([q // S in lost for q in range(R)])
    assert (phy2log[:, dead] == -1).all(), "a lost GPU's slots hold no expert"
    live = phy2log[:, ~dead]
    assert ((live >= 0) & (live < E)).all()
    counted = torch.zeros(L, E, dtype=torch.int64).scatter_add_(1, live, torch.ones_like(live))
    assert torch.equal(counted, logcnt) and (logcnt >= 1).all(), "every expert on a live GPU"
    assert (logcnt.sum(1) == S * (P - len(lost))).all()
    X = log2phy.shape[2]
    valid = torch.arange(X) < logcnt.unsqueeze(-1)
    assert (log2phy[~valid] == -1).all()
    for layer in range(L):
        slots = log2phy[layer][valid[layer]]
        assert not dead[slots].any(), "log2phy never lists a lost GPU's slot"
        assert sorted(slots.tolist()) == (~dead).nonzero().flatten().tolist()
    if G % N == 0 and N > 1:  # hierarchical: a group's replicas on one node
        node = torch.arange(R) // (R // N)
        for layer in range(L):
            for g in range(G):
                nodes = {
                    int(node[q]) for q in range(R) if 0 <= phy2log[layer, q] < E and phy2log[layer, q] // (E // G) == g
                }
                assert len(nodes) == 1, (layer, g, nodes)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("method", ["greedy", "refined"])
def test_every_backend_plans_the_same_around_lost_gpus(case, method):
    L, E, R, G, N, P, lost = case
    w = make_loads(L, E, "skewed", seed=R + P)
    got = {b: eplb.rebalance_experts(w, R, G, N, P, backend=b, method=method, active_gpus=_mask(P, lost))
           for b in BACKENDS}  # fmt: skip
    _check_invariants(*got["reference"], E, R, G, N, P, lost)
    for b in BACKENDS[1:]:
        for a, want in zip(got[b], got["reference"], strict=True):
            assert torch.equal(a, want), b


@pytest.mark.parametrize("case", CASES, ids=str)
def test_with_every_gpu_live_the_plan_is_the_usual_one(case):
    # the per-problem route itself, given every GPU: the same plan as the fused greedy
    L, E, R, G, N, P, _ = case
    w = make_loads(L, E, "skewed", seed=3)
    cfg = Config(L, E, R, G, N, P)
    got = pipeline.plan_live(CPU, w, cfg, list(range(P)))
    want = pipeline.plan(CPU, w, cfg.effective())
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_the_global_policy_plans_the_live_slots_as_one_problem():
    # an independent route: the plan of R' = S x live slots on the live GPUs, placed on them
    L, E, R, P, lost = 2, 8, 12, 4, [1]
    w = make_loads(L, E, "skewed", seed=9)
    got = eplb.rebalance_experts(w, R, 1, 1, P, active_gpus=_mask(P, lost))[0]
    compact = eplb.rebalance_experts(w, 9, 1, 1, 3)[0]
    assert torch.equal(got[:, [0, 1, 2, 6, 7, 8, 9, 10, 11]], compact) and (got[:, 3:6] == -1).all()


def test_the_live_gpus_keep_what_they_hold_where_possible():
    L, E, R, G, N, P = 3, 16, 32, 4, 4, 8
    old = eplb.rebalance_experts(make_loads(L, E, "skewed", seed=1), R, G, N, P)[0]
    w = make_loads(L, E, "skewed", seed=2)
    mask = _mask(P, [3])
    fresh = eplb.rebalance_experts(w, R, G, N, P, active_gpus=mask)
    kept = eplb.rebalance_experts(w, R, G, N, P, active_gpus=mask, old_phy2log=old)
    _check_invariants(*kept, E, R, G, N, P, [3])
    assert torch.equal(kept[2], fresh[2]), "the same replica counts"

    def gpu_shares(phy, cnt):  # each GPU's replica shares, sorted: the same multiset in any slot order
        share = torch.where(phy >= 0, (w.double() / cnt.double()).gather(1, phy.clamp_min(0)), 0.0)
        return share.view(L, P, -1).sort(dim=2).values.sort(dim=1).values

    assert torch.equal(gpu_shares(fresh[0], fresh[2]), gpu_shares(kept[0], kept[2])), "the GPUs, relabelled"
    moved = [int(((p != old) & (p >= 0)).sum()) for p, _, _ in (fresh, kept)]
    assert moved[1] < moved[0], moved


def test_argument_rules():
    w = make_loads(1, 8, "skewed", seed=0)
    rules = [
        (dict(active_gpus=[1, 1, 1]), ValueError, r"one entry per GPU \(num_gpus=4\)"),
        (dict(active_gpus=[0, 0, 0, 0]), ValueError, "every GPU lost"),
        (dict(active_gpus=[1, 0, 0, 0]), ValueError, r"leaves 3 slots \(1 live GPUs x 3\) for the experts \(8\)"),
        (dict(active_gpus=[1, 2, 1, 1]), ValueError, "booleans"),
        (dict(active_gpus="1111"), TypeError, "active_gpus must be"),
        (dict(active_gpus=np.array(True)), ValueError, r"one entry per GPU \(num_gpus=4\), got shape \[\]"),
        (dict(active_gpus=np.ones((4, 1), bool)), ValueError, r"one entry per GPU \(num_gpus=4\), got shape \[4, 1\]"),
        (dict(active_gpus=[1, 1, 0, 1], max_moves=2), ValueError, "max_moves needs old_phy2log"),
        (dict(active_gpus=[1, 1, 0, 1], min_gain=0.1), ValueError, "min_gain needs old_phy2log"),
    ]
    for kwargs, error, words in rules:
        with pytest.raises(error, match=words):
            eplb.rebalance_experts(w, 12, 1, 1, 4, **kwargs)
    with pytest.raises(ValueError, match=r"leaves 3 slots .* for node 1's 1 expert groups \(4\)"):
        eplb.rebalance_experts(w, 12, 2, 2, 4, active_gpus=[1, 1, 1, 0])
    all_live = eplb.rebalance_experts(w, 12, 1, 1, 4, active_gpus=torch.ones(4, dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(all_live, eplb.rebalance_experts(w, 12, 1, 1, 4), strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_bad_loads_are_named_by_their_place_in_weight(backend, bad):
    # the hierarchical sub-problems see group sums and a node's columns; the error names weight's entry
    w = make_loads(2, 8, "skewed", seed=1).to(torch.float32)
    w[1, 5] = bad
    for mask in (None, [1, 1, 0, 1]):
        with pytest.raises(ValueError, match=rf"weight must be finite and >= 0 in float32, found {bad} at \[1, 5\]"):
            eplb.rebalance_experts(w, 16, 4, 2, 4, active_gpus=mask, backend=backend)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_plan_around_lost_gpus_is_the_next_plans_old_placement(case):
    # while the GPUs stay lost, and once they are back: its -1 slots match nothing
    L, E, R, G, N, P, lost = case
    mask = _mask(P, lost)
    degraded = eplb.rebalance_experts(make_loads(L, E, "skewed", seed=5), R, G, N, P, active_gpus=mask)[0]
    w = make_loads(L, E, "skewed", seed=6)
    for active in (mask, None):
        fresh = eplb.rebalance_experts(w, R, G, N, P, active_gpus=active)
        got = {b: eplb.rebalance_experts(w, R, G, N, P, backend=b, active_gpus=active, old_phy2log=degraded)
               for b in BACKENDS}  # fmt: skip
        for b in BACKENDS[1:]:
            assert all(torch.equal(x, y) for x, y in zip(got[b], got["reference"], strict=True)), (b, active)
        kept = got["reference"]
        assert torch.equal(kept[2], fresh[2]), "relabelling changes no count"
        if active is not None:
            _check_invariants(*kept, E, R, G, N, P, lost)
        held = lambda p: int(((p == degraded) & (p >= 0)).sum())  # noqa: E731
        assert held(kept[0]) >= held(fresh[0]), active
    with pytest.raises(ValueError, match=r"old_phy2log has empty slots \(-1\): .* only with active_gpus"):
        eplb.rebalance_experts(w, R, G, N, P, old_phy2log=degraded, max_moves=3)
    with pytest.raises(ValueError, match=r"old_phy2log has empty slots \(-1\)"):
        eplb.rebalance_experts(w, R, G, N, P, old_phy2log=degraded, min_gain=0.1)
    with pytest.raises(
        ValueError, match=rf"old_phy2log must hold expert ids in \[0, {E}\) or -1 \(an empty slot\), found -2"
    ):
        eplb.rebalance_experts(w, R, G, N, P, old_phy2log=degraded - 1)


# ----------------------------------------------------------------------------------------------
# Budgets around lost GPUs (docs/algorithm.md 12.1): the forced moves, then max_moves more
# ----------------------------------------------------------------------------------------------


def test_refill_by_hand():
    w = torch.tensor([[10.0, 1.0, 6.0, 2.0]])
    # 4 marks a slot to refill; experts 0 and 2 have no copy: 0 (heavier) takes the first refill slot,
    # 2 the last slot of the smallest share among experts with two copies (1: 1/2 < 2/2)
    old = torch.tensor([[4, 1, 3, 1, 3]])
    assert pipeline.refill(old, w, 4).tolist() == [[0, 1, 3, 2, 3]]
    # more refill slots than missing experts: the rest go to the largest share, in slot order
    old = torch.tensor([[4, 1, 4, 2, 3, 4]])
    assert pipeline.refill(old, w, 4).tolist() == [[0, 1, 0, 2, 3, 2]]  # then 0: 10/1, 2: 6/1 > 0: 10/2


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("method", ["greedy", "refined"])
def test_a_budget_around_lost_gpus_counts_the_moves_beyond_the_forced_ones(case, method):
    L, E, R, G, N, P, lost = case
    mask = _mask(P, lost)
    old = eplb.rebalance_experts(make_loads(L, E, "skewed", seed=11), R, G, N, P)[0]
    w = make_loads(L, E, "skewed", seed=12)
    kept = lambda p: (p != old) & (p >= 0)  # noqa: E731  (live slots whose expert changed)
    live = torch.tensor(mask).repeat_interleave(R // P)
    bal = lambda out: metrics.balancedness(metrics.gpu_loads(w, out[0], out[2], P)[:, torch.tensor(mask)])  # noqa: E731
    runs = {}
    for k in (0, 2, R):
        got = {b: eplb.rebalance_experts(w, R, G, N, P, backend=b, method=method, active_gpus=mask, old_phy2log=old,
                                         max_moves=k) for b in BACKENDS}  # fmt: skip
        for b in BACKENDS[1:]:
            assert all(torch.equal(x, y) for x, y in zip(got[b], got["reference"], strict=True)), (b, k)
        _check_invariants(*got["reference"], E, R, G, N, P, lost)
        runs[k] = got["reference"]
    forced = kept(runs[0][0]).sum(dim=1)
    # one slot for each expert the lost GPUs held alone, nothing more: under the hierarchical policy
    # too, as the old placement's groups stay on their nodes
    copies = torch.zeros(L, E, dtype=torch.int64).scatter_add_(1, torch.where(live, old, 0), live.long().expand(L, R))
    assert torch.equal(forced, (copies == 0).sum(dim=1))
    for k, out in runs.items():
        assert (kept(out[0]).sum(dim=1) <= forced + k).all(), k
        assert (bal(out) >= bal(runs[0]) - 1e-12).all(), "never worse than the refilled placement"
    gated = eplb.rebalance_experts(w, R, G, N, P, method=method, active_gpus=mask, old_phy2log=old, min_gain=0.999)
    assert all(torch.equal(x, y) for x, y in zip(gated, runs[0], strict=True)), "no gain: the refilled placement"


def test_a_gpu_back_and_another_lost_fills_its_empty_slots_as_forced_moves():
    # the old placement is a plan around GPU 2; GPU 2 is back and GPU 5 lost: GPU 2's empty slots
    # must get experts too, so the forced moves are max(slots to refill, experts with no live copy)
    L, E, R, P = 1, 8, 16, 8
    old = eplb.rebalance_experts(make_loads(L, E, "skewed", seed=1), R, 1, 1, P, active_gpus=_mask(P, [2]))[0]
    mask = _mask(P, [5])
    live = torch.tensor(mask).repeat_interleave(R // P)
    held = old[0, live]
    empty = int((held < 0).sum())
    missing = E - len(set(held[held >= 0].tolist()))
    for k in (0, 1, 3):
        out = eplb.rebalance_experts(make_loads(L, E, "skewed", seed=2), R, 1, 1, P, active_gpus=mask,
                                     old_phy2log=old, max_moves=k)  # fmt: skip
        _check_invariants(*out, E, R, 1, 1, P, [5])
        new = out[0]
        changed = int(((new != old) & live).sum())
        assert changed <= max(empty, missing) + k, (k, changed, empty, missing)
        if k == 0:
            assert changed == max(empty, missing) == 2
