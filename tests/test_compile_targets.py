"""Ahead-of-time compilation of every kernel for real NVIDIA targets, on this CPU-only machine.

The interpreter accepts code that a GPU build rejects, and cannot show what only the machine code
reveals. Here each kernel is compiled with the ``ptxas`` Triton ships, at the configurations the
project ships or documents, with the constexprs and ``num_warps`` that :mod:`eplb_triton.launch`
picks at run time (the same functions), and the result is checked:

* it compiles, uses at most 255 registers and spills nothing to local memory (``cuobjdump``);
* float32 division is IEEE round-to-nearest (``div.rn.f32``), as in the reference, never the
  approximate ``div.full``/``div.approx`` that a plain ``/`` produces, and nothing flushes
  subnormals to zero (``.ftz``; triton 3.2 does, which is why the floor is higher);
* every store to the per-program scratch buffer is separated from the first reload of that
  buffer by a ``bar.sync`` (other threads of the program read what one thread wrote).
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import aot  # noqa: E402  (the one ahead-of-time harness: benchmarks/aot.py)

from eplb_triton import launch  # noqa: E402
from eplb_triton._validation import PAIR_SWAP_MAX_REPLICAS, PAIR_SWAP_MAX_SLOTS, Config  # noqa: E402
from eplb_triton.configs import DEEPSEEK_V3, MODELS  # noqa: E402
from eplb_triton.kernels import _pairs, _rebalance, _repair, _search, _split  # noqa: E402

ARCHS = [80, 90]

# (name, E, R, G, N, P): every configuration the project ships or documents, and the limits.
# One job per shape: deployments of the same shape under two names compile the same kernel.
_SHAPES: dict[tuple, str] = {}
for _d in (*DEEPSEEK_V3.values(), *MODELS.values()):
    _SHAPES.setdefault((_d.experts, _d.replicas, _d.groups, _d.nodes, _d.gpus), _d.name)
_SHAPES[(launch.MAX_EXPERTS, launch.MAX_REPLICAS, 16, 4, 64)] = "limits-hierarchical"
_SHAPES[(launch.MAX_EXPERTS, launch.MAX_REPLICAS, 1, 1, 128)] = "limits-global"
CONFIGS = sorted((name, *shape) for shape, name in _SHAPES.items())


def _jobs() -> dict[str, tuple]:
    """``id -> (kernel, constexprs, num_warps, arch[, maxnreg])`` for everything this module checks."""
    jobs = {}
    for arch in ARCHS:
        for name, E, R, G, N, P in CONFIGS:
            ln = launch.rebalance_launch(Config(58, E, R, G, N, P).effective())
            jobs[f"rebalance-{name}-sm{arch}"] = ("rebalance", ln.constexprs, ln.num_warps, arch)
        for E, R in REPLICATE_SHAPES:
            ln = launch.replicate_launch(58, E, R)
            jobs[f"replicate-E{E}-R{R}-sm{arch}"] = ("replicate", ln.constexprs, ln.num_warps, arch)
        for n, m in PACKING_SHAPES:
            ln = launch.packing_launch(58, n, m)
            jobs[f"packing-n{n}-m{m}-sm{arch}"] = ("packing", ln.constexprs, ln.num_warps, arch)
        for E in DISPATCH_EXPERTS:
            ln = launch.dispatch_launch(8192 * 8, 8, E)
            jobs[f"dispatch-E{E}-sm{arch}"] = ("dispatch", ln.constexprs, ln.num_warps, arch)
        for E, R, P, N in SEARCH_SHAPES:
            for budget in (False, True):
                ln = launch.search_launch(58, E, R, P, N, budget)
                job_id = f"search-E{E}-R{R}-P{P}-N{N}-{'budget' if budget else 'free'}-sm{arch}"
                jobs[job_id] = ("search", ln.constexprs, ln.num_warps, arch, ln.maxnreg)
        for n in ASSIGN_SIZES:
            ln = launch.assign_launch(58, n)
            jobs[f"assign-n{n}-sm{arch}"] = ("assign", ln.constexprs, ln.num_warps, arch)
        for E, R in PAIRS_SHAPES:
            ln = launch.pairs_launch(58, E, R)
            jobs[f"pairs-E{E}-R{R}-sm{arch}"] = ("pairs", ln.constexprs, ln.num_warps, arch, ln.maxnreg)
        for E, R in REPAIR_SHAPES:
            ln = launch.repair_launch(58, E, R)
            jobs[f"repair-E{E}-R{R}-sm{arch}"] = ("repair", ln.constexprs, ln.num_warps, arch, ln.maxnreg)
        for E, R, P in SPLIT_SHAPES:  # the tile for log2phy's fixed width R - E + 1 (the balancer's)
            ln = launch.split_launch(58, E, R, P, R - E + 1)
            jobs[f"split-E{E}-R{R}-P{P}-sm{arch}"] = ("split", ln.constexprs, ln.num_warps, arch, ln.maxnreg)
    return jobs


REPLICATE_SHAPES = [(256, 288), (launch.MAX_EXPERTS, launch.MAX_REPLICAS)]
PACKING_SHAPES = [(288, 32), (256, 4), (launch.MAX_ITEMS, 64)]
DISPATCH_EXPERTS = [256, 384, launch.MAX_EXPERTS]
# (E, R, P, N) of the local search: DeepSeek-V3-like deployments and the limits
SEARCH_SHAPES = [(256, 288, 32, 1), (256, 288, 144, 1), (256, 320, 64, 1), (256, 288, 32, 4)]
SEARCH_SHAPES.append((launch.MAX_EXPERTS, launch.MAX_REPLICAS, 64, 1))
# pair swaps at their limits (PAIR_SWAP_MAX_REPLICAS slots; the most, and the fewest, slots per GPU)
for _s in (PAIR_SWAP_MAX_SLOTS, 4):
    SEARCH_SHAPES.append((launch.MAX_EXPERTS, PAIR_SWAP_MAX_REPLICAS, PAIR_SWAP_MAX_REPLICAS // _s, 1))
SEARCH_SHAPES.append((512, PAIR_SWAP_MAX_REPLICAS, 64, 4))


# the assignment problems of DeepSeek-V3-like deployments (GPUs per node, nodes) and the limit
ASSIGN_SIZES = [8, 18, 32, 64, 144, launch.MAX_ASSIGN]
# (E, R) of the pairing with two slots per GPU: DeepSeek-V3 decode on 144 GPUs, a small one, the limits
PAIRS_SHAPES = [(256, 288), (12, 16), (launch.MAX_EXPERTS, launch.MAX_REPLICAS)]
# (E, R) of the count repair, two slots per GPU: the same, and the first shape of its 8-warp tier
REPAIR_SHAPES = [*PAIRS_SHAPES, (launch.MAX_EXPERTS, 1024)]
# (E, R, P) of the per-step split: the DeepSeek-V3 deployments
SPLIT_SHAPES = [(256, 288, 32), (256, 320, 64), (256, 288, 144)]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict[str, str]]:
    """All jobs, compiled once in a subprocess without ``TRITON_INTERPRET`` (the tests' own
    process decorates the kernels for the interpreter)."""
    return aot.compile_in_subprocess(JOBS, tmp_path_factory.mktemp("aot"))


def _result(compiled: dict, job_id: str) -> tuple[str, str]:
    result = compiled[job_id]
    assert "error" not in result, f"{job_id} does not compile: {result.get('error')}"
    return result["ptx"], result["usage"]


def _local_ops(compiled: dict, job_id: str) -> int:
    return compiled[job_id]["local_ops"]


def assert_fits(usage: str, local_ops: int | None = None) -> None:
    """At most 255 registers and nothing in local memory. ``local_ops`` (the SASS's STL/LDL count),
    when given, decides about a stack frame: ptxas reserves an 8-byte frame for some kernels that
    no instruction ever touches, which is not a spill."""
    res = aot.resources(usage)
    assert "REG" in res, usage
    assert res["REG"] <= 255, f"{res['REG']} registers"
    assert res.get("LOCAL", 0) == 0, f"local memory: {usage}"
    if local_ops is None:
        assert res.get("STACK", 0) == 0, f"spills to local memory: {usage}"
    else:
        assert local_ops == 0, f"{local_ops} local-memory loads/stores (spills): {usage}"


def assert_ieee_division(ptx: str, divides: bool = True) -> None:
    if divides:
        assert "div.rn.f32" in ptx, "the shares must be IEEE float32 divisions (tl.math.div_rn)"
    assert not re.search(r"div\.(full|approx)", ptx), "approximate float32 division in the kernel"
    # flush-to-zero would turn subnormal loads and shares into 0 (triton 3.2 emits div.rn.ftz.f32)
    assert not re.search(r"\.ftz\.f32", ptx), "float32 arithmetic that flushes subnormals to zero"


def assert_float64_halvings_only(ptx: str) -> list[str]:
    """Float64 as in the reference: IEEE division, and the only products are halvings ``* 0.5``
    (exact, so a multiply-add that fuses one computes the same value). Returns the products."""
    assert "div.rn.f64" in ptx, "the shares must be IEEE float64 divisions"
    assert not re.search(r"div\.(full|approx)", ptx), "approximate division in the kernel"
    products = re.findall(r"\b(?:fma|mad|mul)\.\w*\.?f64\s+[^;]*;", ptx)
    assert all("0d3FE0000000000000" in p for p in products), [p for p in products if "0d3FE0000000000000" not in p]
    return products


def _lines_of(fn, pattern: str) -> list[int]:
    """Source line numbers (in the kernel's file) of the lines of ``fn`` that contain ``pattern``."""
    lines, start = inspect.getsourcelines(fn.fn)
    return [start + i for i, line in enumerate(lines) if pattern in line]


def _instructions_by_line(ptx: str, file_index: int) -> list[tuple[int, str]]:
    """``(source line, instruction)`` for each PTX instruction, from the ``.loc`` directives."""
    out, line = [], -1
    for text in ptx.splitlines():
        text = text.strip()
        if text.startswith((".loc ", ".loc\t")):  # not .local
            f, ln = text.split()[1:3]
            line = int(ln) if int(f) == file_index else -1
        elif text and not text.startswith(("//", ".", "{", "}", "$")):
            out.append((line, text))
    return out


MEMORY_OPS = ("ld.", "st.", "atom.", "red.")  # PTX memory instructions (ld.global, st.global.v2.b64, ...)


def assert_barrier_between(ptx: str, fn, store: str, load: str, load_fn=None) -> None:
    """In program order, a ``bar.sync`` lies between the last memory instruction of the source
    lines containing ``store`` and the first read of global memory after it (or the first memory
    instruction of a line containing ``load``, in ``load_fn`` when given, if that comes first).

    Any global read counts, not only those of the ``load`` lines: the line table attributes a
    vectorised load to a neighbouring line at times, and a barrier right after the store is what
    the kernels do. Only memory instructions and barriers are looked at: the compiler shares
    predicates and addresses between lines."""
    source = Path(inspect.getsourcefile(fn.fn)).name
    files = dict(re.findall(r'\.file\s+(\d+)\s+"[^"]*?([^/"]+)"', ptx))
    file_index = next((int(i) for i, name in files.items() if name == source), None)
    assert file_index is not None, f"no line information for {source} in the PTX"
    code = []  # (line, instruction without its predicate) of the memory instructions and barriers
    for ln, text in _instructions_by_line(ptx, file_index):
        text = re.sub(r"^@!?%p\d+\s+", "", text)
        if text.startswith(MEMORY_OPS + ("bar.sync", "barrier.sync")):
            code.append((ln, text))
    store_lines, load_lines = set(_lines_of(fn, store)), set(_lines_of(load_fn or fn, load))
    last_store = max((i for i, (ln, _) in enumerate(code) if ln in store_lines), default=None)
    assert last_store is not None, f"no memory instruction from the lines with {store!r}"
    first_load = next(
        (
            i
            for i, (ln, text) in enumerate(code)
            if i > last_store and (ln in load_lines or text.startswith(("ld.global", "atom.global")))
        ),
        None,
    )
    assert first_load is not None, f"no memory instruction from the lines with {load!r} after the store"
    between = [text for _, text in code[last_store:first_load]]
    assert any(t.startswith(("bar.sync", "barrier.sync")) for t in between), (
        f"no barrier between the scratch store {store!r} and its reload {load!r}"
    )


JOBS = _jobs()


@pytest.mark.parametrize("job_id", [j for j in JOBS if j.startswith("rebalance-")])
def test_rebalance_kernel(compiled, job_id):
    ptx, usage = _result(compiled, job_id)
    c = JOBS[job_id][1]
    assert_fits(usage)
    assert_ieee_division(ptx, divides=c["R"] > c["E"])  # no redundant slot: no share to divide
    fn = _rebalance._rebalance_kernel
    if c["G"] // c["N"] > 1:  # group packing: two scratch round trips
        assert_barrier_between(ptx, fn, "tl.store(scr_i + o_g", "tl.load(scr_i + o_e // GS")
        assert_barrier_between(ptx, fn, "tl.store(scr_i + G + (b_mlog", "tl.load(scr_i + G + o_j")
    # the -1 fill of log2phy rows, then the replicas' columns of the same rows (other threads)
    assert_barrier_between(ptx, fn, "tl.store(p_run[:, None]", "tl.store(log2phy_ptr + (layer * E + b_log)")
    if c["R"] // c["P"] > 1:  # shares gathered for the GPU packing, which streams its items from scratch
        assert_barrier_between(ptx, fn, "tl.store(scr_f + o_j", "tl.load(scr_f + b_phy")
        assert_sorted_packing_barriers(ptx)


def assert_sorted_packing_barriers(ptx: str) -> None:
    """_pack_sorted: the items in taking order, and each item's (pack, rank), are written by some
    threads and read by all."""
    fn = _rebalance._pack_sorted
    assert_barrier_between(ptx, fn, "tl.store(scr_i + o_i, b_item", "tl.load(scr_w + o_p")
    assert_barrier_between(ptx, fn, "tl.store(scr_placed + b_item", "tl.load(scr_placed + o_i")
    assert_barrier_between(ptx, _rebalance._take_pack, "tl.store(scr_placed + item", "tl.load(scr_placed + o_i", fn)


@pytest.mark.parametrize("job_id", [j for j in JOBS if j.startswith("replicate-")])
def test_replicate_kernel(compiled, job_id):
    ptx, usage = _result(compiled, job_id)
    assert_fits(usage)
    assert_ieee_division(ptx)


@pytest.mark.parametrize("job_id", [j for j in JOBS if j.startswith(("packing-", "dispatch-"))])
def test_packing_and_dispatch_kernels(compiled, job_id):
    ptx, usage = _result(compiled, job_id)
    assert_fits(usage)
    c = JOBS[job_id][1]
    if job_id.startswith("packing-") and c["NUM_ITEMS"] // c["NUM_PACKS"] > 1:
        assert_sorted_packing_barriers(ptx)


@pytest.mark.parametrize("job_id", [j for j in JOBS if j.startswith("search-")])
def test_search_kernel(compiled, job_id):
    ptx, usage = _result(compiled, job_id)
    assert_fits(usage)
    # float64 as in the reference: IEEE division, and no multiply that could fuse into an FMA
    assert "div.rn.f64" in ptx, "the shares must be IEEE float64 divisions"
    assert not re.search(r"div\.(full|approx)", ptx), "approximate division in the kernel"
    assert not re.search(r"\b(fma|mad|mul)\.\w*\.?f64", ptx), "a float64 multiply in the search"
    fn, publish, loads = _search._search_kernel, _search._publish, _search._gpu_loads
    # swap bounds, slot shares and the applied move are stored by one thread, reloaded by others
    assert_barrier_between(ptx, fn, "tl.store(bound_row + o_q", "tl.load(bound_row + o_q")
    assert_barrier_between(ptx, publish, "tl.store(slot_share_row + o_q", "tl.load(slot_share_ptr", loads)
    assert_barrier_between(ptx, fn, "tl.store(phy_row + o_q, b_phy", "tl.load(phy_row + o_q", publish)
    assert_barrier_between(ptx, fn, "tl.store(share_row + o_e, b_w", "tl.load(share_row + b_phy", publish)
    if JOBS[job_id][1]["N"] > 1:
        assert_barrier_between(ptx, publish, "tl.store(enode_row + o_e", "tl.atomic_min(enode_row")


@pytest.mark.parametrize("job_id", [j for j in JOBS if j.startswith("assign-")])
def test_assign_kernel(compiled, job_id):
    _, usage = _result(compiled, job_id)
    assert_fits(usage)


@pytest.mark.parametrize("job_id", [j for j in JOBS if j.startswith("split-")])
def test_split_kernel(compiled, job_id):
    ptx, usage = _result(compiled, job_id)
    assert_fits(usage, _local_ops(compiled, job_id))  # an unused 8-byte stack frame on sm_90
    # set-up's per-slot data goes through scratch, read back by other threads
    fn = _split._balanced_split_kernel
    assert_barrier_between(ptx, fn, "tl.store(scr_qe + s_q", "tl.load(scr_qe + o_ps")
    assert_barrier_between(ptx, fn, "tl.store(scr_ux + s_unit, s_g", "tl.load(scr_ux + t_flat)")
    assert_barrier_between(ptx, fn, "tl.store(scr_ux + s_unit, x_unit", "t_x = tl.where(t_ok, tl.load(scr_ux")


@pytest.mark.parametrize("job_id", [j for j in JOBS if j.startswith("pairs-")])
def test_pairs_kernel(compiled, job_id):
    ptx, usage = _result(compiled, job_id)
    assert_fits(usage)
    assert assert_float64_halvings_only(ptx), "the halvings of 13.1 are products by 0.5"
    # shares, counts and first positions are stored by some threads and read one by one by all
    assert_barrier_between(ptx, _pairs._publish, "tl.store(c_row + o_e, b_c", "tl.load(s_row + j)", _pairs._build)
    assert_barrier_between(ptx, _pairs._pair_up, "tl.store(off_row + o_e", "tl.load(off_row + e)")


@pytest.mark.parametrize("job_id", [j for j in JOBS if j.startswith("repair-")])
def test_repair_kernel(compiled, job_id):
    ptx, usage = _result(compiled, job_id)
    assert_fits(usage)
    assert_float64_halvings_only(ptx)  # the bisection's halvings
    # shares, excess sums, counts and slots are stored by some threads and gathered by others
    fn = _repair._repair_kernel
    assert_barrier_between(ptx, fn, "tl.store(s_row + o_e, b_s", "tl.load(s_row + p_a")
    assert_barrier_between(ptx, fn, "tl.store(fx_row + o_e", "tl.atomic_add(fx_row + p_a")
    assert_barrier_between(ptx, fn, "tl.atomic_add(fx_row + p_b", "tl.load(fx_row + p_a")
    assert_barrier_between(ptx, fn, "tl.atomic_add(c_row + o_b", "tl.load(c_row + o_e")
    assert_barrier_between(ptx, fn, "tl.store(cur_row + key_j", "tl.load(cur_row + q_a", _repair._slot_shares)
    assert_barrier_between(ptx, _repair._slot_shares, "tl.store(s_row + o_e, b_w", "tl.load(s_row + p_a")
