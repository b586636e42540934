"""Certified lower bounds on the largest GPU load of any valid placement (docs/algorithm.md 1-3, 8).

:func:`lower_bound` returns, per layer, a value that the largest GPU load of **every** placement of
the policy that runs (``_validation.select_policy``) is at least, as the float64 loads of
``metrics.gpu_loads`` measure it. It is built from three certificates, each a proof that a
candidate max load ``T`` cannot be reached:

1. **Mean and largest share** (the bound of docs/algorithm.md 8). The GPU loads add up to the
   total, so the largest is at least ``total / P``; a GPU holds at least one replica, so the
   largest load is at least ``t* = min over count vectors of the largest share``. ``t*`` is
   computed here in float64 by bisection on ``t``: with ``a_e(t)``, the smallest count whose share
   ``fl(w_e / c)`` is ``<= t``, every count vector with ``sum c = R`` has a share ``> t`` exactly
   when ``sum a_e(t) > R`` (shares only shrink with more copies). This is the value the greedy
   replication reaches (docs/algorithm.md 8 proves the greedy optimal), but taken in float64, the
   precision of the metrics (the greedy's own float32 shares can lie one float32 rounding above
   the float64 share: ``w = [[1]]`` on 3 slots, 0.3333333433 against 0.3333333333).

2. **Pairing certificate, few slots per GPU** (``2 <= S <= PAIR_MAX_S``, ``S = R / P``). Call a
   replica *heavy* if its share is ``> T / 2`` and *light* otherwise. In a placement with max load
   ``<= T`` a GPU holds at most one heavy replica, and if it holds one of share ``s``, each of its
   ``S - 1`` other replicas has share ``<= T - s``. Take any non-decreasing ``f`` on ``[0, T/2]``
   with ``0 <= f <= 1`` and give every replica a cost: ``f(t)`` to a light replica of share ``t``,
   ``1 + (S - 1) * (1 - f(T - s))`` to a heavy one of share ``s``. A GPU then costs at most ``S``:
   with a heavy ``s``, ``1 + (S-1)(1 - f(T-s)) + sum f(t_i) <= S`` because every ``t_i <= T - s``;
   without one, ``S`` light costs of at most 1. So the replicas of a placement with max load
   ``<= T`` cost at most ``S * P = R`` in all. Every expert's ``c`` replicas cost ``c * cost(w/c)``,
   and its count lies in ``[a_e(T), a_e(T) + B]`` with ``B = R - sum a(T)``; hence

       F(T) = sum over experts of  min over those counts of  c * cost(w_e / c)  >  R

   proves that no placement reaches ``T``. With the step ``f = 1[t > T - x]`` (``x > T / 2``) this
   is the Hall condition of the issue: light replicas ``<= T - x`` cost 0, heavy ones ``>= x``
   cost ``S``, the rest 1, and ``F <= R`` reads "the heavy replicas ``>= x`` find ``S - 1``
   distinct partners ``<= T - x``" (with the best counts for that one ``x``). A mixture of steps
   is what the LP relaxation of the exact pairing model optimises over. Single steps are weak on
   the real loads (decode EP144, one file: mean/bound 0.899 even with the exact best counts per
   ``x``, against 0.886 for the LP and 0.949 for part 1); the one-parameter family used here
   reaches 0.889, within ~0.003 of the LP:
   ``f_tau(t) = 1 / ceil(tau / t)`` (``1`` for ``t >= tau``, ``0`` for ``t = 0``), i.e. a light
   replica small enough that ``k`` of them fit in ``tau`` costs ``1/k``. ``tau`` is taken just
   below each of the ``TAU_CANDIDATES`` smallest expert loads of the row and below twice the
   ``TAU_DOUBLED`` smallest (the certifying ``tau`` on the real loads). For each ``T`` of a
   bisection between the bound of part 1 and the greedy placement's max load, ``F(T)`` is
   evaluated for every ``tau``; the largest ``T`` proven unreachable is the bound. (On the real
   loads the certificate never adds anything for ``S >= 3``; it runs up to ``PAIR_MAX_S``.)

   Costs are evaluated so that rounding can only lower ``F`` (ceilings rounded up where they
   divide a light cost, down where they divide a heavy one), so a certificate never rests on a
   rounding error. Two shortcuts, both proven: an expert whose load is ``<= T / 2`` attains its
   minimum at one copy (``c * f(w / c) = c / ceil(c tau / w) >= 1 / ceil(tau / w)`` since
   ``ceil(c x) <= c ceil(x)``; and ``>= 1`` when ``w >= tau``); for the light counts of a heavier
   expert the minimum is replaced by the lower bound ``min(c_l / m0, q (1 - 1 / (m0 + 1)))`` with
   ``q = w / tau``, ``c_l`` its first light count and ``m0 = ceil(c_l / q)`` (for
   ``m = ceil(c / q) > m0``, ``c > (m - 1) q``).

3. **Hierarchical policy**: every replica of a group's experts is on that group's node, and each
   node holds ``G / N`` whole groups on ``R / N`` slots and ``P / N`` GPUs. For a fixed split of
   the groups over the nodes the largest GPU load is at least the largest over nodes of the node's
   own bound (parts 1-2 on the node's experts, slots and GPUs); so the minimum over all splits of
   that maximum is a bound. The splits are the set partitions of the ``G`` groups into ``N``
   unordered blocks of ``G / N`` (105 for ``G = 8, N = 4``); each block's bound is computed once.
   When there are more than ``MAX_PARTITIONS`` of them, the documented weaker fallback is used: the
   largest over groups of the bound of a node holding that group alone (a node holding more
   experts on the same slots has no smaller bound: every part above only grows with more experts,
   their costs being ``>= 0``), and the global bound.

Rounding: the metrics add float64 shares; a final relative margin of ``REL_MARGIN`` absorbs the
rounding of those sums (at most ``S`` additions) and of this module's own sums.

Everything is vectorised over layers (and blocks) with NumPy; no per-layer Python loop.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from . import cpu
from ._validation import EplbArgumentError, _check_counts, select_policy
from .cpu import min_counts

REL_MARGIN = 1e-9
PAIR_MAX_S = 4  # the pairing certificate runs for 2 <= S <= PAIR_MAX_S slots per GPU
TAU_CANDIDATES = 8  # tau just below each of this many smallest loads of a row ...
TAU_DOUBLED = 2  # ... and just below twice the TAU_DOUBLED smallest
BISECTION_STEPS = 12  # bracket [part 1, greedy peak] halved this often: 2.4e-4 of its width
MAX_PARTITIONS = 20000

_TAU_SHRINK = 1.0 - 2.0**-30  # tau strictly below the candidate load: that expert then costs exactly 1


def lower_bound(weight: object, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """Certified lower bound on the max GPU load of any placement of the policy that runs.

    Args:
        weight: ``[L, E]`` loads (a numpy array, nested list or CPU tensor; taken in float64, as
            ``metrics.gpu_loads`` takes them).
        num_replicas, num_groups, num_nodes, num_gpus: ``R, G, N, P`` as for ``rebalance_experts``.

    Returns:
        ``[L]`` float64: no valid placement has a smaller largest GPU load (module docstring).
    """
    w = np.array(weight, dtype=np.float64, copy=True)
    if w.ndim != 2 or w.shape[1] == 0:
        raise EplbArgumentError(f"weight must be 2-D [num_layers, num_logical_experts], got shape {w.shape}")
    L, E = w.shape
    cfg = _check_counts(max(L, 1), E, num_replicas, num_groups, num_nodes, num_gpus)
    if not np.all(np.isfinite(w) & (w >= 0)):
        raise EplbArgumentError("weight must be finite and >= 0")
    w += 0.0  # -0.0 -> +0.0
    R, P = cfg.num_replicas, cfg.num_gpus
    if L == 0:
        return np.zeros(0, np.float64)
    label, G, N = select_policy(cfg.num_groups, cfg.num_nodes)
    if label == "global":
        bound = flat_bound(w, R, P)
    else:
        bound = hierarchical_bound(w, R, G, N, P)
    return bound * (1.0 - REL_MARGIN)


# ----------------------------------------------------------------------------------------------
# Parts 1-2: one row of experts on R slots and P GPUs, no further constraint
# ----------------------------------------------------------------------------------------------


def flat_bound(w: np.ndarray, R: int, P: int) -> np.ndarray:
    """``w [X, E]`` float64: the bound of parts 1-2 for each row placed on ``R`` slots, ``P`` GPUs (no margin)."""
    base = np.maximum(w.sum(axis=1) / P, max_share_bound(w, R))
    S = R // P
    if 2 <= S <= PAIR_MAX_S and w.shape[0]:
        base = np.maximum(base, pairing_bound(w, R, P, base, greedy_peak(w, R, P)))
    return base


def max_share_bound(w: np.ndarray, R: int, steps: int = 44) -> np.ndarray:
    """``[X]``: the largest ``t`` found with ``sum a(t) > R``, i.e. every count vector has a share ``> t``.

    Bisection from a bracket that always holds: ``lo = max(total / R, max w / (R - E + 1))`` (``R``
    slots carry the total; the largest expert has at most ``R - E + 1`` copies) shrunk by ``2^-40``,
    and ``hi`` = the largest share of the counts ``1 + floor(w (R - E) / total)`` (they sum to at
    most ``R``). ``hi / lo < 2 + 2E / (R - E + 1)``, so 44 steps leave ``lo`` within ``2^-40`` of the
    exact value for the shapes of this project (and never above it)."""
    X, E = w.shape
    total = w.sum(axis=1)
    top = w.max(axis=1)
    ok = top > 0
    safe_total = np.where(ok, total, 1.0)[:, None]
    lo = np.maximum(total / R, top / (R - E + 1)) * (1.0 - 2.0**-40)
    hi = (w / (1.0 + np.floor(w * (R - E) / safe_total))).max(axis=1)
    hi = np.maximum(hi, lo)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        over = min_counts(w, np.where(ok, mid, 1.0)[:, None]).sum(axis=1) > R
        lo = np.where(ok & over, mid, lo)
        hi = np.where(ok & ~over, mid, hi)
    return np.where(ok, lo, 0.0)


def greedy_peak(w: np.ndarray, R: int, P: int) -> np.ndarray:
    """``[X]`` max GPU load (float64 shares) of the greedy placement of each row (docs/algorithm.md 3)."""
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    phy2log, _, cnt, share32 = cpu.replicate_experts(w32, R)
    items = cpu._take(share32, phy2log)
    pack, _ = cpu.balanced_packing(items, P)
    share = w / cnt
    per_slot = cpu._take(np.ascontiguousarray(share), phy2log)
    loads = np.zeros((w.shape[0], P))
    np.add.at(loads, (np.arange(w.shape[0])[:, None], pack), per_slot)
    return loads.max(axis=1)


def _ceil_up(x: np.ndarray) -> np.ndarray:
    """At least the ceiling of the exact quotient whose float value is ``x`` (one division's rounding)."""
    return np.floor(x * (1.0 + 1e-12)) + 1.0


def _ceil_down(x: np.ndarray) -> np.ndarray:
    """At most the ceiling of the exact quotient whose float value is ``x``, and ``>= 1``."""
    return np.maximum(np.ceil(x * (1.0 - 1e-12)), 1.0)


def _light_costs(wd: np.ndarray, tau: np.ndarray, H: int) -> np.ndarray:
    """``[X, K]``: the summed cost ``f(w) = 1 / ceil(tau / w)`` of the experts from column ``H`` on (one copy each)."""
    with np.errstate(divide="ignore"):
        return (1.0 / _ceil_up(tau[:, :, None] / wd[:, None, H:])).sum(axis=2)


def pairing_certified(
    wd: np.ndarray, R: int, S: int, T: np.ndarray, tau: np.ndarray, H: int, light_tail: np.ndarray
) -> np.ndarray:
    """``[X]`` bool: ``T`` is proven unreachable (part 2) by some ``tau`` of the row.

    ``wd [X, E]`` loads sorted in decreasing order; ``T [X] > 0``; ``tau [X, K] > 0``; the first
    ``H`` columns hold every expert with load ``> T / 2``; ``light_tail = _light_costs(wd, tau, H)``."""
    Tb = T[:, None]
    a_all = min_counts(wd, Tb)
    B = R - a_all.sum(axis=1)
    tk = tau[:, :, None]
    wh, a = wd[:, :H], a_all[:, :H]
    first_light = min_counts(wh, Tb * 0.5)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # light counts (c >= first_light): a lower bound on min c * f(w / c); exact at one copy
        q = wh[:, None] / tk
        cl = first_light[:, None]
        best = np.minimum(cl / _ceil_up(cl / q), q * (1.0 - 1.0 / (_ceil_down(cl / q) + 1.0)))
        best = np.where((first_light == 1.0)[:, None], 1.0 / _ceil_up(tk / wh[:, None]), best)
        # heavy counts a .. first_light - 1; count j + 1 exists only in the columns before `last`
        span = first_light - a
        for j in range(int(span.max()) if H else 0):
            cols = np.nonzero((span > j).any(axis=0))[0]
            last = int(cols[-1]) + 1
            c = a[:, :last] + j
            s = wh[:, :last] / c
            room = (Tb - s) + 2.0**-51 * Tb  # >= T - s despite the rounding of s and of the subtraction
            k = np.where(room[:, None] < tk, _ceil_down(tk / room[:, None]), 1.0)
            cost = c[:, None] * (1.0 + (S - 1) * (1.0 - 1.0 / k))
            cost = np.where((span[:, :last] > j)[:, None], cost, np.inf)
            best[:, :, :last] = np.minimum(best[:, :, :last], cost)
        F = light_tail + best.sum(axis=2)
    return (B < 0) | (F > R + 1e-6).any(axis=1)


def pairing_bound(w: np.ndarray, R: int, P: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Part 2: bisection on ``T`` in ``[lo, hi]``; returns the largest ``T`` proven unreachable (or ``lo``)."""
    S = R // P
    wd = -np.sort(-w, axis=1)
    small = wd[:, ::-1][:, : min(TAU_CANDIDATES, w.shape[1])]
    tiny = np.maximum(wd[:, :1], 1.0) * 2.0**-60  # tau must be > 0; a tiny tau prices only zero loads
    tau = np.maximum(np.concatenate([small, 2.0 * small[:, :TAU_DOUBLED]], axis=1) * _TAU_SHRINK, tiny)
    lo = lo.copy()
    hi = np.maximum(hi, lo)
    live = lo > 0
    H = int((wd > lo[:, None] / 2).sum(axis=1).max())
    light_tail = _light_costs(wd, tau, H)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        proven = pairing_certified(wd, R, S, np.where(live, mid, 1.0), tau, H, light_tail) & live
        lo = np.where(proven, mid, lo)
        hi = np.where(proven, hi, mid)
    return lo


# ----------------------------------------------------------------------------------------------
# Part 3: the hierarchical policy
# ----------------------------------------------------------------------------------------------


def _partitions(items: tuple[int, ...], size: int):
    """All partitions of ``items`` into unordered blocks of ``size`` (each block sorted, first item fixed)."""
    if not items:
        yield ()
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        block = (first,) + others
        remaining = tuple(i for i in rest if i not in others)
        for tail in _partitions(remaining, size):
            yield (block,) + tail


def partition_count(G: int, N: int) -> int:
    """Number of ways to split ``G`` groups into ``N`` unordered blocks of ``G / N``."""
    k = G // N
    return math.factorial(G) // (math.factorial(k) ** N * math.factorial(N))


def hierarchical_bound(w: np.ndarray, R: int, G: int, N: int, P: int) -> np.ndarray:
    """Part 3 (no margin): min over group-to-node splits of the max over nodes of the node bound."""
    L, E = w.shape
    gs, k, Rn, Pn = E // G, G // N, R // N, P // N
    groups = w.reshape(L, G, gs)
    if N == 1:  # one node holds every group: the global problem
        return flat_bound(w, R, P)
    if partition_count(G, N) > MAX_PARTITIONS:
        per_group = flat_bound(groups.reshape(L * G, gs), Rn, Pn).reshape(L, G).max(axis=1)
        return np.maximum(per_group, flat_bound(w, R, P))
    blocks = list(itertools.combinations(range(G), k))
    index = {b: i for i, b in enumerate(blocks)}
    rows = groups[:, np.array(blocks)].reshape(L * len(blocks), k * gs)  # [L, nb, k, gs] -> rows
    node = flat_bound(rows, Rn, Pn).reshape(L, len(blocks))
    parts = np.array([[index[b] for b in p] for p in _partitions(tuple(range(G)), k)])  # [n_parts, N]
    return node[:, parts].max(axis=2).min(axis=1)
