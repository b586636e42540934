"""Thin launcher of the exact maximum-overlap assignment kernel (:mod:`._assign`).

:func:`eplb_triton.launch.assign_max_overlap` allocates the output and picks the grid, block size
and warps (``launch.assign_launch``); :func:`assign` only binds tensors to the kernel's arguments.
"""

from __future__ import annotations

import torch

from ._assign import _assign_kernel


def assign(overlap: torch.Tensor, skip: torch.Tensor, out: torch.Tensor, launch) -> None:
    """``overlap [B, n, n]`` int64 and ``skip [B]`` int32, contiguous; ``out [B, n]`` int64 on the same device."""
    _assign_kernel[launch.grid](
        # inputs
        overlap,
        skip,
        # outputs
        out,
        **launch.constexprs,
        num_warps=launch.num_warps,
    )
