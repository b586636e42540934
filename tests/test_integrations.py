"""The vLLM and SGLang adapters (``eplb_triton.integrations``) return what the frameworks' own default
EPLB algorithms return.

Without the frameworks (CI), the expectation is ``eplb_triton.reference``'s output put into each
framework's form by hand: vLLM 0.13 - 0.18 pad ``log2phy`` to ``R - E + 1`` columns, vLLM >= 0.19
return ``phy2log`` alone on the CPU, SGLang pads to ``max(logcnt)`` on the CPU like DeepSeek's
``eplb``; vLLM's slot-keeping reorder (``preserve_intragpu_slots``) is ported literally below. With a
framework importable, the adapters are compared with the framework's own algorithm on loads
without ties (those tests skip in CI).
"""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest
import torch
from helpers import make_loads

import eplb_triton as eplb
from eplb_triton import EplbArgumentError, reference
from eplb_triton.integrations import sglang as eplb_sglang
from eplb_triton.integrations import vllm as eplb_vllm

PUBLISHED_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
PUBLISHED_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


class MapsPolicy(eplb_vllm.EplbTritonPolicy):
    """The vLLM 0.13 - 0.18 form: ``(phy2log, log2phy, logcnt)``."""

    returns_maps = True


class Phy2logPolicy(eplb_vllm.EplbTritonPolicy):
    """The vLLM >= 0.19 form: ``phy2log`` alone."""

    returns_maps = False


# (L, E, R, G, N, P, load kind): both policies and the awkward sizes
CASES = [
    (2, 12, 16, 4, 2, 8, "skewed"),  # hierarchical
    (2, 12, 18, 5, 2, 6, "skewed"),  # G % N != 0: global, E % G != 0 allowed
    (1, 6, 9, 3, 1, 1, "uniform-int"),  # one GPU
    (2, 8, 12, 8, 2, 4, "float"),  # groups == experts
    (2, 8, 8, 4, 2, 4, "skewed"),  # no redundant slot: R == E
    (1, 6, 6, 2, 1, 1, "skewed"),  # R == E on one GPU
    (3, 10, 15, 1, 1, 5, "ties"),
    (1, 6, 8, 2, 1, 2, "zeros"),
    (2, 9, 12, 3, 3, 3, "equal"),
]


def case_id(case) -> str:
    L, E, R, G, N, P, kind = case
    return f"L{L}-E{E}-R{R}-G{G}-N{N}-P{P}-{kind}"


def padded(log2phy: torch.Tensor, width: int) -> torch.Tensor:
    """``log2phy`` with ``-1`` columns appended up to ``width``."""
    L, E, X = log2phy.shape
    return torch.cat([log2phy, torch.full((L, E, width - X), -1, dtype=torch.int64)], dim=2)


def replica_ranks(phy2log: torch.Tensor, log2phy: torch.Tensor) -> torch.Tensor:
    """``rank[l, s]``: which replica of its expert slot ``s`` holds, read off ``log2phy``."""
    rank = torch.full_like(phy2log, -1)
    for layer, expert, r in (log2phy >= 0).nonzero().tolist():
        rank[layer, log2phy[layer, expert, r]] = r
    return rank


def preserve_intragpu_slots(phy2log, rank, num_gpus, old):
    """vLLM's ``DefaultEplbPolicy.preserve_intragpu_slots`` (0.14 - 0.33), one layer and GPU at a time:
    old slots in order take the first unused new copy of their expert; the remaining new experts
    fill the other slots in order; a slot's replica rank moves with it."""
    L, R = phy2log.shape
    S = R // num_gpus
    out, out_rank = phy2log.clone(), rank.clone()
    for layer in range(L):
        for gpu in range(num_gpus):
            base = gpu * S
            new = phy2log[layer, base : base + S].tolist()
            used, kept = [False] * S, [False] * S
            for k in range(S):
                for j in range(S):
                    if not used[j] and new[j] == int(old[layer, base + k]):
                        out[layer, base + k], out_rank[layer, base + k] = new[j], rank[layer, base + j]
                        used[j] = kept[k] = True
                        break
            rest = [j for j in range(S) if not used[j]]
            free = [k for k in range(S) if not kept[k]]
            for j, k in zip(rest, free, strict=True):
                out[layer, base + k], out_rank[layer, base + k] = new[j], rank[layer, base + j]
    return out, out_rank


def log2phy_by_hand(phy2log: torch.Tensor, rank: torch.Tensor, num_experts: int, width: int) -> torch.Tensor:
    L, R = phy2log.shape
    out = torch.full((L, num_experts, width), -1, dtype=torch.int64)
    for layer in range(L):
        for s in range(R):
            out[layer, phy2log[layer, s], rank[layer, s]] = s
    return out


def assert_int64_on(t: torch.Tensor, device: str) -> None:
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.device.type == device


# --- without the frameworks: against eplb_triton.reference in each framework's form -------------


def test_published_vector():
    w = torch.tensor(PUBLISHED_WEIGHT)
    assert Phy2logPolicy.rebalance_experts(w, 16, 4, 2, 8).tolist() == PUBLISHED_PHY2LOG
    phy2log, log2phy, logcnt = MapsPolicy.rebalance_experts(w, 16, 4, 2, 8)
    assert phy2log.tolist() == PUBLISHED_PHY2LOG and log2phy.shape == (2, 12, 16 - 12 + 1)
    phy2log, log2phy, logcnt = eplb_sglang.rebalance_experts(w, 16, 4, 2, 8, enable_hierarchical=True)
    assert phy2log.tolist() == PUBLISHED_PHY2LOG and log2phy.shape == (2, 12, 2)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_vllm_forms_match_reference(case):
    L, E, R, G, N, P, kind = case
    w = make_loads(L, E, kind, seed=E + R)
    want_phy2log, want_log2phy, want_logcnt = reference.rebalance_experts(w, R, G, N, P)

    phy2log = Phy2logPolicy.rebalance_experts(w, R, G, N, P)
    assert_int64_on(phy2log, "cpu")
    assert torch.equal(phy2log, want_phy2log)

    phy2log, log2phy, logcnt = MapsPolicy.rebalance_experts(w, R, G, N, P)
    for t in (phy2log, log2phy, logcnt):
        assert_int64_on(t, "cpu")
    assert torch.equal(phy2log, want_phy2log) and torch.equal(logcnt, want_logcnt)
    assert torch.equal(log2phy, padded(want_log2phy, R - E + 1))  # vLLM: num_redundant_experts + 1 columns


def random_old(L: int, E: int, R: int, seed: int, holes: int) -> torch.Tensor:
    """A previous placement: every expert once plus random extra copies, shuffled, ``holes`` slots ``-1``."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, R - E)])) for _ in range(L)]
    old = torch.from_numpy(np.stack(rows))
    old[:, rng.choice(R, holes, replace=False)] = -1  # slots a scale-up added
    return old


@pytest.mark.parametrize("holes", [3, None], ids=["some-minus-1", "all-minus-1"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_vllm_keeps_slots_like_preserve_intragpu_slots(case, holes):
    """An old map with empty (``-1``) slots: only slots within each GPU are kept, as vLLM does. With
    ``R == E``, a ``-1`` must not be read as expert ``R - 1`` of the previous GPU."""
    L, E, R, G, N, P, kind = case
    w = make_loads(L, E, kind, seed=E + R)
    old = random_old(L, E, R, seed=R, holes=R if holes is None else holes)
    want_phy2log, want_log2phy, _ = reference.rebalance_experts(w, R, G, N, P)
    kept, kept_rank = preserve_intragpu_slots(want_phy2log, replica_ranks(want_phy2log, want_log2phy), P, old)

    assert torch.equal(Phy2logPolicy.rebalance_experts(w, R, G, N, P, old), kept)
    phy2log, log2phy, _ = MapsPolicy.rebalance_experts(w, R, G, N, P, old)
    assert torch.equal(phy2log, kept)
    assert torch.equal(log2phy, log2phy_by_hand(kept, kept_rank, E, R - E + 1))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_vllm_relabels_to_a_full_old_map(case):
    """An old map with every expert: the plan is the API's relabelled one (same GPU loads as without
    the map, no more slots moved than keeping intra-GPU slots, nearly always fewer)."""
    L, E, R, G, N, P, kind = case
    w = make_loads(L, E, kind, seed=E + R)
    old = random_old(L, E, R, seed=R, holes=0)
    want_phy2log, want_log2phy, want_logcnt = eplb.rebalance_experts(w, R, G, N, P, old_phy2log=old)
    assert torch.equal(Phy2logPolicy.rebalance_experts(w, R, G, N, P, old), want_phy2log)
    phy2log, log2phy, logcnt = MapsPolicy.rebalance_experts(w, R, G, N, P, old)
    assert torch.equal(phy2log, want_phy2log) and torch.equal(logcnt, want_logcnt)
    assert torch.equal(log2phy, padded(want_log2phy, R - E + 1))
    fresh, fresh_log2phy, _ = reference.rebalance_experts(w, R, G, N, P)
    kept, _ = preserve_intragpu_slots(fresh, replica_ranks(fresh, fresh_log2phy), P, old)
    assert (phy2log != old).sum() <= (kept != old).sum()


def test_vllm_options_from_register_and_the_environment(monkeypatch):
    from eplb_triton.integrations._options import PlanOptions

    assert PlanOptions.from_env({}) == PlanOptions()
    env = {"EPLB_TRITON_METHOD": "refined", "EPLB_TRITON_MAX_MOVES": "0.25", "EPLB_TRITON_MIN_GAIN": "0.02"}
    opts = PlanOptions.from_env(env)
    assert opts == PlanOptions("refined", 0.25, 0.02) and opts.budget(288) == 72
    assert PlanOptions.from_env({"EPLB_TRITON_MAX_MOVES": "12"}).budget(288) == 12
    assert PlanOptions.from_env({"EPLB_TRITON_MAX_MOVES": "+12"}).budget(288) == 12  # as --max-moves +12
    for name, value, words in (
        ("EPLB_TRITON_METHOD", "lp", "method must be one of"),
        ("EPLB_TRITON_MAX_MOVES", "1.5", "fraction of the slots must be in"),
        ("EPLB_TRITON_MAX_MOVES", "-3", "max_moves"),
        ("EPLB_TRITON_MIN_GAIN", "much", "could not convert"),
        ("EPLB_TRITON_MIN_GAIN", "1", "min_gain"),
    ):
        with pytest.raises(ValueError, match=f"environment variable {name}=.*{words}"):
            PlanOptions.from_env({name: value})
    # the options reach the plan: an incremental replan at 2 slots of 12 and a gate
    L, E, R, G, N, P = 2, 8, 12, 2, 1, 4
    w = make_loads(L, E, "skewed", seed=5)
    old = random_old(L, E, R, seed=6, holes=0)
    monkeypatch.setattr(Phy2logPolicy, "options", PlanOptions(max_moves=2))
    got = Phy2logPolicy.rebalance_experts(w, R, G, N, P, old)
    assert torch.equal(got, eplb.rebalance_experts(w, R, G, N, P, old_phy2log=old, max_moves=2)[0])
    assert ((got != old).sum(dim=1) <= 2).all()
    monkeypatch.setattr(Phy2logPolicy, "options", PlanOptions(min_gain=0.999))
    assert torch.equal(Phy2logPolicy.rebalance_experts(w, R, G, N, P, old), old), "no plan gains 99.9%"


def test_vllm_keeps_slots_where_the_old_map_is_the_new_one():
    """An unchanged placement stays as it is: no slot moves, so no weight would be copied."""
    w = torch.tensor(PUBLISHED_WEIGHT)
    phy2log = Phy2logPolicy.rebalance_experts(w, 16, 4, 2, 8)
    shuffled_within_gpus = phy2log.view(2, 8, 2).flip(-1).reshape(2, 16)
    assert torch.equal(Phy2logPolicy.rebalance_experts(w, 16, 4, 2, 8, shuffled_within_gpus), shuffled_within_gpus)


def test_vllm_reads_the_first_r_columns_of_a_longer_old_map():
    """As vLLM's loop does (``old[:, start:end]`` with the new slots per GPU)."""
    w = make_loads(2, 8, "skewed", 1)
    old = random_old(2, 8, 16, seed=3, holes=0)
    want = Phy2logPolicy.rebalance_experts(w, 12, 2, 1, 4, old[:, :12])
    assert torch.equal(Phy2logPolicy.rebalance_experts(w, 12, 2, 1, 4, old), want)


def test_vllm_refuses_an_old_map_of_another_shape():
    w = make_loads(2, 8, "skewed", 1)
    with pytest.raises(ValueError, match="old_global_expert_indices must have shape"):
        Phy2logPolicy.rebalance_experts(w, 12, 2, 1, 4, torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(AssertionError, match=r"num_replicas \(13\) must be a multiple of num_gpus \(4\)"):
        Phy2logPolicy.rebalance_experts(w, 13, 2, 1, 4)


def policy_returning(annotation) -> type:
    """A policy class whose ``rebalance_experts`` declares ``annotation`` as its return type."""

    def rebalance_experts(cls, weight): ...

    rebalance_experts.__annotations__["return"] = annotation
    return type("Policy", (), {"rebalance_experts": classmethod(rebalance_experts)})


def test_vllm_form_follows_the_installed_interface():
    maps = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    for annotation in (maps, typing.Tuple[torch.Tensor, torch.Tensor, torch.Tensor], str(maps), "'tuple[int]'"):  # noqa: UP006
        assert eplb_vllm._returns_maps(policy_returning(annotation)), annotation
    for annotation in (torch.Tensor, "torch.Tensor", "'torch.Tensor'"):
        assert not eplb_vllm._returns_maps(policy_returning(annotation)), annotation
    assert not eplb_vllm._returns_maps(object)
    params = list(inspect.signature(eplb_vllm.EplbTritonPolicy.rebalance_experts).parameters)
    assert params == ["weight", "num_replicas", "num_groups", "num_nodes", "num_ranks", "old_global_expert_indices"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("hierarchical", [True, False], ids=["deepseek_hierarchical", "deepseek"])
def test_sglang_matches_reference(case, hierarchical):
    L, E, R, G, N, P, kind = case
    if hierarchical and G % N:
        pytest.skip("SGLang refuses deepseek_hierarchical when G % N != 0 (tested below)")
    w = make_loads(L, E, kind, seed=E + R)
    want = reference.rebalance_experts(w, R, G, N, P) if hierarchical else reference.rebalance_experts(w, R, 1, 1, P)
    got = eplb_sglang.rebalance_experts(
        weight=w, num_replicas=R, num_groups=G, num_nodes=N, num_gpus=P, enable_hierarchical=hierarchical
    )  # SGLang's dispatcher passes keywords
    for g, x in zip(got, want, strict=True):
        assert_int64_on(g, "cpu")
        assert torch.equal(g, x)  # log2phy padded to max(logcnt), as DeepSeek's eplb


def test_sglang_global_ignores_groups_and_nodes():
    w = make_loads(2, 12, "skewed", 5)
    want = reference.rebalance_experts(w, 18, 1, 1, 6)
    got = eplb_sglang.rebalance_experts(w, 18, None, 4, 6, enable_hierarchical=False)
    assert all(torch.equal(g, x) for g, x in zip(got, want, strict=True))


def test_sglang_hierarchical_needs_groups_a_multiple_of_nodes():
    w = make_loads(2, 12, "skewed", 5)
    with pytest.raises(AssertionError, match=r"num_groups \(3\) to be a multiple of num_nodes \(2\)"):
        eplb_sglang.rebalance_experts(w, 16, 3, 2, 8, enable_hierarchical=True)
    with pytest.raises(EplbArgumentError, match=r"num_groups \(None\)"):
        eplb_sglang.rebalance_experts(w, 16, None, 2, 8, enable_hierarchical=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_devices_on_cuda():
    """vLLM 0.14 - 0.18 return on the loads' device; vLLM >= 0.19 and SGLang on the CPU."""
    w = torch.tensor(PUBLISHED_WEIGHT, device="cuda")
    assert all(t.device.type == "cuda" for t in MapsPolicy.rebalance_experts(w, 16, 4, 2, 8))
    assert Phy2logPolicy.rebalance_experts(w, 16, 4, 2, 8).device.type == "cpu"
    assert all(t.device.type == "cpu" for t in eplb_sglang.rebalance_experts(w, 16, 4, 2, 8, True))


# --- with the frameworks installed: against their own algorithms (skipped in CI) ----------------

# Deployments (L, E, R, G, N, P): DeepSeek-V3 prefill EP32, its decode EP144 (global: 8 % 18 != 0),
# Qwen3-235B EP32 (one group: global), the published example.
PEER_CASES = [(3, 256, 288, 8, 4, 32), (2, 256, 288, 8, 18, 144), (3, 128, 160, 1, 4, 32), (2, 12, 16, 4, 2, 8)]


def peer_id(case) -> str:
    return "L{}-E{}-R{}-G{}-N{}-P{}".format(*case)


def loads_without_ties(L: int, E: int, seed: int) -> torch.Tensor:
    """Distinct integer loads in ``[2^16, 2^17)``: no two experts tie, and with ``R <= 2E`` no expert gets
    a third copy (``w / 2`` is below every single copy's load), so every share (``w`` or ``w / 2``) and
    every GPU load is exact in float32. vLLM and SGLang sum GPU loads in float64 (docs/algorithm.md, like DeepSeek's
    ``eplb.py``, in float32); on loads where rounding decides a choice they can differ from us, about
    1 layer in 40 on log-normal float loads (none once SGLang's sums are made float32)."""
    rng = np.random.default_rng(seed)
    rows = [rng.choice(2**16, E, replace=False) + 2**16 for _ in range(L)]
    return torch.from_numpy(np.stack(rows).astype(np.float32))


def check_no_group_ties(w: torch.Tensor, G: int, N: int) -> None:
    """The premise of the peer tests: the node packing sorts distinct group loads."""
    if G % N == 0 and N > 1:
        sums = w.view(w.shape[0], G, -1).sum(-1)
        assert all(len(set(row.tolist())) == G for row in sums)


def assert_same_maps(got, want) -> None:
    """``phy2log`` and ``logcnt`` exactly; ``log2phy`` the same slots per expert (replicas of one expert
    tie when packed onto GPUs, so which replica is which may differ)."""
    for g, x in zip(got, want, strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype and g.device == x.device
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert torch.equal(got[1].sort(-1).values, want[1].sort(-1).values)


@pytest.mark.parametrize("with_old", [False, True], ids=["fresh", "old-map"])
@pytest.mark.parametrize("case", PEER_CASES, ids=peer_id)
def test_vllm_policy_equals_vllm_default_policy(case, with_old):
    policy = pytest.importorskip("vllm.distributed.eplb.policy")
    L, E, R, G, N, P = case
    assert issubclass(eplb_vllm.EplbTritonPolicy, policy.AbstractEplbPolicy)
    args = [loads_without_ties(L, E, seed=R + P), R, G, N, P]
    check_no_group_ties(args[0], G, N)
    if with_old:
        if "old_global_expert_indices" not in inspect.signature(policy.DefaultEplbPolicy.rebalance_experts).parameters:
            pytest.skip("this vLLM's policy takes no old map (vLLM < 0.14)")
        args.append(random_old(L, E, R, seed=P, holes=4))
    want = policy.DefaultEplbPolicy.rebalance_experts(*args)
    got = eplb_vllm.EplbTritonPolicy.rebalance_experts(*args)
    if isinstance(want, torch.Tensor):  # vLLM >= 0.19
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.device == want.device
        assert torch.equal(got, want)
    else:
        assert_same_maps(got, want)


def test_vllm_register(monkeypatch):
    policy = pytest.importorskip("vllm.distributed.eplb.policy")
    monkeypatch.setitem(policy.EPLB_POLICIES, "default", policy.EPLB_POLICIES["default"])
    eplb_vllm.register()
    assert policy.EPLB_POLICIES["default"] is eplb_vllm.EplbTritonPolicy


@pytest.mark.parametrize("hierarchical", [True, False], ids=["deepseek_hierarchical", "deepseek"])
@pytest.mark.parametrize("case", PEER_CASES, ids=peer_id)
def test_sglang_equals_sglang_deepseek(case, hierarchical):
    algorithms = pytest.importorskip("sglang.srt.eplb.eplb_algorithms")
    L, E, R, G, N, P = case
    if hierarchical and G % N:
        pytest.skip("SGLang refuses deepseek_hierarchical when G % N != 0")
    w = loads_without_ties(L, E, seed=R + P)
    check_no_group_ties(w, G, N)
    want = algorithms.deepseek.rebalance_experts(w, R, G, N, P, enable_hierarchical=hierarchical)
    assert_same_maps(eplb_sglang.rebalance_experts(w, R, G, N, P, enable_hierarchical=hierarchical), want)


def test_sglang_install_reaches_the_dispatcher(monkeypatch):
    algorithms = pytest.importorskip("sglang.srt.eplb.eplb_algorithms")
    monkeypatch.setattr(algorithms.deepseek, "rebalance_experts", algorithms.deepseek.rebalance_experts)
    elastic = getattr(algorithms, "elasticity_aware", None)
    if elastic is not None:  # install() replaces it too; restore it after the test
        monkeypatch.setattr(elastic, "rebalance_experts", elastic.rebalance_experts)
    L, E, R, G, N, P = PEER_CASES[0]
    w = loads_without_ties(L, E, seed=1)
    tokens = torch.stack([w - (w / 3).floor(), (w / 3).floor()])  # two windows; SGLang sums them back to w
    kwargs = dict(
        tokens_per_expert=tokens,
        num_physical_experts=R,
        num_local_physical_experts=R // P,
        num_groups=G,
        num_nodes=N,
        algorithm=algorithms.compute_algorithm("auto", G, N),
    )
    want = algorithms.rebalance_experts(**kwargs)
    eplb_sglang.install()
    assert algorithms.deepseek.rebalance_experts is eplb_sglang.rebalance_experts
    assert_same_maps(algorithms.rebalance_experts(**kwargs), want)


def test_sglang_current_placement_never_imports_sglang(monkeypatch):
    """Outside a running SGLang the adapter plans from scratch without importing SGLang (which would
    take seconds and set cache variables); it reads the module only where SGLang already loaded it."""
    import sys

    monkeypatch.delitem(sys.modules, "sglang.srt.eplb.expert_location", raising=False)
    assert eplb_sglang.current_placement(2, 16) is None
    assert "sglang.srt.eplb.expert_location" not in sys.modules


def _sglang_holds(monkeypatch, old: torch.Tensor):
    """Stand-in sglang modules whose expert-location metadata holds ``old`` as the map in service."""
    import sys
    import types

    meta = types.SimpleNamespace(physical_to_logical_map_cpu=old)
    for name in ("sglang", "sglang.srt", "sglang.srt.eplb"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    location = types.ModuleType("sglang.srt.eplb.expert_location")
    location.get_global_expert_location_metadata = lambda: meta
    monkeypatch.setitem(sys.modules, "sglang.srt.eplb.expert_location", location)
    return meta


def test_sglang_relabels_to_the_placement_in_service(monkeypatch):
    """SGLang holds its current map while it plans: with every expert in it, the plan is relabelled to
    it (and the options apply); a map of another shape is not used."""
    from eplb_triton.integrations._options import PlanOptions

    L, E, R, G, N, P = 2, 8, 12, 2, 1, 4
    w = make_loads(L, E, "skewed", seed=11)
    old = random_old(L, E, R, seed=12, holes=0)
    meta = _sglang_holds(monkeypatch, old)
    monkeypatch.setattr(eplb_sglang, "OPTIONS", PlanOptions())
    got = eplb_sglang.rebalance_experts(w, R, G, N, P, enable_hierarchical=True)
    want = eplb.rebalance_experts(w, R, G, N, P, old_phy2log=old)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    monkeypatch.setattr(eplb_sglang, "OPTIONS", PlanOptions(max_moves=3))
    got = eplb_sglang.rebalance_experts(w, R, G, N, P, enable_hierarchical=True)
    assert ((got[0] != old).sum(dim=1) <= 3).all()
    meta.physical_to_logical_map_cpu = old[:, :8]  # another shape: planned from scratch
    got = eplb_sglang.rebalance_experts(w, R, G, N, P, enable_hierarchical=True)
    assert torch.equal(got[0], eplb.rebalance_experts(w, R, G, N, P)[0])


def test_sglang_elastic_plans_around_lost_ranks(monkeypatch):
    """elasticity_aware's replacement: lost ranks' slots hold the filler 0 and are never listed;
    every expert stays on a live rank; the hierarchical policy stays hierarchical where it can."""
    from eplb_triton.integrations._options import PlanOptions

    monkeypatch.setattr(eplb_sglang, "OPTIONS", PlanOptions())
    L, E, R, G, N, P = 2, 16, 32, 4, 2, 8
    w = make_loads(L, E, "skewed", seed=21)
    active = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 1, 0], dtype=torch.int32)  # capacity 10 > P: first P count
    phy2log, log2phy, logcnt = eplb_sglang.rebalance_experts_elastic(w, R, G, N, P, True, active)
    want = eplb.rebalance_experts(w, R, G, N, P, active_gpus=active[:P].bool())
    assert torch.equal(phy2log, want[0].clamp_min(0)) and torch.equal(logcnt, want[2])
    assert torch.equal(log2phy, want[1]) and (phy2log[:, 12:16] == 0).all()
    assert not ((log2phy >= 12) & (log2phy < 16)).any(), "a lost rank's slots are never listed"
    # a node too short of slots for its groups: the global policy, as SGLang's own falls back
    short = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1])
    got = eplb_sglang.rebalance_experts_elastic(w, 24, G, N, P, True, short)
    assert torch.equal(got[2], eplb.rebalance_experts(w, 24, 1, 1, P, active_gpus=short.bool())[2])
    with pytest.raises(ValueError, match=r"enable_hierarchical needs num_groups \(None\)"):
        eplb_sglang.rebalance_experts_elastic(w, R, None, N, P, True, active)
    every = eplb_sglang.rebalance_experts_elastic(w, R, G, N, P, True, torch.ones(P, dtype=torch.int32))
    plain = eplb_sglang.rebalance_experts(w, R, G, N, P, True)
    assert all(torch.equal(a, b) for a, b in zip(every, plain, strict=True))


def test_sglang_elastic_applies_the_options_around_lost_ranks(monkeypatch):
    """With a placement in service and max_moves, a lost rank moves only the experts it held alone
    plus the budget: the API's replan around lost GPUs, filler 0 in the lost slots."""
    from eplb_triton.integrations._options import PlanOptions

    L, E, R, G, N, P = 2, 16, 32, 4, 2, 8
    old = eplb.rebalance_experts(make_loads(L, E, "skewed", seed=30), R, 1, 1, P)[0]
    w = make_loads(L, E, "skewed", seed=31)
    _sglang_holds(monkeypatch, old)
    active = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.int32)
    live = active.bool().repeat_interleave(R // P)
    moved = {}
    for k in (None, 0, 3):
        monkeypatch.setattr(eplb_sglang, "OPTIONS", PlanOptions(max_moves=k, min_gain=None))
        got = eplb_sglang.rebalance_experts_elastic(w, R, G, N, P, False, active)
        want = eplb.rebalance_experts(w, R, 1, 1, P, old_phy2log=old, active_gpus=active.bool(), max_moves=k)
        assert torch.equal(got[0], want[0].clamp_min(0)) and torch.equal(got[2], want[2]), k
        moved[k] = ((got[0] != old) & live).sum(dim=1)
    assert (moved[3] <= moved[0] + 3).all() and (moved[0] < moved[None]).all()
