"""Thin launcher of the record + dispatch kernel (:mod:`._dispatch`); shapes and block sizes come
from :mod:`eplb_triton.launch`."""

from __future__ import annotations

import torch

from ._dispatch import _record_dispatch_kernel


def record_dispatch(
    ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    counts: torch.Tensor,
    invalid: torch.Tensor,
    out: torch.Tensor,
    launch,
) -> torch.Tensor:
    """Count and map the ``[T, K]`` contiguous ``ids`` of one layer into ``out``; no host sync.

    ``log2phy``, ``logcnt`` and ``counts`` may have any strides; ``invalid`` is one element."""
    T, K = ids.shape
    _record_dispatch_kernel[launch.grid](
        # inputs
        ids,
        log2phy,
        logcnt,
        # outputs
        counts,
        out,
        invalid,
        T * K,
        log2phy.stride(0),
        log2phy.stride(1),
        logcnt.stride(0),
        counts.stride(0),
        **launch.constexprs,
        num_warps=launch.num_warps,
    )
    return out
