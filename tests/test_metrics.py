"""Quality measures against direct per-slot computations."""

import pytest
import torch
from helpers import make_loads

import eplb_triton as eplb
from eplb_triton import metrics


def test_gpu_loads_by_hand():
    w = torch.tensor([[6.0, 2.0, 4.0]])
    phy2log = torch.tensor([[0, 1, 0, 2]])  # GPU0: e0, e1; GPU1: e0, e2
    logcnt = torch.tensor([[2, 1, 1]])
    loads = metrics.gpu_loads(w, phy2log, logcnt, 2)
    assert loads.tolist() == [[5.0, 7.0]]
    assert metrics.balancedness(loads).tolist() == [pytest.approx(6.0 / 7.0)]


def test_gpu_loads_conserve_total_and_bound_holds():
    w = make_loads(5, 32, "skewed", 4)
    phy2log, _, logcnt = eplb.rebalance_experts(w, 48, 8, 2, 8)
    loads = metrics.gpu_loads(w, phy2log, logcnt, 8)
    assert torch.allclose(loads.sum(1), w.double().sum(1))
    bound = metrics.lower_bound(w, 48, 8, num_groups=8, num_nodes=2)
    assert (loads.max(1).values >= bound).all()
    assert (bound >= metrics.lower_bound(w, 48, 8)).all()  # the policy's constraint only adds
    b = metrics.balancedness(loads)
    assert (b <= loads.mean(1) / bound + 1e-12).all()
    # against a per-slot loop that shares nothing with metrics
    for layer in range(5):
        per_gpu = [0.0] * 8
        for q, e in enumerate(phy2log[layer].tolist()):
            per_gpu[q // 6] += float(w[layer, e]) / int(logcnt[layer, e])
        assert float(b[layer]) == pytest.approx(sum(per_gpu) / 8 / max(per_gpu), rel=1e-12)


def test_lower_bound_by_hand():
    # A relative margin of 1e-9 absorbs the rounding of float64 sums (eplb_triton.bounds).
    def bound(w, R, P, **kw):
        return metrics.lower_bound(torch.tensor([w]), R, P, **kw).item()

    # replicate [8, 1, 1] to 4 slots: 8 -> two replicas of 4; t* = 4; total / P = 10 / 2 = 5.
    assert bound([8.0, 1.0, 1.0], 4, 2) == pytest.approx(5.0, rel=2e-9) and bound([8.0, 1.0, 1.0], 4, 2) <= 5.0
    assert bound([8.0, 1.0, 1.0], 4, 4) == pytest.approx(4.0, rel=2e-9)
    # [11, 1, 2] on 4 slots of 2 GPUs: the mean is 7 and t* = 5.5, but a GPU with a half of 11
    # holds a second replica, so the optimum (5.5 + 1, 5.5 + 2) = 7.5 is proven by the pairing bound.
    assert bound([11.0, 1.0, 2.0], 4, 2) == pytest.approx(7.5, rel=1e-3) and bound([11.0, 1.0, 2.0], 4, 2) <= 7.5
    # hierarchical: groups {9, 1} and {0, 0} on two nodes of one two-slot GPU each: a node holds
    # whole groups, so one GPU carries 9 + 1 = 10; the global policy can pair 9 with a 0: 9.
    hier = bound([9.0, 1.0, 0.0, 0.0], 4, 2, num_groups=2, num_nodes=2)
    assert hier == pytest.approx(10.0, rel=2e-9) and hier <= 10.0
    assert bound([9.0, 1.0, 0.0, 0.0], 4, 2) == pytest.approx(9.0, rel=2e-9)


def test_ceiling_is_the_mean_over_the_bound():
    w = torch.tensor([[9.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = metrics.ceiling(w, 4, 2, num_groups=2, num_nodes=2)
    assert got.dtype == torch.float64
    assert got[0].item() == 5.0 / metrics.lower_bound(w, 4, 2, num_groups=2, num_nodes=2)[0].item()
    assert got[1].item() == 1.0  # an idle layer is perfectly balanced
    assert metrics.ceiling(w, 4, 2)[0].item() > got[0].item()  # the global policy can do better


def test_balancedness_of_idle_layer_is_one():
    assert metrics.balancedness(torch.zeros(2, 4)).tolist() == [1.0, 1.0]


def test_balancedness_of_a_layer_with_nan_or_negative_loads_is_nan():
    loads = torch.tensor([[float("nan"), 2.0], [-1.0, -2.0], [0.0, -1.0], [1.0, 3.0]])
    got = metrics.balancedness(loads)
    assert got[:3].isnan().all() and got[3].item() == 2.0 / 3.0


def test_summary_and_migration():
    assert metrics.summarize(torch.tensor([0.5, 1.0])) == {"mean": 0.75, "worst": 0.5}
    old = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    new = torch.tensor([[0, 1, 3, 2], [3, 2, 1, 0]])
    assert metrics.migration_count(old, new).tolist() == [2, 4]
    assert metrics.migration_count(old, old).tolist() == [0, 0]


def test_metric_argument_errors():
    w = torch.ones(2, 4)
    with pytest.raises(ValueError, match="phy2log must be"):
        metrics.gpu_loads(w, torch.zeros(3, 4, dtype=torch.int64), torch.ones(2, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="logcnt must have weight's shape"):
        metrics.gpu_loads(w, torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64), 2)
    with pytest.raises(
        ValueError, match=r"num_replicas \(4, phy2log.shape\[1\]\) must be a multiple of num_gpus \(3\)"
    ):
        metrics.gpu_loads(w, torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 4, dtype=torch.int64), 3)
    cnt = torch.tensor([[1, 1, 1, 1]] * 2)
    for bad, words in ((4, "found 4"), (-2, "found -2")):
        phy = torch.tensor([[0, 1, 2, 3]] * 2)
        phy[1, 2] = bad
        with pytest.raises(
            ValueError, match=rf"phy2log must hold expert ids in \[0, 4\) or -1 \(an empty slot\), {words}"
        ):
            metrics.gpu_loads(w, phy, cnt, 2)
    for name, args in (("phy2log", (torch.zeros(2, 4), cnt)), ("logcnt", (cnt, cnt.bool()))):
        with pytest.raises(TypeError, match=f"{name} must have an integer dtype"):
            metrics.gpu_loads(w, *args, 2)
    with pytest.raises(ValueError, match="must be 2-D of one shape"):
        metrics.migration_count(torch.zeros(2, 4), torch.zeros(2, 5))


def test_identity_gpu_loads():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    assert metrics.identity_gpu_loads(w, 3).tolist() == [[3.0, 7.0, 11.0]]
    assert metrics.identity_gpu_loads(w, 4).tolist() == [[3.0, 3.0, 9.0, 6.0]]  # e * 4 // 6
    assert metrics.identity_gpu_loads(w, 6).tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]


def test_a_wrong_call_names_the_function_and_its_signature():
    w = torch.ones(2, 4)
    wrong = r"^gpu_loads\(weight, phy2log, logcnt, num_gpus, \*, check_ids=True\): too many positional arguments"
    with pytest.raises(TypeError, match=wrong):
        metrics.gpu_loads(w, torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 4), 2, 3)
    with pytest.raises(TypeError, match=r"^lower_bound\(.*\): missing a required argument: 'num_gpus'"):
        metrics.lower_bound(w, 4)
    with pytest.raises(TypeError, match=r"^rebalance_experts\(.*\): got an unexpected keyword argument 'gpus'"):
        eplb.rebalance_experts(w, 4, 1, 1, 2, gpus=2)
