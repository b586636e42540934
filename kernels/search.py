"""Thin launcher of the local search kernel (:mod:`._search`).

Outputs, scratch, grid, block sizes and limits come from :mod:`eplb_triton.launch`
(:func:`~eplb_triton.launch.search_launch`); this function only binds tensors to kernel arguments.
Inputs must be row-contiguous and on the outputs' device: ``w`` float32, the rest int64.
"""

from __future__ import annotations

import torch

from ._search import _search_kernel


def search(
    w: torch.Tensor,
    phy_in: torch.Tensor,
    rank_in: torch.Tensor,
    cnt_in: torch.Tensor,
    old: torch.Tensor,
    budget: int,
    skip: torch.Tensor,
    phy: torch.Tensor,
    rank: torch.Tensor,
    cnt: torch.Tensor,
    scratch_f: torch.Tensor,
    scratch_i: torch.Tensor,
    launch,
) -> None:
    """``old`` is any int64 tensor (unread) unless ``launch.constexprs["HAS_BUDGET"]``; ``skip [L]`` int32."""
    _search_kernel[launch.grid](
        # inputs
        w,
        phy_in,
        rank_in,
        cnt_in,
        old,
        budget,
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
