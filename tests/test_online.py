"""Recording + dispatch (kernel vs torch), slot-stable placements, and the balancer's logic."""

import pytest
import torch
from helpers import make_loads

import eplb_triton as eplb
from eplb_triton import OnlineBalancer, metrics, record_dispatch, stable_slots
from eplb_triton.placement import log2phy_from_rank
from eplb_triton.reference import record_dispatch as record_dispatch_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _placement(E=12, R=18, G=4, N=2, P=6, seed=0):
    w = make_loads(1, E, "skewed", seed)
    phy2log, log2phy, logcnt = eplb.rebalance_experts(w, R, G, N, P)
    padded = torch.full((E, R - E + 1), -1, dtype=torch.int64)
    padded[:, : log2phy.shape[2]] = log2phy[0]
    return padded, logcnt[0]


@pytest.mark.parametrize("counts_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("tokens, top_k", [(1, 1), (37, 2), (300, 4), (1025, 1)])
def test_dispatch_kernel_matches_torch(tokens, top_k, dtype, counts_dtype):
    log2phy, logcnt = _placement()
    g = torch.Generator().manual_seed(tokens * 7 + top_k)
    ids = torch.randint(-2, 14, (tokens, top_k), generator=g, dtype=dtype)  # includes invalid ids
    ids[0, 0] = 12  # == E: invalid
    want_counts = torch.full((12,), 5, dtype=counts_dtype)
    want_phy, want_bad = record_dispatch_reference(ids, log2phy, logcnt, want_counts)
    counts = torch.full((12,), 5, dtype=counts_dtype, device=DEVICE)
    invalid = torch.full((1,), 3, dtype=counts_dtype, device=DEVICE)
    phy = record_dispatch(
        ids.to(DEVICE), log2phy.to(DEVICE), logcnt.to(DEVICE), counts, invalid=invalid, backend="triton"
    )
    assert phy.dtype == dtype
    assert torch.equal(phy.cpu(), want_phy)
    assert torch.equal(counts.cpu(), want_counts)
    assert int(invalid) == 3 + int(want_bad)


def test_dispatch_reference_semantics():
    log2phy = torch.tensor([[0, 3, -1], [1, -1, -1], [2, 4, 5]])
    logcnt = torch.tensor([2, 1, 3])
    ids = torch.tensor([[0, 2], [0, 2], [0, 2], [1, 7]])
    counts = torch.zeros(3, dtype=torch.int32)
    phy, bad = record_dispatch_reference(ids, log2phy, logcnt, counts)
    # token t -> replica t % logcnt[e]
    assert phy.tolist() == [[0, 2], [3, 4], [0, 5], [1, -1]]
    assert counts.tolist() == [3, 1, 3] and int(bad) == 1
    with pytest.raises(ValueError, match=r"topk_ids has 1 ids outside \[0, 3\)"):
        record_dispatch(ids, log2phy, logcnt, counts, check=True)


def test_dispatch_argument_errors():
    log2phy, logcnt = _placement()
    counts = torch.zeros(12, dtype=torch.int32)
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64"):
        record_dispatch(torch.zeros(4, 2), log2phy, logcnt, counts)
    with pytest.raises(ValueError, match=r"topk_ids must be a 2-D tensor"):
        record_dispatch(torch.zeros(4, dtype=torch.int64), log2phy, logcnt, counts)
    with pytest.raises(TypeError, match=r"counts must be int64 \(or int32"):
        record_dispatch(torch.zeros(4, 2, dtype=torch.int64), log2phy, logcnt, counts.float())
    with pytest.raises(ValueError, match="log2phy must be"):
        record_dispatch(torch.zeros(4, 2, dtype=torch.int64), log2phy, logcnt[:5], counts)
    ids = torch.zeros(4, 2, dtype=torch.int64)
    for name, args in (("log2phy", (log2phy.float(), logcnt)), ("logcnt", (log2phy, logcnt.float()))):
        with pytest.raises(TypeError, match=f"{name} must be an integer tensor"):
            record_dispatch(ids, *args, counts)
    none = logcnt.clone()
    none[3] = 0
    with pytest.raises(ValueError, match=r"logcnt\[3\] \(0\) must be >= 1"):
        record_dispatch(ids, log2phy, none, counts)
    phy2log = torch.zeros(log2phy.shape[0] + 4, dtype=torch.int64)  # any [R]: its dtype is checked first
    with pytest.raises(TypeError, match="phy2log must be an integer tensor"):
        record_dispatch(ids, log2phy, logcnt, counts, split="balanced", phy2log=phy2log.float(), num_gpus=2)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_counters_do_not_wrap_past_int32(backend):
    """A step's counts and the invalid-id counter are int64: 2**31 - 1 plus more stays positive."""
    b = OnlineBalancer(1, 4, 6, 2, 1, 2, window=1, rebalance_interval=10, device=DEVICE, backend=backend)
    b.counts.fill_(2**31 - 1)
    b.invalid_ids.fill_(2**31 - 1)
    b.record(0, torch.tensor([[0, 1], [0, 9]], device=DEVICE))  # 9 is invalid
    assert b.counts[0].tolist() == [2**31 + 1, 2**31, 2**31 - 1, 2**31 - 1]
    assert int(b.invalid_ids) == 2**31
    b.step()
    assert b.window_loads()[0].tolist() == [2**31 + 1, 2**31, 2**31 - 1, 2**31 - 1]


def test_stable_slots_keeps_experts_in_place():
    old = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    new = torch.tensor([[3, 2, 8, 9, 7, 7, 4, 0]])
    assert stable_slots(old, new, 2).tolist() == [[8, 9, 2, 3, 4, 7, 0, 7]]


@pytest.mark.parametrize("seed", range(5))
def test_stable_slots_properties(seed):
    E, R, G, N, P = 16, 32, 4, 2, 8
    old = eplb.rebalance_experts(make_loads(6, E, "skewed", seed), R, G, N, P)[0]
    new, _, logcnt = eplb.rebalance_experts(make_loads(6, E, "skewed", seed + 100), R, G, N, P)
    kept = stable_slots(old, new, P)
    S = R // P
    # the same multiset of experts on every GPU, so the same GPU loads
    assert torch.equal(kept.view(6, P, S).sort(-1).values, new.view(6, P, S).sort(-1).values)
    w = make_loads(6, E, "uniform-int", seed)
    assert torch.allclose(metrics.gpu_loads(w, kept, logcnt, P), metrics.gpu_loads(w, new, logcnt, P))
    # never more migration, and every expert a GPU keeps stays in its slot
    assert (metrics.migration_count(old, kept) <= metrics.migration_count(old, new)).all()
    for layer in range(6):
        for p in range(P):
            o, n = old[layer, p * S : (p + 1) * S].tolist(), kept[layer, p * S : (p + 1) * S].tolist()
            stays = sum(min(o.count(e), n.count(e)) for e in set(o))
            assert sum(a == b for a, b in zip(o, n, strict=True)) == stays


def test_log2phy_from_rank_numbers_replicas_by_rank():
    # layer 0: expert 1's replica 0 is in slot 2 and replica 1 in slot 0 (rank order, not slot order)
    phy2log = torch.tensor([[1, 0, 1, 2], [2, 2, 0, 1]])
    phyrank = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]])
    assert log2phy_from_rank(phy2log, phyrank, 3, 3).tolist() == [
        [[1, -1, -1], [2, 0, -1], [3, -1, -1]],
        [[2, -1, -1], [3, -1, -1], [0, 1, -1]],
    ]


def _assert_replicas_follow_their_slots(log2phy, phy2log, want_log2phy, slots_per_gpu):
    """Replica r of e sits in a slot holding e, on the GPU where the unpermuted plan put it."""
    L, E, _ = want_log2phy.shape
    for layer in range(L):
        for e in range(E):
            for r, want_slot in enumerate(want_log2phy[layer, e].tolist()):
                slot = int(log2phy[layer, e, r])
                if want_slot < 0:
                    assert slot == -1
                    continue
                assert int(phy2log[layer, slot]) == e
                assert slot // slots_per_gpu == want_slot // slots_per_gpu
    assert (log2phy[:, :, want_log2phy.shape[2] :] == -1).all()


def _feed(balancer: OnlineBalancer, loads: torch.Tensor) -> None:
    """Record tokens so that the step's counts equal ``loads`` [L, E] exactly."""
    for layer in range(loads.shape[0]):
        ids = torch.repeat_interleave(torch.arange(loads.shape[1]), loads[layer]).view(-1, 1)
        balancer.record(layer, ids.to(balancer.device))


def test_window_interval_and_plan():
    b = OnlineBalancer(2, 8, 12, 4, 2, 4, window=2, rebalance_interval=3, device="cpu")
    initial = b.phy2log.clone()
    steps = [make_loads(2, 8, "skewed", s) % 50 for s in range(3)]
    for s in steps[:2]:
        _feed(b, s)
        assert torch.equal(b.counts, s.to(torch.int32))
        assert b.step() is False
        assert (b.counts == 0).all()
    assert torch.equal(b.phy2log, initial), "no plan before the interval"
    _feed(b, steps[2])
    assert b.step() is True
    window = steps[1] + steps[2]  # window of 2: the first step has rolled out
    assert torch.equal(b.window_loads(), window)
    want = eplb.rebalance_experts(window, 12, 4, 2, 4)
    kept = stable_slots(initial, want[0], 4)
    assert torch.equal(b.phy2log, kept) and torch.equal(b.logcnt, want[2])
    _assert_replicas_follow_their_slots(b.log2phy, b.phy2log, want[1], 3)
    want_bal = metrics.balancedness(metrics.gpu_loads(window, want[0], want[2], 4))
    assert torch.allclose(b.balancedness, want_bal)
    (entry,) = b.history_records()
    assert entry["step"] == 3 and entry["after"] == pytest.approx(float(want_bal.mean()))


def test_ema():
    # decay 0.9 tells ``decay * ema + (1 - decay) * counts`` from the swapped weights
    b = OnlineBalancer(1, 4, 6, 2, 1, 2, ema_decay=0.9, rebalance_interval=2, device="cpu")
    _feed(b, torch.tensor([[8, 0, 0, 0]]))
    b.step()
    assert torch.allclose(b.window_loads(), torch.tensor([[0.8, 0.0, 0.0, 0.0]], dtype=torch.float64))  # 0.1 * 8
    _feed(b, torch.tensor([[0, 0, 0, 4]]))
    b.step()
    assert torch.allclose(
        b.window_loads(), torch.tensor([[0.72, 0.0, 0.0, 0.4]], dtype=torch.float64)
    )  # 0.9 * 0.8, 0.1 * 4


def test_threshold_replans_the_layers_below_it_before_planning():
    b = OnlineBalancer(2, 8, 12, 2, 1, 4, window=1, rebalance_interval=1000, balancedness_threshold=0.9, device="cpu")
    initial = b.phy2log.clone()
    # The equal-load placement puts experts 4,0,0 | 5,1,1 | 6,2,2 | 7,3,3 on the four GPUs. Layer 0's
    # equal traffic keeps every GPU at 20 (balancedness 1). Layer 1's gives GPU loads 40 | 20 | 10 | 10:
    # balancedness 20 / 40 = 0.5 before, and a new plan can reach 20 everywhere (1.0 after). So the
    # rule must look at the balancedness before planning: "after" would leave layer 1 alone.
    loads = torch.tensor([[10] * 8, [0, 20, 0, 0, 40, 0, 10, 10]])
    assert initial[0].tolist() == [4, 0, 0, 5, 1, 1, 6, 2, 2, 7, 3, 3]
    _feed(b, loads)
    assert b.step() is True
    assert b.last_balancedness.tolist() == [1.0, 0.5]
    assert torch.equal(b.phy2log[0], initial[0])
    assert not torch.equal(b.phy2log[1], initial[1])
    assert b.balancedness.tolist() == [1.0, 1.0]
    assert b.last_replanned.tolist() == [False, True]


def test_threshold_does_not_replan_even_loads():
    # The review's case: threshold 0.7 and loads that the current placement already balances
    # perfectly. No step may report a change (that would mean moving weights every step).
    b = OnlineBalancer(2, 8, 12, 2, 1, 4, window=3, rebalance_interval=1000, balancedness_threshold=0.7, device="cpu")
    initial = b.phy2log.clone()
    for _ in range(8):
        _feed(b, torch.full((2, 8), 10))
        assert b.step() is False
    assert torch.equal(b.phy2log, initial) and len(b.history) == 0


def test_threshold_waits_for_min_window_steps():
    # A bad layer from the first step on: no early re-plan until the window holds min_window steps
    # (default: the whole window), then one re-plan, and none after it while the loads stay.
    loads = torch.tensor([[10] * 8, [0, 20, 0, 0, 40, 0, 10, 10]])
    for min_window, first in ((None, 4), (2, 2), (1, 1)):
        b = OnlineBalancer(2, 8, 12, 2, 1, 4, window=4, rebalance_interval=1000, balancedness_threshold=0.9,
                           min_window=min_window, device="cpu")  # fmt: skip
        changed = []
        for _ in range(6):
            _feed(b, loads)
            changed.append(b.step())
        assert changed == [s == first for s in range(1, 7)], (min_window, changed)


def test_min_gain_keeps_placements_that_a_plan_barely_beats():
    # Layer 1 under the equal-load placement: GPU loads 12 | 10 | 10 | 10 (worst 12). The greedy
    # plan splits 12 and the 10s in two (shares 6, 6, 5 x 6) and packs 6+5 | 6+5 | 5+5 | 5+5: worst 11,
    # a gain of 1/12 = 8.3%. min_gain 0.1 keeps the placement; 0.05 takes the plan.
    loads = torch.tensor([[10] * 8, [0, 0, 0, 0, 12, 10, 10, 10]])
    for min_gain, moves in ((0.1, False), (0.05, True)):
        b = OnlineBalancer(2, 8, 12, 2, 1, 4, window=1, rebalance_interval=1, min_gain=min_gain, device="cpu")
        initial = b.phy2log.clone()
        _feed(b, loads)
        assert b.step() is moves
        assert torch.equal(b.phy2log[0], initial[0])
        assert torch.equal(b.phy2log[1], initial[1]) is not moves
        assert b.last_replanned.tolist() == [False, moves]


def test_min_window_and_min_gain_validation():
    with pytest.raises(ValueError, match=r"min_window \(5\) must be <= window \(4\)"):
        OnlineBalancer(1, 4, 4, 1, 1, 1, window=4, min_window=5, device="cpu")
    with pytest.raises(ValueError, match="min_window"):
        OnlineBalancer(1, 4, 4, 1, 1, 1, min_window=0, device="cpu")
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match="min_gain"):
            OnlineBalancer(1, 4, 4, 1, 1, 1, min_gain=bad, device="cpu")


def test_state_dict_round_trip():
    b = OnlineBalancer(2, 8, 12, 4, 2, 4, window=3, rebalance_interval=2, device="cpu")
    for s in range(5):
        _feed(b, make_loads(2, 8, "skewed", s) % 40)
        b.step()
    _feed(b, make_loads(2, 8, "ties", 9))  # counts of an unfinished step
    state = b.state_dict()
    c = OnlineBalancer(2, 8, 12, 4, 2, 4, window=3, rebalance_interval=2, device="cpu")
    c.load_state_dict(state)
    for name in ("phy2log", "log2phy", "logcnt", "counts", "balancedness", "last_balancedness"):
        assert torch.equal(getattr(b, name), getattr(c, name)), name
    assert c.steps == b.steps == 5
    # both continue identically
    for x in (b, c):
        x.step()
    assert torch.equal(b.phy2log, c.phy2log) and torch.equal(b.window_loads(), c.window_loads())
    with pytest.raises(ValueError, match="state_dict is for configuration"):
        OnlineBalancer(2, 8, 16, 4, 2, 4, device="cpu").load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict has window=3"):
        OnlineBalancer(2, 8, 12, 4, 2, 4, window=4, device="cpu").load_state_dict(state)
    missing = dict(state, phy2log=state["phy2log"].clone(), logcnt=state["logcnt"].clone())
    e = int(missing["phy2log"][1, 0])
    missing["phy2log"][1] = torch.where(missing["phy2log"][1] == e, (e + 1) % 8, missing["phy2log"][1])
    missing["logcnt"][1] = torch.bincount(missing["phy2log"][1], minlength=8)
    missing.pop("phyrank")  # numbered in slot order, as a 0.1 checkpoint
    with pytest.raises(
        ValueError, match=rf"state_dict\['phy2log'\] must hold every expert .* expert {e} is missing from layer 1"
    ):
        c.load_state_dict(missing)


def test_balancer_argument_errors():
    with pytest.raises(ValueError, match="either window or ema_decay"):
        OnlineBalancer(1, 4, 4, 1, 1, 1, window=2, ema_decay=0.9)
    with pytest.raises(ValueError, match=r"ema_decay \(1.5\) must be a number with 0 < ema_decay < 1"):
        OnlineBalancer(1, 4, 4, 1, 1, 1, ema_decay=1.5)
    with pytest.raises(ValueError, match=r"rebalance_interval \(0\) must be a positive integer"):
        OnlineBalancer(1, 4, 4, 1, 1, 1, rebalance_interval=0)
    with pytest.raises(ValueError, match=r"balancedness_threshold \(0\) must be in \(0, 1\]"):
        OnlineBalancer(1, 4, 4, 1, 1, 1, balancedness_threshold=0)
    for bad in ("0.5", True, torch.tensor(0.5)):
        with pytest.raises(TypeError, match="balancedness_threshold must be a number or None"):
            OnlineBalancer(1, 4, 4, 1, 1, 1, balancedness_threshold=bad)
    with pytest.raises(ValueError, match=r"history_size \(-1\) must be an int >= 0"):
        OnlineBalancer(1, 4, 4, 1, 1, 1, history_size=-1)
    with pytest.raises(ValueError, match=r"num_replicas \(5\) must be a multiple of num_gpus \(2\)"):
        OnlineBalancer(1, 4, 5, 1, 1, 2)
    b = OnlineBalancer(2, 4, 4, 1, 1, 1, device="cpu")
    with pytest.raises(ValueError, match=r"layer \(2\) must be an int in \[0, 2\)"):
        b.record(2, torch.zeros(1, 1, dtype=torch.int64))


def test_balancer_triton_backend_matches_cpu_backend():
    """The GPU planner + recording kernel path (interpreter on CPU) gives the CPU path's placement."""
    kwargs = dict(window=2, rebalance_interval=2, device=DEVICE)
    gpu_like = OnlineBalancer(2, 8, 12, 4, 2, 4, backend="triton", **kwargs)
    cpu_like = OnlineBalancer(2, 8, 12, 4, 2, 4, backend="cpu", **kwargs)
    for s in range(2):
        loads = make_loads(2, 8, "skewed", s) % 30
        for b in (gpu_like, cpu_like):
            _feed(b, loads)
            b.step()
    for name in ("phy2log", "log2phy", "logcnt"):
        assert torch.equal(getattr(gpu_like, name), getattr(cpu_like, name)), name


@pytest.mark.parametrize("method", ["greedy", "refined"])
def test_balancer_incremental_moves_at_most_max_moves(method):
    b = OnlineBalancer(3, 16, 24, 4, 2, 8, window=1, rebalance_interval=1, device="cpu", method=method, max_moves=3)
    for s in range(4):
        before = b.phy2log.clone()
        loads = make_loads(3, 16, "skewed", s) % 200
        _feed(b, loads)
        assert b.step() is True
        assert ((b.phy2log != before).sum(dim=1) <= 3).all()
        want = eplb.rebalance_experts(loads, 24, 4, 2, 8, backend="cpu", method=method, old_phy2log=before, max_moves=3)
        assert torch.equal(b.phy2log, want[0]) and torch.equal(b.logcnt, want[2])
        _assert_replicas_follow_their_slots(b.log2phy, b.phy2log, want[1], want[1].shape[2])
        assert int(b.history_records()[-1]["migrated_slots"]) == int((b.phy2log != before).sum())


def test_balancer_refined_relabels_to_the_current_placement():
    b = OnlineBalancer(2, 8, 12, 4, 2, 4, window=1, rebalance_interval=1, device="cpu", method="refined")
    before = b.phy2log.clone()
    loads = make_loads(2, 8, "skewed", 5) % 50
    _feed(b, loads)
    b.step()
    want = eplb.rebalance_experts(loads, 12, 4, 2, 4, backend="cpu", method="refined", old_phy2log=before)
    assert torch.equal(b.phy2log, want[0]) and torch.equal(b.logcnt, want[2])


def test_balancer_method_argument_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        OnlineBalancer(2, 8, 12, 4, 2, 4, device="cpu", method="best")
    with pytest.raises(ValueError, match="max_moves"):
        OnlineBalancer(2, 8, 12, 4, 2, 4, device="cpu", max_moves=-2)
    with pytest.raises(TypeError, match="max_moves"):
        OnlineBalancer(2, 8, 12, 4, 2, 4, device="cpu", max_moves=1.5)


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
    with pytest.raises(ValueError, match=r"must have one shape \[L, R\] with R a multiple of num_gpus \(4\)"):
        stable_slots(x, x, 4)


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
