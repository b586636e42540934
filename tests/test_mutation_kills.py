"""Tests written after a mutation-testing pass: each pins a behaviour that a realistic bug changed
without failing any earlier test. Expected values are computed by hand in the comments."""

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eplb_triton as eplb
from eplb_triton import reference
from eplb_triton._validation import Config, select_policy
from eplb_triton.distributed import _transfers, rearrange_expert_weights
from eplb_triton.online import OnlineBalancer, record_dispatch, stable_slots

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# -- float32 arithmetic of the packing ------------------------------------------------------------


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


# -- validation -----------------------------------------------------------------------------------


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


# -- online balancer --------------------------------------------------------------------------------


def _feed(balancer: OnlineBalancer, loads: torch.Tensor) -> None:
    for layer in range(loads.shape[0]):
        ids = torch.repeat_interleave(torch.arange(loads.shape[1]), loads[layer]).view(-1, 1)
        balancer.record(layer, ids)


def _threshold_balancer(threshold: float) -> tuple[OnlineBalancer, torch.Tensor]:
    # As in test_online.test_threshold_...: the equal-load placement is 4,0,0 | 5,1,1 | 6,2,2 | 7,3,3;
    # layer 0's loads keep every GPU at 20 (balancedness 1.0), layer 1's give 40 | 20 | 10 | 10 (0.5).
    b = OnlineBalancer(2, 8, 12, 2, 1, 4, window=1, rebalance_interval=1000, balancedness_threshold=threshold,
                       device="cpu")  # fmt: skip
    initial = b.phy2log.clone()
    _feed(b, torch.tensor([[10] * 8, [0, 20, 0, 0, 40, 0, 10, 10]]))
    return b, initial


def test_threshold_is_strictly_below():
    # balancedness 0.5 is not below a threshold of 0.5: nothing is re-planned (nor planned at all).
    b, initial = _threshold_balancer(0.5)
    assert b.step() is False
    assert torch.equal(b.phy2log, initial)
    assert not b.last_replanned.any() and len(b.history) == 0


def test_history_worst_after_is_the_minimum():
    # threshold 0.9: layer 0 (GPU loads 20 | 20 | 20 | 16, balancedness 0.95) stays, layer 1 (0.5)
    # is re-planned to 1.0: after = [0.95, 1.0], mean 0.975, worst 0.95
    b = OnlineBalancer(2, 8, 12, 2, 1, 4, window=1, rebalance_interval=1000, balancedness_threshold=0.9,
                       device="cpu")  # fmt: skip
    initial = b.phy2log.clone()
    _feed(b, torch.tensor([[10, 10, 10, 10, 10, 10, 10, 6], [0, 20, 0, 0, 40, 0, 10, 10]]))
    assert b.step() is True
    assert b.last_replanned.tolist() == [False, True]
    assert torch.equal(b.phy2log[0], initial[0])
    (entry,) = b.history_records()
    assert entry["after"] == pytest.approx(0.975)
    assert entry["worst_after"] == pytest.approx(0.95)
    assert entry["replanned_layers"] == 1
    assert entry["migrated_slots"] == int((b.phy2log[1] != initial[1]).sum()) > 0


def test_default_window_is_the_rebalance_interval():
    b = OnlineBalancer(1, 4, 4, 1, 1, 1, rebalance_interval=3, device="cpu")
    assert b.window == 3
    for loads in ([[1, 0, 0, 0]], [[0, 2, 0, 0]], [[0, 0, 3, 0]]):
        _feed(b, torch.tensor(loads))
        b.step()
    assert b.window_loads().tolist() == [[1, 2, 3, 0]]


def test_threshold_one_and_decay_limits():
    b = OnlineBalancer(1, 4, 4, 1, 1, 1, balancedness_threshold=1.0, device="cpu")  # (0, 1] includes 1
    assert b.balancedness_threshold == 1.0
    with pytest.raises(ValueError, match=r"ema_decay \(1.0\) must be a number with 0 < ema_decay < 1"):
        OnlineBalancer(1, 4, 4, 1, 1, 1, ema_decay=1.0)


def test_old_checkpoint_without_phyrank_numbers_replicas_in_slot_order():
    b = OnlineBalancer(2, 8, 12, 2, 1, 4, window=1, device="cpu")
    assert b.phy2log[0].tolist() == [4, 0, 0, 5, 1, 1, 6, 2, 2, 7, 3, 3]
    state = b.state_dict()
    del state["phyrank"]  # a 0.1 checkpoint
    c = OnlineBalancer(2, 8, 12, 2, 1, 4, window=1, device="cpu")
    c.phyrank.fill_(5)
    c.load_state_dict(state)
    assert c.phyrank[0].tolist() == [0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    # width R - E + 1 = 5: expert 0 in slots 1 then 2, expert 4 in slot 0
    assert c.log2phy[0, 0].tolist() == [1, 2, -1, -1, -1]
    assert c.log2phy[0, 4].tolist() == [0, -1, -1, -1, -1]


def test_stable_slots_rejects_replicas_not_multiple_of_gpus():
    x = torch.zeros(1, 6, dtype=torch.int64)
    with pytest.raises(ValueError, match="mismatch"):
        stable_slots(x, x, 4)


# -- recording ------------------------------------------------------------------------------------------


def _semantics_placement():
    return torch.tensor([[0, 3, -1], [1, -1, -1], [2, 4, 5]]), torch.tensor([2, 1, 3])


def test_dispatch_rejects_counts_of_the_wrong_shape():
    log2phy, logcnt = _semantics_placement()
    ids = torch.tensor([[0, 2]])
    with pytest.raises(ValueError, match="log2phy must be"):
        record_dispatch(ids, log2phy, logcnt, torch.zeros(4, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dispatch_check_counts_only_this_call(backend):
    # 5 invalid ids from earlier calls must not make a clean call raise
    log2phy, logcnt = _semantics_placement()
    counts = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    invalid = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    ids = torch.tensor([[0, 2], [1, 2]], device=DEVICE)
    phy = record_dispatch(ids, log2phy.to(DEVICE), logcnt.to(DEVICE), counts, invalid=invalid, check=True,
                          backend=backend)  # fmt: skip
    assert phy.tolist() == [[0, 2], [1, 4]]
    assert counts.tolist() == [1, 1, 2] and invalid.tolist() == [5]


def test_dispatch_kernel_writes_no_count_past_the_last_expert():
    # counts is a view of a larger buffer: the entry after it (invalid ids' bin) must stay 0
    log2phy, logcnt = _semantics_placement()
    buf = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    counts = buf[:3]
    ids = torch.tensor([[0, 3], [-1, 2], [3, 1]], device=DEVICE)
    phy = record_dispatch(ids, log2phy.to(DEVICE), logcnt.to(DEVICE), counts, backend="triton")
    assert phy.tolist() == [[0, -1], [-1, 4], [-1, 1]]
    assert buf.tolist() == [1, 1, 1, 0]


# -- kernels ----------------------------------------------------------------------------------------------


def test_replicate_kernel_ranks_past_255():
    # one expert, 300 slots: slot i is replica i of expert 0 (8-bit payloads would wrap at 256)
    phy2log, rank, cnt = eplb.replicate_experts(torch.ones(1, 1, device=DEVICE), 300, backend="triton")
    assert phy2log.tolist() == [[0] * 300]
    assert rank.tolist() == [list(range(300))]
    assert cnt.tolist() == [[300]]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_packing_kernel_full_pack_ranks_after_an_overflowed_pack():
    # capacity 3. big -> p0, big -> p1, big -> p0 (tie; 6e38 overflows to inf), big -> p1 (inf),
    # 1 -> p0 (inf tie, lower index; p0 now full), 1 -> p1: the only open pack, though its load is inf.
    big = 3.0e38
    w = torch.tensor([[big, big, big, big, 1.0, 1.0]], device=DEVICE)
    pack, rank = eplb.balanced_packing(w, 2, backend="triton")
    assert pack.tolist() == [[0, 1, 0, 1, 0, 1]]
    assert rank.tolist() == [[0, 0, 1, 1, 2, 2]]


# -- distributed ------------------------------------------------------------------------------------------


def test_transfers_round_robin_over_distinct_holders():
    # S = 2, 4 ranks. Expert 0 is held by rank 0 (twice) and rank 1; ranks 2 and 3 need it.
    # Distinct holders [0, 1]: requester 0 (rank 2) <- rank 0, requester 1 (rank 3) <- rank 1.
    old = [0, 0, 0, 2, 3, 4, 3, 5]
    new = [0, 0, 0, 2, 0, 4, 0, 5]
    assert _transfers(old, new, 4, 2) == [(0, 0, 2), (0, 1, 3)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # fmt: skip
    try:
        fn(rank, world)
    finally:
        dist.destroy_process_group()


def _stats_worker(rank: int, world: int) -> None:
    # rank 0 swaps its two experts (2 local copies) and sends expert 0 to rank 1 (1 received there)
    old, new = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[1, 0, 0, 3]])
    w = torch.tensor([[float(e)] for e in old[0, 2 * rank : 2 * rank + 2].tolist()])
    stats = rearrange_expert_weights([w], old, new)
    assert w.view(-1).tolist() == [float(e) for e in new[0, 2 * rank : 2 * rank + 2].tolist()]
    want = {0: (2, 0, 1), 1: (0, 1, 0)}[rank]
    assert (stats.local_copies, stats.received, stats.sent) == want, (rank, stats)


def _subgroup_worker(rank: int, world: int) -> None:
    # the expert-parallel group is global ranks 1 and 2 (group ranks 0 and 1); rank 0 is outside it
    group = dist.new_group([1, 2])
    if rank == 0:
        return
    me = rank - 1
    old, new = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[2, 1, 2, 3]])
    w = torch.tensor([[float(e)] for e in old[0, 2 * me : 2 * me + 2].tolist()])
    stats = rearrange_expert_weights([w], old, new, group)
    assert w.view(-1).tolist() == [float(e) for e in new[0, 2 * me : 2 * me + 2].tolist()]
    assert (stats.received, stats.sent) == ((1, 0) if me == 0 else (0, 1))


def test_rearrange_stats_per_rank():
    mp.spawn(_entry, args=(2, _free_port(), _stats_worker), nprocs=2, join=True)


def test_rearrange_in_a_subgroup_uses_global_peer_ranks():
    mp.spawn(_entry, args=(3, _free_port(), _subgroup_worker), nprocs=3, join=True)
