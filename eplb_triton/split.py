"""Per-step token split: each expert's tokens of one step divided among its replicas so that the
largest GPU token load is as small as it can be, without moving any weights.

The even dispatch (:func:`eplb_triton.record_dispatch`) sends token ``t``'s choice of
expert ``e`` to replica ``t % logcnt[e]``, an even split of every expert's tokens. One step's
loads are not the average the placement was planned for, so per step the GPUs are less balanced
than the plan promised. :func:`balanced_split` splits each expert's tokens of the step by that
step's counts instead, exactly optimally; :func:`assign_slots` then maps every routed entry to a
slot so that each slot receives exactly its quota.

This module imports only numpy. It holds the literal per-layer reference
:func:`balanced_split_reference` and the NumPy path :func:`balanced_split`, vectorised over
layers, which returns exactly the reference's quotas (the tests compare them with
``np.array_equal``). The Triton kernel ``eplb_triton.kernels._split`` returns exactly the same.

The specification (steps 1-5, every tie rule, the bounds) is docs/algorithm.md section 11.1: in
short, start from the even split, raise a lower bound ``T`` of the largest GPU load, and move
tokens along shortest augmenting paths from GPUs above ``T`` to GPUs below it until none is above
``T``; every choice goes to the lowest index, so every implementation returns the same quotas.
"""

from __future__ import annotations

import numpy as np

MAX_ROUNDS = 1024  # rounds of step 4 per layer; real layers use at most a few dozen
MAX_LAYER_TOKENS = (1 << 31) - 1  # sum of a layer's counts (int32 in the kernel)

__all__ = [
    "MAX_LAYER_TOKENS",
    "MAX_ROUNDS",
    "assign_slots",
    "balanced_split",
    "balanced_split_reference",
    "even_split",
    "gpu_token_loads",
]


# --------------------------------------------------------------------------------------------
# validation


def _int_array(name: str, value: object, ndim: int, what: str) -> np.ndarray:
    """``value`` as an int64 numpy array of ``ndim`` dimensions; integer dtypes only."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists, CUDA tensors
        raise TypeError(f"{name} must be an integer array-like {what} ({exc})") from None
    if array.dtype == object and array.size == 0:
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu" or array.dtype == np.bool_:
        raise TypeError(f"{name} must have an integer dtype, got {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got {array.ndim}-D shape {array.shape}")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} has values beyond int64")
    return array.astype(np.int64, copy=False)


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name} ({int(value)}) must be >= {minimum}")
    return int(value)


def _check_placement(phy2log: np.ndarray, num_layers: int, num_experts: int, num_gpus: int) -> None:
    L, R = phy2log.shape
    if L != num_layers:
        raise ValueError(f"phy2log must have one row per layer of counts ({num_layers}), got shape {phy2log.shape}")
    if R == 0 or R % num_gpus:
        raise ValueError(f"phy2log.shape[1] (slots, {R}) must be a positive multiple of num_gpus ({num_gpus})")
    if L and (phy2log.min() < 0 or phy2log.max() >= num_experts):
        raise ValueError(f"phy2log values must be expert ids in [0, {num_experts}) (counts.shape[1])")
    if L:
        present = np.zeros((L, num_experts), dtype=bool)
        present[np.arange(L)[:, None], phy2log] = True
        if not present.all():
            layer, expert = np.argwhere(~present)[0]
            raise ValueError(f"phy2log: expert {expert} has no slot in layer {layer}; every expert needs one")


def _check_split_args(counts: object, phy2log: object, num_gpus: object) -> tuple[np.ndarray, np.ndarray, int]:
    counts = _int_array("counts", counts, 2, "[num_layers, num_experts]")
    phy2log = _int_array("phy2log", phy2log, 2, "[num_layers, num_slots]")
    P = _count("num_gpus", num_gpus, 1)
    L, E = counts.shape
    if E == 0:
        raise ValueError(f"counts must have at least one expert (column), got shape {counts.shape}")
    if L and counts.min() < 0:
        raise ValueError("counts must be >= 0")
    if L and counts.sum(axis=1, dtype=np.float64).max() > MAX_LAYER_TOKENS:
        raise ValueError(f"counts: a layer's counts must sum to at most {MAX_LAYER_TOKENS}")
    _check_placement(phy2log, L, E, P)
    return counts, phy2log, P


def gpu_token_loads(quota: object, num_gpus: int) -> np.ndarray:
    """``[L, P]`` int64 tokens on each GPU: the sum of ``quota [L, R]`` over each GPU's ``R / P`` slots."""
    quota = _int_array("quota", quota, 2, "[num_layers, num_slots]")
    P = _count("num_gpus", num_gpus, 1)
    if quota.shape[1] % P:
        raise ValueError(f"quota.shape[1] ({quota.shape[1]}) must be a multiple of num_gpus ({P})")
    return quota.reshape(quota.shape[0], P, -1).sum(axis=2)


# --------------------------------------------------------------------------------------------
# the even split (today's rule)


def even_split(counts: object, phy2log: object, log2phy: object | None = None) -> np.ndarray:
    """Today's rule as quotas: replica ``r`` of expert ``e`` gets ``counts // c + (r < counts % c)``.

    That is the number of entries ``i`` of ``0 .. counts[e] - 1`` with ``i % c == r``, where ``c`` is
    the expert's number of slots: what :func:`eplb_triton.recording.record_dispatch` sends to
    replica ``r`` when the tokens that chose ``e`` are the rows ``0 .. counts[e] - 1`` (it sends
    row ``t`` to replica ``t % c``, so for other rows the quotas differ by the rows' residues).

    Args:
        counts: ``[L, E]`` int, tokens routed to each expert.
        phy2log: ``[L, R]`` int, expert of each slot (every expert has a slot).
        log2phy: optional ``[L, E, X]`` int, the slot of each replica rank (``-1`` padded), as
            :func:`eplb_triton.rebalance_experts` returns it; without it the ranks are in slot order.

    Returns:
        ``[L, R]`` int64 quotas.
    """
    counts, phy2log, _ = _check_split_args(counts, phy2log, 1)
    L, E = counts.shape
    R = phy2log.shape[1]
    if log2phy is None:
        order = np.argsort(phy2log * R + np.arange(R), axis=1)  # slots by (expert, slot)
        expert = np.take_along_axis(phy2log, order, axis=1)
        pos = np.arange(R)
        first = np.ones((L, R), dtype=bool)
        first[:, 1:] = expert[:, 1:] != expert[:, :-1]
        rank_sorted = pos - np.maximum.accumulate(np.where(first, pos, 0), axis=1)
        rank = np.empty_like(rank_sorted)
        np.put_along_axis(rank, order, rank_sorted, axis=1)
    else:
        log2phy = _int_array("log2phy", log2phy, 3, "[num_layers, num_experts, max_replicas]")
        if log2phy.shape[:2] != (L, E):
            raise ValueError(f"log2phy must be [num_layers={L}, num_experts={E}, X], got shape {log2phy.shape}")
        rank = np.full((L, R), -1, dtype=np.int64)
        layer, e, r = np.nonzero(log2phy >= 0)
        slot = log2phy[layer, e, r]
        if slot.size and (slot.max() >= R or not np.array_equal(phy2log[layer, slot], e)):
            raise ValueError("log2phy must hold, for each expert, slots of that expert (phy2log[slot] == e)")
        rank[layer, slot] = r
        if (rank < 0).any() or np.bincount(layer * R + slot, minlength=L * R).max(initial=0) > 1:
            raise ValueError("log2phy must list every slot exactly once")
    c = np.zeros((L, E), dtype=np.int64)
    np.add.at(c, (np.arange(L)[:, None], phy2log), 1)
    c = np.take_along_axis(c, phy2log, axis=1)
    n = np.take_along_axis(counts, phy2log, axis=1)
    return n // c + (rank < n % c)


# --------------------------------------------------------------------------------------------
# the reference: the specification, literally, one layer at a time


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def _reference_layer(counts: list[int], phy2log: list[int], P: int, max_rounds: int) -> tuple[list[int], int]:
    """Steps 1-5 of the module docstring for one layer; returns ``(quota, rounds)``."""
    E, R = len(counts), len(phy2log)
    S = R // P
    slots = [[q for q in range(R) if phy2log[q] == e] for e in range(E)]  # increasing slot order
    gpus = [sorted({q // S for q in slots[e]}) for e in range(E)]  # G(e)
    # 1-2: units, the even split
    x: dict[tuple[int, int], int] = {}
    for e in range(E):
        c, n = len(slots[e]), counts[e]
        for r, q in enumerate(slots[e]):
            x[e, q // S] = x.get((e, q // S), 0) + n // c + (1 if r < n % c else 0)
    load = [sum(x.get((e, g), 0) for e in range(E)) for g in range(P)]
    # 3: the lower bound
    fixed = [sum(counts[e] for e in range(E) if gpus[e] == [g]) for g in range(P)]
    T = max(_ceil_div(sum(counts), P), max(fixed))
    for e in range(E):
        if len(gpus[e]) >= 2:
            T = max(T, _ceil_div(counts[e] + sum(fixed[g] for g in gpus[e]), len(gpus[e])))
    # 4: rounds
    rounds = 0
    while rounds < max_rounds and max(load) > T:
        rounds += 1
        level0 = [g for g in range(P) if load[g] > T]
        visited = set(level0)
        pg: dict[int, int] = {}  # parent GPU of each reached expert
        pe: dict[int, int] = {}  # parent expert of each GPU visited after level 0
        frontier, target = level0, None
        while True:
            reached = {}
            for e in range(E):
                if e not in pg:
                    for g in frontier:  # increasing: the first is the lowest
                        if x.get((e, g), 0) > 0:
                            reached[e] = g
                            break
            pg.update(reached)
            new = {}
            for e in sorted(reached):  # increasing: the first expert to claim a GPU is the lowest
                for g in gpus[e]:
                    if g not in visited and g not in new:
                        new[g] = e
            if not new:
                break
            visited.update(new)
            pe.update(new)
            frontier = sorted(new)
            low = [g for g in frontier if load[g] < T]
            if low:
                target = min(low, key=lambda g: (load[g], g))
                break
        if target is None:  # raise
            T = _ceil_div(sum(load[g] for g in visited), len(visited))
            continue
        path, g = [], target  # augment
        while g not in level0:
            e = pe[g]
            path.append((e, pg[e], g))
            g = pg[e]
        d = min([load[g] - T, T - load[target]] + [x[e, g_from] for e, g_from, _ in path])
        for e, g_from, g_to in path:
            x[e, g_from] -= d
            x[e, g_to] += d
        load[g] -= d
        load[target] += d
    # 5: slots
    quota = [0] * R
    for e in range(E):
        for g in gpus[e]:
            on_g = [q for q in slots[e] if q // S == g]
            m, v = len(on_g), x[e, g]
            for j, q in enumerate(on_g):
                quota[q] = v // m + (1 if j < v % m else 0)
    return quota, rounds


def balanced_split_reference(
    counts: object, phy2log: object, num_gpus: int, *, max_rounds: int = MAX_ROUNDS, return_rounds: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The module docstring's specification, literally, layer by layer (slow; the tests' oracle).

    Same arguments and results as :func:`balanced_split`.
    """
    counts, phy2log, P = _check_split_args(counts, phy2log, num_gpus)
    max_rounds = _count("max_rounds", max_rounds, 0)
    rows = [_reference_layer(c, p, P, max_rounds) for c, p in zip(counts.tolist(), phy2log.tolist(), strict=True)]
    quota = np.array([q for q, _ in rows], dtype=np.int64).reshape(phy2log.shape)
    rounds = np.array([r for _, r in rows], dtype=np.int64)
    return (quota, rounds) if return_rounds else quota


# --------------------------------------------------------------------------------------------
# the NumPy path: all layers at once


def _segment_starts(keys: np.ndarray) -> np.ndarray:
    """Boolean: position ``i`` of the flat sorted ``keys`` starts a run of equal keys."""
    start = np.ones(keys.shape, dtype=bool)
    start[1:] = keys[1:] != keys[:-1]
    return start


def balanced_split(
    counts: object, phy2log: object, num_gpus: int, *, max_rounds: int = MAX_ROUNDS, return_rounds: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Split each expert's tokens of one step among its slots, minimising the largest GPU load.

    The module docstring specifies the result exactly (ties included); every layer gets the
    integral optimum unless it needed more than ``max_rounds`` rounds. All layers are solved
    together: every array op covers all layers, and the search runs one round of every layer
    that is not done per pass.

    Args:
        counts: ``[L, E]`` int, tokens routed to each expert this step (``>= 0``; each layer's sum
            below ``2**31``).
        phy2log: ``[L, R]`` int, expert of each slot; slot ``q`` lives on GPU ``q // (R / num_gpus)``;
            every expert has at least one slot.
        num_gpus: ``P``, dividing ``R``.
        max_rounds: rounds of the search per layer (step 4); ``0`` gives the even split.
        return_rounds: also return the ``[L]`` rounds each layer used.

    Returns:
        ``quota [L, R]`` int64 (and ``rounds [L]`` int64 with ``return_rounds``).

    Example:
        >>> balanced_split([[6, 2, 0]], [[0, 1, 0, 2]], 2).tolist()  # GPU 0: slots 0, 1; GPU 1: slots 2, 3
        [[2, 2, 4, 0]]
    """
    counts, phy2log, P = _check_split_args(counts, phy2log, num_gpus)
    max_rounds = _count("max_rounds", max_rounds, 0)
    L, E = counts.shape
    R = phy2log.shape[1]
    S = R // P
    if L == 0:
        empty = np.zeros((0, R), dtype=np.int64)
        return (empty, np.zeros(0, dtype=np.int64)) if return_rounds else empty

    # Steps 1-2 over all layers: slots sorted by (layer, expert, slot); units are runs of equal
    # (layer, expert, GPU), in increasing GPU order within an expert.
    layer_of = np.repeat(np.arange(L), R)
    order = np.argsort(phy2log * R + np.arange(R), axis=1)
    flat_order = (order + np.arange(L)[:, None] * R).ravel()  # sorted position -> flat slot
    expert = phy2log.ravel()[flat_order]
    slot = order.ravel()
    gpu = slot // S
    le = layer_of * E + expert  # (layer, expert) key
    e_start = _segment_starts(le)
    pos = np.arange(L * R)
    rank = pos - np.maximum.accumulate(np.where(e_start, pos, 0))
    n_slots = np.bincount(le, minlength=L * E)
    c, n = n_slots[le], counts.ravel()[le]
    even = n // c + (rank < n % c)
    u_start = e_start | _segment_starts(gpu)
    starts = np.flatnonzero(u_start)
    u_x = np.add.reduceat(even, starts)  # x(e, g) of every unit, all layers
    u_m = np.diff(np.append(starts, L * R))  # slots per unit
    u_le, u_gpu, u_layer = le[starts], gpu[starts], layer_of[starts]
    u_lg = u_layer * P + u_gpu
    n_gpus = np.bincount(u_le, minlength=L * E)  # |G(e)|
    flexible = n_gpus[u_le] >= 2
    load = np.bincount(u_lg, weights=u_x, minlength=L * P).astype(np.int64).reshape(L, P)

    # Step 3.
    fixed = np.bincount(u_lg[~flexible], weights=u_x[~flexible], minlength=L * P).astype(np.int64)
    T = np.maximum((counts.sum(axis=1) + P - 1) // P, fixed.reshape(L, P).max(axis=1))
    f_sum = np.bincount(u_le[flexible], weights=fixed[u_lg[flexible]], minlength=L * E).astype(np.int64)
    k = np.flatnonzero(n_gpus >= 2)
    if k.size:
        bound = (counts.ravel()[k] + f_sum[k] + n_gpus[k] - 1) // n_gpus[k]
        np.maximum.at(T, k // E, bound)

    # Step 4 on the flexible units, packed per layer into [L, U] (padding: expert E, GPU P, x 0).
    f_idx = np.flatnonzero(flexible)
    f_layer = u_layer[f_idx]
    per_layer = np.bincount(f_layer, minlength=L)
    U = max(int(per_layer.max()), 1)
    col = np.arange(f_idx.size) - np.repeat(np.cumsum(per_layer) - per_layer, per_layer)
    at = f_layer * U + col  # flat [L, U] position of each flexible unit
    ue = np.full(L * U, E, dtype=np.int64)
    ug = np.full(L * U, P, dtype=np.int64)
    x = np.zeros(L * U, dtype=np.int64)
    ue[at], ug[at], x[at] = u_le[f_idx] - f_layer * E, u_gpu[f_idx], u_x[f_idx]
    rounds = np.zeros(L, dtype=np.int64)
    if f_idx.size and max_rounds:
        _search(load, T, x, ue, ug, rounds, L, U, E, P, max_rounds)
        u_x[f_idx] = x[at]

    # Step 5.
    j = pos - np.repeat(starts, u_m)
    ux_slot, m_slot = np.repeat(u_x, u_m), np.repeat(u_m, u_m)
    quota = np.empty(L * R, dtype=np.int64)
    quota[flat_order] = ux_slot // m_slot + (j < ux_slot % m_slot)
    quota = quota.reshape(L, R)
    return (quota, rounds) if return_rounds else quota


def _search(
    load: np.ndarray,  # [L, P] int64, updated
    T: np.ndarray,  # [L] int64, updated
    x: np.ndarray,  # [L * U] int64 tokens of each flexible unit, updated
    ue: np.ndarray,  # [L * U] expert of each unit (E: padding), units sorted by (expert, GPU) per layer
    ug: np.ndarray,  # [L * U] GPU of each unit (P: padding)
    rounds: np.ndarray,  # [L] int64, updated
    L: int,
    U: int,
    E: int,
    P: int,
    max_rounds: int,
) -> None:
    """Step 4 for every layer. The passes run on the layers not yet done, repacked (rows and unit
    columns) whenever half of them are done, so that late rounds cost what the last layers need."""
    x2, ue2, ug2 = x.reshape(L, U), ue.reshape(L, U), ug.reshape(L, U)
    rows = np.arange(L)
    while True:
        rows = rows[(load[rows] > T[rows, None]).any(axis=1) & (rounds[rows] < max_rounds)]
        if rows.size == 0:
            return
        width = max(int((ue2[rows] < E).sum(axis=1).max()), 1)  # padding is at the end of each row
        ld, t, rr = load[rows], T[rows], rounds[rows]
        xx = np.ascontiguousarray(x2[rows, :width]).ravel()
        _passes(ld, t, xx, ue2[rows, :width].ravel(), ug2[rows, :width].ravel(), rr, rows.size, width, E, P, max_rounds)
        load[rows], T[rows], rounds[rows] = ld, t, rr
        x2[rows, :width] = xx.reshape(rows.size, width)


def _passes(
    load: np.ndarray,  # [L, P] int64, updated
    T: np.ndarray,  # [L] int64, updated
    x: np.ndarray,  # [L * U] int64, updated
    ue: np.ndarray,  # [L * U]
    ug: np.ndarray,  # [L * U]
    rounds: np.ndarray,  # [L] int64, updated
    L: int,
    U: int,
    E: int,
    P: int,
    max_rounds: int,
) -> None:
    """One round of every layer that is not done, per pass, until at most half of the ``L`` are left."""
    NONE = L * U  # "no unit": larger than every flat unit index
    unit = np.arange(L * U)
    u_layer = unit // U
    u_lg = u_layer * (P + 1) + ug  # flat [L, P + 1] GPU of each unit (column P: padding)
    # expert runs (reduce by expert) and, in (layer, GPU, expert) order, GPU runs (reduce by GPU)
    e_key = u_layer * (E + 1) + ue
    e_start_mask = _segment_starts(e_key)
    e_starts = np.flatnonzero(e_start_mask)
    e_run = np.cumsum(e_start_mask) - 1  # run of each unit
    by_gpu = np.argsort(u_lg * (E + 1) + ue, kind="stable")
    lg_by_gpu = u_lg[by_gpu]
    g_start_mask = _segment_starts(lg_by_gpu)
    g_starts = np.flatnonzero(g_start_mask)
    g_run_lg = lg_by_gpu[g_starts]  # flat GPU of each GPU run
    lp = np.arange(P)

    while True:
        excess = load > T[:, None]
        active = excess.any(axis=1) & (rounds < max_rounds)
        if active.sum() <= L // 2 or not active.any():
            return
        rounds += active
        visited = np.zeros((L, P + 1), dtype=bool)
        visited[:, :P] = excess & active[:, None]
        frontier = visited.ravel().copy()
        visited = visited.ravel()
        reached = np.zeros(e_starts.size, dtype=bool)
        e_parent = np.full(e_starts.size, NONE)  # unit (e, pg(e)) of each reached expert run
        g_parent = np.full(L * (P + 1), NONE)  # unit (pe(g), g) of each visited GPU after level 0
        target = np.full(L, -1)
        searching = active.copy()
        while searching.any():
            # experts reached in this step: first unit with tokens on the frontier, per expert run
            cand = np.where(frontier[u_lg] & (x > 0), unit, NONE)
            first = np.minimum.reduceat(cand, e_starts)
            new_e = (first < NONE) & ~reached
            reached |= new_e
            e_parent = np.where(new_e, first, e_parent)
            # GPUs reached in this step: lowest unit (so lowest expert) of a newly reached expert
            cand = np.where(new_e[e_run] & ~visited[u_lg], unit, NONE)
            g_first = np.minimum.reduceat(cand[by_gpu], g_starts)
            hit = g_first < NONE
            new_lg = g_run_lg[hit]
            g_parent[new_lg] = g_first[hit]
            frontier = np.zeros(L * (P + 1), dtype=bool)
            frontier[new_lg] = True
            visited |= frontier
            new_gpu = frontier.reshape(L, P + 1)[:, :P]
            low = new_gpu & (load < T[:, None])
            found = low.any(axis=1)
            if found.any():
                key = np.where(low, load * P + lp, np.iinfo(np.int64).max)
                target = np.where(found, key.argmin(axis=1), target)
            stuck = searching & ~new_gpu.any(axis=1)
            if stuck.any():  # raise
                vis = visited.reshape(L, P + 1)[stuck, :P]
                total = np.where(vis, load[stuck], 0).sum(axis=1)
                size = vis.sum(axis=1)
                T[stuck] = (total + size - 1) // size
            searching &= ~found & ~stuck
            frontier.reshape(L, P + 1)[~searching] = False
        # augment, every layer with a target at once: walk the paths back to level 0
        lay = np.flatnonzero(target >= 0)
        if lay.size == 0:
            continue
        tgt = target[lay]
        cur = tgt.copy()
        d = T[lay] - load[lay, tgt]
        steps = []
        while True:
            u_to = g_parent[lay * (P + 1) + cur]
            on = u_to < NONE
            if not on.any():
                break
            u_from = e_parent[e_run[np.where(on, u_to, 0)]]
            steps.append((lay[on], u_from[on], u_to[on]))
            d[on] = np.minimum(d[on], x[u_from[on]])
            cur = np.where(on, ug[np.where(on, u_from, 0)], cur)
        src = cur
        d = np.minimum(d, load[lay, src] - T[lay])
        delta = np.zeros(L, dtype=np.int64)
        delta[lay] = d
        for lay_on, u_from, u_to in steps:
            x[u_from] -= delta[lay_on]
            x[u_to] += delta[lay_on]
        load[lay, src] -= d
        load[lay, tgt] += d


# --------------------------------------------------------------------------------------------
# routed entries to slots


def assign_slots(
    topk_ids: object, quota: object, log2phy: object, logcnt: object, offsets: object | None = None
) -> np.ndarray:
    """Map each routed entry of one layer to a slot so that every slot receives its quota.

    The entries of expert ``e`` are numbered in row-major order of ``topk_ids``, from
    ``offsets[e]`` on (default 0: the entries of ``e`` that other batches of the same step put
    first, e.g. those of lower ranks). Entry number ``n`` of ``e`` goes to the first replica ``r``
    (in replica order) with ``n < quota[log2phy[e, 0]] + ... + quota[log2phy[e, r]]``: the first
    ``quota[log2phy[e, 0]]`` entries of the step to replica 0, the next to replica 1, and so on.
    An entry past the sum of its expert's quotas (only with inconsistent inputs) gets slot ``-1``, as
    do ids outside ``[0, E)`` (as in :func:`eplb_triton.record_dispatch`).

    Args:
        topk_ids: ``[num_tokens, top_k]`` int, logical expert of each entry.
        quota: ``[R]`` int ``>= 0``, e.g. one layer of :func:`balanced_split` of the step's counts.
        log2phy: ``[E, X]`` int, slot of each replica rank (``-1`` padded).
        logcnt: ``[E]`` int, replicas of each expert (``1 <= logcnt[e] <= X``).
        offsets: ``[E]`` int ``>= 0`` or ``None``.

    Returns:
        ``[num_tokens, top_k]`` int64 slots.

    Example:
        >>> assign_slots([[0, 1], [0, 1], [1, 0]], [1, 2, 3], [[0, 1], [2, -1]], [2, 1]).tolist()
        [[0, 2], [1, 2], [2, 1]]
    """
    ids = _int_array("topk_ids", topk_ids, 2, "[num_tokens, top_k]")
    quota = _int_array("quota", quota, 1, "[num_slots]")
    log2phy = _int_array("log2phy", log2phy, 2, "[num_experts, max_replicas]")
    logcnt = _int_array("logcnt", logcnt, 1, "[num_experts]")
    E, X = log2phy.shape
    R = quota.shape[0]
    if logcnt.shape[0] != E:
        raise ValueError(f"logcnt must be [num_experts={E}] (log2phy.shape[0]), got shape {logcnt.shape}")
    if E and (logcnt.min() < 1 or logcnt.max() > X):
        raise ValueError(f"logcnt values must be in [1, {X}] (log2phy.shape[1])")
    if R and quota.min() < 0:
        raise ValueError("quota must be >= 0")
    live = np.arange(X) < logcnt[:, None]  # [E, X]: replica ranks that exist
    if live.any() and (log2phy[live].min() < 0 or log2phy[live].max() >= R):
        raise ValueError(f"log2phy: the first logcnt[e] entries of each row must be slots in [0, {R}) (quota.shape[0])")
    if offsets is None:
        offsets = np.zeros(E, np.int64)
    else:
        offsets = _int_array("offsets", offsets, 1, "[num_experts]")
        if offsets.shape[0] != E:
            raise ValueError(f"offsets must be [num_experts={E}], got shape {offsets.shape}")
        if E and offsets.min() < 0:
            raise ValueError("offsets must be >= 0")
    flat = ids.ravel()
    valid = (flat >= 0) & (flat < E)
    entry = np.flatnonzero(valid)
    key = flat[entry].astype(np.int16 if E <= np.iinfo(np.int16).max else np.int64)  # 16 bits: a radix sort
    entry = entry[np.argsort(key, kind="stable")]  # by expert, row-major within an expert
    expert = flat[entry]
    per_expert = np.bincount(expert, minlength=E)
    first = np.cumsum(per_expert) - per_expert  # position of each expert's first entry in `entry`
    number = np.arange(entry.size) - first[expert] + offsets[expert]  # entry number within its expert
    rep = np.where(live, quota[np.where(live, log2phy, 0)], 0)  # [E, X] quota of each replica
    total = rep.sum(axis=1)
    bounds = np.cumsum(rep.ravel())  # replica (e, r) takes the step's positions below bounds[e * X + r]
    cell = np.searchsorted(bounds, total.cumsum()[expert] - total[expert] + number, side="right")
    within = number < total[expert]  # past its expert's quotas: inconsistent inputs, slot -1
    out = np.full(flat.shape, -1, dtype=np.int64)
    out[entry[within]] = log2phy.ravel()[cell[within]]
    return out.reshape(ids.shape)
