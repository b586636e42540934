"""Thin launcher of the per-step balanced split kernel (:mod:`._split`).

Outputs, scratch, grid, block sizes and warps come from :mod:`eplb_triton.launch`
(:func:`~eplb_triton.launch.split_launch`); this function only binds tensors to kernel arguments.
Inputs must be contiguous int64 on the outputs' device.
"""

from __future__ import annotations

import torch

from ._split import _balanced_split_kernel


def balanced_split(
    counts: torch.Tensor,
    phy2log: torch.Tensor,
    max_rounds: int,
    quota: torch.Tensor,
    rounds: torch.Tensor,
    scratch: torch.Tensor,
    launch,
) -> None:
    """``counts [L, E]``, ``phy2log [L, R]`` -> ``quota [L, R]``, ``rounds [L]``; ``scratch [L, n]`` int32."""
    _balanced_split_kernel[launch.grid](
        # inputs
        counts,
        phy2log,
        max_rounds,
        # outputs
        quota,
        rounds,
        # scratch
        scratch,
        **launch.constexprs,
        num_warps=launch.num_warps,
        maxnreg=launch.maxnreg,
    )
