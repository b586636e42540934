"""Thin launcher of the count repair kernel (:mod:`._repair`), two slots per GPU under a budget.

Outputs, scratch, grid, block sizes and warps come from :mod:`eplb_triton.launch`
(:func:`~eplb_triton.launch.repair_launch`); this function only binds tensors to kernel arguments.
Inputs must be row-contiguous and on the outputs' device: ``w`` float32, ``skip`` int32, the rest int64.
"""

from __future__ import annotations

import torch

from ._repair import _repair_kernel


def repair(
    w: torch.Tensor,
    phy_in: torch.Tensor,
    cnt_in: torch.Tensor,
    old: torch.Tensor,
    target: torch.Tensor,
    budget: int,
    skip: torch.Tensor,
    phy: torch.Tensor,
    cnt: torch.Tensor,
    changed: torch.Tensor,
    scratch_f: torch.Tensor,
    scratch_i: torch.Tensor,
    launch,
) -> None:
    """``(phy_in, cnt_in)`` -> ``(phy, cnt)`` and ``changed [L]`` int32; ``skip [L]`` int32; scratch
    ``[L, 2 E]`` float64 and ``[L, R + E]`` int32."""
    _repair_kernel[launch.grid](
        # inputs
        w,
        phy_in,
        cnt_in,
        old,
        target,
        budget,
        skip,
        # outputs
        phy,
        cnt,
        changed,
        # scratch
        scratch_f,
        scratch_i,
        **launch.constexprs,
        num_warps=launch.num_warps,
        maxnreg=launch.maxnreg,
    )
