"""Triton code of the count repair, two slots per GPU under a budget (docs/algorithm.md 10.8): one
program per layer.

A program runs its layer's whole repair: ``PASSES`` targets ``T`` by bisection, each from the old
placement: shifts that move the replica counts toward ``target`` (step 2.1), then swaps out of the
fullest GPU (step 2.2); the best result is kept in the output rows where its largest GPU load is
strictly below the start's. Slots are two ``[BLOCK_P]`` halves, slot ``2p`` and slot ``2p + 1`` of
GPU ``p``, so a GPU's load is one addition. The pass's state lives in int32 scratch rows (the
expert of each slot, the counts) and its shares in a float64 scratch row; every gather by expert
reads them back. ``tl.debug_barrier()`` separates each store from the reloads by other threads.

Arithmetic is float64, as in the reference: ``w = float64(w32)``, shares ``w / c`` (IEEE division:
``/`` on float64 is ``div.rn.f64``), a GPU's load ``s_a + s_b``. The excess ``floor(max(v - T, 0) /
unit)`` is an integer held in a float64; sums of excesses (a tree reduction, and float64 atomic adds
per expert) stay below ``2**53`` and are therefore exact in any order. The only products are the
bisection's halvings ``* 0.5`` (exact, so a fused multiply-add computes the same value). Every choice is a minimum of
the key, then the lowest index among equal minima, as the spec's ties say.
"""

import triton
import triton.language as tl

from ._keys import INF, NO_INDEX, first_min_or_none

UNIT: tl.constexpr = tl.constexpr(4294967296.0)  # 2**REPAIR_UNIT_BITS: excess in units of T / 2**32


@triton.jit
def _excess(b_v, T, unit):
    """10.8: ``floor(max(v - T, 0) / unit)``, an integer in a float64."""
    return tl.math.floor(tl.maximum(b_v - T, 0.0) / unit)


@triton.jit
def _pick(b_v0, b_v1, o_p):
    """``(min, slot)`` over the two halves of ``[BLOCK_P]`` values (``inf``: no candidate), the
    lowest slot on ties: slot ``2p`` holds ``b_v0[p]``, slot ``2p + 1`` holds ``b_v1[p]``."""
    v0, p0 = first_min_or_none(b_v0, o_p)
    v1, p1 = first_min_or_none(b_v1, o_p)
    q0 = 2 * tl.where(v0 < INF, p0, 0)  # NO_INDEX when there is none: kept out of the product
    q1 = 2 * tl.where(v1 < INF, p1, 0) + 1
    take0 = (v0 < v1) | ((v0 == v1) & (q0 < q1))
    return tl.where(take0, v0, v1), tl.where(take0, q0, q1)


@triton.jit(do_not_specialize=["budget"])  # one compiled kernel for every budget
def _repair_kernel(
    # inputs
    w_ptr,  # [L, E] float32
    phy_in_ptr,  # [L, R] int64: the start (the budgeted search's result)
    cnt_in_ptr,  # [L, E] int64
    old_ptr,  # [L, R] int64: the placement in service
    target_ptr,  # [L, E] int64: the full plan's counts
    budget,  # int >= 1: most slots differing from old
    skip_ptr,  # [L] int32: 1 where the layer is returned as it starts
    # outputs
    phy_ptr,  # [L, R] int64: the result
    cnt_ptr,  # [L, E] int64
    changed_ptr,  # [L] int32: 1 where the result is not the start
    # scratch, one row per layer
    share_ptr,  # [L, 2 E] float64 scratch: shares, per-expert excess sums
    scratch_i_ptr,  # [L, R + E] int32: the pass's expert of each slot, its counts
    E: tl.constexpr,
    R: tl.constexpr,
    PASSES: tl.constexpr,
    BLOCK_E: tl.constexpr,  # >= E
    BLOCK_P: tl.constexpr,  # >= R / 2
):
    tl.static_assert(R % 2 == 0 and E <= R, "two slots per GPU, at least one per expert")
    tl.static_assert(E <= BLOCK_E and R // 2 <= BLOCK_P, "blocks hold a row")
    tl.static_assert(R < NO_INDEX, "NO_INDEX lies above every slot and expert index")
    P: tl.constexpr = R // 2
    layer = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    o_p = tl.arange(0, BLOCK_P)
    m_p = o_p < P
    q_a = 2 * o_p  # [BLOCK_P] the GPUs' first slots
    q_b = q_a + 1  # and second slots
    phy_row = phy_ptr + layer * R
    cnt_row = cnt_ptr + layer * E
    w_row = w_ptr + layer * E
    old_row = old_ptr + layer * R
    tgt_row = target_ptr + layer * E
    s_row = share_ptr + layer * (2 * E)
    fx_row = s_row + E
    cur_row = scratch_i_ptr + layer * (R + E)
    c_row = cur_row + R

    # the start, copied to the outputs
    e_a = tl.load(phy_in_ptr + layer * R + q_a, mask=m_p, other=0)
    e_b = tl.load(phy_in_ptr + layer * R + q_b, mask=m_p, other=0)
    tl.store(phy_row + q_a, e_a, mask=m_p)
    tl.store(phy_row + q_b, e_b, mask=m_p)
    b_cnt = tl.load(cnt_in_ptr + layer * E + o_e, mask=m_e, other=1)
    tl.store(cnt_row + o_e, b_cnt, mask=m_e)
    changed = 0
    if tl.load(skip_ptr + layer) == 0:
        # step 1: the start's largest GPU load and the mean load (the total in expert order)
        m_a = m_p & (e_a >= 0) & (e_a < E)
        m_b = m_p & (e_b >= 0) & (e_b < E)
        s_a = tl.load(w_row + e_a, mask=m_a, other=0.0).to(tl.float64) / tl.load(
            cnt_in_ptr + layer * E + e_a, mask=m_a, other=1
        ).to(tl.float64)
        s_b = tl.load(w_row + e_b, mask=m_b, other=0.0).to(tl.float64) / tl.load(
            cnt_in_ptr + layer * E + e_b, mask=m_b, other=1
        ).to(tl.float64)
        hi = tl.max(tl.where(m_p, s_a + s_b, -INF))
        total = tl.full([], 0.0, tl.float64)
        for e in range(E):
            total += tl.load(w_row + e).to(tl.float64)
        lo = total / P
        # tl.max skips NaN; the total is NaN (inf) with a NaN (inf) load, where the reference's test fails
        if (lo > 0.0) & (lo < hi) & (total < INF):
            start_v = hi
            best_v = hi
            for _pass in range(PASSES):
                T = (lo + hi) * 0.5
                unit = T / UNIT
                # the pass starts from old: its experts, and its counts by atomic increments. Rows
                # that every round reads (old, the loads, the target) are reloaded where they are
                # used rather than carried through the loops, which keeps 2048 slots in registers.
                # Its experts become addresses: ids outside [0, E) (a planner caller's broken
                # contract, unchecked there) are clamped, so that they cannot reach other rows.
                o_a = tl.load(old_row + q_a, mask=m_p, other=0).to(tl.int32)
                o_b = tl.load(old_row + q_b, mask=m_p, other=0).to(tl.int32)
                o_a = tl.minimum(tl.maximum(o_a, 0), E - 1)
                o_b = tl.minimum(tl.maximum(o_b, 0), E - 1)
                tl.debug_barrier()  # the previous pass's reads are done
                tl.store(cur_row + q_a, o_a, mask=m_p)
                tl.store(cur_row + q_b, o_b, mask=m_p)
                tl.store(c_row + o_e, tl.zeros([BLOCK_E], tl.int32), mask=m_e)
                tl.debug_barrier()
                tl.atomic_add(c_row + o_a, 1, mask=m_p)
                tl.atomic_add(c_row + o_b, 1, mask=m_p)
                tl.debug_barrier()
                # step 2.1: shifts toward the target counts, one per round
                go = True
                while tl.condition(go, disable_licm=True):
                    c = tl.load(c_row + o_e, mask=m_e, other=1)
                    b_w = tl.load(w_row + o_e, mask=m_e, other=0.0).to(tl.float64)
                    b_s = b_w / c.to(tl.float64)
                    gaining = m_e & (c < tl.load(tgt_row + o_e, mask=m_e, other=0).to(tl.int32))
                    # y: the gaining expert of the largest share, the lowest on ties
                    v_y, y = first_min_or_none(tl.where(gaining, -b_s, INF), o_e)
                    has = v_y < INF
                    y = tl.where(has, y, 0)
                    s2y = tl.sum(tl.where(o_e == y, b_w, 0.0)) / (tl.sum(tl.where(o_e == y, c, 0)) + 1).to(tl.float64)
                    tl.debug_barrier()
                    tl.store(s_row + o_e, b_s, mask=m_e)
                    tl.store(fx_row + o_e, tl.zeros([BLOCK_E], tl.float64), mask=m_e)
                    tl.debug_barrier()
                    p_a = tl.load(cur_row + q_a, mask=m_p, other=0)
                    p_b = tl.load(cur_row + q_b, mask=m_p, other=0)
                    s_a = tl.load(s_row + p_a, mask=m_p, other=0.0)
                    s_b = tl.load(s_row + p_b, mask=m_p, other=0.0)
                    x_now = _excess(s_a + s_b, T, unit)
                    y_a = tl.where(p_a == y, s2y, s_a)  # slot shares once y has one more copy
                    y_b = tl.where(p_b == y, s2y, s_b)
                    x_y = _excess(y_a + y_b, T, unit)
                    f_y = tl.sum(tl.where(m_p, x_y - x_now, 0.0))
                    # a slot's expert x gives a copy: its share, then the GPU's load
                    c_a = tl.load(c_row + p_a, mask=m_p, other=1)
                    c_b = tl.load(c_row + p_b, mask=m_p, other=1)
                    w_a = tl.load(w_row + p_a, mask=m_p, other=0.0).to(tl.float64)
                    w_b = tl.load(w_row + p_b, mask=m_p, other=0.0).to(tl.float64)
                    x2_a = w_a / tl.maximum(c_a - 1, 1).to(tl.float64)
                    x2_b = w_b / tl.maximum(c_b - 1, 1).to(tl.float64)
                    same = p_a == p_b
                    mate_a = tl.where(same, x2_a, y_b)  # the mate's share then
                    mate_b = tl.where(same, x2_b, y_a)
                    l_a = x2_a + mate_a
                    l_b = x2_b + mate_b
                    x_a = _excess(l_a, T, unit)
                    x_b = _excess(l_b, T, unit)
                    # per expert, the excess change of the GPUs holding it (a GPU holding it twice once)
                    tl.atomic_add(fx_row + p_a, x_a - x_y, mask=m_p)
                    tl.atomic_add(fx_row + p_b, x_b - x_y, mask=m_p & ~same)
                    tl.debug_barrier()
                    d_a = ((f_y + tl.load(fx_row + p_a, mask=m_p, other=0.0)) - x_a) + _excess(s2y + mate_a, T, unit)
                    d_b = ((f_y + tl.load(fx_row + p_b, mask=m_p, other=0.0)) - x_b) + _excess(s2y + mate_b, T, unit)
                    o_a = tl.load(old_row + q_a, mask=m_p, other=-1).to(tl.int32)
                    o_b = tl.load(old_row + q_b, mask=m_p, other=-1).to(tl.int32)
                    diff_a = (p_a != o_a).to(tl.int32)
                    diff_b = (p_b != o_b).to(tl.int32)
                    moved = tl.sum(tl.where(m_p, diff_a + diff_b, 0))
                    ok_a = m_p & (c_a > tl.load(tgt_row + p_a, mask=m_p, other=0).to(tl.int32))
                    ok_a = ok_a & (moved - diff_a + (o_a != y).to(tl.int32) <= budget)
                    ok_b = m_p & (c_b > tl.load(tgt_row + p_b, mask=m_p, other=0).to(tl.int32))
                    ok_b = ok_b & (moved - diff_b + (o_b != y).to(tl.int32) <= budget)
                    v, q = _pick(tl.where(ok_a, d_a, INF), tl.where(ok_b, d_b, INF), o_p)
                    go = has & (v < INF)
                    if go:
                        x = tl.load(cur_row + q)
                        tl.debug_barrier()
                        tl.store(cur_row + q, y)
                        tl.store(c_row + o_e, tl.where(o_e == x, c - 1, tl.where(o_e == y, c + 1, c)), mask=m_e)
                        tl.debug_barrier()
                # step 2.2: swaps out of the fullest GPU, at most 2 R rounds
                rnd = 0
                go = True
                while tl.condition(go, disable_licm=True):
                    p_a, p_b, s_a, s_b = _slot_shares(w_row, c_row, s_row, cur_row, o_e, m_e, q_a, q_b, m_p)
                    b_load = tl.where(m_p, s_a + s_b, -INF)
                    peak = tl.max(b_load)
                    a = tl.min(tl.where(b_load == peak, o_p, NO_INDEX))
                    a = tl.where(a < NO_INDEX, a, 0)
                    x_peak = _excess(peak, T, unit)
                    x_load = _excess(b_load, T, unit)
                    o_a = tl.load(old_row + q_a, mask=m_p, other=-1).to(tl.int32)
                    o_b = tl.load(old_row + q_b, mask=m_p, other=-1).to(tl.int32)
                    diff_a = (p_a != o_a).to(tl.int32)
                    diff_b = (p_b != o_b).to(tl.int32)
                    moved = tl.sum(tl.where(m_p, diff_a + diff_b, 0))
                    other = m_p & (o_p != a)
                    key_v = peak + INF  # float64 inf: no swap yet
                    key_i = 0
                    key_j = 0
                    for k in range(2):
                        i = 2 * a + k
                        e_i = tl.load(cur_row + i)
                        s_i = tl.load(s_row + e_i)
                        old_i = tl.load(old_row + i).to(tl.int32)
                        diff_i = (e_i != old_i).to(tl.int32)
                        # j in the first and in the second slots of the other GPUs
                        v_a = _swap_keys(peak, x_peak, b_load, x_load, s_i, s_a, T, unit)
                        v_b = _swap_keys(peak, x_peak, b_load, x_load, s_i, s_b, T, unit)
                        after_a = moved - diff_i - diff_a + (p_a != old_i).to(tl.int32) + (e_i != o_a).to(tl.int32)
                        after_b = moved - diff_i - diff_b + (p_b != old_i).to(tl.int32) + (e_i != o_b).to(tl.int32)
                        ok_a = other & (p_a != e_i) & (v_a < 0.0) & (after_a <= budget)
                        ok_b = other & (p_b != e_i) & (v_b < 0.0) & (after_b <= budget)
                        v_a = _per_slot(v_a, after_a - moved)
                        v_b = _per_slot(v_b, after_b - moved)
                        v, j = _pick(tl.where(ok_a, v_a, INF), tl.where(ok_b, v_b, INF), o_p)
                        better = v < key_v  # strict: the first slot of a wins a tie
                        key_v = tl.where(better, v, key_v)
                        key_i = tl.where(better, i, key_i)
                        key_j = tl.where(better, j, key_j)
                    rnd += 1
                    go = (peak > T) & (key_v < INF)
                    if go:
                        e_i = tl.load(cur_row + key_i)
                        e_j = tl.load(cur_row + key_j)
                        tl.debug_barrier()
                        tl.store(cur_row + key_i, e_j)
                        tl.store(cur_row + key_j, e_i)
                        tl.debug_barrier()
                    go = go & (rnd < 2 * R)
                # step 2.3: the pass's result against the best so far, the next bracket
                p_a, p_b, s_a, s_b = _slot_shares(w_row, c_row, s_row, cur_row, o_e, m_e, q_a, q_b, m_p)
                v = tl.max(tl.where(m_p, s_a + s_b, -INF))
                if v < best_v:  # strict: an equal peak keeps the earlier result
                    best_v = v
                    tl.store(phy_row + q_a, p_a.to(tl.int64), mask=m_p)
                    tl.store(phy_row + q_b, p_b.to(tl.int64), mask=m_p)
                    tl.store(cnt_row + o_e, tl.load(c_row + o_e, mask=m_e, other=1).to(tl.int64), mask=m_e)
                hi = tl.where(v <= T, T, hi)
                lo = tl.where(v <= T, lo, T)
            changed = (best_v < start_v).to(tl.int32)
    tl.store(changed_ptr + layer, changed)


@triton.jit
def _slot_shares(w_row, c_row, s_row, cur_row, o_e, m_e, q_a, q_b, m_p):
    """The shares of the pass's counts, published to ``s_row`` for the gathers by other threads, and
    the pass's ``(expert, share)`` of each GPU's first and second slot (``[BLOCK_P]`` each)."""
    c = tl.load(c_row + o_e, mask=m_e, other=1)
    b_w = tl.load(w_row + o_e, mask=m_e, other=0.0).to(tl.float64)
    tl.debug_barrier()  # the previous readers of s_row are done
    tl.store(s_row + o_e, b_w / c.to(tl.float64), mask=m_e)
    tl.debug_barrier()
    p_a = tl.load(cur_row + q_a, mask=m_p, other=0)
    p_b = tl.load(cur_row + q_b, mask=m_p, other=0)
    return p_a, p_b, tl.load(s_row + p_a, mask=m_p, other=0.0), tl.load(s_row + p_b, mask=m_p, other=0.0)


@triton.jit
def _swap_keys(peak, x_peak, b_load, x_load, s_i, b_s, T, unit):
    """Step 2.2: ``[BLOCK_P]`` excess change of swapping slot ``i`` of the fullest GPU (share ``s_i``)
    with the slot of share ``b_s`` on each GPU."""
    la = (peak - s_i) + b_s
    lb = (b_load - b_s) + s_i
    return (_excess(la, T, unit) - x_peak) + (_excess(lb, T, unit) - x_load)


@triton.jit
def _per_slot(b_d, cost):
    """Step 2.2: the key, the excess change ``b_d`` times 1, 2 or 4 for a move of ``cost`` 2, 1 or
    <= 0 slots of budget, by additions (exact for these integers; no product that could fuse)."""
    b_2 = b_d + b_d
    return tl.where(cost >= 2, b_d, tl.where(cost == 1, b_2, b_2 + b_2))
