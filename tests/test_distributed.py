"""Multi-process tests over gloo (2 and 4 processes on the CPU): every rank plans the same
placement from its own counts, and rearrange_expert_weights leaves every rank holding exactly the
right expert tensors; a rank whose inputs are wrong or differ from the others' stops every rank
before any weight moves."""

import pytest
import torch
import torch.distributed as dist
from helpers import make_loads, spawn

import eplb_triton as eplb
from eplb_triton import OnlineBalancer, metrics, stable_slots
from eplb_triton.distributed import _transfers, check_ranks_agree, rearrange_expert_weights, sync_replica_grads

E, G, N, L = 16, 4, 2, 3


def _rank_loads(rank: int, step: int) -> torch.Tensor:
    return make_loads(L, E, "skewed", 1000 * rank + step) % 200


def _expert_data(layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two weight tensors per expert whose contents name (layer, expert)."""
    base = float(layer * 1000 + expert)
    return torch.full((3,), base) + torch.arange(3) / 10, torch.full((2, 2), -base)


def _weights_for(phy2log: torch.Tensor, rank: int, S: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = []
    for layer in range(phy2log.shape[0]):
        slots = phy2log[layer, rank * S : (rank + 1) * S].tolist()
        layers.append(tuple(torch.stack([_expert_data(layer, e)[i] for e in slots]) for i in range(2)))
    return layers


def _agree_worker(rank: int, world: int) -> None:
    P = world
    b = OnlineBalancer(L, E, E + 4 * world, G, N, P, window=2, rebalance_interval=2, min_gain=0, device="cpu")
    for step in range(2):
        loads = _rank_loads(rank, step)
        for layer in range(L):
            ids = torch.repeat_interleave(torch.arange(E), loads[layer]).view(-1, 1)
            b.record(layer, ids)
        b.step()
    gathered = [torch.empty_like(b.phy2log) for _ in range(world)]
    dist.all_gather(gathered, b.phy2log)
    for other in gathered:
        assert torch.equal(other, b.phy2log), "all ranks hold the same placement"
    total = sum(_rank_loads(r, s) for r in range(world) for s in range(2))
    R = b.config.num_replicas
    initial, _, initial_cnt = eplb.rebalance_experts(torch.ones(L, E), R, G, N, P)
    plan, _, cnt = eplb.rebalance_experts(total, R, G, N, P)
    # min_gain=0: a layer takes the plan where it lowers the largest GPU load at all
    better = metrics.gpu_loads(total, plan, cnt, P).amax(1) < metrics.gpu_loads(total, initial, initial_cnt, P).amax(1)
    want = torch.where(better[:, None], stable_slots(initial, plan, P), initial)
    assert better.any()
    assert torch.equal(b.phy2log, want), "the plan is that of the counts summed over ranks"

    # then move the weights to it
    weights = _weights_for(initial, rank, R // P)
    stats = rearrange_expert_weights(weights, initial, b.phy2log)
    _check_weights(weights, b.phy2log, rank, R // P)
    changed = int(
        (
            initial[:, rank * (R // P) : (rank + 1) * (R // P)] != b.phy2log[:, rank * (R // P) : (rank + 1) * (R // P)]
        ).sum()
    )
    assert stats.local_copies + stats.received == changed


def _check_weights(weights, phy2log, rank: int, S: int) -> None:
    for layer, tensors in enumerate(weights):
        for i, q in enumerate(range(rank * S, (rank + 1) * S)):
            want = _expert_data(layer, int(phy2log[layer, q]))
            assert torch.equal(tensors[0][i], want[0]) and torch.equal(tensors[1][i], want[1]), (layer, q)


def _rearrange_worker(rank: int, world: int, old: torch.Tensor, new: torch.Tensor, max_inflight: int) -> None:
    S = old.shape[1] // world
    weights = _weights_for(old, rank, S)
    untouched = [(t0.clone(), t1.clone()) for t0, t1 in weights]
    stats = rearrange_expert_weights(weights, old, new, max_inflight=max_inflight)
    _check_weights(weights, new, rank, S)
    mine = slice(rank * S, (rank + 1) * S)
    assert stats.local_copies + stats.received == int((old[:, mine] != new[:, mine]).sum())
    # one-tensor-per-layer form, too
    single = [w[0].clone() for w in untouched]
    rearrange_expert_weights(single, old, new)
    for layer, t in enumerate(single):
        for i, q in enumerate(range(rank * S, (rank + 1) * S)):
            assert torch.equal(t[i], _expert_data(layer, int(new[layer, q]))[0])


def _random_placement(layers: int, experts: int, slots: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(layers):
        extra = torch.randint(0, experts, (slots - experts,), generator=g)
        row = torch.cat([torch.arange(experts), extra])
        rows.append(row[torch.randperm(slots, generator=g)])
    return torch.stack(rows)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_agree_on_the_plan_and_weights_follow(world):
    spawn(world, _agree_worker)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["random", "every-slot-changes", "unchanged"])
def test_rearrange_expert_weights(world, kind):
    S = 5
    old = _random_placement(L, 7, world * S, seed=world)
    if kind == "random":
        new = _random_placement(L, 7, world * S, seed=world + 50)
    elif kind == "every-slot-changes":
        new = torch.roll(old, shifts=S, dims=1)  # each rank gets the next rank's experts
        new[:, :S] = old[:, :S].flip(1)  # ... except rank 0: its own, reversed (local swaps)
        new = torch.where(new == old, (old + 1) % 7, new)
        # keep every expert present
        new[:, -7:] = torch.arange(7)
        new = torch.where(new == old, (new + 3) % 7, new)
        assert (new != old).all()
    else:
        new = old.clone()
    spawn(world, _rearrange_worker, old, new, 2)


def test_rearrange_argument_errors():
    # in one process (no process group) the inputs are checked as in a group
    with pytest.raises(TypeError, match="old_phy2log must be an integer tensor, got torch.float32") as info:
        rearrange_expert_weights([torch.zeros(2, 1)], torch.zeros(1, 2), torch.zeros(1, 2))
    assert isinstance(info.value, ValueError), "still the agreement check's EplbArgumentError"
    with pytest.raises(TypeError, match="expert_weights must be a sequence with one entry per layer, got Tensor"):
        rearrange_expert_weights(torch.zeros(1, 2, 1), torch.zeros(1, 2).long(), torch.zeros(1, 2).long())
    with pytest.raises(TypeError, match="phy2log must be an integer tensor, got torch.float32"):
        sync_replica_grads([torch.zeros(2, 1)], torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"expert_weights\[0\]\[0\] must be \[slots_per_rank=2, ...\] for old_phy2log"):
        rearrange_expert_weights([torch.zeros(3, 1)], torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2).long())


# Faults: every rank must raise the same ValueError and keep its weights bit for bit. Each rank runs
# several scenarios in one spawn, records what happened, and the tests below check every rank.


def _bits(weights) -> list[torch.Tensor]:
    return [t.detach().contiguous().view(torch.uint8).clone() for w in weights for t in w]


def _attempt(weights, old: torch.Tensor, new: torch.Tensor, **kwargs) -> dict:
    before = _bits(weights)
    try:
        rearrange_expert_weights(weights, old, new, **kwargs)
        error = None
    except Exception as exc:  # recorded so that every rank reports, not just the first to fail
        error = f"{type(exc).__name__}: {exc}"
    after = _bits(weights)
    return {"error": error, "unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True))}


def _fault_worker(rank: int, world: int, out: str) -> None:
    S = 5
    old = _random_placement(L, 7, world * S, seed=1)
    new = _random_placement(L, 7, world * S, seed=2)
    results = {}

    new_here = new.clone()
    if rank == 1:
        new_here[1, [0, 9]] = new[1, [9, 0]]
    assert not torch.equal(new_here, new) or rank == 0
    results["new-differs"] = _attempt(_weights_for(old, rank, S), old, new_here)

    old_here = old.clone()
    if rank == 1:
        old_here[2, [0, 9]] = old[2, [9, 0]]
    assert not torch.equal(old_here, old) or rank == 0
    results["old-differs"] = _attempt(_weights_for(old, rank, S), old_here, new)

    no_holder = old.clone()
    no_holder[1] = torch.where(no_holder[1] == 5, 6, no_holder[1])
    results["no-holder"] = _attempt(_weights_for(no_holder, rank, S), no_holder, new)

    weights = _weights_for(old, rank, S)
    if rank == 1:
        weights[2] = (weights[2][0], weights[2][1].double())
    results["layout-differs"] = _attempt(weights, old, new)

    tensors = [torch.arange(4), torch.arange(4) + (rank == 1)]
    try:
        check_ranks_agree(tensors[:1], names=["same"])
        check_ranks_agree(tensors, names=["same", "plan"])
        results["check-ranks-agree"] = None
    except ValueError as exc:
        results["check-ranks-agree"] = str(exc)

    # Last, after the failed attempts: the group still works, and parameters move in place.
    params = [tuple(torch.nn.Parameter(t, requires_grad=True) for t in w) for w in _weights_for(old, rank, S)]
    ptrs = [t.data_ptr() for w in params for t in w]
    moved = list(params)
    try:
        rearrange_expert_weights(moved, old, new)
        _check_weights(moved, new, rank, S)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    results["parameters"] = {
        "error": error,
        "same objects": all(a is b for pa, pb in zip(params, moved, strict=True) for a, b in zip(pa, pb, strict=True)),
        "in place": ptrs == [t.data_ptr() for w in moved for t in w],
        "still trainable": all(t.requires_grad and t.grad is None for w in moved for t in w),
    }
    torch.save(results, f"{out}/{rank}.pt")


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("faults")
    spawn(2, _fault_worker, str(out))
    return [torch.load(out / f"{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize(
    "scenario, error",
    [
        ("new-differs", "new_phy2log differs between ranks (ranks 0 and 1 disagree)"),
        ("old-differs", "old_phy2log differs between ranks (ranks 0 and 1 disagree)"),
        ("no-holder", "new_phy2log[layer 1] needs expert 5, which no rank holds in old_phy2log"),
        ("layout-differs", "expert_weights layout differs between ranks (ranks 0 and 1 disagree)"),
    ],
)
def test_a_fault_stops_every_rank_before_any_weight_moves(faults, scenario, error):
    for rank, results in enumerate(faults):
        assert results[scenario] == {"error": f"EplbArgumentError: {error}", "unchanged": True}, f"rank {rank}"


def test_check_ranks_agree_names_what_differs_on_every_rank(faults):
    for rank, results in enumerate(faults):
        assert results["check-ranks-agree"] == "plan differs between ranks (ranks 0 and 1 disagree)", f"rank {rank}"


def test_parameters_move_in_place(faults):
    for rank, results in enumerate(faults):
        want = {"error": None, "same objects": True, "in place": True, "still trainable": True}
        assert results["parameters"] == want, f"rank {rank}"


def _local_fault_worker(rank: int, world: int, out: str) -> None:
    S = 5
    old = _random_placement(L, 7, world * S, seed=3)
    new = _random_placement(L, 7, world * S, seed=4)
    bad = new.clone()
    if rank == 1:
        bad[2, 3] = -1
    results = {"negative-id": _attempt(_weights_for(old, rank, S), old, bad)}
    results["max-inflight"] = _attempt(_weights_for(old, rank, S), old, new, max_inflight=0 if rank == 1 else 4)
    torch.save(results, f"{out}/{rank}.pt")


def test_a_bad_input_on_one_rank_stops_every_rank_without_hanging(tmp_path):
    spawn(2, _local_fault_worker, str(tmp_path))
    for rank in range(2):
        results = torch.load(tmp_path / f"{rank}.pt")
        assert results == {
            "negative-id": {
                "error": "EplbArgumentError: rank 1: new_phy2log has an expert id < 0 (-1)",
                "unchanged": True,
            },
            "max-inflight": {
                "error": "EplbArgumentError: rank 1: max_inflight (0) must be a positive int",
                "unchanged": True,
            },
        }, f"rank {rank}"


def _balancer_fault_worker(rank: int, world: int, out: str) -> None:
    # A misconfigured rank (keep_slots differs) computes another plan from the same loads: every
    # rank must refuse to install it, and keep its previous placement.
    b = OnlineBalancer(L, E, 24, G, N, 8, window=1, rebalance_interval=1, device="cpu", keep_slots=rank == 0)
    before = b.phy2log.clone()
    b.counts.copy_(_rank_loads(rank, 0))
    try:
        b.step()
        error = None
    except ValueError as exc:
        error = str(exc)
    torch.save({"error": error, "unchanged": torch.equal(b.phy2log, before)}, f"{out}/{rank}.pt")


def test_balancer_plans_that_differ_between_ranks_are_not_installed(tmp_path):
    spawn(2, _balancer_fault_worker, str(tmp_path))
    for rank in range(2):
        results = torch.load(tmp_path / f"{rank}.pt")
        assert results["unchanged"], f"rank {rank}"
        assert results["error"].startswith("phy2log differs between ranks (ranks 0 and 1 disagree)"), results


def test_rearrange_in_one_process_without_a_process_group():
    # The README's loop in a single process: no torch.distributed, group=None. Every slot is
    # rewritten from the process's own old slots, nothing else is touched, bad inputs still raise.
    assert not dist.is_initialized()
    old = eplb.rebalance_experts(torch.ones(L, E), E + 4, G, N, 2)[0]
    new = eplb.rebalance_experts(make_loads(L, E, "skewed", 3), E + 4, G, N, 2)[0]
    weights = _weights_for(old, 0, E + 4)
    stats = rearrange_expert_weights(weights, old, new)
    _check_weights(weights, new, 0, E + 4)
    assert stats.received == stats.sent == 0 and stats.local_copies == int((old != new).sum()) > 0
    with pytest.raises(ValueError, match="expert_weights has 2 layers, old_phy2log has 3"):
        rearrange_expert_weights(weights[:2], new, old)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        rearrange_expert_weights(weights, new, old, group=object())


def test_transfers_round_robin_over_distinct_holders():
    # S = 2, 4 ranks. Expert 0 is held by rank 0 (twice) and rank 1; ranks 2 and 3 need it.
    # Distinct holders [0, 1]: requester 0 (rank 2) <- rank 0, requester 1 (rank 3) <- rank 1.
    old = [0, 0, 0, 2, 3, 4, 3, 5]
    new = [0, 0, 0, 2, 0, 4, 0, 5]
    assert _transfers(old, new, 4, 2) == [(0, 0, 2), (0, 1, 3)]


def _stats_worker(rank: int, world: int) -> None:
    # rank 0 swaps its two experts (2 local copies) and sends expert 0 to rank 1 (1 received there)
    old, new = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[1, 0, 0, 3]])
    w = torch.tensor([[float(e)] for e in old[0, 2 * rank : 2 * rank + 2].tolist()])
    stats = rearrange_expert_weights([w], old, new)
    assert w.view(-1).tolist() == [float(e) for e in new[0, 2 * rank : 2 * rank + 2].tolist()]
    want = {0: (2, 0, 1), 1: (0, 1, 0)}[rank]
    assert (stats.local_copies, stats.received, stats.sent) == want, (rank, stats)
    assert (stats.bytes_sent, stats.bytes_received) == ((4, 0) if rank == 0 else (0, 4))  # one float32


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
    spawn(2, _stats_worker)


def test_rearrange_in_a_subgroup_uses_global_peer_ranks():
    spawn(3, _subgroup_worker)
