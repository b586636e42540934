"""Selection keys and selections: one int64 per candidate, so that one ``tl.max``/``tl.min`` makes
an exact choice, and the two first-minimum selections of the search and the assignment.

Every greedy step of docs/algorithm.md picks the candidate with the largest (or smallest) float32 value,
ties to the lower index. Non-negative float32 values order like their bit patterns, so a key is

    bits 63..32   the value's float32 bits           (fpval_to_key)
    bits 31..16   the index field                    (lower index first, for max or min)
    bits 15..0    a small payload carried along      (a count, read back with key_payload)

and a single reduction returns the choice, its value and its payload together. The index and
payload fields are 16 bits wide: ``tl.static_assert`` ties them to each caller's limits.
"""

import triton
import triton.language as tl

FIELD_BITS: tl.constexpr = tl.constexpr(16)
FIELD_MASK: tl.constexpr = tl.constexpr(0xFFFF)
FIELD_LIMIT: tl.constexpr = tl.constexpr(1 << 16)  # values a field holds: 0 .. FIELD_LIMIT - 1
NO_KEY_MAX: tl.constexpr = tl.constexpr(-1)  # below every max-key
NO_KEY_MIN: tl.constexpr = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # above every min-key


@triton.jit
def fpval_to_key(x):
    """Order-preserving int64 image of a non-negative float32 (``-0.0`` taken as ``+0.0``)."""
    x = tl.where(x == 0.0, 0.0, x)
    return x.to(tl.int32, bitcast=True).to(tl.int64)


@triton.jit
def key_to_fpval(key):
    """The float32 value of a selection key."""
    return (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def max_key(value, index, payload, NUM_INDICES: tl.constexpr, PAYLOAD_LIMIT: tl.constexpr):
    """Key whose ``tl.max`` is the largest ``value``, ties to the lower ``index``.

    ``index < NUM_INDICES`` and ``payload < PAYLOAD_LIMIT``, both at most ``2**16``.
    """
    tl.static_assert(NUM_INDICES <= FIELD_LIMIT, "index field is 16 bits")
    tl.static_assert(PAYLOAD_LIMIT <= FIELD_LIMIT, "payload field is 16 bits")
    lower_first = FIELD_MASK.value - index.to(tl.int64)  # a max prefers the lower index
    return (fpval_to_key(value) << 32) | (lower_first << FIELD_BITS) | payload.to(tl.int64)


@triton.jit
def max_key_index(key):
    """The index a :func:`max_key` was made from."""
    return (FIELD_MASK.value - ((key >> FIELD_BITS) & FIELD_MASK)).to(tl.int32)


@triton.jit
def min_key(value, index, payload, NUM_INDICES: tl.constexpr, PAYLOAD_LIMIT: tl.constexpr):
    """Key whose ``tl.min`` is the smallest ``value``, ties to the lower ``index`` (limits as :func:`max_key`)."""
    tl.static_assert(NUM_INDICES <= FIELD_LIMIT, "index field is 16 bits")
    tl.static_assert(PAYLOAD_LIMIT <= FIELD_LIMIT, "payload field is 16 bits")
    return (fpval_to_key(value) << 32) | (index.to(tl.int64) << FIELD_BITS) | payload.to(tl.int64)


@triton.jit
def min_key_index(key):
    """The index a :func:`min_key` was made from."""
    return ((key >> FIELD_BITS) & FIELD_MASK).to(tl.int32)


@triton.jit
def key_payload(key):
    """The payload of a :func:`max_key` or :func:`min_key`."""
    return (key & FIELD_MASK).to(tl.int32)


# ----------------------------------------------------------------------------------------------
# A packed item's place: (pack, rank in pack) in one int32, for the per-program scratch
# ----------------------------------------------------------------------------------------------


@triton.jit
def place_key(pack, rank, NUM_PACKS: tl.constexpr, CAPACITY: tl.constexpr):
    """``(pack << 16) | rank`` as an int32: ``pack < NUM_PACKS <= 2**15`` (the sign bit stays clear)
    and ``rank < CAPACITY <= 2**16``."""
    tl.static_assert(NUM_PACKS <= FIELD_LIMIT // 2, "pack field is 15 bits of an int32")
    tl.static_assert(CAPACITY <= FIELD_LIMIT, "rank field is 16 bits")
    return (pack << FIELD_BITS) | rank


@triton.jit
def place_pack(key):
    """The pack of a :func:`place_key`."""
    return key >> FIELD_BITS


@triton.jit
def place_rank(key):
    """The rank in its pack of a :func:`place_key`."""
    return key & FIELD_MASK


# ----------------------------------------------------------------------------------------------
# First minima over a block. Two meanings, two names:
# ----------------------------------------------------------------------------------------------

NO_INDEX: tl.constexpr = tl.constexpr(1 << 30)  # above any slot, GPU or expert index: "none"
INF: tl.constexpr = tl.constexpr(float("inf"))  # float infinity: a candidate that is not one


@triton.jit
def first_min_or_none(b_v, b_idx):
    """``(min, lowest index among equal minima)`` of float values of any rank; ``(inf, NO_INDEX)``
    when every value is ``inf`` (no candidate): the search's choice of a move."""
    v = tl.min(b_v)
    return v, tl.where(v < INF, tl.min(tl.where(b_v == v, b_idx, NO_INDEX)), NO_INDEX)


@triton.jit
def _argmin_combine(value0, index0, value1, index1):
    take0 = (value0 < value1) | ((value0 == value1) & (index0 < index1))
    return tl.where(take0, value0, value1), tl.where(take0, index0, index1)


@triton.jit
def argmin_first(b_key, o):
    """``(min, first index of the min)`` of a 1-D block, whatever the values (NumPy's ``argmin``):
    the assignment's column choice. Written out rather than ``tl.min(..., return_indices=True)``,
    whose tie rule the interpreter does not follow."""
    return tl.reduce((b_key, o), 0, _argmin_combine)
