"""The EPLB algorithm of docs/algorithm.md, literally: per-layer Python loops, float32 arithmetic.

This module is the oracle of the project: every other backend (the vectorised CPU path, the
Triton kernels) must return exactly what these functions return. It is written to be obviously
right, not fast (about a second for DeepSeek-V3 shapes); it does not import Triton, and of the
package it imports only the policy rule (:func:`eplb_triton._validation.select_policy`). It does
not validate its arguments: the public API does that first.

All functions take a 2-D tensor of loads (any real dtype, any device) and return ``int64`` CPU
tensors, with the same meaning as the public functions of :mod:`eplb_triton`.
"""

from __future__ import annotations

import numpy as np
import torch

from ._validation import select_policy

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


def log2phy(phy2log: torch.Tensor, phyrank: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """``log2phy[l, e, r]``: the slot holding replica ``r`` of ``e``, ``-1`` padded to ``X = max(logcnt)``."""
    L, E = logcnt.shape
    R = phy2log.shape[1]
    X = int(logcnt.max()) if L > 0 else 0
    out = torch.full((L, E, X), -1, dtype=torch.int64)
    for layer in range(L):
        for q in range(R):
            out[layer, phy2log[layer, q], phyrank[layer, q]] = q
    return out


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entry point (docs/algorithm.md): returns ``(phy2log [L, R], log2phy [L, E, X], logcnt [L, E])``."""
    _, G, N = select_policy(num_groups, num_nodes)
    phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, G, N, num_gpus)
    return phy2log, log2phy(phy2log, phyrank, logcnt), logcnt
