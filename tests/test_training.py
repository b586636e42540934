"""What a training loop with replicas needs, with real processes (gloo on the CPU): replica gradients
summed across ranks (sync_replica_grads), optimizer state that moves with the weights
(rearrange_expert_weights(..., optimizer=)), and the layout a freshly built model starts in.

The end-to-end proof (the same losses as a model without replicas) is tests/test_train_ep.py."""

from __future__ import annotations

import pytest
import torch
from helpers import spawn

import eplb_triton as eplb
from eplb_triton.distributed import rearrange_expert_weights, sync_replica_grads

# Two layers of 6 experts on 12 slots. Layer 0: experts 0 and 1 have copies on three ranks of four
# (or two of two), expert 2 two copies on one rank; layer 1: a permutation with 2 copies of each of
# experts 0..5 spread out. Slot-major: rank r holds slots r * S .. r * S + S - 1.
PLACEMENT = torch.tensor([
    [0, 1, 2, 2, 0, 3, 1, 4, 0, 5, 1, 0],
    [5, 4, 3, 2, 1, 0, 0, 1, 2, 3, 4, 5],
])  # fmt: skip
L, R, E = 2, 12, 6


def _grad_value(layer: int, slot: int, j: int, exact: bool) -> torch.Tensor:
    """The gradient a slot computed: integers (exact sums) or fractions (order-sensitive sums)."""
    g = torch.Generator().manual_seed(1000 * layer + 10 * slot + j)
    shape = (3,) if j == 0 else (2, 2)
    values = torch.randint(-50, 50, shape, generator=g) if exact else torch.rand(shape, generator=g) * 1e3
    return values.double() / (1 if exact else 7)


def _params(rank: int, S: int, exact: bool) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    layers = []
    for layer in range(L):
        ps = []
        for j in range(2):
            rows = [_grad_value(layer, q, j, exact) for q in range(rank * S, (rank + 1) * S)]
            p = torch.nn.Parameter(torch.zeros(S, *rows[0].shape, dtype=torch.float64))
            p.grad = torch.stack(rows)
            ps.append(p)
        layers.append(tuple(ps))
    return layers


def _sync_worker(rank: int, world: int, exact: bool) -> None:
    S = R // world
    params = _params(rank, S, exact)
    before = [[p.grad.clone() for p in ps] for ps in params]
    stats = sync_replica_grads(params, PLACEMENT, check=True)
    expected_bytes = 0
    for layer in range(L):
        row = PLACEMENT[layer].tolist()
        for i, q in enumerate(range(rank * S, (rank + 1) * S)):
            e = row[q]
            copies = [s for s in range(R) if row[s] == e]
            for j in range(2):
                got = params[layer][j].grad[i]
                if len(copies) == 1:  # not replicated: untouched, bit for bit
                    assert torch.equal(got, before[layer][j][i])
                elif exact:  # integers: the sum of every copy's gradient, whatever the order
                    assert torch.equal(got, sum(_grad_value(layer, s, j, True) for s in copies)), (rank, layer, q)
        for e in sorted(set(row)):
            ranks = sorted({s // S for s in range(R) if row[s] == e})
            if len([s for s in range(R) if row[s] == e]) > 1 and rank in ranks:
                expected_bytes += (len(ranks) - 1) * 8 * (3 + 4)  # float64, [3] and [2, 2] per expert
    assert stats.bytes_sent == stats.bytes_received == expected_bytes, (rank, stats, expected_bytes)
    # every copy of an expert holds bitwise the same gradient, on every rank
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, [[p.grad.clone() for p in ps] for ps in params])
    for layer in range(L):
        row = PLACEMENT[layer].tolist()
        for e in set(row):
            for j in range(2):
                copies = [gathered[s // S][layer][j][s % S] for s in range(R) if row[s] == e]
                assert all(torch.equal(c, copies[0]) for c in copies), (layer, e)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("exact", [True, False], ids=["integers", "fractions"])
def test_replicas_get_the_sum_of_all_copies_gradients(world, exact):
    spawn(world, _sync_worker, exact)


def test_replica_sync_in_one_process_sums_local_copies():
    params = _params(0, R, exact=True)
    untouched = [[p.grad.clone() for p in ps] for ps in params]
    stats = sync_replica_grads(params, PLACEMENT)
    assert stats.bytes_sent == 0 and stats.experts == 3 + 6  # layer 0: experts 0, 1, 2; layer 1: all six
    for layer in range(L):
        row = PLACEMENT[layer].tolist()
        for q in range(R):
            copies = [s for s in range(R) if row[s] == row[q]]
            want = sum(untouched[layer][0][s] for s in copies) if len(copies) > 1 else untouched[layer][0][q]
            assert torch.equal(params[layer][0].grad[q], want)


def _sync_fault_worker(rank: int, world: int) -> None:
    S = R // world
    params = _params(rank, S, exact=True)
    before = [[p.grad.clone() for p in ps] for ps in params]
    cases = {
        "placements differ": (params, PLACEMENT if rank == 0 else PLACEMENT.flip(1)),
        "no grad on one rank": (
            [(ps[0], torch.nn.Parameter(ps[1].detach().clone())) if rank == 1 else ps for ps in params],
            PLACEMENT,
        ),  # fmt: skip
        "wrong slot count": ([(p[0][:-1], p[1]) for p in params] if rank == 0 else params, PLACEMENT),
    }
    messages = {
        "placements differ": "phy2log differs between ranks",
        "no grad on one rank": "rank 1: expert_params[0][1] has no .grad",
        "wrong slot count": "rank 0: expert_params[0][0] must be [slots_per_rank=",
    }
    for name, (ps, placement) in cases.items():
        with pytest.raises(ValueError, match=messages[name].replace("[", r"\[")):
            sync_replica_grads(ps, placement)
        for layer in range(L):
            for j in range(2):
                assert torch.equal(params[layer][j].grad, before[layer][j]), name


def test_a_bad_input_stops_every_rank_and_changes_no_gradient():
    spawn(2, _sync_fault_worker)


# A replan between backward() and sync_replica_grads (grads="partial"): the copies change, the sums don't
REPLANNED = torch.tensor([
    [1, 0, 3, 2, 4, 5, 0, 1, 2, 0, 3, 5],
    [0, 0, 0, 1, 2, 3, 4, 5, 5, 5, 1, 2],
])  # fmt: skip


def _partial_worker(rank: int, world: int) -> None:
    S = R // world
    params = _params(rank, S, exact=True)  # each slot's own share of PLACEMENT's gradients
    opt = torch.optim.SGD([p for ps in params for p in ps], lr=0.1)
    rearrange_expert_weights(params, PLACEMENT, REPLANNED, optimizer=opt, grads="partial")
    sync_replica_grads(params, REPLANNED)
    for layer in range(L):
        old, new = PLACEMENT[layer].tolist(), REPLANNED[layer].tolist()
        for i, q in enumerate(range(rank * S, (rank + 1) * S)):
            for j in range(2):
                want = sum(_grad_value(layer, s, j, True) for s in range(R) if old[s] == new[q])
                assert torch.equal(params[layer][j].grad[i], want), (rank, layer, q, j)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_partial_grads_keep_each_experts_sum_through_a_replan(world):
    if world == 1:
        _partial_worker(0, 1)
    else:
        spawn(world, _partial_worker)


def test_partial_grads_argument_rules():
    w = torch.nn.Parameter(torch.zeros(4, 2))
    old, new = torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 0, 1, 2]])
    opt = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(ValueError, match="grads must be 'summed' or 'partial', got 'sum'"):
        rearrange_expert_weights([w], old, new, optimizer=opt, grads="sum")
    with pytest.raises(ValueError, match="grads='partial' needs optimizer="):
        rearrange_expert_weights([w], old, new, grads="partial")
    with pytest.raises(ValueError, match=r"expert_weights\[0\]\[0\] has no .grad \(grads='partial'\)"):
        rearrange_expert_weights([w], old, new, optimizer=opt, grads="partial")
    w.grad = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])  # e0: 1, e1: 2 + 3, e2: 4
    rearrange_expert_weights([w], old, new, optimizer=opt, grads="partial")
    sync_replica_grads([w], new)
    assert w.grad[:, 0].tolist() == [1.0, 1.0, 5.0, 4.0]


# ----------------------------------------------------------------------------------------------
# Optimizer state moves with the weights
# ----------------------------------------------------------------------------------------------

OLD = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1]])  # E = 6, R = 8
NEW = torch.tensor([[3, 1, 0, 0, 4, 2, 5, 1]])


def _expert_tensor(e: int, what: str) -> torch.Tensor:
    base = {"weight": 1.0, "exp_avg": 100.0, "exp_avg_sq": 10_000.0, "grad": -1.0}[what]
    return torch.full((2,), base * (e + 1), dtype=torch.float64)


def _optimizer_worker(rank: int, world: int, optimizer_name: str) -> None:
    S = 8 // world
    mine = OLD[0, rank * S : (rank + 1) * S].tolist()
    w = torch.nn.Parameter(torch.stack([_expert_tensor(e, "weight") for e in mine]))
    dense = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = {"adam": torch.optim.Adam, "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)}[optimizer_name](
        [w, dense]
    )
    w.grad = torch.zeros_like(w)
    dense.grad = torch.zeros_like(dense)
    opt.step()  # creates the state
    state = opt.state[w]
    names = ["exp_avg", "exp_avg_sq"] if optimizer_name == "adam" else ["momentum_buffer"]
    for name in names:  # state that names its expert, to follow it
        state[name].copy_(torch.stack([_expert_tensor(e, "exp_avg" if name != "exp_avg_sq" else name) for e in mine]))
    w.grad = torch.stack([_expert_tensor(e, "grad") for e in mine])
    step_before = state["step"].clone() if "step" in state else None
    with torch.no_grad():
        w.copy_(torch.stack([_expert_tensor(e, "weight") for e in mine]))
    stats = rearrange_expert_weights([w], OLD, NEW, optimizer=opt)
    per_expert = 8 * 2 * (2 + len(names))  # float64 [2]: the weight, its grad and each state tensor
    assert stats.bytes_sent == stats.sent * per_expert and stats.bytes_received == stats.received * per_expert
    now = NEW[0, rank * S : (rank + 1) * S].tolist()
    assert torch.equal(w.detach(), torch.stack([_expert_tensor(e, "weight") for e in now]))
    for name in names:
        kind = "exp_avg" if name != "exp_avg_sq" else name
        assert torch.equal(state[name], torch.stack([_expert_tensor(e, kind) for e in now])), name
    assert torch.equal(w.grad, torch.stack([_expert_tensor(e, "grad") for e in now]))
    if step_before is not None:
        assert torch.equal(state["step"], step_before), "scalar state stays"
    # an optimizer that does not hold every expert parameter: every rank raises, nothing moves
    other = torch.optim.SGD([dense], lr=0.1)
    snapshot = w.detach().clone()
    with pytest.raises(ValueError, match=r"expert_weights\[0\]\[0\] is not among the optimizer's parameters"):
        rearrange_expert_weights([w], NEW, OLD, optimizer=other)
    assert torch.equal(w.detach(), snapshot)


@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
def test_optimizer_state_and_pending_grads_move_with_their_slots(optimizer_name):
    spawn(2, _optimizer_worker, optimizer_name)


def test_per_slot_optimizer_state_of_any_shape_moves_and_state_spanning_the_slots_stays():
    old, new = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[3, 1, 0, 0]])
    tag = torch.tensor([1.0, 2.0, 3.0, 4.0])  # expert e's rows hold e + 1
    for shape in ((4, 2, 3), (4, 3)):
        w = torch.nn.Parameter(torch.ones(shape))
        opt = torch.optim.Adafactor([w])
        w.grad = torch.ones_like(w)
        opt.step()  # row_var [4, 2, 1] and col_var [4, 1, 3]; for [4, 3]: row_var [4, 1], col_var [1, 3]
        state = opt.state[w]
        for name in ("row_var", "col_var"):
            v = state[name]
            if v.shape[0] == 4:
                v.copy_(tag.view(-1, *[1] * (v.dim() - 1)).expand_as(v))
        spanning = {k: v.clone() for k, v in state.items() if torch.is_tensor(v) and v.dim() and v.shape[0] != 4}
        rearrange_expert_weights([w], old, new, optimizer=opt)
        want = tag[new[0]]
        for name in ("row_var", "col_var"):
            v = state[name]
            if v.shape[0] == 4:
                assert torch.equal(v, want.view(-1, *[1] * (v.dim() - 1)).expand_as(v)), (shape, name)
        assert all(torch.equal(state[k], v) for k, v in spanning.items()), "state spanning the slots stays"
        assert list(spanning) == ([] if len(shape) == 3 else ["col_var"])


# ----------------------------------------------------------------------------------------------
# The layout a freshly built model starts in
# ----------------------------------------------------------------------------------------------


def test_initial_placement_is_expert_e_in_slot_e_then_round_robin():
    phy2log = eplb.initial_placement(2, 4, 6)
    assert phy2log.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    with pytest.raises(ValueError, match=r"num_replicas \(3\) must be >= num_experts \(4\)"):
        eplb.initial_placement(1, 4, 3)


def test_balancer_and_planner_start_from_the_given_placement():
    initial = eplb.initial_placement(2, 4, 6)
    b = eplb.OnlineBalancer(2, 4, 6, 1, 1, 2, device="cpu", initial_phy2log=initial)
    assert torch.equal(b.phy2log, initial)
    assert b.logcnt.tolist() == [[2, 2, 1, 1]] * 2
    assert b.phyrank[0].tolist() == [0, 0, 0, 0, 1, 1]  # replicas numbered in slot order
    assert b.log2phy[0, 0, :2].tolist() == [0, 4] and b.log2phy[0, 2, :2].tolist() == [2, -1]
    planner = eplb.EplbPlanner(2, 4, 6, 1, 1, 2, device="cpu", initial_phy2log=initial)
    assert torch.equal(planner.phy2log, initial) and torch.equal(planner.log2phy, b.log2phy)
    assert torch.equal(planner.phyrank, b.phyrank) and torch.equal(planner.logcnt, b.logcnt)
    assert planner.invalid.tolist() == [0, 0]
    missing = initial.clone()
    missing[1, 3] = 0
    with pytest.raises(ValueError, match="initial_phy2log must hold every expert in every layer: expert 3"):
        eplb.EplbPlanner(2, 4, 6, 1, 1, 2, device="cpu", initial_phy2log=missing)
    with pytest.raises(ValueError, match="initial_phy2log must hold every expert in every layer: expert 3"):
        eplb.OnlineBalancer(2, 4, 6, 1, 1, 2, device="cpu", initial_phy2log=missing)
    with pytest.raises(ValueError, match=r"initial_phy2log must have shape \[num_layers, num_replicas\]"):
        eplb.EplbPlanner(2, 4, 6, 1, 1, 2, device="cpu", initial_phy2log=initial[0])


def test_planner_given_a_placement_launches_nothing_until_its_first_plan(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("EplbPlanner(initial_phy2log=...) launched the planning kernel")

    monkeypatch.setattr("eplb_triton.launch.rebalance", no_launch)
    planner = eplb.EplbPlanner(2, 4, 6, 1, 1, 2, device="cpu", initial_phy2log=eplb.initial_placement(2, 4, 6))
    assert planner.invalid.tolist() == [0, 0]
