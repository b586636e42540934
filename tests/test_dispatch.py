"""Per-step dispatch by the step's own loads (eplb_triton.dispatch, record_dispatch(split=...)).

The split itself is tested against an LP in tests/test_split.py; here: every backend returns the same
slots (the Triton path on the interpreter), the slots realise exactly the split's quotas, a batch split
across ranks (counts + offsets) lands exactly where one batch of the whole step would, and the
argument rules.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb_triton as eplb
from eplb_triton import split as split_module

BACKENDS = ["reference", "cpu", "triton"]


@st.composite
def steps(draw, max_experts: int = 7, max_gpus: int = 4, max_per_gpu: int = 3, max_tokens: int = 40):
    """``(topk_ids [T, k], phy2log [R], P, E)`` with every expert placed and skewed routing."""
    E = draw(st.integers(1, max_experts))
    P = draw(st.integers(1, max_gpus))
    S = draw(st.integers(max(1, -(-E // P)), max(1, -(-E // P)) + max_per_gpu - 1))
    R = P * S
    rest = draw(st.lists(st.integers(0, E - 1), min_size=R - E, max_size=R - E))
    order = draw(st.permutations(list(range(E)) + rest))
    T = draw(st.integers(0, max_tokens))
    k = draw(st.integers(1, min(3, E)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.0, E) + 0.01
    rows = [rng.choice(E, size=k, replace=False, p=weights / weights.sum()) for _ in range(T)]
    ids = np.stack(rows) if rows else np.zeros((0, k), np.int64)
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(order), P, E


def _gpu_loads(slots: torch.Tensor, R: int, P: int) -> np.ndarray:
    flat = slots.reshape(-1)
    flat = flat[flat >= 0]
    return np.bincount((flat // (R // P)).numpy(), minlength=P)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps(), st.sampled_from(["balanced", "even"]))
def test_every_backend_returns_the_same_slots(step, split):
    ids, phy2log, P, E = step
    got = {b: eplb.dispatch(ids, phy2log, P, split=split, num_experts=E, backend=b) for b in BACKENDS}
    for b in BACKENDS[1:]:
        assert torch.equal(got[b], got["reference"]), b


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps())
def test_slots_realise_the_optimal_split(step):
    ids, phy2log, P, E = step
    R = phy2log.numel()
    slots = eplb.dispatch(ids, phy2log, P, num_experts=E, backend="cpu")
    counts = np.bincount(ids.reshape(-1).numpy(), minlength=E)
    quota = split_module.balanced_split(counts[None], phy2log.numpy()[None], P)[0]
    assert np.array_equal(np.bincount(slots.reshape(-1).numpy(), minlength=R), quota)
    assert (phy2log[slots] == ids).all(), "every entry goes to a slot of its expert"
    even = eplb.dispatch(ids, phy2log, P, split="even", num_experts=E, backend="cpu")
    assert _gpu_loads(slots, R, P).max(initial=0) <= _gpu_loads(even, R, P).max(initial=0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps(max_tokens=30), st.integers(1, 4), st.sampled_from(["cpu", "triton"]))
def test_ranks_dispatching_their_own_tokens_match_one_batch_of_the_whole_step(step, ranks, backend):
    # rank r's rows, dispatched with the group's counts and the entries of the ranks before it,
    # land exactly where the concatenated batch of the whole step lands
    ids, phy2log, P, E = step
    cuts = np.linspace(0, ids.shape[0], ranks + 1).astype(int)
    parts = [ids[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    local = [torch.bincount(p.reshape(-1), minlength=E) for p in parts]
    total = sum(local, torch.zeros(E, dtype=torch.int64))
    got, before = [], torch.zeros(E, dtype=torch.int64)
    for part, count in zip(parts, local, strict=True):
        got.append(eplb.dispatch(part, phy2log, P, counts=total, offsets=before, backend=backend))
        before = before + count
    want = eplb.dispatch(ids, phy2log, P, num_experts=E, backend=backend)
    assert torch.equal(torch.cat(got), want)


def test_a_hand_case():
    # GPU 0: experts 0, 1; GPU 1: experts 0, 2. Three tokens of expert 0 and one of 1: the even split
    # puts 2 of expert 0 on GPU 0 (load 3 against 1); the balanced one 1 and 2 (loads 2 and 2).
    ids, phy2log = torch.tensor([[0], [0], [0], [1]]), torch.tensor([0, 1, 0, 2])
    for backend in BACKENDS:
        assert eplb.dispatch(ids, phy2log, 2, num_experts=3, backend=backend).tolist() == [[0], [2], [2], [1]]
        assert eplb.dispatch(ids, phy2log, 2, split="even", num_experts=3, backend=backend).tolist() == [
            [0], [2], [0], [1]
        ]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_record_dispatch_balanced_counts_and_dispatches(backend):
    E, R, P = 5, 8, 4
    w = torch.tensor([[50, 3, 9, 1, 30]])
    phy2log, log2phy, logcnt = eplb.rebalance_experts(w, R, 1, 1, P, backend="cpu")
    ids = torch.tensor([[0, 4], [0, 2], [0, 4], [7, 0], [4, 1], [0, -1]])
    counts = torch.zeros(E, dtype=torch.int64)
    invalid = torch.zeros(1, dtype=torch.int64)
    slots = eplb.record_dispatch(ids, log2phy[0], logcnt[0], counts, invalid=invalid, backend=backend,
                                 split="balanced", phy2log=phy2log[0], num_gpus=P)  # fmt: skip
    assert counts.tolist() == [5, 1, 1, 0, 3] and invalid.tolist() == [2]
    assert slots[3, 0] == -1 and slots[5, 1] == -1
    valid = ids.clamp(0, E - 1)
    assert ((phy2log[0][slots] == valid) | (slots < 0)).all()
    counts_np = np.bincount(ids[(ids >= 0) & (ids < E)].numpy(), minlength=E)
    quota = split_module.balanced_split(counts_np[None], phy2log.numpy(), P)[0]
    assert np.array_equal(np.bincount(slots[slots >= 0].numpy(), minlength=R), quota)


def test_argument_rules():
    ids, phy2log = torch.tensor([[0, 1]]), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"counts\[0\] \(0\) must be >= this batch's entries of expert 0"):
        eplb.dispatch(ids, phy2log, 2, counts=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"counts\[1\] \(1\) must be >= .* plus offsets\[1\] \(1\)"):
        eplb.dispatch(ids, phy2log, 2, counts=torch.tensor([1, 1]), offsets=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"counts must have shape \[num_experts=2\]"):
        eplb.dispatch(ids, phy2log, 2, counts=torch.tensor([1, 1, 1]), num_experts=2)
    with pytest.raises(TypeError, match="counts must be an integer tensor"):
        eplb.dispatch(ids, phy2log, 2, counts=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="split must be one of"):
        eplb.dispatch(ids, phy2log, 2, split="lp")
    with pytest.raises(ValueError, match=r"num_replicas \(4, phy2log.shape\[0\]\) must be a multiple of num_gpus"):
        eplb.dispatch(ids, phy2log, 3)
    with pytest.raises(ValueError, match="every expert at least once"):
        eplb.dispatch(ids, torch.tensor([0, 0, 0, 0]), 2, num_experts=2)
    with pytest.raises(ValueError, match="ids outside"):
        eplb.dispatch(torch.tensor([[0, 9]]), phy2log, 2, check=True)
    for backend in ("reference", "cpu", "triton"):  # the even split counts them in its record
        with pytest.raises(ValueError, match=r"topk_ids has 2 ids outside \[0, 2\)"):
            eplb.dispatch(torch.tensor([[0, 9], [-1, 1]]), phy2log, 2, split="even", check=True, backend=backend)
    assert eplb.dispatch(torch.tensor([[0, 9]]), phy2log, 2).tolist()[0][1] == -1
    empty = eplb.dispatch(torch.zeros((0, 2), dtype=torch.int32), phy2log, 2)
    assert empty.shape == (0, 2) and empty.dtype == torch.int32
    log2phy, logcnt = torch.tensor([[0, 2], [1, 3]]), torch.tensor([2, 2])
    with pytest.raises(ValueError, match="split='balanced' needs the layer's phy2log and num_gpus"):
        eplb.record_dispatch(ids, log2phy, logcnt, torch.zeros(2, dtype=torch.int64), split="balanced")


def _balancer_split_worker(rank: int, world: int) -> None:
    # every rank records its own tokens; together they must land where one batch of the step would
    import torch.distributed as dist

    L, E, R, P = 2, 6, 12, 4
    b = eplb.OnlineBalancer(L, E, R, 1, 1, P, device="cpu", split="balanced", rebalance_interval=10**6)
    gen = torch.Generator().manual_seed(7)
    step = [torch.multinomial(torch.tensor([9.0, 1, 1, 4, 1, 2]), 12 * world, replacement=True, generator=gen)
            .view(-1, 2) for _ in range(L)]  # fmt: skip
    for layer in range(L):
        mine = step[layer].chunk(world)[rank]
        slots = b.record(layer, mine)
        gathered = [torch.empty_like(slots) for _ in range(world)]
        dist.all_gather(gathered, slots)
        want = eplb.dispatch(step[layer], b.phy2log[layer], P, num_experts=E, backend="cpu")
        # dispatch numbers replicas in slot order, the balancer in its plan's order: compare loads
        got_loads = torch.bincount(torch.cat(gathered).reshape(-1), minlength=R)
        assert torch.equal(got_loads, torch.bincount(want.reshape(-1), minlength=R)), (rank, layer)
        assert torch.equal(b.counts[layer], torch.bincount(mine.reshape(-1), minlength=E))


@pytest.mark.parametrize("world", [2, 3])
def test_balancer_ranks_split_by_the_groups_counts(world):
    from helpers import spawn

    spawn(world, _balancer_split_worker)
