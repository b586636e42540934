"""The EPLB algorithm of docs/algorithm.md, literally: per-layer Python loops, float32 arithmetic
for the greedy (sections 3-7), float64 for the search and the pairing (sections 10 and 13).

This module is the oracle of the project: every other backend (the vectorised CPU path, the
Triton kernels) must return exactly what these functions return. It is written to be obviously
right, not fast (about a second for DeepSeek-V3 shapes); it does not import Triton, and of the
package it imports only the policy rule and the pairing's pass count (``_validation``). It does
not validate its arguments: the public API does that first.

All functions take a 2-D tensor of loads (any real dtype, any device) and return ``int64`` CPU
tensors, with the same meaning as the public functions of :mod:`eplb_triton`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ._validation import (
    PAIR_PASSES,
    PAIR_SWAP_MAX_REPLICAS,
    PAIR_SWAP_MAX_SLOTS,
    REPAIR_PASSES,
    REPAIR_UNIT_BITS,
    select_policy,
)

f32 = np.float32


def _rows(weight: torch.Tensor) -> list[list[np.float32]]:
    """Loads as float32 Python scalars (docs/algorithm.md: the input is converted to float32 first)."""
    w = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    return [[f32(v) for v in row] for row in w]


def _pack_row(row: list[np.float32], num_packs: int) -> tuple[list[int], list[int]]:
    n = len(row)
    capacity = n // num_packs
    if capacity == 1:
        return list(range(n)), [0] * n
    pack, rank = [-1] * n, [-1] * n
    loads = [f32(0.0)] * num_packs
    counts = [0] * num_packs
    # Decreasing weight; equal weights: lower item index first.
    for item in sorted(range(n), key=lambda i: (-row[i], i)):
        # min() returns the first minimum: equal loads go to the lower pack index.
        p = min((j for j in range(num_packs) if counts[j] < capacity), key=lambda j: loads[j])
        pack[item] = p
        rank[item] = counts[p]
        loads[p] = f32(loads[p] + row[item])
        counts[p] += 1
    return pack, rank


def _replicate_row(row: list[np.float32], num_phy: int) -> tuple[list[int], list[int], list[int]]:
    num_log = len(row)
    phy2log = list(range(num_log))
    rank = [0] * num_log
    cnt = [1] * num_log
    for _ in range(num_log, num_phy):
        best, best_value = 0, row[0] / f32(cnt[0])
        for e in range(1, num_log):
            value = row[e] / f32(cnt[e])
            if value > best_value:  # strict: equal values keep the lower expert
                best, best_value = e, value
        phy2log.append(best)
        rank.append(cnt[best])
        cnt[best] += 1
    return phy2log, rank, cnt


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``balanced_packing`` (docs/algorithm.md): returns ``(pack, rank)``, each ``[X, n]``."""
    rows = [_pack_row(row, num_packs) for row in _rows(weight)]
    shape = tuple(weight.shape)
    pack = torch.tensor([p for p, _ in rows], dtype=torch.int64).reshape(shape)
    rank = torch.tensor([r for _, r in rows], dtype=torch.int64).reshape(shape)
    return pack, rank


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``replicate_experts`` (docs/algorithm.md): returns ``(phy2log [X, num_phy], rank [X, num_phy], cnt [X, E])``."""
    rows = [_replicate_row(row, num_phy) for row in _rows(weight)]
    x, e = weight.shape
    phy2log = torch.tensor([r[0] for r in rows], dtype=torch.int64).reshape(x, num_phy)
    rank = torch.tensor([r[1] for r in rows], dtype=torch.int64).reshape(x, num_phy)
    cnt = torch.tensor([r[2] for r in rows], dtype=torch.int64).reshape(x, e)
    return phy2log, rank, cnt


def _hierarchical_layer(w: list[np.float32], R: int, G: int, N: int, P: int) -> tuple[list[int], list[int], list[int]]:
    E = len(w)
    gs, gpn, En, Rn, Pn, S = E // G, G // N, E // N, R // N, P // N, R // P

    # 1. Groups to nodes, then the node-major renumbering mlog.
    gload = []
    for g in range(G):
        total = f32(0.0)
        for k in range(gs):
            total = f32(total + w[g * gs + k])
        gload.append(total)
    gpack, grank = _pack_row(gload, N)
    mlog2log = [-1] * E
    for g in range(G):
        for k in range(gs):
            mlog2log[(gpack[g] * gpn + grank[g]) * gs + k] = g * gs + k

    phy2log, phyrank, logcnt = [-1] * R, [-1] * R, [0] * E
    for n in range(N):
        # 2. Replicas within the node, on its loads in mlog order.
        wn = [w[mlog2log[n * En + j]] for j in range(En)]
        phy2mlog, rank, mlogcnt = _replicate_row(wn, Rn)
        # 3. Slots to GPUs within the node: each replica carries an equal share of its expert.
        items = [wn[phy2mlog[i]] / f32(mlogcnt[phy2mlog[i]]) for i in range(Rn)]
        pack, rk = _pack_row(items, Pn)
        # 4. Output in global numbering.
        for i in range(Rn):
            q = n * Rn + pack[i] * S + rk[i]
            phy2log[q] = mlog2log[n * En + phy2mlog[i]]
            phyrank[q] = rank[i]
        for j in range(En):
            logcnt[mlog2log[n * En + j]] = mlogcnt[j]
    return phy2log, phyrank, logcnt


def rebalance_experts_hierarchical(
    weight: torch.Tensor, num_physical_experts: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hierarchical policy (docs/algorithm.md): returns ``(phy2log [L, R], phyrank [L, R], logcnt [L, E])``."""
    L, E = weight.shape
    R = num_physical_experts
    layers = [_hierarchical_layer(w, R, num_groups, num_nodes, num_gpus) for w in _rows(weight)]
    phy2log = torch.tensor([x[0] for x in layers], dtype=torch.int64).reshape(L, R)
    phyrank = torch.tensor([x[1] for x in layers], dtype=torch.int64).reshape(L, R)
    logcnt = torch.tensor([x[2] for x in layers], dtype=torch.int64).reshape(L, E)
    return phy2log, phyrank, logcnt


def log2phy(
    phy2log: torch.Tensor, phyrank: torch.Tensor, logcnt: torch.Tensor, width: int | None = None
) -> torch.Tensor:
    """``log2phy[l, e, r]``: the slot holding replica ``r`` of ``e``, ``-1`` padded to ``width`` columns
    (default ``X = max(logcnt)``)."""
    L, E = logcnt.shape
    R = phy2log.shape[1]
    X = width if width is not None else (int(logcnt.max()) if L > 0 else 0)
    out = torch.full((L, E, X), -1, dtype=torch.int64)
    for layer in range(L):
        for q in range(R):
            if phy2log[layer, q] >= 0:  # an empty slot (a lost GPU's) is listed nowhere
                out[layer, phy2log[layer, q], phyrank[layer, q]] = q
    return out


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entry point (docs/algorithm.md): returns ``(phy2log [L, R], log2phy [L, E, X], logcnt [L, E])``."""
    _, G, N = select_policy(num_groups, num_nodes)
    phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, G, N, num_gpus)
    return phy2log, log2phy(phy2log, phyrank, logcnt), logcnt


# ----------------------------------------------------------------------------------------------
# Beyond the greedy: the local search of docs/algorithm.md section 10 (Python floats are float64)
# ----------------------------------------------------------------------------------------------


def _gpu_loads64(share: list[float], phy: list[int], P: int) -> list[float]:
    S = len(phy) // P
    loads = []
    for p in range(P):
        total = 0.0
        for q in range(p * S, p * S + S):  # float64, in slot order
            total += share[phy[q]]
        loads.append(total)
    return loads


def _pair_swap(
    share: list[float], loads: list[float], phy: list[int], a: int, peak: float, S: int, Pn: int
) -> tuple[float, int, tuple[int, int], tuple[int, int]] | None:
    """10.2 step 3, the pair swap: two slots of the fullest GPU ``a`` for two slots of another GPU of
    its node. Returns ``(value, 2, (i1, i2), (j1, j2))`` of the smallest ``(value, i1, i2, j1, j2)``
    with ``value < peak``, or None."""
    best = None
    node = a // Pn
    for i1 in range(a * S, a * S + S):
        for i2 in range(i1 + 1, a * S + S):
            out = share[phy[i1]] + share[phy[i2]]
            for b in range(node * Pn, node * Pn + Pn):
                if b == a:
                    continue
                for j1 in range(b * S, b * S + S):
                    for j2 in range(j1 + 1, b * S + S):
                        inn = share[phy[j1]] + share[phy[j2]]
                        value = max((peak - out) + inn, (loads[b] - inn) + out)
                        if value < peak and (best is None or value < best[0]):
                            best = (value, 2, (i1, i2), (j1, j2))
    return best


def _search_layer(
    w: list[np.float32], phy: list[int], rank: list[int], cnt: list[int], P: int, N: int,
    old: list[int] | None, budget: int | None,
) -> tuple[list[int], list[int], list[int]]:  # fmt: skip
    """Section 10.2 for one layer, literally: one move per round until none lowers the max."""
    R, E = len(phy), len(w)
    S, Pn = R // P, P // N
    start = (list(phy), list(rank), list(cnt))
    if P == 1:
        return start
    phy, rank, cnt = list(phy), list(rank), list(cnt)
    w64 = [float(v) for v in w]
    moved = 0 if old is None else sum(phy[q] != old[q] for q in range(R))

    def key(value: float, changes: list[tuple[int, int]]) -> float | None:
        """The candidate's sort key (10.2 step 3), or None when it breaks the budget.

        ``changes``: (slot, its new expert). Without a budget, the value itself; with one, minus
        the drop of the largest load per slot of budget the move uses (a move that uses none, or
        gives some back, counts half a slot)."""
        if budget is None:
            return value
        after = moved
        for q, e in changes:
            after += int(e != old[q]) - int(phy[q] != old[q])
        if after > budget:
            return None
        cost = after - moved
        return -((peak - value) / (float(cost) if cost >= 1 else 0.5))

    start_max = None
    progress = None  # (peak, GPUs at the peak) of the previous round, if it made a pair swap
    for _ in range(R):
        share = [w64[e] / float(cnt[e]) for e in range(E)]
        loads = _gpu_loads64(share, phy, P)
        peak = max(loads)
        if start_max is None:
            start_max = peak
        at_peak = loads.count(peak)
        if progress is not None and (peak > progress[0] or (peak == progress[0] and at_peak >= progress[1])):
            break  # the last move, a pair swap, lowered only its own rounded evaluation
        progress = None
        a = loads.index(peak)  # lowest GPU with the largest load
        node = a // Pn
        best = None  # (key, kind, i, j): kind 0 = shift, 1 = swap, 2 = pair swap
        # node of each expert: the node of its lowest slot
        enode = [-1] * E
        for q in range(R - 1, -1, -1):
            enode[phy[q]] = q // (R // N)
        for i in range(a * S, a * S + S):
            y = phy[i]
            # swaps of slot i with a slot j of another GPU of the same node
            for j in range(node * Pn * S, (node + 1) * Pn * S):
                b = j // S
                if b == a or phy[j] == y:
                    continue
                va = (peak - share[y]) + share[phy[j]]
                vb = (loads[b] - share[phy[j]]) + share[y]
                value = max(va, vb)
                k = key(value, [(i, phy[j]), (j, y)]) if value < peak else None
                if k is not None and (best is None or (k, 1, i, j) < best):
                    best = (k, 1, i, j)
            # shift: one replica of x (the least per-replica load, >= 2 copies, y's node) becomes y
            x = -1
            for e in range(E):
                if cnt[e] >= 2 and e != y and enode[e] == enode[y] and (x < 0 or share[e] < share[x]):
                    x = e
            if x < 0:
                continue
            cnt2 = list(cnt)
            cnt2[x] -= 1
            cnt2[y] += 1
            share2 = [w64[e] / float(cnt2[e]) for e in range(E)]
            base = _gpu_loads64(share2, phy, P)
            for q in range(R):
                if phy[q] != x:
                    continue
                g = q // S
                value = (base[g] - share2[x]) + share2[y]
                for h in range(P):
                    if h != g and base[h] > value:
                        value = base[h]
                k = key(value, [(q, y)]) if value < peak else None
                if k is not None and (best is None or (k, 0, i, q) < best):
                    best = (k, 0, i, q)
        if best is None and budget is None and 4 <= S <= PAIR_SWAP_MAX_SLOTS and R <= PAIR_SWAP_MAX_REPLICAS:
            best = _pair_swap(share, loads, phy, a, peak, S, Pn)
        if best is None:
            break
        _, kind, i, j = best
        if kind == 2:  # a pair swap: i, j are the slot pairs (i1, i2) and (j1, j2)
            progress = (peak, at_peak)
            for p, q in zip(i, j, strict=True):
                phy[p], phy[q] = phy[q], phy[p]
                rank[p], rank[q] = rank[q], rank[p]
        elif kind == 1:
            phy[i], phy[j] = phy[j], phy[i]
            rank[i], rank[j] = rank[j], rank[i]
        else:
            x, y = phy[j], phy[i]
            # x's highest-rank replica takes the freed rank; the new slot is y's last replica
            for q in range(R):
                if phy[q] == x and rank[q] == cnt[x] - 1:
                    rank[q] = rank[j]
            phy[j], rank[j] = y, cnt[y]
            cnt[x] -= 1
            cnt[y] += 1
        if old is not None:
            moved = sum(phy[q] != old[q] for q in range(R))
    final = _gpu_loads64([w64[e] / float(cnt[e]) for e in range(E)], phy, P)
    if start_max is not None and max(final) > start_max:  # never worse than the start
        return start
    return phy, rank, cnt


def search(
    weight: torch.Tensor, phy2log: torch.Tensor, phyrank: torch.Tensor, logcnt: torch.Tensor,
    num_gpus: int, num_nodes: int, old_phy2log: torch.Tensor | None = None, max_moves: int | None = None,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The local search of docs/algorithm.md section 10.2 from the placement ``(phy2log, phyrank, logcnt)``.

    ``num_nodes`` is the effective one (1 for the global policy). With ``old_phy2log`` and
    ``max_moves``, at most ``max_moves`` slots per layer end up differing from ``old_phy2log``.
    Layers marked in ``skip [L]`` (bool) are returned as they are. Returns ``(phy2log, phyrank,
    logcnt)`` int64 CPU tensors.
    """

    def layer_search(layer: int, w: list[np.float32], *start: list[int]) -> tuple[list[int], list[int], list[int]]:
        old = None if old_phy2log is None else old_phy2log[layer].tolist()
        return _search_layer(w, *start, num_gpus, num_nodes, old, max_moves)

    return _per_layer(weight, phy2log, phyrank, logcnt, skip, layer_search)


def _per_layer(
    weight: torch.Tensor, phy2log: torch.Tensor, phyrank: torch.Tensor, logcnt: torch.Tensor,
    skip: torch.Tensor | None, step: Callable[..., tuple[list[int], list[int], list[int]]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``step(layer, w, phy, rank, cnt)`` on every layer of the plan not marked in ``skip``; the
    marked ones as they are. Returns ``(phy2log, phyrank, logcnt)`` int64 CPU tensors."""
    out = []
    for layer, w in enumerate(_rows(weight)):
        start = (phy2log[layer].tolist(), phyrank[layer].tolist(), logcnt[layer].tolist())
        out.append(start if skip is not None and bool(skip[layer]) else step(layer, w, *start))
    return _plans(out, *phy2log.shape, logcnt.shape[1])


# ----------------------------------------------------------------------------------------------
# Two slots per GPU: deficit-driven replication (docs/algorithm.md section 13; Python floats are float64)
# ----------------------------------------------------------------------------------------------


def _min_count(w: float, T: float) -> int:
    """13.2 step 1: the smallest ``c >= 1`` with ``w / c <= T`` (one estimate, at most one correction)."""
    c = max(1, math.ceil(w / T))
    if w / c > T:
        c += 1
    elif c > 1 and w / (c - 1) <= T:
        c -= 1
    return c


def _replicas(w: list[float], c: list[int]) -> list[float]:
    """The shares of all replicas, largest first."""
    return sorted((w[e] / c[e] for e in range(len(w)) for _ in range(c[e])), reverse=True)


def _pair_peak(w: list[float], c: list[int]) -> float:
    """13.3: the largest GPU load when GPU ``p`` takes the ``p``-th and the ``(R-1-p)``-th largest replica."""
    b = _replicas(w, c)
    R = len(b)
    return max(b[p] + b[R - 1 - p] for p in range(R // 2))


def _pair_build(w: list[float], R: int, T: float) -> list[int] | None:
    """13.2: replica counts whose pairing keeps every GPU within ``T``, or None (the build fails)."""
    E = len(w)
    half = T * 0.5
    c = [_min_count(w[e], T) for e in range(E)]
    if sum(c) > R:
        return None
    while True:
        s = [w[e] / c[e] for e in range(E)]
        b = _replicas(w, c)
        n = len(b)
        m = sum(1 for v in b if v > half)  # heavy replicas: two cannot share a GPU within T
        # the k-th largest heavy replica pairs with the k-th smallest light one, b[n - 1 - k]
        k_star = next((k for k in range(m) if k >= n - m or b[n - 1 - k] > T - b[k]), None)
        if k_star is None:
            break
        if n == R:
            return None
        h = b[k_star]
        need = T - h
        gain = []
        for e in range(E):
            s2 = w[e] / (c[e] + 1)
            if s[e] > half:
                g = c[e] * (s[e] >= h) - (c[e] + 1) * (s2 > half and s2 >= h) + (c[e] + 1) * (s2 <= half and s2 <= need)
            else:
                g = (c[e] + 1) * (s2 <= need) - c[e] * (s[e] <= need)
            gain.append(g)
        g_max = max(gain)
        if g_max <= 0:
            return None
        best = -1
        for e in range(E):  # the largest share after the copy; strict: equal shares keep the lower expert
            if gain[e] == g_max and (best < 0 or w[e] / (c[e] + 1) > w[best] / (c[best] + 1)):
                best = e
        c[best] += 1
    spare = R - sum(c)
    if spare:
        s = [w[e] / c[e] for e in range(E)]
        j = -1
        for e in range(E):  # the light expert of the largest share (one exists, section 13.2)
            if s[e] <= half and (j < 0 or s[e] > s[j]):
                j = e
        c[j] += spare
    return c


def _pairs_layer(
    w32: list[np.float32], phy: list[int], rank: list[int], cnt: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """Section 13 for one layer: the search for ``T`` (13.1), then the pairing placement (13.4) if it is
    strictly better than the start."""
    R, E = len(phy), len(w32)
    P = R // 2
    w = [float(v) for v in w32]
    share = [w[e] / cnt[e] for e in range(E)]
    hi = max((0.0 + share[phy[2 * p]]) + share[phy[2 * p + 1]] for p in range(P))  # the start's peak (10.1)
    total = 0.0
    for e in range(E):  # float64, in expert order
        total += w[e]
    lo = max(total / P, max(share))
    if not 0.0 < lo < hi:
        return phy, rank, cnt
    best_v, best_c = hi, None
    for _ in range(PAIR_PASSES):
        mid = (lo + hi) * 0.5
        trials = [(lo + mid) * 0.5, mid, (mid + hi) * 0.5]
        first = 3
        for i, T in enumerate(trials):
            c = _pair_build(w, R, T)
            if c is None:
                continue
            first = min(first, i)
            v = _pair_peak(w, c)
            if v < best_v:  # strict: an equal peak keeps the earlier trial
                best_v, best_c = v, c
        points = [lo, *trials, hi]
        lo, hi = points[first], points[first + 1]
    if best_c is None:
        return phy, rank, cnt
    # 13.4: replicas by (share desc, expert asc, rank asc); GPU p takes the p-th and the (R-1-p)-th
    s = [w[e] / best_c[e] for e in range(E)]
    order = sorted(((e, r) for e in range(E) for r in range(best_c[e])), key=lambda er: (-s[er[0]], er[0], er[1]))
    new_phy, new_rank = [-1] * R, [-1] * R
    for k, (e, r) in enumerate(order):
        q = 2 * k if k < P else 2 * (R - 1 - k) + 1
        new_phy[q], new_rank[q] = e, r
    return new_phy, new_rank, best_c


def pairs(
    weight: torch.Tensor, phy2log: torch.Tensor, phyrank: torch.Tensor, logcnt: torch.Tensor,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Deficit-driven replication for two slots per GPU (docs/algorithm.md section 13) from the plan
    ``(phy2log, phyrank, logcnt)`` (``R = 2 P`` slots, the global policy): per layer, the pairing
    placement where its largest GPU load is strictly below the plan's, else the plan. Layers marked in
    ``skip [L]`` (bool) are returned as they are. Returns ``(phy2log, phyrank, logcnt)`` int64 CPU tensors.
    """
    return _per_layer(weight, phy2log, phyrank, logcnt, skip, lambda _layer, w, *start: _pairs_layer(w, *start))


# ----------------------------------------------------------------------------------------------
# Two slots per GPU under a budget: the count repair (docs/algorithm.md 10.8; Python floats are float64)
# ----------------------------------------------------------------------------------------------


def _excess(load: float, T: float, unit: float) -> int:
    """10.8: the excess of a GPU load over ``T`` in whole units (an exact integer, summed in any order)."""
    return math.floor(max(load - T, 0.0) / unit)


def _pair_loads(w: list[float], phy: list[int], cnt: list[int]) -> list[float]:
    """10.1 with two slots per GPU, from the counts."""
    return _gpu_loads64([w[e] / cnt[e] for e in range(len(w))], phy, len(phy) // 2)


def _repair_force(w: list[float], phy: list[int], cnt: list[int], old: list[int], target: list[int],
                  k: int, T: float, unit: float) -> None:  # fmt: skip
    """10.8 step 2a: the replica counts toward ``target``, one shift at a time, in place."""
    R, E = len(phy), len(w)
    while True:
        gaining = [e for e in range(E) if cnt[e] < target[e]]
        if not gaining:
            return
        y = max(gaining, key=lambda e: w[e] / cnt[e])  # max() keeps the first: the lowest expert on ties
        now = sum(_excess(v, T, unit) for v in _pair_loads(w, phy, cnt))
        moved = sum(phy[q] != old[q] for q in range(R))
        best = None
        for q in range(R):
            x = phy[q]
            if cnt[x] <= target[x] or moved - (x != old[q]) + (y != old[q]) > k:
                continue
            phy[q] = y
            cnt[x] -= 1
            cnt[y] += 1
            delta = sum(_excess(v, T, unit) for v in _pair_loads(w, phy, cnt)) - now
            phy[q] = x
            cnt[x] += 1
            cnt[y] -= 1
            if best is None or delta < best[0]:  # strict: the lowest slot on ties
                best = (delta, q)
        if best is None:
            return
        q = best[1]
        cnt[phy[q]] -= 1
        cnt[y] += 1
        phy[q] = y


def _repair_swaps(w: list[float], phy: list[int], cnt: list[int], old: list[int], k: int, T: float,
                  unit: float) -> None:  # fmt: skip
    """10.8 step 2b: swaps out of the fullest GPU that lower the total excess, in place."""
    R = len(phy)
    for _ in range(2 * R):
        share = [w[e] / cnt[e] for e in range(len(w))]
        loads = _gpu_loads64(share, phy, R // 2)
        peak = max(loads)
        if peak <= T:
            return
        a = loads.index(peak)
        moved = sum(phy[q] != old[q] for q in range(R))
        best = None
        for i in (2 * a, 2 * a + 1):
            for j in range(R):
                b = j // 2
                if b == a or phy[j] == phy[i]:
                    continue
                la = (peak - share[phy[i]]) + share[phy[j]]
                lb = (loads[b] - share[phy[j]]) + share[phy[i]]
                delta = (_excess(la, T, unit) - _excess(peak, T, unit)) + (
                    _excess(lb, T, unit) - _excess(loads[b], T, unit)
                )
                after = moved - (phy[i] != old[i]) - (phy[j] != old[j]) + (phy[j] != old[i]) + (phy[i] != old[j])
                if delta >= 0 or after > k:
                    continue
                cost = after - moved
                key = delta * (1 if cost >= 2 else 2 if cost == 1 else 4)  # delta per slot of budget, times 2
                if best is None or key < best[0]:
                    best = (key, i, j)
        if best is None:
            return
        _, i, j = best
        phy[i], phy[j] = phy[j], phy[i]


def _repair_layer(
    w32: list[np.float32], phy: list[int], rank: list[int], cnt: list[int], old: list[int], target: list[int], k: int
) -> tuple[list[int], list[int], list[int]]:
    """10.8 for one layer: targets ``T`` by bisection; from ``old`` each time, the counts toward
    ``target`` then excess-lowering swaps; the result with the smallest largest load if it is strictly
    below the start's."""
    R, E = len(phy), len(w32)
    P = R // 2
    w = [float(v) for v in w32]
    hi = max(_pair_loads(w, phy, cnt))
    total = 0.0
    for e in range(E):  # float64, in expert order
        total += w[e]
    lo = total / P
    if k <= 0 or not 0.0 < lo < hi:
        return phy, rank, cnt
    best_v, best = hi, None
    old_cnt = [0] * E
    for e in old:
        old_cnt[e] += 1
    for _ in range(REPAIR_PASSES):
        T = (lo + hi) * 0.5
        unit = T / 2.0**REPAIR_UNIT_BITS
        p, c = list(old), list(old_cnt)
        _repair_force(w, p, c, old, target, k, T, unit)
        _repair_swaps(w, p, c, old, k, T, unit)
        v = max(_pair_loads(w, p, c))
        if v < best_v:  # strict: an equal peak keeps the earlier result
            best_v, best = v, (p, c)
        if v <= T:
            hi = T
        else:
            lo = T
    if best is None:
        return phy, rank, cnt
    p, c = best
    seen = [0] * E
    new_rank = []
    for e in p:  # replicas numbered in slot order
        new_rank.append(seen[e])
        seen[e] += 1
    return p, new_rank, c


def repair(
    weight: torch.Tensor, phy2log: torch.Tensor, phyrank: torch.Tensor, logcnt: torch.Tensor,
    old_phy2log: torch.Tensor, target: torch.Tensor, max_moves: int, skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The count repair of a budgeted replan with two slots per GPU (docs/algorithm.md 10.8), from the
    budgeted search's plan ``(phy2log, phyrank, logcnt)``: per layer, a placement at most ``max_moves``
    slots from ``old_phy2log`` that moves the replica counts toward ``target [L, E]``, where its largest
    GPU load is strictly below the plan's, else the plan. Layers marked in ``skip [L]`` (bool) are
    returned as they are. Returns ``(phy2log, phyrank, logcnt)`` int64 CPU tensors."""

    def layer_repair(layer: int, w: list[np.float32], *start: list[int]) -> tuple[list[int], list[int], list[int]]:
        return _repair_layer(w, *start, old_phy2log[layer].tolist(), target[layer].tolist(), max_moves)

    return _per_layer(weight, phy2log, phyrank, logcnt, skip, layer_repair)


# ----------------------------------------------------------------------------------------------
# Per-step recording and dispatch (the record + dispatch kernel's oracle, and the torch path)
# ----------------------------------------------------------------------------------------------


def record_dispatch(
    topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count one layer's routed ``topk_ids [T, k]`` per expert into ``counts [E]`` (in place) and map
    entry ``(t, k)`` with expert ``e`` to replica ``t % logcnt[e]``, slot ``log2phy[e, t % logcnt[e]]``.

    Ids outside ``[0, E)`` are not counted and get slot ``-1``. Torch on any device. Returns
    ``(slots [T, k] in topk_ids' dtype, number of invalid ids [1])``.
    """
    T, K = topk_ids.shape
    E = logcnt.shape[0]
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < E)
    counts += torch.bincount(ids[valid], minlength=E).to(counts.dtype)
    e = ids.clamp(0, E - 1)
    token = torch.arange(T, device=ids.device).unsqueeze(1).expand(T, K)
    phy = log2phy[e, token % logcnt[e]]
    phy = torch.where(valid, phy, torch.full_like(phy, -1)).to(topk_ids.dtype)
    return phy, (~valid).sum().view(1)


def _plans(out: list[tuple[list[int], list[int], list[int]]], L: int, R: int, E: int) -> tuple[torch.Tensor, ...]:
    """Per-layer ``(phy2log, phyrank, logcnt)`` lists as ``int64`` tensors ``[L, R], [L, R], [L, E]``."""
    return (
        torch.tensor([o[0] for o in out], dtype=torch.int64).reshape(L, R),
        torch.tensor([o[1] for o in out], dtype=torch.int64).reshape(L, R),
        torch.tensor([o[2] for o in out], dtype=torch.int64).reshape(L, E),
    )
