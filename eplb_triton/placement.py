"""Placement algebra on ``[L, R]`` tensors, on any device, without host synchronisation.

* :func:`log2phy_from_rank`: the ``log2phy`` of a placement from ``phy2log`` and each slot's
  replica rank (the one construction of the torch family; the reference and the kernel have
  their own);
* :func:`stable_order` / :func:`stable_slots`: reorder a new placement within each GPU so that
  experts that stay on a GPU keep their slot, and only slots whose expert changes need weights.
"""

from __future__ import annotations

import torch

from ._validation import check_count


def log2phy_from_rank(
    phy2log: torch.Tensor, phyrank: torch.Tensor, num_experts: int, width: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``log2phy[l, e, r]``: the slot holding replica ``r`` of expert ``e``, ``-1`` past its count.

    Args:
        phy2log: ``[L, R]`` int64 expert of each slot.
        phyrank: ``[L, R]`` int64 replica number of each slot (``0 .. logcnt - 1`` per expert).
        num_experts: ``E``.
        width: columns ``X`` of the result, at least ``max(logcnt)``.
        out: optional ``[L, E, width]`` int64 buffer, rewritten in place.

    Returns:
        ``[L, E, width]`` int64.
    """
    L, R = phy2log.shape
    if out is None:
        out = torch.empty((L, num_experts, width), dtype=torch.int64, device=phy2log.device)
    out.fill_(-1)
    slots = torch.arange(R, device=phy2log.device).expand(L, R)
    out.view(L, -1).scatter_(1, phy2log * width + phyrank, slots)
    return out


def _occurrence(keys: torch.Tensor) -> torch.Tensor:
    """For each entry of each row, how many earlier entries of the row have the same key."""
    sorted_keys, order = torch.sort(keys, dim=1, stable=True)
    first = torch.searchsorted(sorted_keys, sorted_keys, right=False)
    occ_sorted = torch.arange(keys.shape[1], device=keys.device).expand_as(keys) - first
    return torch.empty_like(keys).scatter_(1, order, occ_sorted)


def _count_in(keys: torch.Tensor, sorted_other: torch.Tensor) -> torch.Tensor:
    """How many entries of each row of ``sorted_other`` equal each key."""
    return torch.searchsorted(sorted_other, keys, right=True) - torch.searchsorted(sorted_other, keys, right=False)


def stable_order(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """The per-GPU permutation of ``new_phy2log`` that keeps experts where they already are.

    Returns ``order [L, R]`` int64 such that ``new_phy2log.gather(1, order)`` is
    :func:`stable_slots`; apply the same gather to any per-slot tensor of the new placement
    (its replica ranks) to keep it aligned.
    """
    L, R = new_phy2log.shape
    P = check_count("num_gpus", num_gpus)
    if old_phy2log.shape != new_phy2log.shape or R % P:
        raise ValueError(
            f"phy2log shapes {tuple(old_phy2log.shape)}, {tuple(new_phy2log.shape)} and num_gpus {P} mismatch"
        )
    S = R // P
    dev = new_phy2log.device
    old = old_phy2log.to(dev, torch.int64)
    gpu = (torch.arange(R, device=dev) // S).expand(L, R)
    old_key = gpu * R + old  # (GPU, expert) keys: expert ids are < E <= R
    new_key = gpu * R + new_phy2log
    sorted_old, _ = torch.sort(old_key, dim=1)
    sorted_new, new_by_key = torch.sort(new_key, dim=1, stable=True)
    # an old slot stays if its GPU still wants that many copies of its expert
    keep = _occurrence(old_key) < _count_in(old_key, sorted_new)
    # new entries beyond the copies the GPU already had are the ones to place
    surplus = _occurrence(new_key) >= _count_in(new_key, sorted_old)
    # a kept slot takes the new entry with its (GPU, expert) key and occurrence: the k-th copy in
    # slot order of the sorted new keys
    first_new = torch.searchsorted(sorted_new, old_key, right=False)
    kept_source = new_by_key.gather(1, (first_new + _occurrence(old_key)).clamp_max(R - 1))
    # k-th free slot of a GPU <- k-th surplus entry of that GPU (both in slot order)
    free = ~keep
    free_rank = (torch.cumsum(free.view(L, P, S).long(), dim=2) - 1).view(L, R)
    surplus_rank = (torch.cumsum(surplus.view(L, P, S).long(), dim=2) - 1).view(L, R)
    # surplus_at[l, gpu * S + k] = the k-th surplus entry of that GPU (column R takes the others)
    index = torch.where(surplus, gpu * S + surplus_rank, torch.full_like(gpu, R))
    surplus_at = torch.full((L, R + 1), R, dtype=torch.int64, device=dev)
    surplus_at.scatter_(1, index, torch.arange(R, device=dev).expand(L, R))
    free_source = surplus_at.gather(1, gpu * S + free_rank.clamp_min(0))
    return torch.where(keep, kept_source, free_source)


def stable_slots(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Reorder the slots of ``new_phy2log`` within each GPU to keep experts where they already are.

    Each GPU keeps exactly the multiset of experts ``new_phy2log`` gives it (so every GPU load
    is unchanged); among its slots, an expert that the GPU already held stays in its old slot,
    and the experts it gains fill the freed slots in order. Vectorised, no host synchronisation.

    Args:
        old_phy2log, new_phy2log: ``[L, R]`` int64 placements.
        num_gpus: ``P``; GPU ``p`` holds slots ``p * R/P .. (p+1) * R/P - 1``.

    Returns:
        ``[L, R]`` int64, a per-GPU permutation of ``new_phy2log``.
    """
    return new_phy2log.gather(1, stable_order(old_phy2log, new_phy2log, num_gpus))
