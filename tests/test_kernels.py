"""Triton kernels == reference, exactly. On CPU they run on the interpreter (conftest.py), on
small shapes; real shapes, CUDA graphs and timing need a GPU."""

import pytest
import torch
from helpers import DATA, FIXED_CASES, REAL_CONFIGS, Case, assert_same, assert_valid_placement, cases, make_loads
from hypothesis import HealthCheck, given, settings

import eplb_triton as eplb
from eplb_triton import launch, reference
from eplb_triton._validation import Config
from eplb_triton.io import read_loads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Interpreter-sized versions of the hand-picked cases (<= 3 layers, <= 16 experts).
SMALL_CASES = [c for c in FIXED_CASES if c.L <= 3 and c.E <= 16]


def _poisoned(cfg: Config) -> launch.RebalanceBuffers:
    out = launch.RebalanceBuffers.allocate(cfg, DEVICE)
    for t in (out.phy2log, out.phyrank, out.logcnt, out.invalid, out.scratch_i):
        t.fill_(-7)
    out.log2phy.fill_(-7)
    out.scratch_f.fill_(float("nan"))
    return out


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.id)
def test_fused_kernel_writes_everything_and_matches_reference(case: Case):
    w = case.weight()
    cfg = Config(case.L, case.E, case.R, case.G, case.N, case.P).effective()
    G, N = cfg.num_groups, cfg.num_nodes
    out = _poisoned(cfg)
    launch.rebalance(w.to(DEVICE), cfg, out=out)
    for name in ("phy2log", "phyrank", "logcnt", "log2phy", "invalid"):
        assert not (getattr(out, name) == -7).any(), f"{name} has unwritten elements"
    want_phy2log, want_phyrank, want_logcnt = reference.rebalance_experts_hierarchical(w, case.R, G, N, case.P)
    assert_same((out.phy2log, out.phyrank, out.logcnt), (want_phy2log, want_phyrank, want_logcnt))
    assert (out.invalid == 0).all()
    # log2phy: padded to R - E + 1 with -1; the trimmed view is the reference's.
    _, want_log2phy, _ = reference.rebalance_experts(w, case.R, case.G, case.N, case.P)
    width = want_log2phy.shape[2]
    assert torch.equal(out.log2phy[:, :, :width].cpu(), want_log2phy)
    assert (out.log2phy[:, :, width:] == -1).all()


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.id)
def test_drop_in_api(case: Case):
    w = case.weight().to(DEVICE)
    got = eplb.rebalance_experts(w, case.R, case.G, case.N, case.P, backend="triton")
    assert_same(got, reference.rebalance_experts(w.cpu(), case.R, case.G, case.N, case.P))
    assert all(t.device == w.device for t in got)
    assert_valid_placement(*(t.cpu() for t in got), case.E, case.R, case.G, case.N, case.P)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_layers=3, max_experts=16, max_gpus_per_node=3, max_nodes=3))
def test_generated_cases(case: Case):
    w = case.weight().to(DEVICE)
    got = eplb.rebalance_experts(w, case.R, case.G, case.N, case.P, backend="triton")
    assert_same(got, reference.rebalance_experts(w.cpu(), case.R, case.G, case.N, case.P))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_layers=3, max_experts=16, max_gpus_per_node=3, max_nodes=3))
def test_building_block_kernels(case: Case):
    w = case.weight().to(DEVICE)
    assert_same(eplb.replicate_experts(w, case.R, backend="triton"), reference.replicate_experts(w.cpu(), case.R))
    assert_same(eplb.balanced_packing(w, case.G, backend="triton"), reference.balanced_packing(w.cpu(), case.G))
    if case.hierarchical:
        assert_same(
            eplb.rebalance_experts_hierarchical(w, case.R, case.G, case.N, case.P, backend="triton"),
            reference.rebalance_experts_hierarchical(w.cpu(), case.R, case.G, case.N, case.P),
        )


def test_float_ties_and_rounding():
    # Shares that tie only after float32 rounding, negative zero, and float32-inexact sums.
    w = torch.tensor(
        [[3.0, 1.5, 6.0, 0.1, 0.2, 0.30000001, -0.0, 0.0], [2.0**24, 1.0, 1.0, 1.0, 2.0**24 + 2, 0.0, 3.0, 0.0]],
        dtype=torch.float64,
    )
    for args in ((12, 4, 2, 4), (16, 2, 2, 4), (12, 1, 1, 4), (8, 4, 2, 2)):
        got = eplb.rebalance_experts(w.to(DEVICE), *args, backend="triton")
        assert_same(got, reference.rebalance_experts(w, *args))


def test_sorted_packing_first_round_and_remainders():
    # _pack_sorted places the first min(packs, Z + 1) items without a search (Z: items > 0), then
    # runs the other steps four per loop trip and the last (steps % 4) one by one. Rows with fewer
    # positive items than packs (a zero item then joins a loaded-zero pack of lower index, not the
    # next empty one), all zeros, -0.0, ties, and every step count modulo 4.
    rows = [
        [5.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 2.0, -0.0, 2.0, 0.0, 1.0, 0.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5],
    ]
    w = torch.tensor(rows, dtype=torch.float32)
    for packs in (4, 2):
        assert_same(eplb.balanced_packing(w.to(DEVICE), packs, backend="triton"), reference.balanced_packing(w, packs))
    for n in range(9, 16):  # 9-15 items onto 3 packs of 3-5: 6-12 steps after the first round
        m = n - n % 3
        w = torch.tensor([[(i * 7) % 5 for i in range(m)], [float(i < 2) for i in range(m)]], dtype=torch.float32)
        assert_same(eplb.balanced_packing(w.to(DEVICE), 3, backend="triton"), reference.balanced_packing(w, 3))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_invalid_loads_raise_and_planner_keeps_previous_plan(value):
    w = make_loads(3, 8, "skewed", 2).to(torch.float32).to(DEVICE)
    bad = w.clone()
    bad[1, 3] = value
    with pytest.raises(ValueError, match=r"weight must be finite and >= 0 in float32, found .* at \[1, 3\]"):
        eplb.rebalance_experts(bad, 12, 4, 2, 4, backend="triton")
    with pytest.raises(ValueError, match=r"weight must be finite"):
        eplb.balanced_packing(bad, 2, backend="triton")
    with pytest.raises(ValueError, match=r"weight must be finite"):
        eplb.replicate_experts(bad, 10, backend="triton")

    planner = eplb.EplbPlanner(3, 8, 12, 4, 2, 4, device=DEVICE)
    planner.plan(w)
    before = planner.phy2log.clone()
    planner.plan(bad * 0 + torch.flip(bad, dims=[1]))  # other loads in layers 0 and 2, the bad value in layer 1
    assert planner.invalid.tolist() == [0, 1, 0]
    assert torch.equal(planner.phy2log[1], before[1]), "an invalid layer keeps its previous placement"
    fresh = reference.rebalance_experts(torch.flip(w, dims=[1]).cpu(), 12, 4, 2, 4)[0]
    assert torch.equal(planner.phy2log[0].cpu(), fresh[0]) and torch.equal(planner.phy2log[2].cpu(), fresh[2])


def test_kernel_limits():
    with pytest.raises(ValueError, match=r"backend='triton' supports up to 1024 logical experts per layer, got 1025"):
        eplb.rebalance_experts(torch.ones(1, 1025, device=DEVICE), 1025, 1, 1, 1, backend="triton")
    with pytest.raises(ValueError, match=r"backend='triton' supports up to 2048 replicas per layer, got 2050"):
        eplb.rebalance_experts(torch.ones(1, 10, device=DEVICE), 2050, 1, 1, 2, backend="triton")
    with pytest.raises(ValueError, match=r"up to 2048 items per row, got 2050"):
        eplb.balanced_packing(torch.ones(1, 2050, device=DEVICE), 2, backend="triton")
    with pytest.raises(ValueError, match=r"supports up to 1024 logical experts"):
        eplb.EplbPlanner(1, 1025, 1025, 1, 1, 1, device=DEVICE)


def test_planner_matches_drop_in_and_validates():
    case = Case(2, 12, 18, 4, 2, 6, "skewed", 5)
    planner = eplb.EplbPlanner(case.L, case.E, case.R, case.G, case.N, case.P, device=DEVICE)
    assert planner.log2phy.shape == (2, 12, 18 - 12 + 1)
    w = case.weight().to(DEVICE)
    phy2log, log2phy, logcnt = planner.plan(w)
    assert phy2log.data_ptr() == planner.phy2log.data_ptr(), "plan() writes the static buffers in place"
    want = reference.rebalance_experts(w.cpu(), case.R, case.G, case.N, case.P)
    assert_same((phy2log, logcnt), (want[0], want[2]))
    assert torch.equal(log2phy[:, :, : want[1].shape[2]].cpu(), want[1])
    with pytest.raises(ValueError, match=r"weight must have shape \[num_layers=2, num_experts=12\], got \(3, 12\)"):
        planner.plan(torch.ones(3, 12, device=DEVICE))
    with pytest.raises(ValueError, match=r"num_replicas \(13\) must be a multiple of num_gpus \(6\)"):
        eplb.EplbPlanner(2, 12, 13, 4, 2, 6, device=DEVICE)
    with pytest.raises(ValueError, match=r"num_layers \(0\) must be a positive integer"):
        eplb.EplbPlanner(0, 12, 18, 4, 2, 6, device=DEVICE)


def test_planner_under_torch_compile_has_no_graph_break():
    planner = eplb.EplbPlanner(2, 8, 12, 4, 2, 4, device=DEVICE)
    w = make_loads(2, 8, "skewed", 1).to(DEVICE)

    def step(loads):
        phy2log, _, logcnt = planner.plan(loads * 2)
        return phy2log.sum() + logcnt.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(w)
    want = reference.rebalance_experts(w.cpu() * 2, 12, 4, 2, 4)
    assert_same((planner.phy2log, planner.logcnt), (want[0], want[2]))


def test_custom_op_passes_opcheck():
    """Schema, fake (meta) implementation and AOT dispatch of torch.ops.eplb_triton.rebalance_."""
    b = launch.RebalanceBuffers.allocate(Config(2, 8, 12, 4, 2, 4), DEVICE)
    args = (make_loads(2, 8, "skewed", 4).float().to(DEVICE), b.phy2log, b.phyrank, b.logcnt, b.log2phy, b.invalid,
            b.scratch_i, b.scratch_f, 12, 4, 2, 4)  # fmt: skip
    result = torch.library.opcheck(torch.ops.eplb_triton.rebalance_.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_custom_op_refuses_buffers_of_another_layout():
    # The kernel writes the buffers by computed offsets: a buffer of another shape (e.g. a scratch
    # row of an older layout) or dtype is refused by name before anything is launched.
    cfg = Config(2, 8, 12, 4, 2, 4)
    w = make_loads(2, 8, "skewed", 4).float().to(DEVICE)
    b = launch.RebalanceBuffers.allocate(cfg, DEVICE)
    short = torch.empty((4, 4 + 4), dtype=torch.int32, device=DEVICE)  # [L * N, G + E / N]: no packing rows
    with pytest.raises(ValueError, match=r"scratch_i must be a contiguous torch.int32 tensor of shape \[4, 20\]"):
        torch.ops.eplb_triton.rebalance_(w, b.phy2log, b.phyrank, b.logcnt, b.log2phy, b.invalid, short,
                                         b.scratch_f, 12, 4, 2, 4)  # fmt: skip
    with pytest.raises(ValueError, match=r"phy2log must be a contiguous torch.int64 tensor"):
        torch.ops.eplb_triton.rebalance_(w, b.phy2log.int(), b.phyrank, b.logcnt, b.log2phy, b.invalid,
                                         b.scratch_i, b.scratch_f, 12, 4, 2, 4)  # fmt: skip


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        eplb.rebalance_experts(torch.ones(1, 4), 4, 1, 1, 1, backend="triton")


def test_auto_falls_back_to_cpu_beyond_the_kernel_limits():
    # CUDA data beyond the kernels' limits: "auto" must take the CPU path, not pick Triton and raise
    # (resolve only reads the device type, so a CUDA device object serves without a GPU).
    from eplb_triton import backends, launch

    cuda = torch.device("cuda")
    E, R, n = launch.MAX_EXPERTS, launch.MAX_REPLICAS, launch.MAX_ITEMS
    assert backends.resolve("auto", cuda, experts=E, replicas=R).name == "triton"
    assert backends.resolve("auto", cuda, items=n).name == "triton"
    assert backends.resolve("auto", cuda, experts=E + 1, replicas=R).name == "cpu"
    assert backends.resolve("auto", cuda, experts=E, replicas=R + 1).name == "cpu"
    assert backends.resolve("auto", cuda, items=n + 1).name == "cpu"
    assert backends.resolve("auto", torch.device("cpu"), experts=1).name == "cpu"
    with pytest.raises(ValueError, match="supports up to 1024 logical experts per layer, got 1025; use backend='cpu'"):
        eplb.rebalance_experts(torch.ones(1, E + 1), E + 1, 1, 1, 1, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_and_replay():
    planner = eplb.EplbPlanner(58, 256, 288, 8, 4, 32, device="cuda")
    static_w = torch.zeros(58, 256, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        planner.plan(static_w)  # warm-up (compilation) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        planner.plan(static_w)
    for seed in range(3):
        w = make_loads(58, 256, "skewed", seed).to(torch.float32)
        static_w.copy_(w.cuda())
        graph.replay()
        want = eplb.rebalance_experts(w, 288, 8, 4, 32, backend="cpu")
        assert_same((planner.phy2log.cpu(), planner.logcnt.cpu()), (want[0], want[2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", [(256, 288, 8, 4, 32), (256, 288, 8, 18, 144), (1024, 2048, 16, 4, 64)])
def test_real_shapes_on_gpu(config):
    E, R, G, N, P = config
    w = make_loads(8, E, "skewed", 0)
    got = eplb.rebalance_experts(w.cuda(), R, G, N, P, backend="triton")
    assert_same(got, eplb.rebalance_experts(w, R, G, N, P, backend="cpu"))


@pytest.mark.parametrize("config", REAL_CONFIGS, ids=lambda c: c[0])
def test_real_shapes_one_layer(config):
    """Full DeepSeek-V3 widths (256 experts, up to 320 slots, 144 GPUs) on one layer of real loads:
    the interpreter handles one layer in about a second; a GPU runs all 58."""
    files = sorted(DATA.glob("*.json")) if DATA.is_dir() else []
    if not files:
        pytest.skip(f"real loads not found at {DATA} (../shared/data is absent)")
    _, R, G, N, P = config
    w = read_loads(files[0]).weight
    w = w if torch.cuda.is_available() else w[20:21]
    got = eplb.rebalance_experts(w.to(DEVICE), R, G, N, P, backend="triton")
    assert_same(got, eplb.rebalance_experts(w, R, G, N, P, backend="cpu"))


@pytest.mark.parametrize("config", [(2048, 16, 4, 64), (2048, 1, 1, 128)], ids=["hierarchical", "global"])
def test_kernel_limits_are_supported(config):
    """E = 1024 experts and R = 2048 slots, the largest shapes the kernels accept."""
    R, G, N, P = config
    w = make_loads(1, 1024, "skewed", 3)
    got = eplb.rebalance_experts(w.to(DEVICE), R, G, N, P, backend="triton")
    assert_same(got, eplb.rebalance_experts(w, R, G, N, P, backend="cpu"))


def test_planner_starts_with_the_equal_load_plan():
    """Before the first plan() the buffers hold a real placement (the plan for equal loads)."""
    planner = eplb.EplbPlanner(2, 8, 12, 4, 2, 4, device=DEVICE)
    want = reference.rebalance_experts(torch.ones(2, 8), 12, 4, 2, 4)
    assert_same((planner.phy2log, planner.logcnt), (want[0], want[2]))
    assert torch.equal(planner.log2phy[:, :, : want[1].shape[2]].cpu(), want[1])
    assert (planner.invalid == 0).all()


# Shapes that take the kernels' wide-block paths (>= 128 experts per program: one division per
# replication step; >= 32 packs: one pack key rewritten per packing step), on the interpreter.
WIDE_CASES = [Case(2, 130, 170, 1, 1, 34, kind) for kind in ("skewed", "ties", "equal", "zeros", "sparse")]


@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: c.id)
def test_wide_blocks_match_reference(case: Case):
    w = case.weight()
    got = eplb.rebalance_experts(w.to(DEVICE), case.R, case.G, case.N, case.P, backend="triton")
    assert_same(got, reference.rebalance_experts(w, case.R, case.G, case.N, case.P))
    got = eplb.replicate_experts(w.to(DEVICE), case.R, backend="triton")
    assert_same(got, reference.replicate_experts(w, case.R))
    got = eplb.balanced_packing(w[:, :128].to(DEVICE), 64, backend="triton")
    assert_same(got, reference.balanced_packing(w[:, :128], 64))


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


def test_plan_rows_are_converted_per_call_and_not_kept_alive():
    # the search, pairing and repair launchers convert a plan's rows to int64 for every call: a
    # cache keyed by the tensor returned a stale copy of an int32 plan changed in place, and kept
    # every plan it had seen alive (a decorator meant for the kernels' import had slipped onto it)
    import gc
    import weakref

    t = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    assert launch._int64_rows(t, t.device).tolist() == [[1, 2, 3]]
    t[0, 0] = 7
    assert launch._int64_rows(t, t.device).tolist() == [[7, 2, 3]]
    ref = weakref.ref(t)
    del t
    gc.collect()
    assert ref() is None
    assert launch._kernels() is launch._kernels()
