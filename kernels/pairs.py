"""Thin launcher of the deficit-driven replication kernel (:mod:`._pairs`), two slots per GPU.

Outputs, scratch, grid, block sizes and warps come from :mod:`eplb_triton.launch`
(:func:`~eplb_triton.launch.pairs_launch`); this function only binds tensors to kernel arguments.
Inputs must be row-contiguous and on the outputs' device: ``w`` float32, ``skip`` int32, the rest int64.
"""

from __future__ import annotations

import torch

from ._pairs import _pairs_kernel


def pairs(
    w: torch.Tensor,
    phy_in: torch.Tensor,
    rank_in: torch.Tensor,
    cnt_in: torch.Tensor,
    skip: torch.Tensor,
    phy: torch.Tensor,
    rank: torch.Tensor,
    cnt: torch.Tensor,
    scratch_f: torch.Tensor,
    scratch_i: torch.Tensor,
    launch,
) -> None:
    """``(phy_in, rank_in, cnt_in)`` -> ``(phy, rank, cnt)``; ``skip [L]`` int32; scratch ``[L, E]``
    float64 and ``[L, 2 E]`` int32."""
    _pairs_kernel[launch.grid](
        # inputs
        w,
        phy_in,
        rank_in,
        cnt_in,
        skip,
        # outputs
        phy,
        rank,
        cnt,
        # scratch
        scratch_f,
        scratch_i,
        **launch.constexprs,
        num_warps=launch.num_warps,
        maxnreg=launch.maxnreg,
    )
