"""Triton code of the exact maximum-overlap assignment (:func:`eplb_triton.cpu.assign_max_overlap`).

One program of :func:`_assign_kernel` solves one ``[N, N]`` problem with the Hungarian algorithm in
its shortest-augmenting-path form, step for step as the reference does: rows added in order, the
first minimum over columns ``0 .. N`` taken on ties, int64 arithmetic on ``cost = -overlap``.

Everything lives in registers as ``[BLOCK_N]`` vectors over the columns ``0 .. N`` (column 0 is
the reference's virtual column). The row potentials ``u``, which the reference indexes by row,
are kept by column instead: ``b_u[j] = u[p[j]]``, the potential of the row holding column ``j``
(column 0 holds the row being added). Every row added so far holds exactly one column, so the
reference's scatter ``u[p[j]] += delta`` over the visited columns becomes ``b_u[j] += delta``
there, its gather ``u[p[j0]]`` becomes ``b_u[j0]``, and an augmentation moves ``b_u`` along with
``p``. No scratch memory, no barriers; a scalar gather is one masked sum.

The loops stop where the reference's do (``p[j0] == 0``, ``j0 == 0``) and never run past its
bounds of ``N + 1`` steps. Where gains are so large that reduced costs reach ``COST_INF`` (far
beyond ``|overlap| <= 2**30``), the reference itself leaves rows unmatched and returns
uninitialised memory for them; nothing can match it there.
"""

import triton
import triton.language as tl

from ._keys import argmin_first

COST_INF: tl.constexpr = tl.constexpr(1 << 40)  # cpu.COST_INF: a visited column's key in the argmin


@triton.jit
def _at(b_vec, o, j):
    """``b_vec[j]`` of a register vector, as a scalar."""
    return tl.sum(tl.where(o == j, b_vec, 0), axis=0)


@triton.jit
def _add_pairs(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _at_pair(b_vec0, b_vec1, o, j):
    """``(b_vec0[j], b_vec1[j])`` as scalars, in one reduction."""
    m_j = o == j
    return tl.reduce((tl.where(m_j, b_vec0, 0), tl.where(m_j, b_vec1, 0)), 0, _add_pairs)


@triton.jit
def _assign_kernel(
    overlap_ptr,  # [B, N, N] int64
    skip_ptr,  # [B] int32: 1 where the problem is answered by the identity, unsolved
    col_ptr,  # [B, N] int64: the column of each row
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_N > N, "columns 0 .. N")
    b = tl.program_id(0).to(tl.int64)
    solve = tl.load(skip_ptr + b) == 0
    row_ptr = overlap_ptr + b * N * N - N - 1  # row_ptr + i * N + j: overlap[b, i - 1, j - 1]
    o = tl.arange(0, BLOCK_N)  # columns 0 .. N, then padding
    m_real = (o >= 1) & (o <= N)
    b_v = tl.zeros([BLOCK_N], dtype=tl.int64)  # [BLOCK_N] column potentials
    b_u = tl.zeros([BLOCK_N], dtype=tl.int64)  # [BLOCK_N] potential of the row holding each column
    b_p = tl.zeros([BLOCK_N], dtype=tl.int32)  # [BLOCK_N] row holding each column (1-based; 0 = none)
    b_way = tl.zeros([BLOCK_N], dtype=tl.int32)  # [BLOCK_N] previous column on the shortest path
    for i in range(1, N + 1):
        b_p = tl.where(o == 0, i, b_p)
        b_u = tl.where(o == 0, 0, b_u)  # row i has not been touched yet
        b_minv = tl.full([BLOCK_N], COST_INF, dtype=tl.int64)  # [BLOCK_N]
        # [BLOCK_N] columns on the tree. Padding counts as visited: its key COST_INF never beats column
        # 0's (visited, COST_INF, lower index), so the first minimum over 0 .. N is the first over all lanes.
        b_used = o > N
        j0 = 0
        i0 = i  # p[j0]
        u0 = tl.zeros([], dtype=tl.int64)  # u[i0]
        steps = 0
        run = solve
        while run:
            b_used = b_used | (o == j0)
            b_cost = -tl.load(row_ptr + i0 * N + o, mask=m_real, other=0)  # [BLOCK_N] cost[i0, :]
            b_cur = b_cost - u0 - b_v
            m_better = ~b_used & (b_cur < b_minv)
            b_minv = tl.where(m_better, b_cur, b_minv)
            b_way = tl.where(m_better, j0, b_way)
            delta, j1 = argmin_first(tl.where(b_used, COST_INF, b_minv), o)
            b_u = tl.where(b_used, b_u + delta, b_u)
            b_v = tl.where(b_used, b_v - delta, b_v)
            b_minv = b_minv - delta  # the reference keeps visited columns' minv, but never reads it again
            j0 = j1
            i0, u0 = _at_pair(b_p, b_u, o, j0)
            steps += 1
            run = (i0 != 0) & (steps <= N)
        # augment along the path back to column 0
        steps = 0
        while (j0 != 0) & (steps <= N):
            j1 = _at(b_way, o, j0)
            p1, u1 = _at_pair(b_p, b_u, o, j1)
            m_j0 = o == j0
            b_p = tl.where(m_j0, p1, b_p)
            b_u = tl.where(m_j0, u1, b_u)
            j0 = j1
            steps += 1
    # column j - 1 for row p[j] - 1; column 0 holds a copy of the last row, not a real column. A
    # skipped problem never ran a path (every row's p stays 0 but column 0's): the identity.
    b_p = tl.where(solve, b_p, o)
    tl.store(col_ptr + b * N + b_p - 1, (o - 1).to(tl.int64), mask=m_real & (b_p > 0))
