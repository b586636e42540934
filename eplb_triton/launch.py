"""Launch policy of the Triton kernels: limits, buffer shapes, grids, block sizes and warps.

The kernels (:mod:`eplb_triton.kernels`) hold only Triton code and thin launchers; what a
configuration needs (which constexprs, how many warps, which buffers of which shape) is decided
here, once, by the ``*_launch`` functions. The API, the planner, the online layer, the GPU check
and the ahead-of-time compile tests all go through them, so what is tested is what runs.

This module imports Triton only when a kernel is launched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

from ._validation import (
    PAIR_PASSES,
    PAIR_SWAP_MAX_REPLICAS,
    PAIR_SWAP_MAX_SLOTS,
    REPAIR_PASSES,
    Config,
    EplbArgumentError,
)
from .placement import slot_order_ranks
from .split import MAX_ROUNDS

MAX_EXPERTS = 1024  # logical experts per layer: a row lives in one program's registers
MAX_REPLICAS = 2048  # slots per layer
MAX_ITEMS = 2048  # balanced_packing: items per row
DISPATCH_BLOCK = 1024  # routed entries per program of the record + dispatch kernel
MAX_ASSIGN = 256  # rows (= columns) of one assignment problem: columns 0 .. n live in one program's registers


@dataclass(frozen=True)
class Launch:
    """One kernel launch: its grid, its ``tl.constexpr`` arguments and ``num_warps``."""

    grid: tuple[int, ...]
    constexprs: dict[str, int]
    num_warps: int


def _pow2(n: int) -> int:
    """Block size for ``n`` lanes: the next power of two, at least 2."""
    return max(2, 1 << (max(1, n) - 1).bit_length())


def _num_warps(block: int) -> int:
    # Each greedy step is a chain of block-wide reductions, latency-bound: within one warp they
    # are register shuffles, across warps each adds a shared-memory round trip and a barrier.
    # One warp up to 512 lanes (16 int64 keys per thread), more only to avoid register spills.
    # A guess until measured: benchmarks/gpu_check.py sweeps num_warps 1-8.
    return max(1, min(4, block // 512))


def check_limits(num_experts: int, num_replicas: int) -> None:
    """The kernels hold a row in registers: ``E <= MAX_EXPERTS`` and ``R <= MAX_REPLICAS``."""
    if num_experts > MAX_EXPERTS:
        raise EplbArgumentError(
            f"backend='triton' supports up to {MAX_EXPERTS} logical experts per layer, got {num_experts}; "
            "use backend='cpu'"
        )
    if num_replicas > MAX_REPLICAS:
        raise EplbArgumentError(
            f"backend='triton' supports up to {MAX_REPLICAS} replicas per layer, got {num_replicas}; use backend='cpu'"
        )


def log2phy_width(num_experts: int, num_replicas: int) -> int:
    """Columns of a fixed-width ``log2phy``: the most replicas one expert can get, ``R - E + 1``."""
    return num_replicas - num_experts + 1


def _fill_block(run: int, rows: int) -> int:
    """Columns of the fused kernel's ``[rows, BLOCK_F]`` log2phy ``-1`` fill tiles over ``rows`` runs of
    ``run`` int64 each: at most 1024 entries a tile, the fewest padded stores plus ~8 instructions of
    overhead per tile (2 int64 per vector store, 32 threads)."""
    blocks = [b for b in (1 << k for k in range(1, 11)) if rows * b <= 1024]
    return min(blocks, key=lambda b: -(-run // b) * (rows * b / 64 + 8))


def rebalance_launch(cfg: Config, num_warps: int | None = None) -> Launch:
    """The fused rebalance kernel for the effective configuration ``cfg`` (global policy: G = N = 1)."""
    L, E, R, G, N, P = (
        cfg.num_layers, cfg.num_experts, cfg.num_replicas, cfg.num_groups, cfg.num_nodes, cfg.num_gpus,
    )  # fmt: skip
    check_limits(E, R)
    width = log2phy_width(E, R)
    block_en, block_rn = _pow2(E // N), _pow2(R // N)
    constexprs = dict(
        E=E, R=R, G=G, N=N, P=P, WIDTH=width,
        BLOCK_E=_pow2(E), BLOCK_G=_pow2(G), BLOCK_N=_pow2(N), BLOCK_EN=block_en, BLOCK_RN=block_rn,
        BLOCK_PN=_pow2(P // N),
        BLOCK_GN=_pow2(G // N), BLOCK_F=_fill_block(E // G * width, _pow2(G // N)),
    )  # fmt: skip
    return Launch((L * N,), constexprs, num_warps or _num_warps(max(block_rn, block_en)))


def packing_launch(num_rows: int, num_items: int, num_packs: int) -> Launch:
    if num_items > MAX_ITEMS:
        raise EplbArgumentError(
            f"backend='triton' supports up to {MAX_ITEMS} items per row, got {num_items}; use backend='cpu'"
        )
    block_i = _pow2(num_items)
    constexprs = dict(NUM_ITEMS=num_items, NUM_PACKS=num_packs, BLOCK_I=block_i, BLOCK_P=_pow2(num_packs))
    return Launch((num_rows,), constexprs, _num_warps(block_i))


def replicate_launch(num_rows: int, num_log: int, num_phy: int) -> Launch:
    check_limits(num_log, num_phy)
    block_r = _pow2(num_phy)
    constexprs = dict(NUM_LOG=num_log, NUM_PHY=num_phy, BLOCK_E=_pow2(num_log), BLOCK_R=block_r)
    return Launch((num_rows,), constexprs, _num_warps(block_r))


def dispatch_launch(num_entries: int, top_k: int, num_experts: int) -> Launch:
    constexprs = dict(E=num_experts, K=top_k, BLOCK=DISPATCH_BLOCK, BLOCK_E=_pow2(num_experts + 1))
    return Launch((max(1, -(-num_entries // DISPATCH_BLOCK)),), constexprs, 4)


@dataclass
class RebalanceBuffers:
    """Outputs and scratch of :func:`rebalance` for one configuration, reusable across calls."""

    phy2log: torch.Tensor  # [L, R] int64
    phyrank: torch.Tensor  # [L, R] int64
    logcnt: torch.Tensor  # [L, E] int64
    log2phy: torch.Tensor  # [L, E, R - E + 1] int64, -1 padded (R - E + 1: the most replicas of one expert)
    invalid: torch.Tensor  # [L] int32, 1 where the layer's loads were not all finite and >= 0
    scratch_i: torch.Tensor  # [L * N, G + E / N + 2 R / N] int32
    scratch_f: torch.Tensor  # [L * N, E / N + R / N] float32

    @staticmethod
    def layout(cfg: Config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``name -> (shape, dtype)`` of each buffer for the effective configuration ``cfg``."""
        L, E, R, G, N = cfg.num_layers, cfg.num_experts, cfg.num_replicas, cfg.num_groups, cfg.num_nodes
        return dict(
            phy2log=((L, R), torch.int64),
            phyrank=((L, R), torch.int64),
            logcnt=((L, E), torch.int64),
            log2phy=((L, E, log2phy_width(E, R)), torch.int64),
            invalid=((L,), torch.int32),
            scratch_i=((L * N, G + E // N + 2 * (R // N)), torch.int32),
            scratch_f=((L * N, E // N + R // N), torch.float32),
        )

    @classmethod
    def allocate(cls, cfg: Config, device: torch.device | str) -> RebalanceBuffers:
        """Buffers for the effective configuration ``cfg``."""
        return cls(**{k: torch.empty(shape, dtype=dt, device=device) for k, (shape, dt) in cls.layout(cfg).items()})

    def check(self, cfg: Config, device: torch.device) -> None:
        """Every buffer has the shape, dtype and device :meth:`layout` gives, and is contiguous: the
        kernel writes them by computed offsets."""
        for name, (shape, dtype) in self.layout(cfg).items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
                raise EplbArgumentError(
                    f"{name} must be a contiguous {dtype} tensor of shape {list(shape)} on {device} for this "
                    f"configuration, got {t.dtype} {list(t.shape)} on {t.device}"
                    + ("" if t.is_contiguous() else " (not contiguous)")
                )


def _float32_rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float32).contiguous()


def _int64_rows(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A plan's rows as the kernels read them: int64, contiguous, on ``device`` (a copy where needed)."""
    return t.to(device=device, dtype=torch.int64).contiguous()


def _skip_flags(skip: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """``[n]`` int32 flags, 1 where a row is returned as it went in: ``skip`` (bool), else all 0."""
    if skip is None:
        return torch.zeros(n, dtype=torch.int32, device=device)
    return skip.to(device=device, dtype=torch.int32).contiguous()


@functools.cache
def _kernels() -> ModuleType:
    """The Triton kernels package with its launchers, imported at the first launch (the only place
    that imports it: Triton's import is slow and optional until a kernel runs)."""
    from . import kernels
    from .kernels import assign, dispatch, pairs, rebalance, repair, search, split  # noqa: F401  (submodules become attributes)

    return kernels


def rebalance(
    weight: torch.Tensor, cfg: Config, out: RebalanceBuffers | None = None, num_warps: int | None = None
) -> RebalanceBuffers:
    """Plan all layers of ``weight [L, E]`` with one launch, one program per (layer, node).

    ``cfg`` is the effective configuration (:meth:`Config.effective`). Writes ``out`` (allocated
    when ``None``) in place and returns it; no host synchronisation. ``num_warps`` overrides the
    default (for tuning sweeps).
    """
    launch = rebalance_launch(cfg, num_warps)
    w = _float32_rows(weight)
    if out is None:
        out = RebalanceBuffers.allocate(cfg, w.device)
    else:
        out.check(cfg, w.device)
    _kernels().rebalance.rebalance(w, out, launch)
    return out


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pack, rank, invalid)`` of ``weight [X, n]``; rows flagged in ``invalid`` are left unwritten."""
    X, n = weight.shape
    launch = packing_launch(X, n, num_packs)
    w = _float32_rows(weight)
    pack = torch.empty((X, n), dtype=torch.int64, device=w.device)
    rank = torch.empty_like(pack)
    invalid = torch.empty(X, dtype=torch.int32, device=w.device)
    scratch_i = torch.empty((X, 2 * n), dtype=torch.int32, device=w.device)
    scratch_f = torch.empty((X, n), dtype=torch.float32, device=w.device)
    _kernels().rebalance.balanced_packing(w, pack, rank, invalid, scratch_i, scratch_f, launch)
    return pack, rank, invalid


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, ...]:
    """``(phy2log, rank, cnt, invalid)`` of ``weight [X, E]``; rows flagged in ``invalid`` are left unwritten."""
    X, E = weight.shape
    launch = replicate_launch(X, E, num_phy)
    w = _float32_rows(weight)
    phy2log = torch.empty((X, num_phy), dtype=torch.int64, device=w.device)
    rank = torch.empty_like(phy2log)
    cnt = torch.empty((X, E), dtype=torch.int64, device=w.device)
    invalid = torch.empty(X, dtype=torch.int32, device=w.device)
    _kernels().rebalance.replicate_experts(w, phy2log, rank, cnt, invalid, launch)
    return phy2log, rank, cnt, invalid


def record_dispatch(
    topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, counts: torch.Tensor, invalid: torch.Tensor
) -> torch.Tensor:
    """One layer's record + dispatch; ``counts`` and ``invalid`` are accumulated in place. No host sync.

    ``log2phy``, ``logcnt`` and ``counts`` are read and written through their strides (views of
    wider tensors work in place); ``topk_ids`` is read contiguously; ``invalid`` is one element."""
    T, K = topk_ids.shape
    ids = topk_ids.contiguous()
    launch = dispatch_launch(T * K, K, log2phy.shape[0])
    return _kernels().dispatch.record_dispatch(ids, log2phy, logcnt, counts, invalid, torch.empty_like(ids), launch)


# ----------------------------------------------------------------------------------------------
# The local search (docs/algorithm.md section 10.2)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchLaunch(Launch):
    """A :class:`Launch` that also caps registers per thread (ptxas ``.maxnreg``)."""

    maxnreg: int | None


def search_launch(L: int, E: int, R: int, P: int, N: int, has_budget: bool) -> SearchLaunch:
    """The search kernel: one program per layer; slots are held as a ``[BLOCK_P, BLOCK_S]`` tile
    (GPU x slot on the GPU) so that per-GPU values broadcast to slots without a gather."""
    check_limits(E, R)
    block_p, block_s, block_e = _pow2(P), _pow2(R // P), _pow2(E)
    pairs = not has_budget and 4 <= R // P <= PAIR_SWAP_MAX_SLOTS and R <= PAIR_SWAP_MAX_REPLICAS  # 10.2
    constexprs = dict(
        E=E, R=R, P=P, N=N, HAS_BUDGET=bool(has_budget), PAIRS=pairs, BLOCK_E=block_e, BLOCK_P=block_p,
        BLOCK_S=block_s, BLOCK_R=_pow2(R),
    )  # fmt: skip
    # A slot carries several float64 values and pointers through the loops: 4 warps per
    # _num_warps' one, at most 8 (at the limits, 8 slots per thread). Compiled by ptxas at 249-255
    # registers without spilling there, with Triton 3.6 and 3.9; 16 warps (128 registers each)
    # spill with 3.6. A guess for speed until measured on a GPU.
    num_warps = min(8, 4 * _num_warps(max(block_p * block_s, block_e)))
    # Up to 4 warps, ptxas left alone trims this kernel to an occupancy tier (72-96 registers) and
    # spills a few cold values (one program per layer gains nothing from occupancy): cap at 255.
    # At 8 warps without pair swaps the cap itself made Triton 3.6's ptxas spill 8 bytes at the
    # limits; there the default is kept. With pair swaps (R <= 1024) the default tier (80-128
    # registers) spilled with both versions, the cap does not.
    return SearchLaunch((L,), constexprs, num_warps, 255 if num_warps <= 4 or pairs else None)


def search(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    phyrank: torch.Tensor,
    logcnt: torch.Tensor,
    num_gpus: int,
    num_nodes: int,
    old_phy2log: torch.Tensor | None = None,
    max_moves: int | None = None,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The local search of every layer from ``(phy2log, phyrank, logcnt)``, one launch, no host sync.

    ``num_nodes`` is the effective one (1 for the global policy). With ``old_phy2log`` and
    ``max_moves``, at most ``max_moves`` slots per layer end up differing from ``old_phy2log``
    (``max_moves`` alone is ignored here; the reference needs ``old_phy2log`` for it). Layers marked
    in ``skip [L]`` (bool) come back as they went in, unsearched. Returns new ``int64`` tensors
    ``(phy2log [L, R], phyrank [L, R], logcnt [L, E])``; the inputs are not modified.
    """
    L, R = phy2log.shape
    E = logcnt.shape[1]
    has_budget = old_phy2log is not None and max_moves is not None
    ln = search_launch(L, E, R, num_gpus, num_nodes, has_budget)
    w = _float32_rows(weight)
    dev = w.device

    phy_in, rank_in, cnt_in = (_int64_rows(t, dev) for t in (phy2log, phyrank, logcnt))
    old = _int64_rows(old_phy2log, dev) if has_budget else phy_in  # unread without a budget
    skip_rows = _skip_flags(skip, L, dev)
    phy, rank, cnt = torch.empty_like(phy_in), torch.empty_like(rank_in), torch.empty_like(cnt_in)
    if L == 0:
        return phy, rank, cnt
    scratch_f = torch.empty((L, E + 2 * R + 3), dtype=torch.float64, device=dev)
    scratch_i = torch.empty((L, E), dtype=torch.int32, device=dev)
    budget = min(int(max_moves), R) if has_budget else 0  # validated >= 0; int32 in range
    _kernels().search.search(
        w, phy_in, rank_in, cnt_in, old, budget, skip_rows, phy, rank, cnt, scratch_f, scratch_i, ln
    )
    return phy, rank, cnt


# ----------------------------------------------------------------------------------------------
# Two slots per GPU: deficit-driven replication (docs/algorithm.md section 13)
# ----------------------------------------------------------------------------------------------


def pairs_launch(L: int, E: int, R: int) -> SearchLaunch:
    """The pairing kernel: one program per layer of ``R = 2 P`` slots; lanes are experts
    (``BLOCK_E``) or GPUs (``BLOCK_P``), and every count against the other experts is a loop over
    them, so a lane holds a few values: 4 warps, 8 past 1024 lanes. As for the search, ptxas is
    kept from trimming 4 warps to an occupancy tier (one program per layer gains nothing from it)."""
    check_limits(E, R)
    if R % 2:
        raise EplbArgumentError(f"the pairing kernel needs two slots per GPU (an even R), got R = {R}")
    block_e, block_p = _pow2(E), _pow2(R // 2)
    constexprs = dict(E=E, R=R, PASSES=PAIR_PASSES, BLOCK_E=block_e, BLOCK_P=block_p)
    num_warps = 4 if max(block_e, block_p) <= 1024 else 8
    return SearchLaunch((L,), constexprs, num_warps, 255 if num_warps <= 4 else None)


def pairs(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    phyrank: torch.Tensor,
    logcnt: torch.Tensor,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deficit-driven replication of every layer of the plan ``(phy2log, phyrank, logcnt)`` with two
    slots per GPU (``R = 2 P``), one launch, no host synchronisation: the pairing placement where it
    is strictly better, else the plan. Layers marked in ``skip [L]`` (bool) come back as they went
    in. Returns new ``int64`` tensors ``(phy2log [L, R], phyrank [L, R], logcnt [L, E])``; the inputs
    are not modified.
    """
    L, R = phy2log.shape
    E = logcnt.shape[1]
    ln = pairs_launch(L, E, R)
    w = _float32_rows(weight)
    dev = w.device

    phy_in, rank_in, cnt_in = (_int64_rows(t, dev) for t in (phy2log, phyrank, logcnt))
    skip_rows = _skip_flags(skip, L, dev)
    phy, rank, cnt = torch.empty_like(phy_in), torch.empty_like(rank_in), torch.empty_like(cnt_in)
    if L == 0:
        return phy, rank, cnt
    scratch_f = torch.empty((L, E), dtype=torch.float64, device=dev)
    scratch_i = torch.empty((L, 2 * E), dtype=torch.int32, device=dev)
    _kernels().pairs.pairs(w, phy_in, rank_in, cnt_in, skip_rows, phy, rank, cnt, scratch_f, scratch_i, ln)
    return phy, rank, cnt


# ----------------------------------------------------------------------------------------------
# Two slots per GPU under a budget: the count repair (docs/algorithm.md 10.8)
# ----------------------------------------------------------------------------------------------


def repair_launch(L: int, E: int, R: int) -> SearchLaunch:
    """The count repair kernel: one program per layer of ``R = 2 P`` slots; lanes are experts
    (``BLOCK_E``) or GPUs (``BLOCK_P``, a GPU's two slots as two halves), a few values each: 4
    warps, 8 from 1024 lanes (with 4, an earlier form of the kernel spilled at the limits). As for
    the search, ptxas is kept from trimming to an occupancy tier (one program per layer gains
    nothing from it; left alone at 8 warps that earlier form got 128 registers for E = R = 1024 and
    spilled): capped at 255, 256 threads still fit an SM's 64K registers, and every shape of
    tests/test_compile_targets.py compiles without spills with Triton 3.6 (109-254 registers) and
    3.9 (108-232)."""
    check_limits(E, R)
    if R % 2:
        raise EplbArgumentError(f"the count repair kernel needs two slots per GPU (an even R), got R = {R}")
    block_e, block_p = _pow2(E), _pow2(R // 2)
    constexprs = dict(E=E, R=R, PASSES=REPAIR_PASSES, BLOCK_E=block_e, BLOCK_P=block_p)
    num_warps = 4 if max(block_e, block_p) < 1024 else 8
    return SearchLaunch((L,), constexprs, num_warps, 255)


def repair(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    phyrank: torch.Tensor,
    logcnt: torch.Tensor,
    old_phy2log: torch.Tensor,
    target: torch.Tensor,
    max_moves: int,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The count repair of every layer of the budgeted search's plan ``(phy2log, phyrank, logcnt)``
    (``R = 2 P``), one launch, no host synchronisation: a placement at most ``max_moves`` slots from
    ``old_phy2log`` with counts moved toward ``target [L, E]`` where it is strictly better, replicas
    numbered in slot order, else the plan. Layers marked in ``skip [L]`` (bool) come back as they
    went in. Returns new ``int64`` tensors ``(phy2log [L, R], phyrank [L, R], logcnt [L, E])``; the
    inputs are not modified.
    """
    L, R = phy2log.shape
    E = logcnt.shape[1]
    ln = repair_launch(L, E, R)
    w = _float32_rows(weight)
    dev = w.device
    phy_in, rank_in, cnt_in, old, tgt = (_int64_rows(t, dev) for t in (phy2log, phyrank, logcnt, old_phy2log, target))
    skip_rows = _skip_flags(skip, L, dev)
    if L == 0 or max_moves <= 0:
        return phy_in.clone(), rank_in.clone(), cnt_in.clone()
    phy, cnt = torch.empty_like(phy_in), torch.empty_like(cnt_in)
    changed = torch.empty(L, dtype=torch.int32, device=dev)
    scratch_f = torch.empty((L, 2 * E), dtype=torch.float64, device=dev)
    scratch_i = torch.empty((L, R + E), dtype=torch.int32, device=dev)
    budget = min(int(max_moves), R)  # int32 in range
    _kernels().repair.repair(
        w, phy_in, cnt_in, old, tgt, budget, skip_rows, phy, cnt, changed, scratch_f, scratch_i, ln
    )
    rank = torch.where(changed[:, None] != 0, slot_order_ranks(phy, E)[0], rank_in)
    return phy, rank, cnt


# ----------------------------------------------------------------------------------------------
# The exact assignment of the relabelling (docs/algorithm.md 10.3; cpu.assign_max_overlap)
# ----------------------------------------------------------------------------------------------


def assign_launch(B: int, n: int) -> Launch:
    """One program per ``[n, n]`` problem; ``BLOCK_N`` lanes cover the columns ``0 .. n``."""
    if not 1 <= n <= MAX_ASSIGN:
        raise EplbArgumentError(f"the assignment kernel solves problems of 1 to {MAX_ASSIGN} rows, got {n}")
    block_n = _pow2(n + 1)
    return Launch((B,), dict(N=n, BLOCK_N=block_n), _num_warps(block_n))


def assign_max_overlap(overlap: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`eplb_triton.cpu.assign_max_overlap` returns for ``overlap [B, n, n]`` (``n <=
    MAX_ASSIGN``), in one launch without host synchronisation. ``skip [B]`` bool: problems answered by
    the identity, unsolved. Returns ``[B, n]`` int64.
    """
    B, n, _ = overlap.shape
    out = torch.empty((B, n), dtype=torch.int64, device=overlap.device)
    if B == 0 or n == 0:
        return out
    skip_rows = _skip_flags(skip, B, overlap.device)
    _kernels().assign.assign(overlap.to(torch.int64).contiguous(), skip_rows, out, assign_launch(B, n))
    return out


# ----------------------------------------------------------------------------------------------
# The per-step balanced split (eplb_triton/split.py; docs/algorithm.md section 11)
# ----------------------------------------------------------------------------------------------


def split_launch(L: int, E: int, R: int, P: int, max_replicas: int | None = None) -> SearchLaunch:
    """The split kernel: one program per layer. ``max_replicas`` bounds the GPUs of any expert (e.g.
    the placement's ``log2phy.shape[-1]``); without it the unit tile takes the bound every placement
    meets, ``min(P, R - E + 1)``. The scratch row length is ``launch.constexprs``-derived:
    :func:`split_scratch`."""
    gpus = min(P, R - E + 1) if max_replicas is None else max(1, min(P, max_replicas))
    constexprs = dict(
        E=E, R=R, P=P, BLOCK_E=_pow2(E), BLOCK_R=_pow2(R), BLOCK_P=_pow2(P), BLOCK_S=_pow2(R // P),
        BLOCK_K=_pow2(min(E, max(R - E, 1))), BLOCK_X=_pow2(gpus),
    )  # fmt: skip
    widest = max(constexprs["BLOCK_R"], constexprs["BLOCK_K"] * constexprs["BLOCK_X"])
    # One warp spills at DeepSeek-V3 shapes (a 512-lane sort and tiles) and its warp-local gathers
    # become long shuffle chains; 4 warps (8 past 1024 lanes) estimate fastest in the static report.
    # Left alone, ptxas trims 4 warps to an occupancy tier (80 registers) and spills: one program
    # per layer gains nothing from occupancy, so the cap is 255.
    num_warps = 4 if widest <= 1024 else 8
    return SearchLaunch((L,), constexprs, num_warps, 255 if num_warps <= 4 else None)


def split_scratch(ln: Launch) -> int:
    """int32 entries of the split kernel's scratch row per layer."""
    c = ln.constexprs
    return 6 * c["BLOCK_R"] + c["BLOCK_K"] * c["BLOCK_X"]


def balanced_split(
    counts: torch.Tensor, phy2log: torch.Tensor, num_gpus: int, max_replicas: int | None = None,
    max_rounds: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(quota [L, R], rounds [L])`` int64 of :func:`eplb_triton.split.balanced_split`, one launch,
    no host synchronisation. ``counts [L, E]`` and ``phy2log [L, R]`` integers on one device (every
    expert with a slot: not checked here, that would synchronise). A layer with an expert on more
    than ``max_replicas`` GPUs gets quotas ``-1`` and rounds ``-1``."""
    L, E = counts.shape
    R = phy2log.shape[1]
    ln = split_launch(L, E, R, num_gpus, max_replicas)
    dev = phy2log.device
    quota = torch.empty((L, R), dtype=torch.int64, device=dev)
    rounds = torch.empty((L,), dtype=torch.int64, device=dev)
    if L == 0:
        return quota, rounds
    scratch = torch.empty((L, split_scratch(ln)), dtype=torch.int32, device=dev)
    counts, phy2log = (t.to(device=dev, dtype=torch.int64).contiguous() for t in (counts, phy2log))
    rounds_cap = MAX_ROUNDS if max_rounds is None else max_rounds
    _kernels().split.balanced_split(counts, phy2log, rounds_cap, quota, rounds, scratch, ln)
    return quota, rounds
