"""Thin launcher of the exact maximum-overlap assignment kernel (:mod:`._assign`).

:func:`eplb_triton.launch.assign_launch` picks the grid, block size and warps; :func:`assign` binds
tensors to the kernel's arguments; :func:`assign_max_overlap_triton` allocates the output and
launches once, without host synchronisation.
"""

from __future__ import annotations

import torch

from eplb_triton.launch import Launch, assign_launch

from ._assign import _assign_kernel


def assign(overlap: torch.Tensor, out: torch.Tensor, launch: Launch) -> None:
    """``overlap [B, n, n]`` int64, contiguous; ``out [B, n]`` int64 on the same device."""
    _assign_kernel[launch.grid](
        # inputs
        overlap,
        # outputs
        out,
        **launch.constexprs,
        num_warps=launch.num_warps,
    )


def assign_max_overlap_triton(overlap: torch.Tensor) -> torch.Tensor:
    """What :func:`eplb_triton.placement.assign_max_overlap` returns, in one launch.

    Args:
        overlap: ``[B, n, n]`` integer, ``1 <= n <= 256``; ``overlap[b, i, j]`` the gain of giving
            row ``i`` column ``j``.

    Returns:
        ``[B, n]`` int64: the column of each row, on ``overlap``'s device.

    Example:
        >>> assign_max_overlap_triton(torch.tensor([[[0, 3], [2, 0]]]))
        tensor([[1, 0]])
    """
    B, n, _ = overlap.shape
    out = torch.empty((B, n), dtype=torch.int64, device=overlap.device)
    if B == 0 or n == 0:
        return out
    assign(overlap.to(torch.int64).contiguous(), out, assign_launch(B, n))
    return out
