"""Thin launchers of the rebalance kernels (:mod:`._rebalance`).

Outputs, scratch, grids, block sizes and limits come from :mod:`eplb_triton.launch` (a
:class:`~eplb_triton.launch.Launch` per call); these functions only bind tensors to kernel
arguments. Inputs must be float32, row-contiguous, on the outputs' device.
"""

from __future__ import annotations

import torch

from ._rebalance import _balanced_packing_kernel, _rebalance_kernel, _replicate_kernel


def balanced_packing(
    w: torch.Tensor,
    pack: torch.Tensor,
    rank: torch.Tensor,
    invalid: torch.Tensor,
    scratch_i: torch.Tensor,
    scratch_f: torch.Tensor,
    launch,
) -> None:
    _balanced_packing_kernel[launch.grid](
        # inputs
        w,
        # outputs
        pack,
        rank,
        invalid,
        # scratch
        scratch_i,
        scratch_f,
        **launch.constexprs,
        num_warps=launch.num_warps,
    )


def replicate_experts(
    w: torch.Tensor, phy2log: torch.Tensor, rank: torch.Tensor, cnt: torch.Tensor, invalid: torch.Tensor, launch
) -> None:
    _replicate_kernel[launch.grid](
        # inputs
        w,
        # outputs
        phy2log,
        rank,
        cnt,
        invalid,
        **launch.constexprs,
        num_warps=launch.num_warps,
    )


def rebalance(w: torch.Tensor, out, launch) -> None:
    """``out``: a :class:`~eplb_triton.launch.RebalanceBuffers` of the launch's configuration."""
    _rebalance_kernel[launch.grid](
        # inputs
        w,
        # outputs
        out.phy2log,
        out.phyrank,
        out.logcnt,
        out.log2phy,
        out.invalid,
        # scratch
        out.scratch_i,
        out.scratch_f,
        **launch.constexprs,
        num_warps=launch.num_warps,
    )
