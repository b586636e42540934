"""Per-step load recording fused with token dispatch: the first job of the online loop.

:func:`record_dispatch` adds one MoE layer's routed ``topk_ids`` to per-expert counts and maps each
token to a physical replica of its expert; on CUDA it is one Triton kernel
(:mod:`eplb_triton.kernels.dispatch`), elsewhere :func:`eplb_triton.reference.record_dispatch` (torch).
"""

from __future__ import annotations

import torch

from . import backends
from ._validation import EplbArgumentError


def _check_dispatch_args(topk_ids, log2phy, logcnt, counts) -> None:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise EplbArgumentError(
            f"topk_ids must be a 2-D tensor [num_tokens, top_k], got {getattr(topk_ids, 'shape', topk_ids)}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if log2phy.dim() != 2 or logcnt.shape != (log2phy.shape[0],) or counts.shape != logcnt.shape:
        raise EplbArgumentError(
            f"log2phy must be [E, X] with logcnt and counts [E], got {tuple(log2phy.shape)}, "
            f"{tuple(logcnt.shape)}, {tuple(counts.shape)}"
        )
    if counts.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"counts must be int64 (or int32, which wraps past 2**31 - 1), got {counts.dtype}")
    devices = {t.device for t in (topk_ids, log2phy, logcnt, counts)}
    if len(devices) != 1:
        raise EplbArgumentError(
            f"topk_ids, log2phy, logcnt and counts must be on one device, got {sorted(map(str, devices))}"
        )


def record_dispatch(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    counts: torch.Tensor,
    *,
    invalid: torch.Tensor | None = None,
    check: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Count one layer's routed tokens per expert and map each to a physical replica.

    Token ``t``'s choice ``e`` goes to replica ``t % logcnt[e]`` of ``e``, i.e. slot
    ``log2phy[e, t % logcnt[e]]``: even and deterministic. Ids outside ``[0, E)`` are not counted
    and get slot ``-1``.

    Args:
        topk_ids: ``[num_tokens, top_k]`` int32/int64 logical expert ids.
        log2phy: ``[E, X]`` slots of each expert (``-1`` padded), e.g. one layer of a planner's.
        logcnt: ``[E]`` replicas of each expert.
        counts: ``[E]`` int64, accumulated in place (int32 is accepted and wraps past ``2**31 - 1``).
        invalid: optional ``[1]`` int64 (or int32) device counter of invalid ids, accumulated in place.
        check: raise ``ValueError`` on invalid ids (synchronises with the host).
        backend: ``"auto"`` (the Triton kernel for CUDA tensors, else torch), ``"triton"``, or
            ``"cpu"`` / ``"reference"`` (both: :func:`eplb_triton.reference.record_dispatch`, torch on
            any device).

    Returns:
        ``[num_tokens, top_k]`` physical slot ids, ``topk_ids``' dtype.
    """
    _check_dispatch_args(topk_ids, log2phy, logcnt, counts)
    served = backends.resolve(backend, topk_ids.device)
    if invalid is None:
        invalid = torch.zeros(1, dtype=torch.int64, device=topk_ids.device)
    before = invalid.clone() if check else None
    phy = served.record(topk_ids, log2phy, logcnt, counts, invalid)
    if check:
        n_bad = int((invalid - before).item())
        if n_bad:
            E = logcnt.shape[0]
            raise EplbArgumentError(
                f"topk_ids has {n_bad} ids outside [0, {E}) (they were skipped and dispatched to -1)"
            )
    return phy
