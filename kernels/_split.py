"""Triton code of the per-step balanced split (eplb_triton/split.py): one program per layer.

A program computes its layer's quotas exactly as ``eplb_triton.split.balanced_split`` specifies
them (steps 1-5 of that module's docstring), with no host synchronisation: all layers in one
launch, every loop bounded (the search by ``max_rounds``, a breadth-first search by the number of
GPUs, a path walk by its length), so the launch can be captured in a CUDA graph.

Layout. Set-up sorts the layer's slots by ``(expert, slot)`` once (``tl.sort`` of
``expert * BLOCK_R + slot``): in that order every expert's slots, and so its units (runs of one
GPU), are contiguous, and prefix sums give the even split (step 2), the units and their sizes.
The search then works on two register tiles:

* the *unit tile* ``[BLOCK_K, BLOCK_X]``: row ``k`` is the ``k``-th expert (by index) with slots on
  at least two GPUs, column ``j`` its ``j``-th GPU in increasing order; it holds the unit's GPU
  (``P``: no unit) and its tokens ``x``. A flat unit index is ``k * BLOCK_X + j``, so a smaller
  one means a lower expert, or the same expert on a lower GPU: one ``tl.min`` makes the spec's
  "lowest" choices;
* the *GPU tile* ``[BLOCK_P, BLOCK_S]`` (GPU x slot on the GPU): the flat unit index of each slot
  of a unit in the unit tile, ``NONE`` otherwise.

One level of the search is two ``tl.gather`` (GPU flags to units; unit candidates to GPU slots),
three row reductions and one block-wide ``tl.min`` (a single key says: target, go on, or raise);
a step of the path walk is two picks (the GPU's packed link, the tokens it gives).

Per-slot data that set-up computes in sorted order (the even split, unit
sizes, ranks) goes through a per-program int32 scratch row, written by slot and read back after
a ``tl.debug_barrier()``; the final quotas read the units' tokens the same way.

Integers are int32 inside (the spec requires a layer's token sum below ``2**31``); keys that pack
a load and a GPU index are int64. A layer whose multi-GPU experts do not fit the tile (an expert
on more than ``BLOCK_X`` GPUs) gets quotas ``-1`` and rounds ``-1``.
"""

import triton
import triton.language as tl

from ._keys import FIELD_BITS, FIELD_LIMIT, FIELD_MASK

NONE: tl.constexpr = tl.constexpr(1 << 30)  # "no unit", above every flat unit index
BIG_KEY: tl.constexpr = tl.constexpr(1 << 62)  # above every (load, GPU) key: no GPU reached
NEW_ONLY: tl.constexpr = tl.constexpr((1 << 62) - 1)  # GPUs reached, none below T
NO_LINK: tl.constexpr = tl.constexpr(1 << 48)  # above every link


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _link(u_to, u_from, from_gpu):
    """How the search reached a GPU: ``u_to`` = unit (pe(g), g), ``u_from`` = unit (pe(g), pg(pe(g))),
    ``from_gpu`` = pg(pe(g)), as one int64 (bits 32-47, 16-31, 0-15), so that one ``tl.min`` over the
    candidates of a GPU takes the lowest ``u_to`` (the lowest expert) and one pick reads a path step."""
    return (u_to.to(tl.int64) << (2 * FIELD_BITS)) | (u_from.to(tl.int64) << FIELD_BITS) | from_gpu.to(tl.int64)


@triton.jit
def _pick(b_v, mask):
    """The element of ``b_v`` (any shape) where the one-hot ``mask`` is set (0 if none)."""
    return tl.sum(tl.where(mask, b_v, 0))


@triton.jit
def _gather_flat(src, index, SHAPE0: tl.constexpr, SHAPE1: tl.constexpr, SIZE: tl.constexpr):
    """``src[index]`` for a 1-D ``src`` and a 2-D ``index`` of shape ``[SHAPE0, SHAPE1]`` (in range)."""
    flat = tl.reshape(index, (SIZE,))
    return tl.reshape(tl.gather(src, flat, 0), (SHAPE0, SHAPE1))


@triton.jit(do_not_specialize=["max_rounds"])
def _balanced_split_kernel(
    # inputs
    counts_ptr,  # [L, E] int64, contiguous
    phy_ptr,  # [L, R] int64, contiguous
    max_rounds,  # int32: rounds of the search per layer
    # outputs
    quota_ptr,  # [L, R] int64
    rounds_ptr,  # [L] int64: rounds used (-1: the layer does not fit the unit tile)
    # scratch
    scr_ptr,  # [L, 6 * BLOCK_R + BLOCK_K * BLOCK_X] int32
    E: tl.constexpr,
    R: tl.constexpr,
    P: tl.constexpr,
    BLOCK_E: tl.constexpr,  # >= E
    BLOCK_R: tl.constexpr,  # >= R
    BLOCK_P: tl.constexpr,  # >= P
    BLOCK_S: tl.constexpr,  # >= R / P
    BLOCK_K: tl.constexpr,  # >= number of experts with slots on two or more GPUs
    BLOCK_X: tl.constexpr,  # >= GPUs of any such expert (else the layer is flagged)
):
    """One layer per program: steps 1-5 of eplb_triton/split.py."""
    tl.static_assert(BLOCK_E * BLOCK_R < (1 << 30), "sort key expert * BLOCK_R + slot is int32")
    tl.static_assert(BLOCK_K * BLOCK_X <= FIELD_LIMIT, "flat unit index fits a link field")
    tl.static_assert(BLOCK_P <= FIELD_LIMIT, "GPU index fits a link field")
    S: tl.constexpr = R // P
    U: tl.constexpr = BLOCK_K * BLOCK_X
    layer = tl.program_id(0).to(tl.int64)
    counts_row = counts_ptr + layer * E
    phy_row = phy_ptr + layer * R
    scr = scr_ptr + layer * (6 * BLOCK_R + U)
    scr_qe = scr  # [BLOCK_R] by slot: even quota (step 2)
    scr_fix = scr + BLOCK_R  # [BLOCK_R] by slot: even quota if the slot's expert is on one GPU, else 0
    scr_unit = scr + 2 * BLOCK_R  # [BLOCK_R] by slot: flat unit index, NONE for one-GPU experts
    scr_m = scr + 3 * BLOCK_R  # [BLOCK_R] by slot: slots in its unit
    scr_j = scr + 4 * BLOCK_R  # [BLOCK_R] by slot: rank in its unit
    scr_xu = scr + 5 * BLOCK_R  # [BLOCK_R] by slot: its unit's tokens after the even split
    scr_ux = scr + 6 * BLOCK_R  # [U] by unit: GPU then tokens (set-up), tokens (end)

    # ---- set-up in (expert, slot) order ---------------------------------------------------
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    b_e = tl.load(phy_row + o_r, mask=m_r, other=0).to(tl.int32)
    b_key = tl.sort(tl.where(m_r, b_e * BLOCK_R + o_r, BLOCK_E * BLOCK_R))  # [BLOCK_R]
    s_e = b_key // BLOCK_R  # expert (BLOCK_E for padding, which sorts last)
    s_q = b_key % BLOCK_R  # slot
    s_ok = o_r < R
    s_g = s_q // S
    b_prev = tl.gather(b_key, tl.maximum(o_r - 1, 0), 0)
    e_start = (o_r == 0) | (s_e != b_prev // BLOCK_R)
    u_start = e_start | (s_g != (b_prev % BLOCK_R) // S)
    e_first = tl.associative_scan(tl.where(e_start, o_r, 0), 0, _max_combine)  # first position of the expert
    u_first = tl.associative_scan(tl.where(u_start, o_r, 0), 0, _max_combine)  # first position of the unit
    nxt = tl.associative_scan(tl.where(u_start, o_r, BLOCK_R), 0, _min_combine, reverse=True)
    u_last = tl.gather(nxt, tl.minimum(o_r + 1, BLOCK_R - 1), 0)  # next unit's first position
    u_last = tl.where(o_r == BLOCK_R - 1, BLOCK_R, u_last) - 1
    s_ec = tl.minimum(s_e, BLOCK_E - 1)
    c = tl.gather(tl.histogram(s_ec, BLOCK_E, mask=s_ok), s_ec, 0)  # slots of the expert
    n = tl.load(counts_row + s_ec, mask=s_ok, other=0).to(tl.int32)
    c = tl.maximum(c, 1)
    qe = n // c + ((o_r - e_first) < n % c).to(tl.int32)  # step 2, by rank in slot order
    qe = tl.where(s_ok, qe, 0)
    cq = tl.cumsum(qe, 0)
    x_unit = tl.gather(cq, u_last, 0) - tl.gather(cq, u_first, 0) + tl.gather(qe, u_first, 0)
    n_units = tl.histogram(s_ec, BLOCK_E, mask=s_ok & u_start)  # [BLOCK_E] |G(e)|
    o_e = tl.arange(0, BLOCK_E)
    multi = (n_units >= 2) & (o_e < E)
    row_of = tl.cumsum(multi.to(tl.int32), 0) - 1  # [BLOCK_E] row of each multi-GPU expert
    s_multi = tl.gather(multi.to(tl.int32), s_ec, 0) > 0
    cu = tl.cumsum(u_start.to(tl.int32), 0)
    s_row = tl.gather(row_of, s_ec, 0)
    s_col = cu - tl.gather(cu, e_first, 0)
    fits = (tl.max(tl.where(s_ok & s_multi, s_col, 0)) < BLOCK_X) & (tl.max(tl.where(multi, row_of, 0)) < BLOCK_K)
    s_unit = tl.where(s_multi & (s_col < BLOCK_X) & (s_row < BLOCK_K), s_row * BLOCK_X + s_col, NONE)

    o_u = tl.arange(0, U)
    tl.store(scr_ux + o_u, tl.full([U], P, tl.int32))  # no unit: GPU P
    tl.debug_barrier()
    tl.store(scr_qe + s_q, qe, mask=s_ok)
    tl.store(scr_fix + s_q, tl.where(s_multi, 0, qe), mask=s_ok)
    tl.store(scr_unit + s_q, s_unit, mask=s_ok)
    tl.store(scr_m + s_q, u_last - u_first + 1, mask=s_ok)
    tl.store(scr_j + s_q, o_r - u_first, mask=s_ok)
    tl.store(scr_xu + s_q, x_unit, mask=s_ok)
    m_unit = s_ok & u_start & (s_unit < NONE)
    tl.store(scr_ux + s_unit, s_g, mask=m_unit)
    tl.debug_barrier()

    # ---- the two tiles, the loads, the lower bound (step 3) -------------------------------
    o_p = tl.arange(0, BLOCK_P)
    o_s = tl.arange(0, BLOCK_S)
    m_p = o_p < P
    o_ps = o_p[:, None] * S + o_s[None, :]  # [BLOCK_P, BLOCK_S] slot
    m_ps = m_p[:, None] & (o_s[None, :] < S)
    load = tl.sum(tl.load(scr_qe + o_ps, mask=m_ps, other=0), axis=1)  # [BLOCK_P]
    fixed = tl.sum(tl.load(scr_fix + o_ps, mask=m_ps, other=0), axis=1)  # [BLOCK_P] F
    t_su = tl.load(scr_unit + o_ps, mask=m_ps, other=NONE)  # [BLOCK_P, BLOCK_S]
    o_k = tl.arange(0, BLOCK_K)
    o_x = tl.arange(0, BLOCK_X)
    t_flat = o_k[:, None] * BLOCK_X + o_x[None, :]  # [BLOCK_K, BLOCK_X] flat unit index
    t_g = tl.load(scr_ux + t_flat)  # [BLOCK_K, BLOCK_X] GPU (P: none)
    t_ok = t_g < P
    t_gc = tl.minimum(t_g, P - 1)
    tl.debug_barrier()  # every thread read the GPUs before the tokens overwrite them
    tl.store(scr_ux + s_unit, x_unit, mask=m_unit)
    tl.debug_barrier()
    t_x = tl.where(t_ok, tl.load(scr_ux + t_flat), 0)  # [BLOCK_K, BLOCK_X] tokens x(e, g)

    b_n = tl.load(counts_row + o_e, mask=o_e < E, other=0)
    total = tl.sum(b_n)
    T = ((total + P - 1) // P).to(tl.int32)
    T = tl.maximum(T, tl.max(tl.where(m_p, fixed, 0)))
    k_units = tl.sum(t_ok.to(tl.int32), axis=1)  # [BLOCK_K] |G(e)|
    k_n = tl.sum(tl.where(t_ok, t_x, 0), axis=1)  # [BLOCK_K] counts of the row's expert
    k_f = tl.sum(tl.where(t_ok, _gather_flat(fixed, t_gc, BLOCK_K, BLOCK_X, U), 0), axis=1)
    k_bound = (k_n + k_f + k_units - 1) // tl.maximum(k_units, 1)
    T = tl.maximum(T, tl.max(tl.where(k_units >= 2, k_bound, 0)))

    # ---- step 4: rounds -------------------------------------------------------------------
    rounds = 0
    limit = tl.where(fits, max_rounds, 0)
    peak = tl.max(tl.where(m_p, load, -1))
    while (rounds < limit) & (peak > T):
        rounds += 1
        visited = m_p & (load > T)  # level 0: the excess GPUs
        frontier = visited
        reached = o_k < 0  # [BLOCK_K] False
        g_link = tl.full([BLOCK_P], NO_LINK, tl.int64)  # link of each GPU reached after level 0
        target = -1
        searching = True
        while searching:  # at most P levels: each visits a new GPU
            t_front = _gather_flat(frontier.to(tl.int32), t_gc, BLOCK_K, BLOCK_X, U) > 0
            cand = t_ok & t_front & (t_x > 0) & ~reached[:, None]
            first = tl.min(tl.where(cand, o_x[None, :], BLOCK_X), axis=1)  # lowest GPU of the expert
            new_e = first < BLOCK_X
            reached = reached | new_e
            from_gpu = tl.min(tl.where(o_x[None, :] == first[:, None], t_g, P), axis=1)  # [BLOCK_K] pg(e)
            t_link = tl.where(
                new_e[:, None] & t_ok,
                _link(t_flat, o_k[:, None] * BLOCK_X + first[:, None], from_gpu[:, None]),
                NO_LINK,
            )
            t_sc = tl.where(
                t_su < NONE,
                _gather_flat(tl.reshape(t_link, (U,)), tl.minimum(t_su, U - 1), BLOCK_P, BLOCK_S, BLOCK_P * BLOCK_S),
                NO_LINK,
            )
            best = tl.min(t_sc, axis=1)  # [BLOCK_P] lowest unit, so lowest expert, reaching the GPU
            new_g = (best < NO_LINK) & ~visited
            g_link = tl.where(new_g, best, g_link)
            visited = visited | new_g
            frontier = new_g
            # one reduction decides: a target (its key), new GPUs but no target, or none (raise)
            code = tl.min(
                tl.where(new_g & (load < T), load.to(tl.int64) * BLOCK_P + o_p, tl.where(new_g, NEW_ONLY, BIG_KEY))
            )
            if code < NEW_ONLY:
                target = (code % BLOCK_P).to(tl.int32)
                searching = False
            elif code == BIG_KEY:  # raise
                size = tl.sum(visited.to(tl.int64))
                T = ((tl.sum(tl.where(visited, load, 0).to(tl.int64)) + size - 1) // size).to(tl.int32)
                searching = False
        if target >= 0:  # augment: walk the path back to level 0, at most P steps
            d = T - _pick(load, o_p == target)
            t_mark = tl.zeros([BLOCK_K, BLOCK_X], tl.int32)  # -1: gives, +1: receives
            cur = target
            link = _pick(g_link, o_p == cur)
            while link < NO_LINK:
                u_to = ((link >> (2 * FIELD_BITS)) & FIELD_MASK).to(tl.int32)
                u_from = ((link >> FIELD_BITS) & FIELD_MASK).to(tl.int32)
                cur = (link & FIELD_MASK).to(tl.int32)
                at_from = t_flat == u_from
                d = tl.minimum(d, _pick(t_x, at_from))
                t_mark = tl.where(at_from, t_mark - 1, tl.where(t_flat == u_to, t_mark + 1, t_mark))
                link = _pick(g_link, o_p == cur)
            d = tl.minimum(d, _pick(load, o_p == cur) - T)
            t_x += d * t_mark
            load = tl.where(o_p == cur, load - d, tl.where(o_p == target, load + d, load))
        peak = tl.max(tl.where(m_p, load, -1))

    # ---- step 5: slots --------------------------------------------------------------------
    tl.debug_barrier()  # every thread read the set-up tokens before they are overwritten
    tl.store(scr_ux + t_flat, t_x)
    tl.debug_barrier()
    b_unit = tl.load(scr_unit + o_r, mask=m_r, other=NONE)
    b_m = tl.load(scr_m + o_r, mask=m_r, other=1)
    b_j = tl.load(scr_j + o_r, mask=m_r, other=0)
    b_x = tl.where(
        b_unit < NONE,
        tl.load(scr_ux + b_unit, mask=m_r & (b_unit < NONE), other=0),
        tl.load(scr_xu + o_r, mask=m_r, other=0),
    )
    b_quota = (b_x // b_m + (b_j < b_x % b_m).to(tl.int32)).to(tl.int64)
    tl.store(quota_ptr + layer * R + o_r, tl.where(fits, b_quota, -1), mask=m_r)
    tl.store(rounds_ptr + layer, tl.where(fits, rounds, -1).to(tl.int64))
