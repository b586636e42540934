"""Fault handling: corrupted checkpoints restore nothing, unsupported tensors and unbounded sizes
are refused before anything is allocated, the planner refuses a device it cannot run on."""

import pytest
import torch
from helpers import make_loads

import eplb_triton as eplb
from eplb_triton.backends import interpreter_active
from eplb_triton.balancer import OnlineBalancer

CONFIG = (2, 8, 12, 4, 2, 4)  # L, E, R, G, N, P


def _trained(**kwargs) -> OnlineBalancer:
    b = OnlineBalancer(*CONFIG, rebalance_interval=2, device="cpu", **kwargs)
    for s in range(3):
        b.counts.copy_(make_loads(2, 8, "skewed", s) % 40)
        b.step()
    b.counts.copy_(make_loads(2, 8, "ties", 9))
    return b


def _snapshot(b: OnlineBalancer) -> dict:
    state = b.state_dict()
    state["log2phy"] = b.log2phy.clone()
    return state


def _corrupt(state: dict, key: str, how: str) -> dict:
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    if how == "missing":
        del state[key]
    elif how == "shape":
        state[key] = state[key][..., :-1]
    elif how == "dtype":
        state[key] = state[key].to(torch.float32) if not state[key].dtype.is_floating_point else state[key].long()
    elif how == "negative":
        state[key].view(-1)[0] = -1
    elif how == "nan":
        state[key].view(-1)[0] = float("nan")
    elif how == "id>=E":
        state[key][0, 0] = 8
    elif how == "swap-slot":  # phy2log and logcnt disagree
        state[key][0, 0] = (state[key][0, 0] + 1) % 8
    elif how == "rank-repeat":
        state[key][0] = 0
    elif how == "value":
        state[key] = {"steps": -1, "pos": None}[key] if key == "steps" else state[key] + 5
    return state


CASES = [
    ("counts", "missing", "missing 'counts'"),
    ("phy2log", "shape", r"state_dict\['phy2log'\] must be a tensor of shape \(2, 12\)"),
    ("counts", "dtype", r"state_dict\['counts'\] must have an integer dtype"),
    ("counts", "negative", r"state_dict\['counts'\] must be >= 0"),
    ("invalid_ids", "negative", r"state_dict\['invalid_ids'\] must be >= 0"),
    ("ring", "negative", r"state_dict\['ring'\] must be >= 0"),
    ("balancedness", "nan", r"state_dict\['balancedness'\] must be finite"),
    ("phy2log", "id>=E", r"state_dict\['phy2log'\] has expert ids outside \[0, 8\)"),
    ("phy2log", "swap-slot", r"state_dict\['logcnt'\] must count the slots"),
    ("logcnt", "negative", r"state_dict\['logcnt'\] must be >= 0"),
    ("phyrank", "rank-repeat", r"state_dict\['phyrank'\] must number the replicas"),
    ("steps", "value", r"state_dict\['steps'\] must be an int >= 0, got -1"),
    ("pos", "value", r"state_dict\['pos'\] \(\d+\) must be in \[0, window=2\)"),
]


@pytest.mark.parametrize(("key", "how", "message"), CASES, ids=[f"{k}-{h}" for k, h, _ in CASES])
def test_a_corrupted_checkpoint_restores_nothing(key, how, message):
    good = _trained().state_dict()
    target = _trained(window=2)
    target.counts.copy_(make_loads(2, 8, "uniform-int", 5) % 7)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(_corrupt(good, key, how))
    after = _snapshot(target)
    for name, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[name]), f"{name} changed"
        else:
            assert value == after[name], f"{name} changed"


def test_a_good_checkpoint_and_a_0_1_checkpoint_load():
    source = _trained()
    state = source.state_dict()
    target = OnlineBalancer(*CONFIG, rebalance_interval=2, device="cpu")
    target.load_state_dict(state)
    for name in ("phy2log", "phyrank", "log2phy", "logcnt", "counts"):
        assert torch.equal(getattr(source, name), getattr(target, name)), name
    # 0.1 wrote int32 counts and no phyrank (replicas in slot order): still accepted
    old = dict(state, counts=state["counts"].int(), invalid_ids=state["invalid_ids"].int())
    del old["phyrank"]
    target.load_state_dict(old)
    for layer in range(2):  # replica r of e is its r-th slot, in slot order
        for e in range(8):
            slots = [q for q in range(12) if int(target.phy2log[layer, q]) == e]
            assert target.log2phy[layer, e, : len(slots)].tolist() == slots


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: torch.ones(2, 8, device="meta"), "weight must hold data"),
        (lambda: torch.ones(2, 8).to_sparse(), "weight must be a dense"),
        (lambda: torch.ones(2, 8).to_sparse_csr(), "weight must be a dense"),
        (lambda: torch.quantize_per_tensor(torch.ones(2, 8), 0.1, 0, torch.quint8), "weight must not be quantized"),
        (lambda: torch.nested.nested_tensor([torch.ones(8), torch.ones(8)]), "weight must be a dense tensor"),
        (lambda: torch.ones(2, 8)._neg_view(), "weight has the lazy negation"),
    ],
    ids=["meta", "sparse-coo", "sparse-csr", "quantized", "nested", "neg-bit"],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # beta/deprecated tensor kinds warn on creation
def test_unsupported_tensor_kinds_are_type_errors(make, message):
    for fn in (
        lambda w: eplb.rebalance_experts(w, 12, 4, 2, 4),
        lambda w: eplb.replicate_experts(w, 12),
        lambda w: eplb.balanced_packing(w, 4),
    ):
        with pytest.raises(TypeError, match=message):
            fn(make())


@pytest.mark.parametrize("replicas", [10**9, 2**40])
def test_slot_counts_are_bounded_before_allocation(replicas):
    with pytest.raises(ValueError, match=r"num_replicas \(\d+\) must be <= 65536 slots per layer"):
        eplb.rebalance_experts(torch.ones(2, 8), replicas, 1, 1, 1)
    with pytest.raises(ValueError, match=r"num_phy \(\d+\) must be <= 65536"):
        eplb.replicate_experts(torch.ones(2, 8), replicas)
    with pytest.raises(ValueError, match=r"must be <= 65536"):
        OnlineBalancer(2, 8, replicas, 1, 1, 1, device="cpu")


def test_layers_times_slots_is_bounded():
    with pytest.raises(ValueError, match=r"num_layers x num_replicas \(4097 x 32768\) must be <= 134217728"):
        eplb.rebalance_experts(torch.ones(4097, 8), 32768, 1, 1, 1)


def test_planner_on_a_cpu_device_says_what_to_use(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not interpreter_active()
    with pytest.raises(ValueError, match=r"EplbPlanner runs the Triton kernels and needs a CUDA device, got cpu"):
        eplb.EplbPlanner(*CONFIG, device="cpu")


@pytest.mark.parametrize(("value", "message"), [(float("nan"), "must be finite"), (-1.0, "must be >= 0")])
def test_a_checkpoint_with_a_bad_ema_restores_nothing(value, message):
    source = OnlineBalancer(*CONFIG, ema_decay=0.9, rebalance_interval=2, device="cpu")
    source.counts.copy_(make_loads(2, 8, "skewed", 1) % 40)
    source.step()
    state = source.state_dict()
    state["ema"] = state["ema"].clone()
    state["ema"][1, 3] = value
    target = OnlineBalancer(*CONFIG, ema_decay=0.9, rebalance_interval=2, device="cpu")
    before = target.window_loads()
    with pytest.raises(ValueError, match=rf"state_dict\['ema'\] {message}"):
        target.load_state_dict(state)
    assert torch.equal(target.window_loads(), before) and target.steps == 0
