"""Placement algebra on ``[L, R]`` tensors, on any device, without host synchronisation.

* :func:`log2phy_from_rank`: the ``log2phy`` of a placement from ``phy2log`` and each slot's
  replica rank (the one construction of the torch family; the reference and the kernel have
  their own);
* :func:`stable_order` / :func:`stable_slots`: reorder a new placement within each GPU so that
  experts that stay on a GPU keep their slot, and only slots whose expert changes need weights.
"""

from __future__ import annotations

import numpy as np
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


# ----------------------------------------------------------------------------------------------
# Relabelling a new placement to keep experts where an old one had them (docs/algorithm.md 10.3)
# ----------------------------------------------------------------------------------------------

_INF = 1 << 40  # larger than any reduced cost: overlaps are <= R <= 65536


def assign_max_overlap(overlap: torch.Tensor) -> torch.Tensor:
    """Exact maximum-weight perfect matching of each ``[n, n]`` matrix of a batch.

    The Hungarian algorithm in its shortest-augmenting-path form (Kuhn-Munkres with potentials,
    ``O(n^3)``) on ``cost = -overlap``, with 1-based rows and columns and column 0 as the root:
    rows are added in order ``1 .. n``; each step scans the unused columns in index order and takes
    the first minimum of the reduced costs. Integer arithmetic throughout, so the matching is the
    same on every device: NumPy on the CPU, one Triton program per matrix on a GPU
    (:mod:`eplb_triton.kernels.assign`, up to ``launch.MAX_ASSIGN = 256`` rows, without host
    synchronisation; larger problems on a GPU are solved on the host).

    Args:
        overlap: ``[B, n, n]`` integer tensor, ``overlap[b, i, j]`` the gain of giving row ``i``
            column ``j``; ``0 <= overlap < 2**31``.

    Returns:
        ``[B, n]`` int64 on ``overlap``'s device: the column of each row.
    """
    from .launch import MAX_ASSIGN

    if overlap.device.type != "cpu" and overlap.shape[1] <= MAX_ASSIGN:
        from .kernels.assign import assign_max_overlap_triton

        return assign_max_overlap_triton(overlap)
    # the CPU, or more than MAX_ASSIGN GPUs in one problem on a GPU: one round trip to the host
    result = _assign_numpy(overlap.to(device="cpu", dtype=torch.int64).numpy())
    return torch.from_numpy(result).to(overlap.device)


def _assign_numpy(overlap: np.ndarray) -> np.ndarray:
    B, n, _ = overlap.shape
    cost = np.zeros((B, n + 1, n + 1), np.int64)
    cost[:, 1:, 1:] = -overlap
    u = np.zeros((B, n + 1), np.int64)  # row potentials
    v = np.zeros_like(u)  # column potentials
    p = np.zeros_like(u)  # p[j]: the row holding column j (0: none)
    way = np.zeros_like(u)  # the previous column on the shortest path
    everyone = np.arange(B)
    for i in range(1, n + 1):
        p[:, 0] = i
        j0 = np.zeros(B, np.int64)
        minv = np.full((B, n + 1), _INF, np.int64)
        used = np.zeros((B, n + 1), bool)
        b = everyone  # the problems whose path for row i is still growing
        while b.size:
            k = np.arange(b.size)
            used[b, j0[b]] = True
            i0 = p[b, j0[b]]
            us, mv = used[b], minv[b]
            cur = cost[b, i0] - u[b, i0][:, None] - v[b]
            better = ~us & (cur < mv)
            mv = np.where(better, cur, mv)
            way[b] = np.where(better, j0[b][:, None], way[b])
            free = np.where(us, _INF, mv)
            j1 = free.argmin(axis=1)  # the first minimum
            delta = free[k, j1]
            step = np.where(us, delta[:, None], 0)
            ub = u[b]
            # used columns hold distinct rows; unused ones add 0 (row 0 may repeat there)
            ub[k[:, None], p[b]] += step
            u[b] = ub
            v[b] -= step
            minv[b] = np.where(us, mv, mv - delta[:, None])
            j0[b] = j1
            b = b[p[b, j1] != 0]
        b = everyone[j0 != 0]
        while b.size:  # augment along the path back to column 0
            j1 = way[b, j0[b]]
            p[b, j0[b]] = p[b, j1]
            j0[b] = j1
            b = b[j1 != 0]
    col = np.empty((B, n + 1), np.int64)  # p[:, 0] is scratch (the last row added): skip it
    np.put_along_axis(col, p[:, 1:], np.broadcast_to(np.arange(1, n + 1), (B, n)), axis=1)
    return col[:, 1:] - 1


def _block_overlap(new: torch.Tensor, old: torch.Tensor, blocks: int, num_experts: int) -> torch.Tensor:
    """``[L, blocks, blocks]``: experts (with multiplicity) that new block ``i`` and old block ``j`` share."""
    L, R = new.shape
    width = R // blocks
    block = (torch.arange(R, device=new.device) // width).expand(L, R)

    def counts(phy: torch.Tensor) -> torch.Tensor:
        c = torch.zeros((L, blocks * num_experts), dtype=torch.float64, device=new.device)
        c.scatter_add_(1, block * num_experts + phy, torch.ones_like(phy, dtype=torch.float64))
        return c.view(L, blocks, num_experts)

    cn, co = counts(new), counts(old)
    # Copies of one expert in one block: at most ``width``; read the real bound only on the CPU.
    top = int(cn.max()) if new.device.type == "cpu" else width
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
    num_nodes: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Renumber the nodes and GPUs of a placement, then its slots, to keep experts where they were.

    Nodes first (when ``num_nodes > 1``): an exact assignment of new nodes to old node positions
    maximising the experts they share; then the GPUs within each node the same way; then
    :func:`stable_order` within each GPU. GPU loads and every GPU's set of experts are unchanged.

    Returns the relabelled ``(phy2log, phyrank)``.
    """
    L, R = phy2log.shape
    old = old_phy2log.to(phy2log.device, torch.int64)
    N, P = num_nodes, num_gpus
    if N > 1:
        node = assign_max_overlap(_block_overlap(phy2log, old, N, num_experts))
        phy2log, phyrank = (_move_blocks(t, node, R // N) for t in (phy2log, phyrank))
    Pn, S = P // N, R // P
    full = _block_overlap(phy2log, old, P, num_experts).view(L, N, Pn, N, Pn)
    idx = torch.arange(N, device=phy2log.device)
    within = full[:, idx, :, idx, :]  # [N, L, Pn, Pn]: new and old GPUs of the same node
    within = within.permute(1, 0, 2, 3).reshape(L * N, Pn, Pn)
    local = assign_max_overlap(within).view(L, N, Pn)
    gpu = (local + idx[None, :, None] * Pn).view(L, P)
    phy2log, phyrank = (_move_blocks(t, gpu, S) for t in (phy2log, phyrank))
    order = stable_order(old, phy2log, P)
    return phy2log.gather(1, order), phyrank.gather(1, order)


def slot_order_ranks(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica ranks numbered in slot order, and the replica counts, of a placement given as ``phy2log``."""
    L, R = phy2log.shape
    cnt = torch.zeros((L, num_experts), dtype=torch.int64, device=phy2log.device)
    cnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    return _occurrence(phy2log), cnt


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
