"""Triton code of deficit-driven replication, two slots per GPU (docs/algorithm.md section 13):
one program per layer.

A program runs its layer's whole search for the pairing threshold ``T`` (13.1): ``PASSES`` passes
of three trial values, each a build of replica counts (13.2) and, where the build succeeds, the
largest GPU load of the pairing (13.3); at the end it writes the best pairing's placement (13.4)
where that load is strictly below the start's, else the start. Nothing is read back by the host.

Where the NumPy path sorts, the kernel counts: every per-expert quantity that depends on the other
experts (how many replicas are at most ``T - s``, at least ``s``, or come before an expert in the
order) is a loop over the experts ``j`` whose share and count each lane compares with its own, read
one by one from a scratch row (one float64 and two int32 rows per layer). ``tl.debug_barrier()``
separates each store to scratch from the reloads by other threads, and the reloads from the next
store. Lanes are experts (``[BLOCK_E]``) or GPUs (``[BLOCK_P]``: GPU ``p`` holds positions ``p``
and ``R - 1 - p`` of the order).

Arithmetic is float64, as in the reference: ``w = float64(w32)``, shares ``w / c`` by IEEE
division (``/`` on float64 is ``div.rn.f64``), ``T - s``; the only products are halvings ``* 0.5``,
which are exact, so a fused multiply-add computes the same values. Every choice is a maximum or
minimum followed by the lowest index among equal values, as the spec's ties say.
"""

import triton
import triton.language as tl

from ._keys import INF, NO_INDEX, first_min_or_none


@triton.jit
def _min_counts(b_w, T, m_e):
    """13.2 step 1: ``[BLOCK_E]`` int32, the smallest ``c >= 1`` with ``w / c <= T`` (0 in padding lanes).

    ``ceil(w / T)`` is within one of it (``w / T <= R``); one test each way corrects it."""
    b_c = tl.maximum(tl.math.ceil(b_w / T), 1.0)
    up = b_w / b_c > T
    down = (b_c > 1.0) & (b_w / tl.maximum(b_c - 1.0, 1.0) <= T)
    b_c = tl.where(up, b_c + 1.0, tl.where(down, b_c - 1.0, b_c))
    return tl.where(m_e, b_c.to(tl.int32), 0)


@triton.jit
def _shares(b_w, b_c, m_e):
    """``[BLOCK_E]`` float64 ``w / c`` (0 in padding lanes)."""
    return b_w / tl.where(m_e, b_c, 1).to(tl.float64)


@triton.jit
def _publish(o_e, m_e, b_s, b_c, s_row, c_row):
    """Stores shares and counts for the loops over experts (every thread reads every entry)."""
    tl.debug_barrier()  # the previous loop's reads of these rows are done
    tl.store(s_row + o_e, b_s, mask=m_e)
    tl.store(c_row + o_e, b_c, mask=m_e)
    tl.debug_barrier()


@triton.jit
def _build(b_w, T, o_e, m_e, s_row, c_row, E: tl.constexpr, R: tl.constexpr):
    """13.2: ``(ok, counts [BLOCK_E] int32)`` for the trial value ``T``; the counts of a failed build
    are garbage.

    The first violation, per expert: a heavy expert of share ``s`` is violated when fewer light
    replicas have a share ``<= T - s`` than heavy replicas have a share ``>= s`` (for a heavy ``s``,
    ``T - s <= T / 2``, so the replicas ``<= T - s`` are all light and those ``>= s`` all heavy);
    ``h`` is the largest violated share."""
    half = T * 0.5
    b_c = _min_counts(b_w, T, m_e)
    n = tl.sum(b_c)
    go = n <= R
    ok = n < 0  # False
    while go:
        b_s = _shares(b_w, b_c, m_e)
        _publish(o_e, m_e, b_s, b_c, s_row, c_row)
        b_room = T - b_s
        b_light = tl.zeros(b_c.shape, tl.int32)  # replicas with share <= T - s
        b_heavy = tl.zeros(b_c.shape, tl.int32)  # replicas with share >= s
        for j in range(E):
            s_j = tl.load(s_row + j)
            c_j = tl.load(c_row + j)
            b_light += tl.where(s_j <= b_room, c_j, 0)
            b_heavy += tl.where(s_j >= b_s, c_j, 0)
        b_viol = m_e & (b_s > half) & (b_light < b_heavy)
        h = tl.max(tl.where(b_viol, b_s, -INF))
        # from integers: Triton 3.9's interpreter broadcasts a float comparison's scalar result as float64
        violated = tl.max(b_viol.to(tl.int32)) > 0
        # gain: the change of (replicas with share <= need) - (replicas with share >= h) if e got a copy
        need = T - h
        b_s2 = b_w / (b_c + 1).to(tl.float64)
        b_gain = b_c * ((b_s >= h).to(tl.int32) - (b_s <= need).to(tl.int32))
        b_gain += (b_c + 1) * ((b_s2 <= need).to(tl.int32) - (b_s2 >= h).to(tl.int32))
        b_gain = tl.where(m_e, b_gain, -(1 << 30))
        g = tl.max(b_gain)
        # the largest share after the copy, lowest index (a first minimum of the negated shares: exact)
        e_star = first_min_or_none(tl.where(b_gain == g, -b_s2, INF), o_e)[1]
        grow = violated & (n < R) & (g > 0)
        ok = ok | ~violated
        b_c = tl.where(grow & (o_e == e_star), b_c + 1, b_c)
        n += grow.to(tl.int32)
        go = grow
    # the spare slots all go to the light expert of the largest share (one exists when ok)
    b_s = _shares(b_w, b_c, m_e)
    m_light = m_e & (b_s <= half)
    j = first_min_or_none(tl.where(m_light, -b_s, INF), o_e)[1]
    b_c = tl.where(o_e == j, b_c + (R - n), b_c)
    return ok, b_c


@triton.jit
def _pair_up(b_w, b_c, o_e, m_e, o_p, m_p, s_row, c_row, off_row, E: tl.constexpr, R: tl.constexpr):
    """13.3-13.4 for counts summing to ``R``: ``(peak, e_a, r_a, e_b, r_b)``, the largest GPU load and,
    per GPU ``p`` (``[BLOCK_P]``), the expert and replica rank at positions ``p`` and ``R - 1 - p`` of
    the order (share decreasing, expert increasing, rank increasing)."""
    b_s = _shares(b_w, b_c, m_e)
    _publish(o_e, m_e, b_s, b_c, s_row, c_row)
    b_off = tl.zeros(b_c.shape, tl.int32)  # replicas before the expert's first one in the order
    for j in range(E):
        s_j = tl.load(s_row + j)
        c_j = tl.load(c_row + j)
        b_off += tl.where((s_j > b_s) | ((s_j == b_s) & (j < o_e)), c_j, 0)
    tl.store(off_row + o_e, b_off, mask=m_e)
    tl.debug_barrier()
    o_b = R - 1 - o_p  # [BLOCK_P] the second position of GPU p
    e_a = tl.zeros(o_p.shape, tl.int32)
    r_a = tl.zeros(o_p.shape, tl.int32)
    e_b = tl.zeros(o_p.shape, tl.int32)
    r_b = tl.zeros(o_p.shape, tl.int32)
    s_a = tl.zeros(o_p.shape, tl.float64)
    s_b = tl.zeros(o_p.shape, tl.float64)
    for e in range(E):
        first = tl.load(off_row + e)
        end = first + tl.load(c_row + e)
        s_e = tl.load(s_row + e)
        in_a = (o_p >= first) & (o_p < end)
        in_b = (o_b >= first) & (o_b < end)
        e_a = tl.where(in_a, e, e_a)
        r_a = tl.where(in_a, o_p - first, r_a)
        s_a = tl.where(in_a, s_e, s_a)
        e_b = tl.where(in_b, e, e_b)
        r_b = tl.where(in_b, o_b - first, r_b)
        s_b = tl.where(in_b, s_e, s_b)
    peak = tl.max(tl.where(m_p, s_a + s_b, -INF))
    return peak, e_a, r_a, e_b, r_b


@triton.jit
def _pairs_kernel(
    # inputs
    w_ptr,  # [L, E] float32
    phy_in_ptr,  # [L, R] int64
    rank_in_ptr,  # [L, R] int64
    cnt_in_ptr,  # [L, E] int64
    skip_ptr,  # [L] int32: 1 where the layer is returned as it starts
    # outputs
    phy_ptr,  # [L, R] int64
    rank_ptr,  # [L, R] int64
    cnt_ptr,  # [L, E] int64
    # scratch, one row per layer
    share_ptr,  # [L, E] float64: shares of the counts being looked at
    scratch_i_ptr,  # [L, 2 E] int32: their counts, the experts' first positions in the order
    E: tl.constexpr,
    R: tl.constexpr,
    PASSES: tl.constexpr,
    BLOCK_E: tl.constexpr,  # >= E
    BLOCK_P: tl.constexpr,  # >= R / 2
):
    tl.static_assert(R % 2 == 0 and E <= R, "two slots per GPU, at least one per expert")
    tl.static_assert(E <= BLOCK_E and R // 2 <= BLOCK_P, "blocks hold a row")
    tl.static_assert(R < NO_INDEX, "NO_INDEX lies above every expert index")
    P: tl.constexpr = R // 2
    layer = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    o_p = tl.arange(0, BLOCK_P)
    m_p = o_p < P
    phy_row = phy_ptr + layer * R
    rank_row = rank_ptr + layer * R
    cnt_row = cnt_ptr + layer * E
    s_row = share_ptr + layer * E
    c_row = scratch_i_ptr + layer * (2 * E)
    off_row = c_row + E

    # the start, copied; slots 2p and 2p + 1 as two [BLOCK_P] halves
    e0 = tl.load(phy_in_ptr + layer * R + 2 * o_p, mask=m_p, other=0)
    e1 = tl.load(phy_in_ptr + layer * R + 2 * o_p + 1, mask=m_p, other=0)
    tl.store(phy_row + 2 * o_p, e0, mask=m_p)
    tl.store(phy_row + 2 * o_p + 1, e1, mask=m_p)
    tl.store(rank_row + 2 * o_p, tl.load(rank_in_ptr + layer * R + 2 * o_p, mask=m_p), mask=m_p)
    tl.store(rank_row + 2 * o_p + 1, tl.load(rank_in_ptr + layer * R + 2 * o_p + 1, mask=m_p), mask=m_p)
    b_cnt = tl.load(cnt_in_ptr + layer * E + o_e, mask=m_e, other=1)
    tl.store(cnt_row + o_e, b_cnt, mask=m_e)
    if tl.load(skip_ptr + layer) == 0:
        w_row = w_ptr + layer * E
        b_w = tl.load(w_row + o_e, mask=m_e, other=0.0).to(tl.float64)
        # 13.1: the start's largest GPU load (slot order, from 0.0), the total in expert order
        m_0 = m_p & (e0 >= 0) & (e0 < E)
        m_1 = m_p & (e1 >= 0) & (e1 < E)
        s_0 = tl.load(w_row + e0, mask=m_0, other=0.0).to(tl.float64) / tl.load(
            cnt_in_ptr + layer * E + e0, mask=m_0, other=1
        ).to(tl.float64)
        s_1 = tl.load(w_row + e1, mask=m_1, other=0.0).to(tl.float64) / tl.load(
            cnt_in_ptr + layer * E + e1, mask=m_1, other=1
        ).to(tl.float64)
        hi = tl.max(tl.where(m_p, (0.0 + s_0) + s_1, -INF))
        total = tl.full([], 0.0, tl.float64)
        for e in range(E):
            total += tl.load(w_row + e).to(tl.float64)
        lo = tl.maximum(total / P, tl.max(tl.where(m_e, b_w / b_cnt.to(tl.float64), -INF)))
        # tl.max and tl.maximum skip NaN, so a row with one NaN load would get a finite bracket; the
        # total is NaN there (and inf with an inf load), where the reference's test fails
        if (lo > 0.0) & (lo < hi) & (total < INF):
            start_peak = hi
            best_v = hi
            b_best = b_cnt.to(tl.int32)
            for _pass in range(PASSES):
                mid = (lo + hi) * 0.5
                t_1 = (lo + mid) * 0.5
                t_3 = (mid + hi) * 0.5
                first = tl.full([], 3, tl.int32)  # the first trial that succeeds; 3: none
                for t in range(3):
                    T = tl.where(t == 0, t_1, tl.where(t == 1, mid, t_3))
                    ok, b_c = _build(b_w, T, o_e, m_e, s_row, c_row, E, R)
                    if ok:
                        v = _pair_up(b_w, b_c, o_e, m_e, o_p, m_p, s_row, c_row, off_row, E, R)[0]
                        better = v < best_v  # strict: an equal peak keeps the earlier trial
                        best_v = tl.where(better, v, best_v)
                        b_best = tl.where(better, b_c, b_best)
                        first = tl.minimum(first, t)
                # the next bracket: the first success and the trial value below it
                new_lo = tl.where(first == 0, lo, tl.where(first == 1, t_1, tl.where(first == 2, mid, t_3)))
                hi = tl.where(first == 0, t_1, tl.where(first == 1, mid, tl.where(first == 2, t_3, hi)))
                lo = new_lo
            if best_v < start_peak:
                _peak, e_a, r_a, e_b, r_b = _pair_up(b_w, b_best, o_e, m_e, o_p, m_p, s_row, c_row, off_row, E, R)
                tl.debug_barrier()  # after the copy of the start by other threads
                tl.store(phy_row + 2 * o_p, e_a.to(tl.int64), mask=m_p)
                tl.store(rank_row + 2 * o_p, r_a.to(tl.int64), mask=m_p)
                tl.store(phy_row + 2 * o_p + 1, e_b.to(tl.int64), mask=m_p)
                tl.store(rank_row + 2 * o_p + 1, r_b.to(tl.int64), mask=m_p)
                tl.store(cnt_row + o_e, b_best.to(tl.int64), mask=m_e)
