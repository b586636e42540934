"""Triton code of the rebalance (docs/algorithm.md): the greedy loops and three kernels.

One program of :func:`_rebalance_kernel` runs the complete pipeline for one (layer, node) row: the
group packing of its layer (recomputed by every node's program: it is tiny and saves a launch),
replication within the node, packing of the node's slots onto its GPUs, and the writes of
``phy2log``, ``phyrank``, ``logcnt`` and the ``-1``-padded ``log2phy``. The sequential greedy chains
stay inside a program, with pack loads and counts in registers; nothing goes back to the host.

Each greedy choice is one ``tl.max``/``tl.min`` over selection keys (:mod:`._keys`): exact ties.
The packing of many items (:func:`_pack_sorted`: the slots onto GPUs, the standalone
``balanced_packing``) sorts the items once and streams them, so its steps reduce over the packs
only; the group packing (:func:`_pack_greedy`, a few groups) keeps everything in registers.
Shares are computed with IEEE division (``div_rn``), as float32 division in the reference is.

Values gathered by data-dependent index (a group's node, a replica's share, the items in taking
order, each item's pack) go through a small per-program scratch buffer in global memory, with
``tl.debug_barrier()`` between the store and the read-back by other threads of the program.

A row whose loads are not all finite and ``>= 0`` is skipped (its outputs are not written) and
flagged in ``invalid[row]``; the callers decide what that means (the drop-in API raises).
"""

import triton
import triton.language as tl

from ._keys import (
    NO_KEY_MAX,
    NO_KEY_MIN,
    key_payload,
    key_to_fpval,
    max_key,
    max_key_index,
    min_key,
    min_key_index,
    place_key,
    place_pack,
    place_rank,
)


@triton.jit
def _row_is_valid(b_w, mask):
    """1 if every masked entry is finite and >= 0 (NaN fails ``>= 0``)."""
    b_bad = mask & ~((b_w >= 0.0) & (b_w < float("inf")))
    return tl.sum(b_bad.to(tl.int32), axis=0) == 0


@triton.jit
def _load_row(w_ptr, invalid_ptr, row, NUM: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``row`` of ``w [X, NUM]`` as [BLOCK] float32 (0 past NUM), with its validity, which is
    also stored in ``invalid[row]``."""
    o = tl.arange(0, BLOCK)
    b_w = tl.load(w_ptr + row * NUM + o, mask=o < NUM, other=0.0)
    valid = _row_is_valid(b_w, o < NUM)
    tl.store(invalid_ptr + row, (~valid).to(tl.int32))
    return b_w, valid


@triton.jit
def _take_replica(b_key, b_phy, b_rank, o_r, slot):
    """One replication step's choice (the largest share) recorded in ``slot``: (expert, its count
    before this replica, phy2log, rank)."""
    best = tl.max(b_key, axis=0)
    expert = max_key_index(best)
    count = key_payload(best)
    b_phy = tl.where(o_r == slot, expert, b_phy)
    b_rank = tl.where(o_r == slot, count, b_rank)
    return expert, count, b_phy, b_rank


@triton.jit
def _pack_greedy(
    b_w,  # [BLOCK_I] float32 item weights
    NUM_ITEMS: tl.constexpr,
    NUM_PACKS: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """balanced_packing of a few items (the groups onto the nodes), all in registers: returns
    (pack, rank), each [BLOCK_I] int32.

    A step takes the heaviest item left (a ``tl.max``) and the least-loaded open pack (a ``tl.min``
    over keys rebuilt from the packs' loads and counts). For many items :func:`_pack_sorted` takes
    fewer cycles per step; for the group packing (4-16 items) its sort and scratch round trips cost
    more than they save (measured in the static report, benchmarks/results/static-sm90).
    """
    CAPACITY: tl.constexpr = NUM_ITEMS // NUM_PACKS
    o_i = tl.arange(0, BLOCK_I)
    if CAPACITY == 1:  # one item per pack: no sorting at all
        b_pack = o_i
        b_rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    else:
        o_p = tl.arange(0, BLOCK_P)
        m_p = o_p < NUM_PACKS
        # [BLOCK_I] heaviest item first, then lower index; taken items drop out
        b_none = tl.zeros([BLOCK_I], dtype=tl.int32)  # no payload
        b_item = tl.where(o_i < NUM_ITEMS, max_key(b_w, o_i, b_none, BLOCK_I, 1), NO_KEY_MAX)
        b_load = tl.zeros([BLOCK_P], dtype=tl.float32)
        b_cnt = tl.zeros([BLOCK_P], dtype=tl.int32)
        b_pack = tl.zeros([BLOCK_I], dtype=tl.int32)
        b_rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        for _ in range(NUM_ITEMS):
            # [BLOCK_P] least-loaded open pack, then lower pack index; full packs drop out
            b_key = min_key(b_load, o_p, b_cnt, BLOCK_P, CAPACITY)
            b_key = tl.where(m_p & (b_cnt < CAPACITY), b_key, NO_KEY_MIN)
            best = tl.max(b_item, axis=0)
            choice = tl.min(b_key, axis=0)
            item, pack, rank = max_key_index(best), min_key_index(choice), key_payload(choice)
            m_hit = o_p == pack
            b_load = tl.where(m_hit, b_load + key_to_fpval(best), b_load)  # float32, as the reference adds
            b_cnt = tl.where(m_hit, b_cnt + 1, b_cnt)
            m_item = o_i == item
            b_pack = tl.where(m_item, pack, b_pack)
            b_rank = tl.where(m_item, rank, b_rank)
            b_item = tl.where(m_item, NO_KEY_MAX, b_item)
    return b_pack, b_rank


@triton.jit
def _take_pack(b_key, o_p, weight, item, scr_placed, CAPACITY: tl.constexpr, BLOCK_P: tl.constexpr):
    """One step of :func:`_pack_sorted`: ``item`` (of ``weight``) into the least-loaded open pack."""
    choice = tl.min(b_key, axis=0)
    pack = min_key_index(choice)
    rank = key_payload(choice)
    load = key_to_fpval(choice) + weight  # float32, as the reference adds
    new_key = tl.where(rank + 1 < CAPACITY, min_key(load, pack, rank + 1, BLOCK_P, CAPACITY), NO_KEY_MIN)
    tl.store(scr_placed + item, place_key(pack, rank, BLOCK_P, CAPACITY))
    return tl.where(o_p == pack, new_key, b_key)


@triton.jit
def _pack_sorted(
    b_w,  # [BLOCK_I] float32 item weights
    scr_w,  # float32 scratch, NUM_ITEMS: the weights in taking order
    scr_i,  # int32 scratch, 2 * NUM_ITEMS: the items in taking order, then each item's place_key(pack, rank)
    NUM_ITEMS: tl.constexpr,
    NUM_PACKS: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """balanced_packing of one row: returns (pack, rank), each [BLOCK_I] int32.

    Equal to the greedy of docs/algorithm.md, step for step, with less work per step:

    * The order in which the greedy takes the items (heaviest first, then lower index) does not
      depend on the packs, so one ``tl.sort`` of their keys fixes it, and the items stream from
      scratch: four steps per loop iteration, the next four loaded while these are placed.
    * The first round needs no search: while the items taken so far all weigh more than zero, item
      ``k < NUM_PACKS`` finds packs ``0 .. k - 1`` loaded and ``k ..`` empty, so it goes to pack ``k``.
      The first ``min(NUM_PACKS, Z + 1)`` items (``Z`` of them weigh more than zero) are placed at once.
    * A step is one ``tl.min`` over the packs' keys, spread over at least a whole warp (its min is two
      REDUX, no shuffles). The key carries the pack's load and count, so a step rewrites only the
      chosen pack's key.

    Each item's (pack, rank) goes to scratch with one scalar store and is read back at the end. With one
    item per pack, item i is in pack i (the definition's shortcut) and the scratch is not touched.
    """
    CAPACITY: tl.constexpr = NUM_ITEMS // NUM_PACKS
    o_i = tl.arange(0, BLOCK_I)
    if CAPACITY == 1:  # one item per pack: item i in pack i, no sorting at all
        b_pack = o_i
        b_rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    else:
        LANES: tl.constexpr = max(BLOCK_P, 32)
        m_i = o_i < NUM_ITEMS
        o_p = tl.arange(0, LANES)
        scr_placed = scr_i + NUM_ITEMS
        b_none = tl.zeros([BLOCK_I], dtype=tl.int32)
        b_order = tl.sort(tl.where(m_i, max_key(b_w, o_i, b_none, BLOCK_I, 1), NO_KEY_MAX), descending=True)
        first = tl.minimum(tl.sum((m_i & (b_w > 0.0)).to(tl.int32), axis=0) + 1, NUM_PACKS)  # the first round
        b_item = max_key_index(b_order)
        tl.store(scr_w + o_i, key_to_fpval(b_order), mask=m_i)
        tl.store(scr_i + o_i, b_item, mask=m_i)
        tl.store(scr_placed + b_item, place_key(o_i, 0, BLOCK_I, CAPACITY), mask=m_i & (o_i < first))
        tl.debug_barrier()
        m_first = o_p < first
        b_key = min_key(tl.load(scr_w + o_p, mask=m_first, other=0.0), o_p, m_first.to(tl.int32), LANES, CAPACITY)
        b_key = tl.where(o_p < NUM_PACKS, b_key, NO_KEY_MIN)
        end = first + (NUM_ITEMS - first) // 4 * 4  # the unrolled steps; the rest one by one
        w0 = tl.load(scr_w + first + 0, mask=first + 0 < end, other=0.0)
        w1 = tl.load(scr_w + first + 1, mask=first + 1 < end, other=0.0)
        w2 = tl.load(scr_w + first + 2, mask=first + 2 < end, other=0.0)
        w3 = tl.load(scr_w + first + 3, mask=first + 3 < end, other=0.0)
        i0 = tl.load(scr_i + first + 0, mask=first + 0 < end, other=0)
        i1 = tl.load(scr_i + first + 1, mask=first + 1 < end, other=0)
        i2 = tl.load(scr_i + first + 2, mask=first + 2 < end, other=0)
        i3 = tl.load(scr_i + first + 3, mask=first + 3 < end, other=0)
        for k in range(first + 4, end + 4, 4):
            m_next = k < end
            v0 = tl.load(scr_w + k + 0, mask=m_next, other=0.0)
            v1 = tl.load(scr_w + k + 1, mask=m_next, other=0.0)
            v2 = tl.load(scr_w + k + 2, mask=m_next, other=0.0)
            v3 = tl.load(scr_w + k + 3, mask=m_next, other=0.0)
            j0 = tl.load(scr_i + k + 0, mask=m_next, other=0)
            j1 = tl.load(scr_i + k + 1, mask=m_next, other=0)
            j2 = tl.load(scr_i + k + 2, mask=m_next, other=0)
            j3 = tl.load(scr_i + k + 3, mask=m_next, other=0)
            b_key = _take_pack(b_key, o_p, w0, i0, scr_placed, CAPACITY, LANES)
            b_key = _take_pack(b_key, o_p, w1, i1, scr_placed, CAPACITY, LANES)
            b_key = _take_pack(b_key, o_p, w2, i2, scr_placed, CAPACITY, LANES)
            b_key = _take_pack(b_key, o_p, w3, i3, scr_placed, CAPACITY, LANES)
            w0, w1, w2, w3 = v0, v1, v2, v3
            i0, i1, i2, i3 = j0, j1, j2, j3
        for k in range(end, NUM_ITEMS):
            b_key = _take_pack(b_key, o_p, tl.load(scr_w + k), tl.load(scr_i + k), scr_placed, CAPACITY, LANES)
        tl.debug_barrier()
        b_placed = tl.load(scr_placed + o_i, mask=m_i, other=0)
        b_pack = place_pack(b_placed)
        b_rank = place_rank(b_placed)
    return b_pack, b_rank


@triton.jit
def _replicate_greedy(
    b_w,  # [BLOCK_E] float32 expert loads
    NUM_LOG: tl.constexpr,
    NUM_PHY: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """replicate_experts of one row (docs/algorithm.md).

    Returns (phy2log [BLOCK_R], rank [BLOCK_R], cnt [BLOCK_E]) int32 and share [BLOCK_E] float32,
    the final ``w / cnt`` of each expert.
    """
    COUNT_LIMIT: tl.constexpr = NUM_PHY - NUM_LOG + 2  # counts run 1 .. NUM_PHY - NUM_LOG + 1
    o_e = tl.arange(0, BLOCK_E)
    o_r = tl.arange(0, BLOCK_R)
    m_e = o_e < NUM_LOG
    b_phy = tl.where(o_r < NUM_LOG, o_r, 0)
    b_rank = tl.zeros([BLOCK_R], dtype=tl.int32)
    b_one = tl.full([BLOCK_E], 1, dtype=tl.int32)
    # [BLOCK_E] largest share first, then lower expert; the count rides along in the key
    b_key = tl.where(m_e, max_key(b_w, o_e, b_one, BLOCK_E, COUNT_LIMIT), NO_KEY_MAX)
    if BLOCK_E >= 128:
        # Many experts per thread: the key also carries the share, so a step divides once (only the
        # chosen expert's share changes) and rewrites one key (about half the cycles per step for
        # 256 experts in the static report, benchmarks/results/static-sm90).
        b_bits = b_w.to(tl.int32, bitcast=True)  # non-negative float32 values order like their bits
        for slot in range(NUM_LOG, NUM_PHY):
            expert, count, b_phy, b_rank = _take_replica(b_key, b_phy, b_rank, o_r, slot)
            m_hit = o_e == expert
            load = tl.max(tl.where(m_hit, b_bits, 0), axis=0).to(tl.float32, bitcast=True)  # w of the expert
            share = tl.math.div_rn(load, (count + 1).to(tl.float32))
            b_key = tl.where(m_hit, max_key(share, expert, count + 1, BLOCK_E, COUNT_LIMIT), b_key)
        b_cnt = tl.where(m_e, key_payload(b_key), 1)
        b_share = tl.where(m_e, key_to_fpval(b_key), 0.0)
    else:
        # A few experts per thread: dividing every lane keeps the step's chain short.
        b_cnt = b_one
        b_share = b_w
        for slot in range(NUM_LOG, NUM_PHY):
            expert, count, b_phy, b_rank = _take_replica(b_key, b_phy, b_rank, o_r, slot)
            m_hit = o_e == expert
            b_cnt = tl.where(m_hit, count + 1, b_cnt)
            b_share = tl.where(m_hit, tl.math.div_rn(b_w, b_cnt.to(tl.float32)), b_share)
            b_key = tl.where(m_hit, max_key(b_share, o_e, b_cnt, BLOCK_E, COUNT_LIMIT), b_key)
    return b_phy, b_rank, b_cnt, b_share


@triton.jit
def _balanced_packing_kernel(
    # inputs
    w_ptr,  # [X, NUM_ITEMS] float32
    # outputs
    pack_ptr,  # [X, NUM_ITEMS] int64
    rank_ptr,  # [X, NUM_ITEMS] int64
    invalid_ptr,  # [X] int32
    # scratch, one row per program
    scratch_i_ptr,  # [X, 2 * NUM_ITEMS] int32
    scratch_f_ptr,  # [X, NUM_ITEMS] float32
    NUM_ITEMS: tl.constexpr,
    NUM_PACKS: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    o_i = tl.arange(0, BLOCK_I)
    m_i = o_i < NUM_ITEMS
    b_w, valid = _load_row(w_ptr, invalid_ptr, row, NUM_ITEMS, BLOCK_I)
    if valid:
        scr_f = scratch_f_ptr + row * NUM_ITEMS
        scr_i = scratch_i_ptr + row * (2 * NUM_ITEMS)
        b_pack, b_rank = _pack_sorted(b_w, scr_f, scr_i, NUM_ITEMS, NUM_PACKS, BLOCK_I, BLOCK_P)
        tl.store(pack_ptr + row * NUM_ITEMS + o_i, b_pack.to(tl.int64), mask=m_i)
        tl.store(rank_ptr + row * NUM_ITEMS + o_i, b_rank.to(tl.int64), mask=m_i)


@triton.jit
def _replicate_kernel(
    # inputs
    w_ptr,  # [X, NUM_LOG] float32
    # outputs
    phy2log_ptr,  # [X, NUM_PHY] int64
    rank_ptr,  # [X, NUM_PHY] int64
    cnt_ptr,  # [X, NUM_LOG] int64
    invalid_ptr,  # [X] int32
    NUM_LOG: tl.constexpr,
    NUM_PHY: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BLOCK_E)
    o_r = tl.arange(0, BLOCK_R)
    m_e = o_e < NUM_LOG
    m_r = o_r < NUM_PHY
    b_w, valid = _load_row(w_ptr, invalid_ptr, row, NUM_LOG, BLOCK_E)
    if valid:
        b_phy, b_rank, b_cnt, _ = _replicate_greedy(b_w, NUM_LOG, NUM_PHY, BLOCK_E, BLOCK_R)
        tl.store(phy2log_ptr + row * NUM_PHY + o_r, b_phy.to(tl.int64), mask=m_r)
        tl.store(rank_ptr + row * NUM_PHY + o_r, b_rank.to(tl.int64), mask=m_r)
        tl.store(cnt_ptr + row * NUM_LOG + o_e, b_cnt.to(tl.int64), mask=m_e)


@triton.jit
def _rebalance_kernel(
    # inputs
    w_ptr,  # [L, E] float32
    # outputs
    phy2log_ptr,  # [L, R] int64
    phyrank_ptr,  # [L, R] int64
    logcnt_ptr,  # [L, E] int64
    log2phy_ptr,  # [L, E, WIDTH] int64
    invalid_ptr,  # [L] int32
    # scratch, one row per program
    scratch_i_ptr,  # [L * N, G + EN + 2 RN] int32: group bases, mlog2log of the node, slot packing
    scratch_f_ptr,  # [L * N, EN + RN] float32: share of each expert of the node, slot packing
    E: tl.constexpr,
    R: tl.constexpr,
    G: tl.constexpr,
    N: tl.constexpr,
    P: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_E: tl.constexpr,  # >= E
    BLOCK_G: tl.constexpr,  # >= G
    BLOCK_N: tl.constexpr,  # >= N
    BLOCK_EN: tl.constexpr,  # >= E / N
    BLOCK_RN: tl.constexpr,  # >= R / N
    BLOCK_PN: tl.constexpr,  # >= P / N
    BLOCK_GN: tl.constexpr,  # >= G / N
    BLOCK_F: tl.constexpr,  # log2phy entries of each group filled with -1 per step
):
    """Program ``pid`` solves node ``pid % N`` of layer ``pid // N`` (hierarchical policy;
    the global policy is G = N = 1)."""
    GS: tl.constexpr = E // G
    GPN: tl.constexpr = G // N
    EN: tl.constexpr = E // N
    RN: tl.constexpr = R // N
    PN: tl.constexpr = P // N
    S: tl.constexpr = R // P
    pid = tl.program_id(0).to(tl.int64)
    layer = pid // N
    node = pid % N
    w_row = w_ptr + layer * E
    o_e = tl.arange(0, BLOCK_E)
    o_j = tl.arange(0, BLOCK_EN)
    o_r = tl.arange(0, BLOCK_RN)
    m_j = o_j < EN
    m_r = o_r < RN
    scr_i = scratch_i_ptr + pid * (G + EN + 2 * RN)  # group bases | mlog2log | slot packing
    scr_f = scratch_f_ptr + pid * (EN + RN)  # shares | slot packing

    valid = _row_is_valid(tl.load(w_row + o_e, mask=o_e < E, other=0.0), o_e < E)
    if node == 0:
        tl.store(invalid_ptr + layer, (~valid).to(tl.int32))
    if valid:
        # 1. Groups to nodes and mlog2log of this node ([BLOCK_EN] int32: logical expert of each
        #    node-local mlog index). One group per node: the packing is the identity.
        if GPN == 1:
            b_m2l = (node * EN + o_j).to(tl.int32)
        else:
            o_g = tl.arange(0, BLOCK_G)
            m_g = o_g < G
            b_gload = tl.zeros([BLOCK_G], dtype=tl.float32)
            for k in range(GS):  # float32, in the spec's order
                b_gload += tl.load(w_row + o_g * GS + k, mask=m_g, other=0.0)
            b_gpack, b_grank = _pack_greedy(b_gload, G, N, BLOCK_G, BLOCK_N)
            tl.store(scr_i + o_g, (b_gpack * GPN + b_grank) * GS, mask=m_g)
            tl.debug_barrier()
            b_mlog = tl.load(scr_i + o_e // GS, mask=o_e < E, other=0) + o_e % GS  # [BLOCK_E]
            m_mine = (o_e < E) & (b_mlog >= node * EN) & (b_mlog < node * EN + EN)
            tl.store(scr_i + G + (b_mlog - node * EN), o_e, mask=m_mine)
            tl.debug_barrier()
            b_m2l = tl.load(scr_i + G + o_j, mask=m_j, other=0)
        b_wn = tl.load(w_row + b_m2l, mask=m_j, other=0.0)
        # -1 in every log2phy column of the node's experts; the replicas' columns overwrite it in
        # step 4, after a barrier. The node's experts are GPN groups, each GS * WIDTH contiguous int64:
        # [BLOCK_GN, BLOCK_F] tiles of (group, entry), aligned, so the stores vectorise and need no
        # per-column mask; issued now, they drain during the greedy.
        o_n = tl.arange(0, BLOCK_GN)
        if GPN == 1:
            b_start = tl.zeros([BLOCK_GN], dtype=tl.int64) + node * EN
        else:  # the group in position n of this node
            m_in = (b_gpack[None, :] == node) & (b_grank[None, :] == o_n[:, None]) & m_g[None, :]
            b_start = tl.sum(tl.where(m_in, o_g[None, :], 0), axis=1).to(tl.int64) * GS
        p_run = log2phy_ptr + (layer * E + b_start) * WIDTH  # [BLOCK_GN]
        o_f = tl.arange(0, BLOCK_F)
        for x0 in range(0, GS * WIDTH, BLOCK_F):
            m_f = (o_n < GPN)[:, None] & (x0 + o_f < GS * WIDTH)[None, :]
            tl.store(p_run[:, None] + x0 + o_f[None, :], tl.full([BLOCK_GN, BLOCK_F], -1, tl.int64), mask=m_f)

        # 2. Replicas within the node.
        b_phy, b_rank, b_cnt, b_share = _replicate_greedy(b_wn, EN, RN, BLOCK_EN, BLOCK_RN)

        # 3. Slots to GPUs: each replica carries its expert's share.
        if S == 1:
            b_pos = o_r
        else:
            tl.store(scr_f + o_j, b_share, mask=m_j)
            tl.debug_barrier()
            b_items = tl.load(scr_f + b_phy, mask=m_r, other=0.0)
            b_pack, b_rk = _pack_sorted(b_items, scr_f + EN, scr_i + G + EN, RN, PN, BLOCK_RN, BLOCK_PN)
            b_pos = b_pack * S + b_rk

        # 4. Outputs in global numbering.
        if GPN == 1:
            b_log = node * EN + b_phy
        else:
            b_log = tl.load(scr_i + G + b_phy, mask=m_r, other=0)
        b_slot = node * RN + b_pos  # [BLOCK_RN]
        tl.store(phy2log_ptr + layer * R + b_slot, b_log.to(tl.int64), mask=m_r)
        tl.store(phyrank_ptr + layer * R + b_slot, b_rank.to(tl.int64), mask=m_r)
        tl.store(logcnt_ptr + layer * E + b_m2l, b_cnt.to(tl.int64), mask=m_j)
        tl.debug_barrier()  # after the -1 fill of the same rows
        tl.store(log2phy_ptr + (layer * E + b_log) * WIDTH + b_rank, b_slot.to(tl.int64), mask=m_r)
