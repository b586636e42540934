"""Triton code of the local search (docs/algorithm.md section 10.2): one program per layer.

A program runs the whole search of its layer: rounds of "find the best move that lowers the
fullest GPU, apply it" until none does (or ``R`` rounds), then keeps the result only if it is not
worse than the start. The state lives in the output rows (``phy2log``, ``phyrank``, ``logcnt``,
copied from the inputs first) and in float64 scratch rows (per-expert shares, per-slot shares,
per-slot swap bounds): every gather by index reads them back, and blocks are reloaded where they
are used rather than carried across the loops, which keeps a 2048-slot layer in registers.
``tl.debug_barrier()`` separates each store from the reloads by other threads (and the reads of a
round from the next round's stores). Slots are handled as ``[BLOCK_P, BLOCK_S]`` tiles (GPU x
slot on the GPU), so that per-GPU values broadcast to slots without a gather.

Arithmetic is float64, in the reference's order: a share is ``float64(w) / float64(count)`` (IEEE
division: ``/`` on float64 is ``div.rn.f64``), a GPU's load is summed in slot order from 0.0 (a
loop, never a tree reduction), and there are no multiplies that could fuse. Every choice is a
minimum of the key, then the lowest index among equal minima, so ties resolve as in the spec:
candidate moves compare as ``(key, kind, i, j)`` with shift = 0, swap = 1, where the key is the
value without a budget and minus the drop of the largest load per slot of budget with one. A
round with no such move (and ``PAIRS``) then looks for the best pair swap, whose ties resolve by
one integer code that orders like ``(i1, i2, j1, j2)``.
"""

import triton
import triton.language as tl

from ._keys import INF, NO_INDEX, first_min_or_none

PAIR_TILE: tl.constexpr = tl.constexpr(256)  # most lanes of a pair-swap tile (registers at the limits)


@triton.jit
def _budget_key(peak, b_value, b_cost):
    """With a budget, candidates sort by minus the drop of the largest load per slot of budget
    used; a move that uses none (or gives some back) counts half a slot. Dividing by 1, 2 or 0.5
    is exact, so every backend gets the same keys."""
    return -((peak - b_value) / tl.where(b_cost >= 1, b_cost.to(tl.float64), 0.5))


@triton.jit
def _gpu_loads(
    slot_share_ptr,  # [R] float64 slot shares of the round
    phy_ptr,  # [R] int64 phy2log of the round
    x,
    share_x,
    y,
    share_y,
    o_p,
    m_p,
    S: tl.constexpr,
    PATCH: tl.constexpr,
):
    """[BLOCK_P] float64 load of each GPU: its slots' shares added in slot order, starting from 0.0.

    With PATCH, slots holding ``x`` count ``share_x`` and slots holding ``y`` count ``share_y``
    (the loads after a shift changes the two counts, before any slot changes)."""
    b_load = tl.zeros(o_p.shape, dtype=tl.float64)
    for k in range(S):
        b_s = tl.load(slot_share_ptr + o_p * S + k, mask=m_p, other=0.0)
        if PATCH:
            b_e = tl.load(phy_ptr + o_p * S + k, mask=m_p, other=-1)
            b_s = tl.where(b_e == x, share_x, tl.where(b_e == y, share_y, b_s))
        b_load += b_s
    return b_load


@triton.jit
def _publish(
    o_q,
    m_q,
    o_e,
    m_e,
    o_p,
    m_p,
    phy_row,  # [R] int64
    share_row,  # [E] float64 scratch: per-expert shares
    slot_share_row,  # [R] float64 scratch: per-slot shares
    enode_row,  # [E] int32 scratch: lowest slot of each expert
    R: tl.constexpr,
    N: tl.constexpr,
    S: tl.constexpr,
):
    """After the state rows changed (and a barrier): writes the slot shares and (N > 1) the lowest
    slot of each expert; returns the [BLOCK_P] GPU loads."""
    b_phy = tl.load(phy_row + o_q, mask=m_q, other=0)
    tl.store(slot_share_row + o_q, tl.load(share_row + b_phy, mask=m_q, other=0.0), mask=m_q)
    if N > 1:
        tl.store(enode_row + o_e, tl.full(o_e.shape, R, tl.int32), mask=m_e)
        tl.debug_barrier()
        tl.atomic_min(enode_row + b_phy, o_q, mask=m_q)
    tl.debug_barrier()
    return _gpu_loads(slot_share_row, phy_row, 0, 0.0, 0, 0.0, o_p, m_p, S, False)


@triton.jit
def _pair_swap(
    slot_share_row, phy_row, a, peak, o_p, m_p,
    R: tl.constexpr, S: tl.constexpr, PN: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """The pair swap (docs/algorithm.md 10.2): two slots ``a*S + k1 < a*S + k2`` of the fullest GPU
    for two slots ``j1 < j2`` of another GPU ``b`` of a's node. Returns ``(value, code)`` of the
    smallest ``(value, k1, k2, j1, j2)`` with ``value < peak``, where
    ``code = (k1 * S + k2) * (R * S) + j1 * S + (j2 - b * S)`` orders like the tuple; ``inf`` when
    there is none. Tiles are ``[GPU b, slot l2]`` for one ``l1`` (``j1 = b*S + l1``), ``BLOCK_H``
    slots ``l2`` at a time, so that a tile has at most ``PAIR_TILE`` lanes."""
    # the round's GPU loads, summed again (bit-equal) rather than kept live through the single moves
    b_load = _gpu_loads(slot_share_row, phy_row, 0, 0.0, 0, 0.0, o_p, m_p, S, False)[:, None]
    m_b = (m_p & (o_p // PN == a // PN) & (o_p != a))[:, None]
    o_h = tl.arange(0, BLOCK_H)[None, :]
    best_v = peak + INF
    best_code = NO_INDEX
    for k1 in tl.range(S - 1, disable_licm=True):
        for k2 in tl.range(k1 + 1, S, disable_licm=True):
            out = tl.load(slot_share_row + a * S + k1) + tl.load(slot_share_row + a * S + k2)
            for l1 in tl.range(S - 1, disable_licm=True):
                b_s1 = tl.load(slot_share_row + o_p * S + l1, mask=m_p, other=0.0)[:, None]
                for h in tl.static_range(0, BLOCK_S, BLOCK_H):
                    l2 = h + o_h
                    ok = m_b & (l2 > l1) & (l2 < S)
                    b_in = b_s1 + tl.load(slot_share_row + o_p[:, None] * S + l2, mask=ok, other=0.0)
                    b_v = tl.maximum((peak - out) + b_in, (b_load - b_in) + out)
                    ok = ok & (b_v < peak)
                    b_code = (k1 * S + k2) * (R * S) + (o_p[:, None] * S + l1) * S + l2
                    v, code = first_min_or_none(tl.where(ok, b_v, INF), b_code)
                    better = (v < best_v) | ((v == best_v) & (code < best_code))
                    best_v = tl.where(better, v, best_v)
                    best_code = tl.where(better, code, best_code)
    return best_v, best_code


@triton.jit(do_not_specialize=["budget"])  # one compiled kernel for every budget
def _search_kernel(
    # inputs
    w_ptr,  # [L, E] float32
    phy_in_ptr,  # [L, R] int64
    rank_in_ptr,  # [L, R] int64
    cnt_in_ptr,  # [L, E] int64
    old_ptr,  # [L, R] int64, read only when HAS_BUDGET
    budget,  # int: most slots differing from old, when HAS_BUDGET
    skip_ptr,  # [L] int32: 1 where the layer is returned as it starts, unsearched
    # outputs (and the search state)
    phy_ptr,  # [L, R] int64
    rank_ptr,  # [L, R] int64
    cnt_ptr,  # [L, E] int64
    # scratch, one row per layer
    share_ptr,  # [L, E + 2 R + 3] float64: per-expert shares, per-slot shares and swap bounds, start max, progress
    enode_ptr,  # [L, E] int32: lowest slot of each expert (N > 1)
    E: tl.constexpr,
    R: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    HAS_BUDGET: tl.constexpr,
    PAIRS: tl.constexpr,  # pair swaps where no single move helps (no budget, 4 <= S <= 16, R <= 1024)
    BLOCK_E: tl.constexpr,  # >= E
    BLOCK_P: tl.constexpr,  # >= P
    BLOCK_S: tl.constexpr,  # >= R / P
    BLOCK_R: tl.constexpr,  # >= R
):
    tl.static_assert(E <= BLOCK_E and P <= BLOCK_P and R // P <= BLOCK_S and R <= BLOCK_R, "blocks hold a row")
    tl.static_assert(R < NO_INDEX and E <= R, "NO_INDEX lies above every slot, GPU and expert index")
    tl.static_assert(R % P == 0 and P % N == 0, "whole slots per GPU and GPUs per node")
    S: tl.constexpr = R // P
    PN: tl.constexpr = P // N
    tl.static_assert(not PAIRS or S * S * R * S < NO_INDEX, "a pair swap's code lies below NO_INDEX")
    BLOCK_H: tl.constexpr = min(BLOCK_S, max(1, PAIR_TILE // BLOCK_P))  # the pair swap's tile width
    layer = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    o_p = tl.arange(0, BLOCK_P)
    m_p = o_p < P
    o_s = tl.arange(0, BLOCK_S)
    m_q = m_p[:, None] & (o_s < S)[None, :]
    o_q = tl.where(m_q, o_p[:, None] * S + o_s[None, :], R)  # [BLOCK_P, BLOCK_S] slot index; R: padding
    phy_row = phy_ptr + layer * R
    rank_row = rank_ptr + layer * R
    cnt_row = cnt_ptr + layer * E
    w_row = w_ptr + layer * E
    old_row = old_ptr + layer * R

    # The start, copied in [BLOCK_R] blocks: the restore at the end uses other shapes, so that no
    # pointer block is shared with it and kept live through the loop.
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    m_re = o_r < E  # E <= R
    tl.store(phy_row + o_r, tl.load(phy_in_ptr + layer * R + o_r, mask=m_r), mask=m_r)
    tl.store(rank_row + o_r, tl.load(rank_in_ptr + layer * R + o_r, mask=m_r), mask=m_r)
    b_start = tl.load(cnt_in_ptr + layer * E + o_r, mask=m_re, other=1)
    tl.store(cnt_row + o_r, b_start, mask=m_re)
    if P > 1:
        share_row = share_ptr + layer * (E + 2 * R + 3)
        slot_share_row = share_row + E
        bound_row = slot_share_row + R  # (load of the slot's GPU - its share), inf where no swap partner
        enode_row = enode_ptr + layer * E
        tl.store(share_row + o_r, tl.load(w_row + o_r, mask=m_re).to(tl.float64) / b_start.to(tl.float64), mask=m_re)
        if HAS_BUDGET:
            b_start = tl.load(phy_in_ptr + layer * R + o_r, mask=m_r, other=-1)
            moved = tl.sum((b_start != tl.load(old_row + o_r, mask=m_r, other=-1)).to(tl.int32))
        else:
            moved = 0
        tl.debug_barrier()
        b_load = _publish(o_q, m_q, o_e, m_e, o_p, m_p, phy_row, share_row, slot_share_row, enode_row, R, N, S)
        start_max = tl.max(tl.where(m_p, b_load, -INF))
        tl.store(bound_row + R, start_max)  # read back at the end only: not held in a register
        go = tl.load(skip_ptr + layer) == 0
        rnd = 0
        if PAIRS:  # (peak, GPUs at it) after a pair swap, kept in memory; inf: the last move was not one
            tl.store(bound_row + R + 1, start_max + INF)
            tl.store(bound_row + R + 2, 0.0)
        while tl.condition(go, disable_licm=True):  # no long live ranges of hoisted blocks
            peak = tl.max(tl.where(m_p, b_load, -INF))
            a = tl.min(tl.where(m_p & (b_load == peak), o_p, NO_INDEX))  # the lowest fullest GPU
            # No fullest GPU when every load is NaN (tl.max skips NaN, so the peak is a padding
            # lane's -inf): the row is done. GPU 0 keeps this round's reads in bounds.
            has_peak = a < NO_INDEX
            if PAIRS:  # a pair swap that lowered only its own rounded evaluation ends the search
                at_peak = tl.sum((m_p & (b_load == peak)).to(tl.int32)).to(tl.float64)
                prev_peak = tl.load(bound_row + R + 1)
                has_peak = has_peak & (
                    (peak < prev_peak) | ((peak == prev_peak) & (at_peak < tl.load(bound_row + R + 2)))
                )
            a = tl.where(has_peak, a, 0)
            # swap partners j: another GPU b of a's node; (loads[b] - share[phy[j]]) is the part of
            # the swap's value on b that does not depend on i
            b_gpu = o_q // S
            m_j = m_q & (b_gpu // PN == a // PN) & (b_gpu != a)
            b_bound = tl.where(m_j, b_load[:, None] - tl.load(slot_share_row + o_q, mask=m_q, other=0.0), INF)
            tl.store(bound_row + o_q, b_bound, mask=m_q)
            tl.debug_barrier()
            best_v = peak + INF  # inf: no move yet
            best_k = 2
            best_i = 0
            best_j = 0
            for k in tl.range(S, disable_licm=True):
                i = a * S + k
                y = tl.load(phy_row + i).to(tl.int32)
                sy = tl.load(slot_share_row + i)
                b_phy = tl.load(phy_row + o_q, mask=m_q, other=-1).to(tl.int32)  # [BLOCK_P, BLOCK_S]
                if HAS_BUDGET:
                    b_old = tl.load(old_row + o_q, mask=m_q, other=-1).to(tl.int32)
                # swaps of slot i with a slot j of another GPU of a's node
                b_v = tl.load(slot_share_row + o_q, mask=m_q, other=0.0)
                b_v = tl.maximum((peak - sy) + b_v, tl.load(bound_row + o_q, mask=m_q, other=INF) + sy)
                ok = (b_phy != y) & (b_v < peak)
                if HAS_BUDGET:
                    old_i = tl.load(old_row + i).to(tl.int32)
                    after = moved - (y != old_i).to(tl.int32) - (b_phy != b_old).to(tl.int32)
                    after += (b_phy != old_i).to(tl.int32) + (b_old != y).to(tl.int32)
                    ok = ok & (after <= budget)
                    b_v = _budget_key(peak, b_v, after - moved)
                swap_v, swap_j = first_min_or_none(tl.where(ok, b_v, INF), o_q)
                # shift: x (least share, >= 2 copies, y's node, lowest id) gives one replica to y
                m_x = m_e & (tl.load(cnt_row + o_e, mask=m_e, other=0) >= 2) & (o_e != y)
                if N > 1:
                    b_enode = tl.load(enode_row + o_e, mask=m_e, other=0) // (R // N)
                    m_x = m_x & (b_enode == tl.load(enode_row + y) // (R // N))
                _, x = first_min_or_none(tl.where(m_x, tl.load(share_row + o_e, mask=m_e, other=INF), INF), o_e)
                shift_v = peak + INF
                shift_q = 0
                if x < NO_INDEX:
                    s2x = tl.load(w_row + x).to(tl.float64) / (tl.load(cnt_row + x) - 1).to(tl.float64)
                    s2y = tl.load(w_row + y).to(tl.float64) / (tl.load(cnt_row + y) + 1).to(tl.float64)
                    b_base = _gpu_loads(slot_share_row, phy_row, x, s2x, y, s2y, o_p, m_p, S, True)
                    b_base = tl.where(m_p, b_base, -INF)
                    top, g1 = first_min_or_none(-b_base, o_p)
                    second = tl.max(tl.where(o_p == g1, -INF, b_base))
                    b_rest = tl.where(o_p == g1, second, -top)  # max over the other GPUs
                    b_gv = tl.maximum((b_base - s2x) + s2y, b_rest)  # [BLOCK_P] value of a shift on GPU g
                    ok = (b_phy == x) & (b_gv[:, None] < peak)
                    b_sv = tl.broadcast_to(b_gv[:, None], o_q.shape)
                    if HAS_BUDGET:
                        after = moved + (b_old != y).to(tl.int32) - (b_old != x).to(tl.int32)
                        ok = ok & (after <= budget)
                        b_sv = _budget_key(peak, b_sv, after - moved)
                    shift_v, shift_q = first_min_or_none(tl.where(ok, b_sv, INF), o_q)
                # (key, kind, i, j): a shift wins a tie with a swap; an earlier i wins a full tie
                take_shift = shift_v <= swap_v
                v = tl.where(take_shift, shift_v, swap_v)
                kind = tl.where(take_shift, 0, 1)
                better = (v < INF) & ((v < best_v) | ((v == best_v) & (kind < best_k)))
                best_v = tl.where(better, v, best_v)
                best_k = tl.where(better, kind, best_k)
                best_i = tl.where(better, i, best_i)
                best_j = tl.where(better, tl.where(take_shift, shift_q, swap_j), best_j)
            if PAIRS:
                pair_i2 = NO_INDEX
                pair_j2 = NO_INDEX
                tl.store(bound_row + R + 1, peak + INF)  # read by every thread before the round's barrier
                if has_peak & (best_v == INF):  # no single move: the pair swaps
                    pair_v, pair_code = _pair_swap(
                        slot_share_row, phy_row, a, peak, o_p, m_p, R, S, PN, BLOCK_S, BLOCK_H
                    )
                    if pair_v < INF:
                        # code = (k1 * S + k2) * (R * S) + j1 * S + l2: slots a*S + k1, a*S + k2 for j1, j2
                        k12 = pair_code // (R * S)
                        j1 = (pair_code % (R * S)) // S
                        best_v = pair_v
                        best_k = 1
                        best_i = a * S + k12 // S
                        best_j = j1
                        pair_i2 = a * S + k12 % S
                        pair_j2 = (j1 // S) * S + pair_code % S
                        tl.store(bound_row + R + 1, peak)
                        tl.store(bound_row + R + 2, at_peak)
            found = has_peak & (best_v < INF)
            # apply the move (i, j): a swap exchanges (phy, rank); a shift turns j's x into y's last
            # replica. Selections by index, NO_INDEX where the move does not apply.
            e_i = tl.load(phy_row + best_i).to(tl.int32)
            e_j = tl.load(phy_row + best_j).to(tl.int32)
            swap_i = tl.where(found & (best_k == 1), best_i, NO_INDEX)
            move_j = tl.where(found, best_j, NO_INDEX)
            x = tl.where(found & (best_k == 0), e_j, NO_INDEX)
            y = tl.where(found & (best_k == 0), e_i, NO_INDEX)
            b_phy = tl.load(phy_row + o_q, mask=m_q, other=-1).to(tl.int32)
            b_rank = tl.load(rank_row + o_q, mask=m_q, other=0).to(tl.int32)
            b_cnt = tl.load(cnt_row + o_e, mask=m_e, other=1).to(tl.int32)
            cnt_x = tl.sum(tl.where(o_e == x, b_cnt, 0))
            cnt_y = tl.sum(tl.where(o_e == y, b_cnt, 0))
            r_i = tl.sum(tl.where(o_q == best_i, b_rank, 0))
            r_j = tl.sum(tl.where(o_q == best_j, b_rank, 0))
            if PAIRS:  # a pair swap's second exchange, (pair_i2, pair_j2); NO_INDEX matches no slot
                e_i2 = tl.sum(tl.where(o_q == pair_i2, b_phy, 0))
                e_j2 = tl.sum(tl.where(o_q == pair_j2, b_phy, 0))
                r_i2 = tl.sum(tl.where(o_q == pair_i2, b_rank, 0))
                r_j2 = tl.sum(tl.where(o_q == pair_j2, b_rank, 0))
                b_phy = tl.where(o_q == pair_i2, e_j2, tl.where(o_q == pair_j2, e_i2, b_phy))
                b_rank = tl.where(o_q == pair_i2, r_j2, tl.where(o_q == pair_j2, r_i2, b_rank))
            b_rank = tl.where((b_phy == x) & (b_rank == cnt_x - 1), r_j, b_rank)  # x's last replica
            b_phy = tl.where(o_q == swap_i, e_j, b_phy)
            b_rank = tl.where(o_q == swap_i, r_j, b_rank)
            b_phy = tl.where(o_q == move_j, e_i, b_phy)
            b_rank = tl.where(o_q == move_j, tl.where(x == NO_INDEX, r_i, cnt_y), b_rank)
            b_cnt = tl.where(o_e == x, b_cnt - 1, tl.where(o_e == y, b_cnt + 1, b_cnt))
            m_xy = (o_e == x) | (o_e == y)  # the two shares that change
            b_w = tl.load(w_row + o_e, mask=m_xy, other=0.0).to(tl.float64)
            if HAS_BUDGET:
                moved = tl.sum((b_phy != tl.load(old_row + o_q, mask=m_q, other=-1).to(tl.int32)).to(tl.int32))
            tl.debug_barrier()  # every thread is done reading the round's rows
            tl.store(phy_row + o_q, b_phy.to(tl.int64), mask=m_q)
            tl.store(rank_row + o_q, b_rank.to(tl.int64), mask=m_q)
            tl.store(cnt_row + o_e, b_cnt.to(tl.int64), mask=m_e)
            tl.store(share_row + o_e, b_w / b_cnt.to(tl.float64), mask=m_xy)
            tl.debug_barrier()
            b_load = _publish(o_q, m_q, o_e, m_e, o_p, m_p, phy_row, share_row, slot_share_row, enode_row, R, N, S)
            rnd += 1
            go = found & (rnd < R)
        # never worse than the start (b_load: the final state's loads, summed as the reference does)
        if tl.max(tl.where(m_p, b_load, -INF)) > tl.load(bound_row + R):
            tl.store(phy_row + o_q, tl.load(phy_in_ptr + (layer * R + o_q), mask=m_q), mask=m_q)
            tl.store(rank_row + o_q, tl.load(rank_in_ptr + (layer * R + o_q), mask=m_q), mask=m_q)
            tl.store(cnt_row + o_e, tl.load(cnt_in_ptr + (layer * E + o_e), mask=m_e), mask=m_e)
