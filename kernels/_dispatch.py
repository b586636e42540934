"""Triton code of per-step load recording fused with token dispatch.

For one MoE layer, each routed ``(token, k)`` entry with logical expert ``e``:

* adds 1 to ``counts[e]`` (a per-program histogram, then one atomic add per expert, so hot
  experts do not serialise thousands of atomics);
* is mapped to a physical slot ``log2phy[e, token % logcnt[e]]``: tokens spread evenly and
  deterministically over the expert's replicas.

Entries with ``e < 0`` or ``e >= E`` are not counted, get slot ``-1``, and are counted in
``invalid[0]``.
"""

import triton
import triton.language as tl


@triton.jit
def _record_dispatch_kernel(
    # inputs
    ids_ptr,  # [T * K] int32/int64 logical expert ids
    log2phy_ptr,  # [E, X] int64
    logcnt_ptr,  # [E] int64
    # outputs
    counts_ptr,  # [E] int64 (or int32), accumulated
    phy_ptr,  # [T * K] physical slot ids (ids' dtype)
    n_invalid_ptr,  # [1] int64 (or int32), accumulated
    n_entries,
    # element strides (any layout: views of wider tensors are read and written in place)
    stride_l2p_e,
    stride_l2p_x,
    stride_cnt,
    stride_counts,
    E: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,  # > E: bin E collects invalid and padding entries
):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n_entries
    b_e = tl.load(ids_ptr + o, mask=m, other=-1).to(tl.int64)  # [BLOCK]
    m_valid = m & (b_e >= 0) & (b_e < E)
    b_e = tl.where(m_valid, b_e, E)
    b_hist = tl.histogram(b_e.to(tl.int32), BLOCK_E)  # [BLOCK_E]
    o_e = tl.arange(0, BLOCK_E)
    b_hist = b_hist.to(counts_ptr.dtype.element_ty)  # counts accumulate in their own width (int64)
    tl.atomic_add(counts_ptr + o_e * stride_counts, b_hist, mask=(o_e < E) & (b_hist > 0))
    n_bad = tl.sum((m & ~m_valid).to(tl.int32), axis=0).to(n_invalid_ptr.dtype.element_ty)
    tl.atomic_add(n_invalid_ptr, n_bad, mask=n_bad > 0)
    b_cnt = tl.load(logcnt_ptr + b_e * stride_cnt, mask=m_valid, other=1)
    b_phy = tl.load(log2phy_ptr + b_e * stride_l2p_e + ((o // K) % b_cnt) * stride_l2p_x, mask=m_valid, other=-1)
    tl.store(phy_ptr + o, b_phy.to(phy_ptr.dtype.element_ty), mask=m)
