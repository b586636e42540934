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

_FULL = np.iinfo(np.int32).max


def balanced_packing(w: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """``w``: float32 ``[X, n]``. Returns ``(pack, rank)``, int64 ``[X, n]``."""
    X, n = w.shape
    capacity = n // num_packs
    if capacity == 1:
        return np.broadcast_to(np.arange(n, dtype=np.int64), (X, n)).copy(), np.zeros((X, n), np.int64)
    order = np.argsort(-w, axis=1, kind="stable")
    w_sorted = np.take_along_axis(w, order, axis=1)
    loads = np.zeros(X * num_packs, np.float32)
    counts = np.zeros(X * num_packs, np.int64)
    key = np.zeros((X, num_packs), np.int32)  # bits of the pack load, _FULL once full
    key_flat = key.reshape(-1)
    base = np.arange(X, dtype=np.int64) * num_packs
    pack_sorted = np.empty((n, X), np.int64)
    rank_sorted = np.empty((n, X), np.int64)
    for t in range(n):
        p = key.argmin(axis=1)
        flat = base + p
        r = counts[flat]
        pack_sorted[t] = p
        rank_sorted[t] = r
        with np.errstate(over="ignore"):  # float32 overflow to inf is part of the spec
            new_load = loads[flat] + w_sorted[:, t]
        loads[flat] = new_load
        counts[flat] = r + 1
        key_flat[flat] = np.where(r + 1 < capacity, new_load.view(np.int32), _FULL)
    pack = np.empty((X, n), np.int64)
    rank = np.empty((X, n), np.int64)
    np.put_along_axis(pack, order, pack_sorted.T, axis=1)
    np.put_along_axis(rank, order, rank_sorted.T, axis=1)
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
    """``w``: float32 ``[L, E]``. Returns ``(phy2log [L, R], phyrank [L, R], logcnt [L, E])``."""
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
    np.put_along_axis(mlog2log, log2mlog, np.broadcast_to(np.arange(E), (L, E)), axis=1)

    # 2. Replicas within each node: one row per (layer, node).
    wn = np.take_along_axis(w, mlog2log, axis=1).reshape(L * N, En)
    phy2mlog, phyrank, mlogcnt, share = replicate_experts(wn, Rn)

    # 3. Slots to GPUs within each node.
    items = np.take_along_axis(share, phy2mlog, axis=1)
    pack, rk = balanced_packing(items, Pn)

    # 4. Back to global numbering.
    node = np.arange(N)[None, :, None]
    item_log = np.take_along_axis(mlog2log, (phy2mlog.reshape(L, N, Rn) + node * En).reshape(L, R), axis=1)
    item_slot = ((pack * S + rk).reshape(L, N, Rn) + node * Rn).reshape(L, R)
    phy2log = np.empty((L, R), np.int64)
    rank = np.empty((L, R), np.int64)
    np.put_along_axis(phy2log, item_slot, item_log, axis=1)
    np.put_along_axis(rank, item_slot, phyrank.reshape(L, R), axis=1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, E), log2mlog, axis=1)
    return phy2log, rank, logcnt
