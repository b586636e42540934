"""The fast CPU path: docs/algorithm.md vectorised over all rows (layers, and nodes) with NumPy.

Each greedy loop of the spec is sequential over its items, so the Python loops that remain
run over items (packing steps, redundant replicas, experts of a group); every step handles all
rows at once. The results are identical to :mod:`eplb_triton.reference`, ties included:

* sorting uses a stable argsort of the negated loads, i.e. decreasing load, lower index first;
* the least-loaded pack is an ``argmin`` over the float32 bit patterns of the pack loads
  (non-negative floats order like their bits), with full packs set to the largest int32, so a
  pack whose load overflowed to ``inf`` still ranks below a full one; ``argmin``/``argmax``
  return the first extreme, which is the spec's "lower index first";
* every sum is a float32 sum taken in the spec's order.

Functions here take and return NumPy arrays; :mod:`eplb_triton.api` wraps them for tensors.
"""

from __future__ import annotations

import numpy as np

from ._validation import (
    PAIR_PASSES,
    PAIR_SWAP_MAX_REPLICAS,
    PAIR_SWAP_MAX_SLOTS,
    REPAIR_PASSES,
    REPAIR_UNIT_BITS,
    EplbArgumentError,
)

_FULL = np.iinfo(np.int32).max
_PAIR_CHUNK = 1 << 22  # pair-swap candidates evaluated at once (float64: 32 MiB per array)


def check_values(w32: np.ndarray, name: str = "weight") -> None:
    """``w32``, the float32 loads: every entry finite and >= 0 (else the API's error, naming the first)."""
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(w32) & (w32 >= 0))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise EplbArgumentError(
            f"{name} must be finite and >= 0 in float32, found {float(w32[row, col])} at [{row}, {col}]"
        )


def _rows_offset(shape: tuple[int, int]) -> np.ndarray:
    """``[X, 1]`` flat offset of each row of a C-contiguous ``[X, n]`` array."""
    return (np.arange(shape[0], dtype=np.int64) * shape[1])[:, None]


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``take_along_axis(a, idx, axis=1)`` by flat indexing (C-contiguous ``a``), without its overhead."""
    return a.reshape(-1)[idx + _rows_offset(a.shape)]


def _put(out: np.ndarray, idx: np.ndarray, values: np.ndarray) -> None:
    """``put_along_axis(out, idx, values, axis=1)`` by flat indexing (C-contiguous ``out``)."""
    out.reshape(-1)[idx + _rows_offset(out.shape)] = values


def log2phy(phy2log: np.ndarray, rank: np.ndarray, num_experts: int, width: int) -> np.ndarray:
    """``[L, E, width]`` int64: ``log2phy[l, e, r]`` is the slot of replica ``r`` of ``e``, ``-1`` past its
    count; slots with ``phy2log < 0`` (empty: a lost GPU's) are listed nowhere."""
    L, R = phy2log.shape
    slots = np.broadcast_to(np.arange(R, dtype=np.int64), (L, R))
    if (phy2log >= 0).all():  # no empty slot: write in place, the result stays C-contiguous (no copy later)
        out = np.full((L, num_experts * width), -1, np.int64)
        _put(out, phy2log * width + rank, slots)
        return out.reshape(L, num_experts, width)
    out = np.full((L, num_experts * width + 1), -1, np.int64)  # the last column takes the empty slots
    _put(out, np.where(phy2log < 0, num_experts * width, phy2log * width + rank), slots)
    return np.ascontiguousarray(out[:, :-1]).reshape(L, num_experts, width)


def slot_order_ranks(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rank [L, R], logcnt [L, E])`` int64 of a placement given as ``phy2log``: replicas numbered
    in slot order (:func:`eplb_triton.placement.slot_order_ranks`)."""
    L, R = phy2log.shape
    order = np.argsort(phy2log, axis=1, kind="stable")
    keys = np.take_along_axis(phy2log, order, axis=1)
    start = np.maximum.accumulate(np.where(np.diff(keys, axis=1, prepend=-1) != 0, np.arange(R), 0), axis=1)
    rank = np.empty((L, R), np.int64)
    _put(rank, order, np.arange(R) - start)
    cnt = np.zeros((L, num_experts), np.int64)
    np.add.at(cnt, (np.repeat(np.arange(L), R), phy2log.ravel()), 1)
    return rank, cnt


_INF_BITS = np.int64(0x7F800000)  # float32 +inf: the largest bit pattern of a valid (non-negative) load


def _decreasing_order(w: np.ndarray) -> np.ndarray:
    """Per row, the item indices by decreasing weight, lower index first among equals.

    One int64 key per item, ``(inf bits - weight bits) << 32 | index``: weights are non-negative
    float32 (``-0.0`` already made ``+0.0``), which order like their bit patterns, and the keys are
    distinct, so a plain sort of the keys gives the order, and its low bits the indices."""
    bits = w.view(np.int32).astype(np.int64)
    key = ((_INF_BITS - bits) << 32) | np.arange(w.shape[1], dtype=np.int64)
    key.sort(axis=1)
    return key & 0xFFFFFFFF


def balanced_packing(w: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """``w``: float32 ``[X, n]``. Returns ``(pack, rank)``, int64 ``[X, n]``."""
    X, n = w.shape
    P = num_packs
    capacity = n // P
    if capacity == 1:
        return np.broadcast_to(np.arange(n, dtype=np.int64), (X, n)).copy(), np.zeros((X, n), np.int64)
    w = w + np.float32(0.0)  # -0.0 as +0.0: the pack keys compare float32 bit patterns
    order = _decreasing_order(w)
    w_cols = np.ascontiguousarray(_take(w, order).T)  # [n, X]: item t of every row, contiguous
    pack_sorted = np.empty((n, X), np.int64)
    rank_sorted = np.empty((n, X), np.int64)
    # The first round needs no search (docs/algorithm.md section 6): while every item taken so far
    # weighs > 0, item k finds packs 0..k-1 loaded and k..P-1 empty, so it goes to pack k.
    positive = (w_cols > 0).sum(axis=0).min() if X else 0
    first = min(P, int(positive) + 1, n)
    pack_sorted[:first] = np.arange(first)[:, None]
    rank_sorted[:first] = 0
    counts = np.zeros(X * P, np.int64)
    key = np.zeros((X, P), np.int32)  # bits of the pack's float32 load while it has room, _FULL once full
    key_flat = key.reshape(-1)
    load_flat = key_flat.view(np.float32)
    counts.reshape(X, P)[:, :first] = 1
    key[:, :first] = w_cols[:first].T.view(np.int32)
    base = np.arange(X, dtype=np.int64) * P
    with np.errstate(over="ignore"):  # float32 overflow to inf is part of the spec
        for t in range(first, n):
            p = key.argmin(axis=1)
            flat = base + p
            r = counts[flat]
            pack_sorted[t] = p
            rank_sorted[t] = r
            new_load = load_flat[flat] + w_cols[t]
            counts[flat] = r + 1
            key_flat[flat] = np.where(r + 1 < capacity, new_load.view(np.int32), _FULL)
    pack = np.empty((X, n), np.int64)
    rank = np.empty((X, n), np.int64)
    _put(pack, order, pack_sorted.T)
    _put(rank, order, rank_sorted.T)
    return pack, rank


def replicate_experts(w: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``w``: float32 ``[X, E]``. Returns ``(phy2log, rank, cnt, share)``.

    ``share[x, e] = w[x, e] / cnt[x, e]`` (float32) is the load of each replica of ``e``.
    """
    X, E = w.shape
    phy2log = np.empty((X, num_phy), np.int64)
    phy2log[:, :E] = np.arange(E)
    rank = np.zeros((X, num_phy), np.int64)
    cnt = np.ones(X * E, np.int64)
    share = w.copy()  # w / 1 == w exactly
    share_flat = share.reshape(-1)
    w_flat = w.reshape(-1)
    base = np.arange(X, dtype=np.int64) * E
    for i in range(E, num_phy):
        e = share.argmax(axis=1)
        flat = base + e
        c = cnt[flat]
        phy2log[:, i] = e
        rank[:, i] = c
        cnt[flat] = c + 1
        share_flat[flat] = w_flat[flat] / (c + 1).astype(np.float32)
    return phy2log, rank, cnt.reshape(X, E), share


def rebalance_experts_hierarchical(
    w: np.ndarray, R: int, G: int, N: int, P: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w``: float32 ``[L, E]``, C-contiguous. Returns ``(phy2log [L, R], phyrank [L, R], logcnt [L, E])``."""
    L, E = w.shape
    gs, gpn, En, Rn, Pn, S = E // G, G // N, E // N, R // N, P // N, R // P

    # 1. Groups to nodes and the node-major renumbering (mlog). With one group per node the
    #    packing is the identity and the group loads are not needed.
    if gpn == 1:
        gpack, grank = np.broadcast_to(np.arange(G), (L, G)), np.zeros((L, G), np.int64)
    else:
        w3 = w.reshape(L, G, gs)
        gload = np.zeros((L, G), np.float32)
        for k in range(gs):  # float32, in the spec's order
            gload += w3[:, :, k]
        gpack, grank = balanced_packing(gload, N)
    log2mlog = (((gpack * gpn + grank) * gs)[:, :, None] + np.arange(gs)).reshape(L, E)
    mlog2log = np.empty((L, E), np.int64)
    _put(mlog2log, log2mlog, np.broadcast_to(np.arange(E), (L, E)))

    # 2. Replicas within each node: one row per (layer, node).
    wn = _take(w, mlog2log).reshape(L * N, En)
    phy2mlog, phyrank, mlogcnt, share = replicate_experts(wn, Rn)

    # 3. Slots to GPUs within each node.
    items = _take(share, phy2mlog)
    pack, rk = balanced_packing(items, Pn)

    # 4. Back to global numbering.
    node = np.arange(N)[None, :, None]
    item_log = _take(mlog2log, (phy2mlog.reshape(L, N, Rn) + node * En).reshape(L, R))
    item_slot = ((pack * S + rk).reshape(L, N, Rn) + node * Rn).reshape(L, R)
    phy2log = np.empty((L, R), np.int64)
    rank = np.empty((L, R), np.int64)
    _put(phy2log, item_slot, item_log)
    _put(rank, item_slot, phyrank.reshape(L, R))
    logcnt = _take(mlogcnt.reshape(L, E), log2mlog)
    return phy2log, rank, logcnt


# ----------------------------------------------------------------------------------------------
# The exact assignment of the relabelling (docs/algorithm.md 10.3)
# ----------------------------------------------------------------------------------------------

COST_INF = 1 << 40  # larger than any reduced cost: overlaps are <= R <= 65536; the kernel's COST_INF


def assign_max_overlap(overlap: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
    """Exact maximum-weight perfect matching of each ``[n, n]`` matrix of ``overlap [B, n, n]`` (int64).

    The Hungarian algorithm in its shortest-augmenting-path form (Kuhn-Munkres with potentials,
    ``O(n^3)``) on ``cost = -overlap``, with 1-based rows and columns and column 0 as the root:
    rows are added in order ``1 .. n``; each step scans the unused columns in index order and takes
    the first minimum of the reduced costs (docs/algorithm.md 10.3). Integer arithmetic throughout,
    so the Triton kernel (:mod:`eplb_triton.kernels._assign`) returns the same matching. Gains must
    satisfy ``0 <= overlap < 2**31``. ``skip [B]`` bool: problems answered by the identity, unsolved.

    Returns ``[B, n]`` int64: the column of each row.
    """
    B, n, _ = overlap.shape
    if skip is not None and skip.any():
        out = np.broadcast_to(np.arange(n, dtype=np.int64), (B, n)).copy()
        solve = ~skip
        if solve.any():
            out[solve] = assign_max_overlap(overlap[solve])
        return out
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
        minv = np.full((B, n + 1), COST_INF, np.int64)
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
            free = np.where(us, COST_INF, mv)
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


# ----------------------------------------------------------------------------------------------
# Beyond the greedy: the local search of docs/algorithm.md section 10.2, one move per row per round
# ----------------------------------------------------------------------------------------------


def _slot_sums(per_slot: np.ndarray, S: int) -> np.ndarray:
    """``[..., R]`` float64 per-slot loads -> ``[..., R/S]`` GPU loads, summed in slot order."""
    v = per_slot.reshape(*per_slot.shape[:-1], -1, S)
    total = v[..., 0].copy()
    for s in range(1, S):
        total += v[..., s]
    return total


def search(
    w: np.ndarray, phy: np.ndarray, rank: np.ndarray, cnt: np.ndarray, P: int, N: int,
    old: np.ndarray | None = None, budget: int | None = None, skip: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``w`` float32 ``[X, E]``; ``phy``/``rank`` ``[X, R]``, ``cnt`` ``[X, E]`` int64 (the start).

    Returns the searched ``(phy, rank, cnt)`` (new arrays), equal to :func:`reference.search`.
    Every round makes one move in each row still searching; rows that stop are set aside, and
    rows marked in ``skip [X]`` (bool) are never searched.
    """
    X = w.shape[0]
    R = phy.shape[1]
    out = [phy.copy(), rank.copy(), cnt.copy()]
    if P == 1 or X == 0:
        return tuple(out)
    ids = np.arange(X) if skip is None else np.flatnonzero(~skip)  # rows still searching
    if ids.size == 0:
        return tuple(out)
    w_searched = w[ids].astype(np.float64)
    w64 = w_searched
    state = [a[ids] for a in out]
    old = None if old is None else old[ids]
    searched = ids
    start_peak = None
    progress = None
    for _ in range(R):
        peak, at_peak, kind = _round(w64, *state, P, N, old, budget, progress)
        if start_peak is None:
            start_peak = peak
        moved = kind >= 0
        progress = (np.where(kind == 1, peak, np.inf), at_peak)
        if not moved.all():
            for o, st in zip(out, state, strict=True):
                o[ids[~moved]] = st[~moved]
            ids, state, w64 = ids[moved], [st[moved] for st in state], w64[moved]
            old = None if old is None else old[moved]
            progress = tuple(p[moved] for p in progress)
        if ids.size == 0:
            break
    for o, st in zip(out, state, strict=True):  # rows stopped by the round limit
        o[ids] = st
    # never worse than the start (docs/algorithm.md 10.2): a guard against float64 rounding
    final = _slot_sums(_take(w_searched / out[2][searched], out[0][searched]), R // P).max(axis=1)
    worse = searched[final > start_peak]
    for o, begin in zip(out, (phy, rank, cnt), strict=True):
        o[worse] = begin[worse]
    return tuple(out)


def _round(
    w64: np.ndarray, phy: np.ndarray, rank: np.ndarray, cnt: np.ndarray, P: int, N: int,
    old: np.ndarray | None, budget: int | None, progress: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """One round of docs/algorithm.md 10.2 on every row, in place. ``progress``: the previous round's
    ``(peak, GPUs at the peak)`` per row where it made a pair swap (peak ``inf`` elsewhere), or None.
    Returns ``(peak, at_peak, kind)`` per row, ``kind`` -1 (no move), 0 (a single move) or 1 (a pair
    swap)."""
    X, E = w64.shape
    R = phy.shape[1]
    S, Pn = R // P, P // N
    rows = np.arange(X)
    gpu = np.arange(R) // S
    share = w64 / cnt
    slot_share = np.take_along_axis(share, phy, axis=1)
    loads = _slot_sums(slot_share, S)
    peak = loads.max(axis=1)
    at_peak = (loads == peak[:, None]).sum(axis=1)
    go = np.ones(X, bool)  # False: the last move, a pair swap, lowered only its own rounded evaluation
    if progress is not None:
        go = (peak < progress[0]) | ((peak == progress[0]) & (at_peak < progress[1]))
    a = loads.argmax(axis=1)
    ia = a[:, None] * S + np.arange(S)  # [X, S] slots of the fullest GPU
    y = np.take_along_axis(phy, ia, axis=1)
    sy = np.take_along_axis(share, y, axis=1)
    if budget is not None:
        diff = phy != old  # [X, R]
        moved = diff.sum(axis=1)
        old_i = np.take_along_axis(old, ia, axis=1)
        diff_i = np.take_along_axis(diff, ia, axis=1)

    # --- swaps: slot i of the fullest GPU with slot j of another GPU of its node
    value = slot_share[:, None, :] + (peak[:, None] - sy)[:, :, None]  # (peak - sy) + sj
    np.maximum(value, (loads[:, gpu] - slot_share)[:, None, :] + sy[:, :, None], out=value)
    ok = gpu[None, :] != a[:, None]
    if N > 1:
        ok &= (gpu // Pn)[None, :] == (a // Pn)[:, None]
    ok = ok[:, None, :] & (phy[:, None, :] != y[:, :, None]) & (value < peak[:, None, None])
    if budget is not None:
        after = (
            moved[:, None, None] - diff_i[:, :, None] - diff[:, None, :]
            + (phy[:, None, :] != old_i[:, :, None]) + (y[:, :, None] != old[:, None, :])
        )  # fmt: skip
        ok &= after <= budget
        value = _budget_key(peak[:, None, None], value, after - moved[:, None, None])
    value = np.where(ok, value, np.inf).reshape(X, S * R)
    swap_at = value.argmin(axis=1)  # the first minimum: lowest (i, j)
    swap_value = value[rows, swap_at]
    swap_ok = ok.reshape(X, S * R)[rows, swap_at]

    # --- shifts: a copy of the donor x becomes a copy of y = phy[i]
    donor = (cnt >= 2)[:, None, :] & (np.arange(E)[None, None, :] != y[:, :, None])  # [X, S, E]
    if N > 1:  # the donor's node (of its lowest slot) must be y's
        first = np.full((X, E), R, np.int64)
        np.minimum.at(first, (np.repeat(rows, R), phy.reshape(-1)), np.tile(np.arange(R), X))
        enode = first // (R // N)
        donor &= enode[:, None, :] == np.take_along_axis(enode, y, axis=1)[:, :, None]
    x = np.where(donor, share[:, None, :], np.inf).argmin(axis=2)  # [X, S]
    has_x = np.take_along_axis(donor, x[:, :, None], axis=2)[:, :, 0]
    s2x = np.take_along_axis(w64, x, axis=1) / (np.take_along_axis(cnt, x, axis=1) - 1).clip(1)
    s2y = np.take_along_axis(w64, y, axis=1) / (np.take_along_axis(cnt, y, axis=1) + 1)
    is_x = phy[:, None, :] == x[:, :, None]  # [X, S, R]
    sh2 = np.where(is_x, s2x[:, :, None], slot_share[:, None, :])
    sh2 = np.where(phy[:, None, :] == y[:, :, None], s2y[:, :, None], sh2)
    base = _slot_sums(sh2, S)  # [X, S, P]
    top = base.argmax(axis=2)[:, :, None]
    first_max = np.take_along_axis(base, top, axis=2)
    masked = base.copy()
    np.put_along_axis(masked, top, -np.inf, axis=2)
    rest = np.where(np.arange(P) == top, masked.max(axis=2, keepdims=True), first_max)  # max over the other GPUs
    value = np.maximum((base - s2x[:, :, None]) + s2y[:, :, None], rest)[:, :, gpu]  # [X, S, R]
    ok = is_x & has_x[:, :, None] & (value < peak[:, None, None])
    if budget is not None:
        after = moved[:, None, None] - diff[:, None, :] + (y[:, :, None] != old[:, None, :])
        ok &= after <= budget
        value = _budget_key(peak[:, None, None], value, after - moved[:, None, None])
    value = np.where(ok, value, np.inf).reshape(X, S * R)
    shift_at = value.argmin(axis=1)
    shift_value = value[rows, shift_at]
    shift_ok = ok.reshape(X, S * R)[rows, shift_at]

    # --- one move per row: the lower key; a shift wins a tie with a swap
    swap_ok &= go
    shift_ok &= go
    take_shift = shift_ok & (~swap_ok | (shift_value <= swap_value))
    take_swap = swap_ok & ~take_shift
    r = rows[take_swap]
    if r.size:
        i = ia[r, swap_at[r] // R]
        j = swap_at[r] % R
        phy[r, i], phy[r, j] = phy[r, j], phy[r, i].copy()
        rank[r, i], rank[r, j] = rank[r, j], rank[r, i].copy()
    r = rows[take_shift]
    if r.size:
        ii, q = shift_at[r] // R, shift_at[r] % R
        xs, ys = x[r, ii], y[r, ii]
        last = (phy[r] == xs[:, None]) & (rank[r] == (cnt[r, xs] - 1)[:, None])
        rank[r] = np.where(last, rank[r, q][:, None], rank[r])
        phy[r, q] = ys
        rank[r, q] = cnt[r, ys]
        cnt[r, xs] -= 1
        cnt[r, ys] += 1
    take_pair = np.zeros(X, bool)
    r = rows[go & ~(take_shift | take_swap)]
    if budget is None and 4 <= S <= PAIR_SWAP_MAX_SLOTS and R <= PAIR_SWAP_MAX_REPLICAS and r.size:
        take_pair[r] = _pair_swap(slot_share[r], loads[r], phy, rank, r, a[r], peak[r], S, Pn)
    return peak, at_peak, np.where(take_pair, 1, np.where(take_shift | take_swap, 0, -1))


def _pair_swap(
    slot_share: np.ndarray, loads: np.ndarray, phy: np.ndarray, rank: np.ndarray, rows: np.ndarray,
    a: np.ndarray, peak: np.ndarray, S: int, Pn: int,
) -> np.ndarray:  # fmt: skip
    """The pair swap of docs/algorithm.md 10.2 in the ``rows`` of ``phy``/``rank`` (where no single
    move qualified; ``slot_share``, ``loads``, ``a``, ``peak`` are those rows'). Makes the move of
    the smallest ``(value, i1, i2, j1, j2)`` in place; returns which of the rows made one."""
    X, P = loads.shape
    k1, k2 = np.triu_indices(S, 1)  # the slot pairs of a GPU, in lexicographic order
    M = k1.size
    pair_sum = slot_share.reshape(X, P, S)
    pair_sum = pair_sum[:, :, k1] + pair_sum[:, :, k2]  # [X, P, M]
    out = pair_sum[np.arange(X), a]  # [X, M]: the pairs of the fullest GPU
    node = (a // Pn)[:, None] * Pn + np.arange(Pn)  # [X, Pn]: the GPUs of a's node, in order
    inn = np.take_along_axis(pair_sum, node[:, :, None], axis=1)  # [X, Pn, M]
    other = np.take_along_axis(loads, node, axis=1)[:, :, None] - inn
    found = np.zeros(X, bool)
    step = max(1, _PAIR_CHUNK // (M * Pn * M))  # rows per block of candidates, to bound memory
    for lo in range(0, X, step):
        c = slice(lo, lo + step)
        value = (peak[c, None] - out[c])[:, :, None, None] + inn[c, None]  # [x, M, Pn, M]
        np.maximum(value, other[c, None] + out[c, :, None, None], out=value)
        ok = (node[c] != a[c, None])[:, None, :, None] & (value < peak[c, None, None, None])
        value[~ok] = np.inf
        at = value.reshape(value.shape[0], -1).argmin(axis=1)  # the first minimum: lowest (i1, i2, j1, j2)
        hit = ok.reshape(ok.shape[0], -1)[np.arange(at.size), at]
        found[c] = hit
        f = np.flatnonzero(hit) + lo
        at = at[hit]
        m_i, b, m_j = at // (Pn * M), node[f, (at // M) % Pn], at % M
        r = rows[f]
        for k in (k1, k2):
            i, j = a[f] * S + k[m_i], b * S + k[m_j]
            phy[r, i], phy[r, j] = phy[r, j], phy[r, i].copy()
            rank[r, i], rank[r, j] = rank[r, j], rank[r, i].copy()
    return found


def _budget_key(peak: np.ndarray, value: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """With a budget, candidates sort by minus the drop of the largest load per slot of budget
    used; a move that uses none (or gives some back) counts half a slot (docs/algorithm.md 10.2)."""
    with np.errstate(invalid="ignore"):  # masked candidates may be inf - inf; they are not chosen
        return -((peak - value) / np.where(cost >= 1, cost, 0.5))


# ----------------------------------------------------------------------------------------------
# Two slots per GPU: deficit-driven replication (docs/algorithm.md section 13)
# ----------------------------------------------------------------------------------------------


def min_counts(w: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The smallest count ``c >= 1`` with ``fl(w / c) <= t`` per entry, as float64 counts (``t``
    broadcasts against ``w``, e.g. ``[X, 1]``; ``t > 0``): ``ceil(w / t)`` is within one of it, one
    test each way corrects it. The pairing's fewest copies (docs/algorithm.md 13.2 step 1) and the
    bounds' (:mod:`eplb_triton.bounds`)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.maximum(1.0, np.ceil(w / t))
        a = np.where(w / a > t, a + 1.0, a)
        a = np.where((a > 1.0) & (w / np.maximum(a - 1.0, 1.0) <= t), a - 1.0, a)
    return a


def _first_violation(
    s: np.ndarray, c: np.ndarray, n: np.ndarray, T: np.ndarray, half: np.ndarray, R: int
) -> tuple[np.ndarray, np.ndarray]:
    """13.2 step 2 on ``[Y, E]`` rows with ``n = sum c <= R`` replicas: ``(violated [Y] bool, h [Y, 1])``,
    h the share of the first heavy replica whose light partner is missing or too heavy.

    The replicas' shares sorted increasing, padded to ``R`` with ``+inf``: the ``k``-th largest is at
    ``n - 1 - k``, the ``k``-th smallest at ``k``."""
    Y = s.shape[0]
    m = (c * (s > half)).sum(axis=1)  # heavy replicas
    width = max(int(m.max()), 1)  # positions k < m are checked
    values = np.concatenate([s, np.full((Y, 1), np.inf)], axis=1).ravel()
    b = np.repeat(values, np.concatenate([c, (R - n)[:, None]], axis=1).ravel()).reshape(Y, R)
    b.sort(axis=1)
    k = np.arange(width)
    top = _take(b, np.maximum(n[:, None] - 1 - k, 0))  # the k-th largest, [Y, width]
    viol = (k < m[:, None]) & ((k >= (n - m)[:, None]) | (b[:, :width] > T - top))
    first = viol.argmax(axis=1)
    return viol.any(axis=1), top[np.arange(Y), first][:, None]


def _pair_build(w: np.ndarray, R: int, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """13.2 for every row of ``w [Y, E]`` (float64) with its own ``T [Y]``: ``(ok [Y], counts [Y, E])``;
    counts of failed rows are garbage. Rows still building are compacted each step; the shares
    ``w / c`` and ``w / (c + 1)`` change only at the expert that got a copy."""
    Y, E = w.shape
    Tc = T[:, None]
    c = min_counts(w, Tc).astype(np.int64)
    n = c.sum(axis=1)
    ok = np.zeros(Y, bool)
    ids = np.flatnonzero(n <= R)  # rows still building
    wa, ca, na, Ta = w[ids], c[ids], n[ids], Tc[ids]
    sa, s2a = wa / ca, wa / (ca + 1)
    while ids.size:
        viol, h = _first_violation(sa, ca, na, Ta, Ta * 0.5, R)
        done = ~viol
        ok[ids[done]] = True
        c[ids[done]] = ca[done]
        go = np.flatnonzero(viol & (na < R))
        if go.size < ids.size:
            ids, wa, ca, na, Ta, sa, s2a, h = (a[go] for a in (ids, wa, ca, na, Ta, sa, s2a, h))
        if not ids.size:
            break
        # gain: the change of (replicas with share <= need) - (replicas with share >= h) if e got a copy
        need = Ta - h
        gain = ca * np.subtract(sa >= h, sa <= need, dtype=np.int8)
        gain += (ca + 1) * np.subtract(s2a <= need, s2a >= h, dtype=np.int8)
        g = gain.max(axis=1)
        grow = np.flatnonzero(g > 0)
        if grow.size < ids.size:
            ids, wa, ca, na, Ta, sa, s2a, gain, g = (a[grow] for a in (ids, wa, ca, na, Ta, sa, s2a, gain, g))
        e = np.where(gain == g[:, None], s2a, -np.inf).argmax(axis=1)  # the largest share after the copy
        r = np.arange(ids.size)
        ca[r, e] += 1
        na += 1
        sa[r, e] = s2a[r, e]
        s2a[r, e] = wa[r, e] / (ca[r, e] + 1)
    # spare slots of the rows that succeeded: all to the light expert of the largest share
    f = np.flatnonzero(ok)
    if f.size:
        s = w[f] / c[f]
        j = np.where(s <= Tc[f] * 0.5, s, -np.inf).argmax(axis=1)
        c[f, j] += R - c[f].sum(axis=1)
    return ok, c


def _pair_peak(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """13.3: ``[Y]`` largest GPU load when GPU ``p`` holds the ``p``-th and ``(R-1-p)``-th largest
    replica (every row's counts sum to ``R``)."""
    Y = w.shape[0]
    b = np.sort(np.repeat((w / c).ravel(), c.ravel()).reshape(Y, -1), axis=1)  # increasing
    R = b.shape[1]
    return (b[:, ::-1][:, : R // 2] + b[:, : R // 2]).max(axis=1)


def pairs(
    w: np.ndarray, phy: np.ndarray, rank: np.ndarray, cnt: np.ndarray, skip: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w`` float32 ``[X, E]``; ``phy``/``rank`` ``[X, R]`` (``R = 2 P``), ``cnt`` ``[X, E]`` int64: the
    plan to improve. Returns new ``(phy, rank, cnt)``, equal to :func:`reference.pairs`: all rows and
    their three trial values of ``T`` are built at once, pass by pass."""
    X, E = w.shape
    R = phy.shape[1]
    P = R // 2
    out = [phy.copy(), rank.copy(), cnt.copy()]
    if X == 0:
        return tuple(out)
    w64 = w.astype(np.float64)
    share = w64 / cnt
    slot = _take(share, phy)
    hi = ((0.0 + slot[:, 0::2]) + slot[:, 1::2]).max(axis=1)
    total = np.add.accumulate(w64, axis=1)[:, -1]  # float64, in expert order
    lo = np.maximum(total / P, share.max(axis=1))
    run = (lo > 0.0) & (lo < hi)
    if skip is not None:
        run &= ~skip
    rows = np.flatnonzero(run)
    if rows.size == 0:
        return tuple(out)
    Y = rows.size
    wr, lo, hi = w64[rows], lo[rows], hi[rows]
    w3 = np.repeat(wr, 3, axis=0)
    start_peak = hi.copy()
    best_v = hi.copy()
    best_c = np.zeros((Y, E), np.int64)
    ar = np.arange(Y)
    for _ in range(PAIR_PASSES):
        mid = (lo + hi) * 0.5
        trials = np.stack([(lo + mid) * 0.5, mid, (mid + hi) * 0.5], axis=1)  # [Y, 3], increasing
        ok, c = _pair_build(w3, R, trials.reshape(-1))
        v = np.full(3 * Y, np.inf)
        if ok.any():
            v[ok] = _pair_peak(w3[ok], c[ok])
        v, ok = v.reshape(Y, 3), ok.reshape(Y, 3)
        i = v.argmin(axis=1)  # the first minimum: the lower T on equal peaks
        better = v[ar, i] < best_v
        best_v = np.where(better, v[ar, i], best_v)
        best_c[better] = c.reshape(Y, 3, E)[ar, i][better]
        first = np.where(ok.any(axis=1), ok.argmax(axis=1), 3)
        points = np.concatenate([lo[:, None], trials, hi[:, None]], axis=1)
        lo, hi = points[ar, first], points[ar, first + 1]
    found = best_v < start_peak
    rows, c = rows[found], best_c[found]
    if rows.size:
        # 13.4: replicas by (share desc, expert asc, rank asc): a stable sort of the replicas listed
        # expert by expert; GPU p takes the p-th and the (R-1-p)-th
        Z = rows.size
        expert = np.repeat(np.tile(np.arange(E, dtype=np.int64), Z), c.ravel()).reshape(Z, R)
        first_slot = np.cumsum(c, axis=1) - c
        order = np.argsort(-_take(w64[rows] / c, expert), axis=1, kind="stable")
        expert = _take(expert, order)
        replica = order - _take(first_slot, expert)
        k = np.arange(R)
        slot = np.where(k < P, 2 * k, 2 * (R - 1 - k) + 1)
        out[0][rows[:, None], slot] = expert
        out[1][rows[:, None], slot] = replica
        out[2][rows] = c
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Two slots per GPU under a budget: the count repair (docs/algorithm.md 10.8)
# ----------------------------------------------------------------------------------------------

_NO_MOVE = np.iinfo(np.int64).max


def _excess(load: np.ndarray, T: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """10.8: ``floor(max(load - T, 0) / unit)`` as int64 (``T``, ``unit`` broadcast against ``load``)."""
    return np.floor(np.maximum(load - T, 0.0) / unit).astype(np.int64)


def _repair_force(w, phy, cnt, old, target, k, T, unit):  # noqa: ANN001, ANN202 - arrays of the rows, in place
    """10.8 step 2a for every row at once: one shift per row and round, until no row has one."""
    X, R = phy.shape
    slot = np.arange(R)
    mate, even = slot ^ 1, (slot & 1) == 0
    live = np.arange(X)
    while live.size:
        p, c, o, tg, ww = phy[live], cnt[live], old[live], target[live], w[live]
        t, u = T[live, None], unit[live, None]
        gaining = c < tg
        has = gaining.any(axis=1)
        live, p, c, o, tg, ww, t, u, gaining = (a[has] for a in (live, p, c, o, tg, ww, t, u, gaining))
        if not live.size:
            return
        n = live.size
        flat = p + np.arange(n)[:, None] * ww.shape[1]  # each slot's expert, in the rows' flat [n * E]
        share = ww / c
        s = share.reshape(-1)[flat]
        loads = _slot_sums(s, 2)
        now = _excess(loads, t, u)
        y = np.where(gaining, share, -np.inf).argmax(axis=1)  # the first maximum: the lowest expert
        sy2 = ww[np.arange(n), y] / (c[np.arange(n), y] + 1)
        shy = np.where(p == y[:, None], sy2[:, None], s)  # slot shares once y has one more copy
        ly = _slot_sums(shy, 2)
        x_ly = _excess(ly, t, u)
        fy = (x_ly - now).sum(axis=1)
        cs = c.reshape(-1)[flat]
        sx2 = ww.reshape(-1)[flat] / np.maximum(cs - 1, 1)  # a slot's expert's share once it gives a copy
        same = p == p[:, mate]
        other = np.where(same, sx2, shy[:, mate])  # the mate's share once the slot's expert gives a copy
        lx = sx2 + other  # the GPU's load then (a + b == b + a in IEEE arithmetic)
        x_lx = _excess(lx, t, u)
        gpu_x = x_lx - np.repeat(x_ly, 2, axis=1)
        once = even | ~same  # a GPU holding the expert twice counts once
        fx = np.bincount(flat.ravel(), np.where(once, gpu_x, 0).ravel(), n * ww.shape[1])
        # (integers below 2**53: exact in float64, whatever the order)
        delta = fy[:, None] + fx[flat].astype(np.int64) - x_lx + _excess(sy2[:, None] + other, t, u)
        diff = p != o
        after = diff.sum(axis=1)[:, None] - diff + (y[:, None] != o)
        ok = (cs > tg.reshape(-1)[flat]) & (after <= k)
        q = np.where(ok, delta, _NO_MOVE).argmin(axis=1)  # the first minimum: the lowest slot
        found = ok[np.arange(n), q]
        live, y, q = live[found], y[found], q[found]
        x = phy[live, q]
        phy[live, q] = y
        np.subtract.at(cnt, (live, x), 1)
        np.add.at(cnt, (live, y), 1)  # the rows that made a shift try again


def _repair_swaps(w, phy, cnt, old, k, T, unit):  # noqa: ANN001, ANN202 - arrays of the rows, in place
    """10.8 step 2b for every row at once: one swap per row and round, at most ``2 R`` rounds."""
    X, R = phy.shape
    gpu = np.arange(R) // 2
    live = np.arange(X)
    for _ in range(2 * R):
        if not live.size:
            return
        p, c, o = phy[live], cnt[live], old[live]
        t, u = T[live, None, None], unit[live, None, None]
        n = live.size
        s = _take(w[live] / c, p)
        loads = _slot_sums(s, 2)
        a = loads.argmax(axis=1)  # the first maximum: the lowest GPU
        peak = loads[np.arange(n), a]
        over = peak > T[live]
        live, p, o, s, loads, a, peak, t, u = (v[over] for v in (live, p, o, s, loads, a, peak, t, u))
        n = live.size
        if not n:
            return
        ii = np.stack([2 * a, 2 * a + 1], axis=1)  # [n, 2] the fullest GPU's slots
        si, yi, oi = _take(s, ii), _take(p, ii), _take(o, ii)
        lb = loads[:, gpu]  # [n, R] the load of each slot's GPU
        la2 = (peak[:, None, None] - si[:, :, None]) + s[:, None, :]
        lb2 = (lb[:, None, :] - s[:, None, :]) + si[:, :, None]
        delta = (_excess(la2, t, u) - _excess(peak[:, None, None], t, u)) + (
            _excess(lb2, t, u) - _excess(lb[:, None, :], t, u)
        )
        diff = p != o
        moved = diff.sum(axis=1)[:, None, None]
        di = _take(diff.astype(np.int64), ii)
        after = (
            moved
            - di[:, :, None]
            - diff[:, None, :]
            + (p[:, None, :] != oi[:, :, None])
            + (yi[:, :, None] != o[:, None, :])
        )
        ok = (gpu[None, None, :] != a[:, None, None]) & (p[:, None, :] != yi[:, :, None]) & (delta < 0) & (after <= k)
        cost = after - moved
        key = np.where(ok, delta * np.where(cost >= 2, 1, np.where(cost == 1, 2, 4)), _NO_MOVE).reshape(n, 2 * R)
        f = key.argmin(axis=1)  # the first minimum: the lowest (i, j)
        found = key[np.arange(n), f] != _NO_MOVE
        live, f, ii = live[found], f[found], ii[found]
        i, j = ii[np.arange(live.size), f // R], f % R
        xi, xj = phy[live, i], phy[live, j]
        phy[live, i], phy[live, j] = xj, xi


def repair(
    w: np.ndarray, phy: np.ndarray, rank: np.ndarray, cnt: np.ndarray, old: np.ndarray, target: np.ndarray,
    k: int, skip: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``w`` float32 ``[X, E]``; ``(phy, rank, cnt)`` the budgeted search's plan (``R = 2 P`` slots);
    ``old [X, R]`` the placement in service; ``target [X, E]`` the full plan's counts. Returns new
    ``(phy, rank, cnt)``, equal to :func:`reference.repair`: every row's pass runs at once."""
    X, E = w.shape
    R = phy.shape[1]
    P = R // 2
    out = [phy.copy(), rank.copy(), cnt.copy()]
    if X == 0 or k <= 0:
        return tuple(out)
    w64 = w.astype(np.float64)
    s = _take(w64 / cnt, phy)
    hi = _slot_sums(s, 2).max(axis=1)
    lo = np.add.accumulate(w64, axis=1)[:, -1] / P  # float64, in expert order
    run = (lo > 0.0) & (lo < hi)
    if skip is not None:
        run &= ~skip
    rows = np.flatnonzero(run)
    if rows.size == 0:
        return tuple(out)
    wr, o, tg, lo, hi = w64[rows], old[rows], target[rows], lo[rows], hi[rows]
    o_cnt = np.zeros((rows.size, E), np.int64)
    np.add.at(o_cnt, (np.repeat(np.arange(rows.size), R), o.ravel()), 1)
    start_v = hi.copy()
    best_v, best_p, best_c = hi.copy(), np.zeros_like(o), np.zeros_like(o_cnt)
    for _ in range(REPAIR_PASSES):
        T = (lo + hi) * 0.5
        unit = T / 2.0**REPAIR_UNIT_BITS
        p, c = o.copy(), o_cnt.copy()
        _repair_force(wr, p, c, o, tg, k, T, unit)
        _repair_swaps(wr, p, c, o, k, T, unit)
        s = _take(wr / c, p)
        v = _slot_sums(s, 2).max(axis=1)
        better = v < best_v  # strict: an equal peak keeps the earlier result
        best_v = np.where(better, v, best_v)
        best_p[better], best_c[better] = p[better], c[better]
        hi, lo = np.where(v <= T, T, hi), np.where(v <= T, lo, T)
    found = best_v < start_v
    if found.any():
        rows, best_p = rows[found], best_p[found]
        new_rank, _ = slot_order_ranks(best_p, E)  # replicas numbered in slot order
        out[0][rows], out[1][rows], out[2][rows] = best_p, new_rank, best_c[found]
    return tuple(out)
