"""Selection keys: one int64 per candidate, so that one ``tl.max``/``tl.min`` makes an exact choice.

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
