"""Placement algebra on ``[L, R]`` tensors, on any device, without host synchronisation.

* :func:`initial_placement`: the layout of a freshly built model (slot ``q`` holds expert ``q % E``);
* :func:`log2phy_from_rank`: the ``log2phy`` of a placement from ``phy2log`` and each slot's
  replica rank (the one construction of the torch family; the reference and the kernel have
  their own);
* :func:`stable_order` / :func:`stable_slots`: reorder a new placement within each GPU so that
  experts that stay on a GPU keep their slot, and only slots whose expert changes need weights;
  :func:`reorder_log2phy` follows such a reordering in ``log2phy``;
* :func:`relabel`: renumber a new placement's nodes and GPUs, then slots, to keep experts where an
  old placement had them (with the backend's exact assignment, docs/algorithm.md 10.3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._validation import EplbArgumentError, check_count


def initial_placement(num_layers: int, num_experts: int, num_replicas: int) -> torch.Tensor:
    """The layout of a freshly built expert-parallel model: slot ``q`` holds expert ``q % E``.

    Expert ``e`` sits in slot ``e``; the ``R - E`` redundant slots hold experts ``0, 1, ...`` again
    (vLLM's initial map). GPU ``p`` holds slots ``p * R/P .. (p+1) * R/P - 1``. Pass it as
    ``initial_phy2log`` to :class:`~eplb_triton.OnlineBalancer` / :class:`~eplb_triton.EplbPlanner`
    when the model's expert weights were built this way.

    Returns:
        ``[num_layers, num_replicas]`` int64 on the CPU.
    """
    L = check_count("num_layers", num_layers)
    E = check_count("num_experts", num_experts)
    R = check_count("num_replicas", num_replicas)
    if R < E:
        raise EplbArgumentError(f"num_replicas ({R}) must be >= num_experts ({E})")
    return (torch.arange(R) % E).expand(L, R).clone()


def log2phy_from_rank(
    phy2log: torch.Tensor, phyrank: torch.Tensor, num_experts: int, width: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``log2phy[l, e, r]``: the slot holding replica ``r`` of expert ``e``, ``-1`` past its count.

    Args:
        phy2log: ``[L, R]`` int64 expert of each slot (``-1``: an empty slot, listed nowhere).
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
    slots = torch.arange(R, device=phy2log.device).expand(L, R)
    empty = phy2log < 0  # slots of lost GPUs hold no expert: they write into a column past the end
    flat = torch.where(empty, num_experts * width, phy2log * width + phyrank)
    spill = torch.full((L, num_experts * width + 1), -1, dtype=torch.int64, device=phy2log.device)
    spill.scatter_(1, flat, slots)
    out.view(L, -1).copy_(spill[:, :-1])
    return out


def occurrence(keys: torch.Tensor) -> torch.Tensor:
    """For each entry of each row, how many earlier entries of the row have the same key."""
    sorted_keys, order = torch.sort(keys.contiguous(), dim=1, stable=True)  # searchsorted wants rows in memory order
    first = torch.searchsorted(sorted_keys, sorted_keys, right=False)
    occ_sorted = torch.arange(keys.shape[1], device=keys.device).expand_as(keys) - first
    return torch.empty_like(keys).scatter_(1, order, occ_sorted)


def _count_in(keys: torch.Tensor, sorted_other: torch.Tensor) -> torch.Tensor:
    """How many entries of each row of ``sorted_other`` equal each key."""
    sorted_other, keys = sorted_other.contiguous(), keys.contiguous()
    return torch.searchsorted(sorted_other, keys, right=True) - torch.searchsorted(sorted_other, keys, right=False)


def stable_order(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """The per-GPU permutation of ``new_phy2log`` that keeps experts where they already are.

    Returns ``order [L, R]`` int64 such that ``new_phy2log.gather(1, order)`` is
    :func:`stable_slots`; apply the same gather to any per-slot tensor of the new placement
    (its replica ranks; its ``log2phy`` through :func:`reorder_log2phy`) to keep it aligned.
    Entries of ``old_phy2log`` outside ``[0, R)``, such as ``-1`` for an empty slot, match nothing.
    """
    L, R = new_phy2log.shape
    P = check_count("num_gpus", num_gpus)
    if old_phy2log.shape != new_phy2log.shape or R % P:
        raise EplbArgumentError(
            f"old_phy2log {list(old_phy2log.shape)} and new_phy2log {list(new_phy2log.shape)} must have one shape "
            f"[L, R] with R a multiple of num_gpus ({P})"
        )
    S = R // P
    dev = new_phy2log.device
    old = old_phy2log.to(dev, torch.int64)
    old = torch.where((old >= 0) & (old < R), old, -1)  # an empty slot (-1) or a foreign id matches nothing
    gpu = (torch.arange(R, device=dev) // S).expand(L, R)
    # (GPU, expert) keys, expert + 1 in 0 .. R: an empty old slot is (GPU, 0), which no new slot has
    old_key = gpu * (R + 1) + (old + 1)
    new_key = gpu * (R + 1) + (new_phy2log + 1)
    sorted_old, _ = torch.sort(old_key, dim=1)
    sorted_new, new_by_key = torch.sort(new_key, dim=1, stable=True)
    # an old slot stays if its GPU still wants that many copies of its expert
    keep = occurrence(old_key) < _count_in(old_key, sorted_new)
    # new entries beyond the copies the GPU already had are the ones to place
    surplus = occurrence(new_key) >= _count_in(new_key, sorted_old)
    # a kept slot takes the new entry with its (GPU, expert) key and occurrence: the k-th copy in
    # slot order of the sorted new keys
    first_new = torch.searchsorted(sorted_new, old_key, right=False)
    kept_source = new_by_key.gather(1, (first_new + occurrence(old_key)).clamp_max(R - 1))
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


def reorder_log2phy(log2phy: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``log2phy [L, E, X]`` of a placement whose slots were reordered by ``phy2log.gather(1, order)``:
    each replica follows its expert to the new slot (``-1`` padding stays)."""
    L, R = order.shape
    new_slot = torch.empty_like(order).scatter_(1, order, torch.arange(R, device=order.device).expand(L, R))
    moved = new_slot.gather(1, log2phy.clamp_min(0).reshape(L, -1)).view_as(log2phy)
    return torch.where(log2phy >= 0, moved, log2phy)


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


# ----------------------------------------------------------------------------------------------
# Relabelling a new placement to keep experts where an old one had them (docs/algorithm.md 10.3)
# ----------------------------------------------------------------------------------------------

Assign = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""A backend's exact assignment: ``(overlap [B, n, n], skip [B] bool | None) -> [B, n]`` column per row."""


def block_overlap(
    new: torch.Tensor, old: torch.Tensor, blocks: int, num_experts: int, read_bound: bool = False
) -> torch.Tensor:
    """``[L, blocks, blocks]``: experts (with multiplicity) that new block ``i`` and old block ``j`` share;
    ids outside ``[0, num_experts)`` match nothing.

    ``read_bound``: read the largest number of copies of one expert in one block from the data (a
    host read; worth it where that is free) instead of taking the block width as the bound.
    """
    L, R = new.shape
    width = R // blocks
    block = (torch.arange(R, device=new.device) // width).expand(L, R)

    def counts(phy: torch.Tensor) -> torch.Tensor:
        # ids outside [0, E) (an empty slot, an expert foreign to this subproblem) count nowhere
        real = (phy >= 0) & (phy < num_experts)
        c = torch.zeros((L, blocks * num_experts), dtype=torch.float64, device=new.device)
        c.scatter_add_(1, block * num_experts + phy.clamp(0, num_experts - 1), real.double())
        return c.view(L, blocks, num_experts)

    cn, co = counts(new), counts(old)
    top = int(cn.max()) if read_bound else width  # copies of one expert in one block
    total = torch.zeros((L, blocks, blocks), dtype=torch.float64, device=new.device)
    # min(a, b) = sum over k >= 1 of [a >= k][b >= k]; small integers, so the float64 sums are exact
    for k in range(1, top + 1):
        total += (cn >= k).double() @ (co >= k).double().transpose(1, 2)
    return total.to(torch.int64)


def _move_blocks(t: torch.Tensor, target: torch.Tensor, width: int) -> torch.Tensor:
    """Move block ``i`` (``width`` consecutive columns) of each row of ``t`` to block ``target[:, i]``."""
    L, R = t.shape
    src = torch.arange(R, device=t.device).expand(L, R)
    dest = target.gather(1, src // width) * width + src % width
    return torch.empty_like(t).scatter_(1, dest, t)


def relabel(
    old_phy2log: torch.Tensor, phy2log: torch.Tensor, phyrank: torch.Tensor, num_experts: int, num_gpus: int,
    num_nodes: int, assign: Assign, skip: torch.Tensor | None = None, read_bounds: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Renumber the nodes and GPUs of a placement, then its slots, to keep experts where they were.

    Nodes first (when ``num_nodes > 1``): an exact assignment of new nodes to old node positions
    maximising the experts they share; then the GPUs within each node the same way; then
    :func:`stable_order` within each GPU. GPU loads and every GPU's set of experts are unchanged.
    ``assign`` is the backend's exact assignment; ``skip [L]`` bool marks layers whose result the
    caller discards (their assignments are not solved); ``read_bounds``: see :func:`block_overlap`.

    Returns the relabelled ``(phy2log, phyrank)``.
    """
    L, R = phy2log.shape
    old = old_phy2log.to(phy2log.device, torch.int64)
    N, P = num_nodes, num_gpus
    if N > 1:
        node = assign(block_overlap(phy2log, old, N, num_experts, read_bounds), skip)
        phy2log, phyrank = (_move_blocks(t, node, R // N) for t in (phy2log, phyrank))
    Pn, S = P // N, R // P
    full = block_overlap(phy2log, old, P, num_experts, read_bounds).view(L, N, Pn, N, Pn)
    idx = torch.arange(N, device=phy2log.device)
    within = full[:, idx, :, idx, :]  # [N, L, Pn, Pn]: new and old GPUs of the same node
    within = within.permute(1, 0, 2, 3).reshape(L * N, Pn, Pn)
    local = assign(within, None if skip is None else skip.repeat_interleave(N)).view(L, N, Pn)
    gpu = (local + idx[None, :, None] * Pn).view(L, P)
    phy2log, phyrank = (_move_blocks(t, gpu, S) for t in (phy2log, phyrank))
    order = stable_order(old, phy2log, P)
    return phy2log.gather(1, order), phyrank.gather(1, order)


def replica_counts(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[L, E]`` int64: the slots of each expert in ``phy2log [L, R]``; an empty slot (``-1``, a lost
    GPU's) counts nowhere."""
    held = phy2log >= 0
    cnt = torch.zeros((phy2log.shape[0], num_experts), dtype=torch.int64, device=phy2log.device)
    return cnt.scatter_add_(1, phy2log.clamp_min(0), held.to(torch.int64))


def slot_order_ranks(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica ranks numbered in slot order, and the replica counts, of a placement given as ``phy2log``."""
    return occurrence(phy2log), replica_counts(phy2log, num_experts)


def max_gpu_load(weight32: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """The largest GPU load of each layer as the search defines it (docs/algorithm.md 10.1).

    ``float64(w) / float64(cnt)`` per replica, summed per GPU in slot order from ``0.0``.
    ``weight32`` must already be float32. Returns ``[L]`` float64.
    """
    L, R = phy2log.shape
    S = R // num_gpus
    share = weight32.to(torch.float64) / logcnt.to(torch.float64)
    per_slot = share.gather(1, phy2log).view(L, num_gpus, S)
    total = torch.zeros((L, num_gpus), dtype=torch.float64, device=phy2log.device)
    for s in range(S):
        total += per_slot[:, :, s]
    return total.amax(dim=1)


# ----------------------------------------------------------------------------------------------
# Per-step dispatch: routed entries to slots by quotas (eplb_triton.split.assign_slots, in torch)
# ----------------------------------------------------------------------------------------------


def assign_slots(
    topk_ids: torch.Tensor, quota: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """:func:`eplb_triton.split.assign_slots` on any device, without host synchronisation.

    The entries of expert ``e`` are numbered in row-major order of ``topk_ids`` from ``offsets[e]``
    on; entry number ``n`` goes to the first replica ``r`` with ``n < sum(quota[log2phy[e, :r + 1]])``
    (a search in the cumulative quotas of all replicas); past the quotas, and for ids outside
    ``[0, E)``, the slot is ``-1``. Returns ``[T, k]`` int64.
    """
    E, X = log2phy.shape
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    expert = torch.where(valid, flat, E)  # invalid entries sort last, in a bin of their own
    order = torch.sort(expert, stable=True).indices  # by expert, row-major within an expert
    sorted_expert = expert[order]
    per_expert = torch.bincount(expert, minlength=E + 1)
    first = torch.cumsum(per_expert, 0) - per_expert
    number = torch.arange(flat.numel(), device=dev) - first[sorted_expert]
    e = sorted_expert.clamp_max(E - 1)
    if offsets is not None:
        number = number + offsets.to(dev, torch.int64)[e]
    live = torch.arange(X, device=dev) < logcnt.to(dev)[:, None]
    rep = torch.where(live, quota.to(dev, torch.int64)[log2phy.clamp_min(0)], 0)  # [E, X] quota of each replica
    total = rep.sum(dim=1)
    bounds = torch.cumsum(rep.reshape(-1), 0)  # replica (e, r) takes the step's positions below bounds[e * X + r]
    position = torch.cumsum(total, 0)[e] - total[e] + number
    cell = torch.searchsorted(bounds, position, right=True).clamp_max(E * X - 1)
    within = (number < total[e]) & (sorted_expert < E)  # past its expert's quotas: inconsistent inputs
    slot = torch.where(within, log2phy.reshape(-1)[cell], -1)
    out = torch.empty_like(flat)
    out[order] = slot
    return out.view(topk_ids.shape)
