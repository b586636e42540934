"""How far an incremental replan can get within its budget: a proven ceiling, two slots per GPU.

    python benchmarks/budget_bound.py --pair OLD NEW [--pair OLD NEW ...] [--share 0.15] [--steps 8]
        [--time-limit 20] [--span 0.02] [--layers 0,6,12] [--jobs 2] [--out DIR]

Pairs of load files as in the incremental rows of ``bench_layers.py``: the greedy plan of ``OLD`` is
the placement in service (``old``), the loads of ``NEW`` arrive, and the incremental replan
(``method="refined"``, ``max_moves = k = int(share * R)``) may change at most ``k`` slots of
``old``. For decode EP144 (``E = 256``, ``R = 288``, ``P = 144``: two slots per GPU, the global
policy) and every layer, it bisects a target load ``T`` between the certified bound
(``metrics.lower_bound``) and the incremental replan's largest GPU load, testing a **mixed-integer
relaxation** of "some placement that differs from ``old`` in at most ``k`` slots has its largest
GPU load ``<= T``" (SciPy's HiGHS). Where HiGHS proves it infeasible, no such placement reaches
``T``: the last such ``T`` is a proven lower bound on the best largest load within the budget, so
``mean / T`` is a ceiling on the balancedness any method reaches within ``k`` moves. A test that
HiGHS leaves undecided within ``--time-limit`` seconds counts as feasible (the ceiling only gets
looser). With ``--span S`` the first test is at the incremental replan's largest load ``/ (1 + S)``;
where it is proven infeasible, the bisection runs above it.

It also brackets the optimum from below: every feasible test's counts and changed slots are
**realized** (``realize``: an assignment MIP of the new replicas to the changed slots, keeping the
others), and the best resulting placement within the budget is reported as ``found`` (at least the
incremental replan). So per layer the best placement within ``k`` moves lies between ``found`` and
``ceiling``.

The model for one layer and a target ``T`` (loads ``w[e]`` in float64):

* the count model of ``pairing_lp.py`` (``count_model``), now with binary ``y[e, c]``: one count
  per expert, ``R`` slots, and the pairing condition (every replica of share ``>= h > T / 2`` has
  its own partner of share ``<= T - h``);
* a binary ``u[q]`` per slot: ``1`` if slot ``q`` holds another expert than ``old[q]``;
  ``sum u <= k``;
* the kept slots of an expert are among its copies: ``sum_c c y[e, c] >= #{q: old[q] = e, u[q] = 0}``;
* a GPU that keeps both of its slots keeps their experts, whose shares under the new counts must fit:
  ``share(old[2p]) + share(old[2p + 1]) <= T + T (u[2p] + u[2p + 1])`` (each share is at most
  ``T``, so a GPU with a changed slot is unconstrained here);
* for up to ``WASTE_ROWS`` heavy shares ``h`` (evenly by rank), the pairing row again, less the
  small replicas (share ``<= T - h``) that no big one (share ``>= h``) can take as its partner:
  those on a GPU that keeps both slots and holds no big replica. With ``waste[h, p] >= 0`` and
  ``waste[h, p] >= small(p) - big(p) - 2 (u[2p] + u[2p + 1])`` (``small(p)``, ``big(p)``: how many
  of GPU ``p``'s old experts have a small, a big share under the new counts), the row is
  ``#big - #small + sum_p waste[h, p] <= 0``. A big replica's partner on a kept GPU is that GPU's
  other replica, so a kept GPU with a big one wastes none; without one, all its small ones;
* the changed part's pairing rows (``_changed_part_rows``, up to ``CHANGED_ROWS`` shares ``a``): a
  kept slot whose GPU partner changed (``KH``) takes its partner from the replicas in changed slots
  (``F``), never from another kept slot, so for ``a <= h``, ``a + h > T`` (``h`` heavy or
  infinite): ``KH(>= a) + F(>= h) <= F(<= T - a) + KH(<= T - h)``.

Every placement within the budget whose largest GPU load is at most ``T`` satisfies all of it (its
counts, its changed slots), so the relaxation is never infeasible where such a placement exists, up
to the rounding of float64 sums and HiGHS's feasibility tolerance. A changed slot is what
``max_moves`` counts: ``phy2log[q] != old_phy2log[q]`` (docs/algorithm.md 10.4). Needs SciPy
(``pip install scipy``; in the test extra). Writes ``summary.txt`` and ``results.json`` under
``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pairing_lp, next to this script

from pairing_lp import DEPLOYMENT, count_model, write_results  # noqa: E402

import eplb_triton as eplb  # noqa: E402
from eplb_triton import metrics  # noqa: E402
from eplb_triton.io import read_loads  # noqa: E402

WASTE_ROWS = 16  # heavy shares whose pairing row also counts the small replicas kept GPUs hold
CHANGED_ROWS = 32  # shares a of the changed part's pairing rows (with every heavy share h)


def budget_feasible(
    w: np.ndarray,
    old: np.ndarray,
    k: int,
    T: float,
    time_limit: float = 60.0,
    waste_rows: int = WASTE_ROWS,
    changed_rows: int = CHANGED_ROWS,
) -> bool | None:
    """Whether the relaxation above is feasible for the float64 loads ``w [E]``, the placement in
    service ``old [R]`` (two slots per GPU) and the budget ``k``; ``None`` if HiGHS gave up."""
    return budget_solve(w, old, k, T, time_limit, waste_rows, changed_rows)[0]


def budget_solve(
    w: np.ndarray,
    old: np.ndarray,
    k: int,
    T: float,
    time_limit: float = 60.0,
    waste_rows: int = WASTE_ROWS,
    changed_rows: int = CHANGED_ROWS,
) -> tuple[bool | None, np.ndarray | None, np.ndarray | None]:
    """``budget_feasible``, and where feasible the relaxation's counts ``[E]`` and changed slots
    ``[R]`` (0/1), which ``realize`` turns into a placement."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix, hstack, vstack

    R, E = old.shape[0], w.shape[0]
    model = count_model(w, R, T)
    if model is None:
        return False, None, None
    var_e, var_c, share, A, lo, hi = model
    n = var_e.size
    by_expert = np.bincount(old, minlength=E)
    # Rows on [y | u]: kept slots among the copies (E), the budget (1), a GPU keeping both slots (R/2).
    kept = csr_matrix((var_c.astype(np.float64), (var_e, np.arange(n))), shape=(E, n))
    kept_u = csr_matrix((np.ones(R), (old, np.arange(R))), shape=(E, R))
    budget = csr_matrix(np.ones((1, R)))
    gpu = np.arange(R) // 2
    slot_of = [np.flatnonzero(var_e == e) for e in range(E)]
    # Every (slot, count variable of the slot's old expert) pair: slot g_slot[i], variable g_cols[i].
    g_slot = np.concatenate([np.full(slot_of[old[q]].size, q) for q in range(R)])
    g_rows, g_cols = gpu[g_slot], np.concatenate([slot_of[old[q]] for q in range(R)])
    g_vals = share[g_cols]
    pair = csr_matrix((g_vals, (g_rows, g_cols)), shape=(R // 2, n))  # duplicates add up (same expert twice)
    pair_u = csr_matrix((np.full(R, -T), (gpu, np.arange(R))), shape=(R // 2, R))
    # The pairing rows again for up to WASTE_ROWS heavy shares h, now with the small replicas that a
    # GPU keeping both slots holds without a big one: waste[h, p] >= small - big - 2 (changed slots).
    heavy = np.unique(share[share > T * 0.5])
    if heavy.size > waste_rows:
        heavy = heavy[np.linspace(0, heavy.size - 1, waste_rows).round().astype(np.int64)]
    H, nz = heavy.size, heavy.size * (R // 2)
    h_rows, h_cols, h_vals, w_rows, w_cols, w_vals = [], [], [], [], [], []
    for i, h in enumerate(heavy):
        above, below = np.flatnonzero(share >= h), np.flatnonzero(share <= T - h)
        h_rows.append(np.full(above.size + below.size + R // 2, i))
        h_cols.append(np.concatenate([above, below, n + R + i * (R // 2) + np.arange(R // 2)]))
        h_vals.append(np.concatenate([var_c[above], -var_c[below], np.ones(R // 2)]).astype(np.float64))
        sign = (share[g_cols] <= T - h).astype(np.float64) - (share[g_cols] >= h)
        w_rows += [i * (R // 2) + g_rows, i * (R // 2) + gpu, i * (R // 2) + np.arange(R // 2)]
        w_cols += [g_cols, n + np.arange(R), n + R + i * (R // 2) + np.arange(R // 2)]
        w_vals += [sign, np.full(R, -2.0), np.full(R // 2, -1.0)]
    cat = np.concatenate
    hall = csr_matrix((cat(h_vals), (cat(h_rows), cat(h_cols))), shape=(H, n + R + nz)) if H else None
    waste = csr_matrix((cat(w_vals), (cat(w_rows), cat(w_cols))), shape=(nz, n + R + nz)) if H else None
    M = vstack([
        hstack([A, csr_matrix((A.shape[0], R + nz))]),
        hstack([kept, kept_u, csr_matrix((E, nz))]),
        hstack([csr_matrix((1, n)), budget, csr_matrix((1, nz))]),
        hstack([pair, pair_u, csr_matrix((R // 2, nz))]),
        *([hall, waste] if H else []),
    ]).tocsr()  # fmt: skip
    lo = cat([lo, by_expert.astype(np.float64), [-np.inf], np.full(R // 2 + H + nz, -np.inf)])
    hi = cat([hi, np.full(E, np.inf), [float(k)], np.full(R // 2, T), np.zeros(H + nz)])
    integrality, upper = cat([np.ones(n + R), np.zeros(nz)]), cat([np.ones(n + R), np.full(nz, 2.0)])
    if changed_rows:
        width = M.shape[1]
        extra, e_lo, e_hi, n_aux = _changed_part_rows(share, var_c, g_slot, g_cols, R, T, heavy, changed_rows, n, width)
        M = vstack([hstack([M, csr_matrix((M.shape[0], n_aux))]), extra]).tocsr()
        lo, hi = cat([lo, e_lo]), cat([hi, e_hi])
        integrality, upper = cat([integrality, np.zeros(n_aux)]), cat([upper, np.ones(n_aux)])
    res = milp(
        np.zeros(M.shape[1]), constraints=LinearConstraint(M, lo, hi),
        integrality=integrality, bounds=Bounds(0, upper), options={"time_limit": time_limit},
    )  # fmt: skip
    if res.status == 0:
        y = res.x[:n] > 0.5
        counts = np.zeros(E, dtype=np.int64)
        counts[var_e[y]] = var_c[y]
        return True, counts, (res.x[n : n + R] > 0.5).astype(np.int64)
    if res.status == 2:
        return False, None, None
    if res.status == 1:  # the time limit
        return None, None, None
    raise RuntimeError(f"HiGHS returned status {res.status} ({res.message}) at T = {T!r}")


def _changed_part_rows(
    share: np.ndarray,
    var_c: np.ndarray,
    q_idx: np.ndarray,
    j_idx: np.ndarray,
    R: int,
    T: float,
    heavy: np.ndarray,
    m: int,
    n: int,
    width: int,
) -> tuple:
    """The pairing condition of the changed part (the model's last rows, docs/algorithm.md 10.9).

    A kept slot whose GPU partner changed (``KH``) takes its partner from the free replicas ``F``
    (those in changed slots), never from another kept slot. For a share ``a`` and a heavy share
    ``h`` (or ``h = inf``) with ``a <= h`` and ``a + h > T``, the ``KH`` replicas of share ``>= a``
    and the ``F`` replicas of share ``>= h`` can pair with none of each other, so they need as many
    distinct partners: ``KH(>= a) + F(>= h) <= F(<= T - a) + KH(<= T - h)``. The products of a
    slot's share test and its ``u`` are bounded by continuous ``[0, 1]`` variables on the side that
    keeps the row valid (lower bounds on the left, upper bounds on the right). ``q_idx``, ``j_idx``: the
    slot and the count variable of each (slot, count of its old expert) pair. Returns the rows over
    ``[model columns | aux]``, their bounds and the number of aux columns."""
    from scipy.sparse import csr_matrix, hstack, vstack

    values = np.unique(share[share <= T])
    small = values if values.size <= m else values[np.linspace(0, values.size - 1, m).round().astype(np.int64)]
    na, nh = small.size, heavy.size
    n_aux = 2 * R * (na + nh)
    slots = np.arange(R)
    u_self = csr_matrix((np.ones(R), (slots, slots)), shape=(R, R))
    u_partner = csr_matrix((np.ones(R), (slots, slots ^ 1)), shape=(R, R))
    none_y, none_u = csr_matrix((R, n)), csr_matrix((R, R))
    pad = csr_matrix((R, width - n - R))

    def kept_share(mask: np.ndarray) -> csr_matrix:  # [R, n]: 1 if slot q's old expert's share passes mask
        sel = mask[j_idx]
        return csr_matrix((np.ones(int(sel.sum())), (q_idx[sel], j_idx[sel])), shape=(R, n))

    def rows(on_y, on_u, block: int, coef: float) -> csr_matrix:
        aux = csr_matrix((np.full(R, coef), (slots, block * R + slots)), shape=(R, n_aux))
        return hstack([on_y if on_y is not None else none_y, on_u if on_u is not None else none_u, pad, aux])

    # Aux blocks: v[a] >= KH with share >= a; t[a] >= kept with share <= T - a (lower bounds);
    # z[h] <= kept with share >= h; r[h] <= KH with share <= T - h (upper bounds).
    v, t = (lambda i: i), (lambda i: na + i)
    z, r = (lambda i: 2 * na + i), (lambda i: 2 * na + nh + i)
    blocks, b_hi = [], []
    for i, a in enumerate(small):
        blocks += [rows(kept_share(share >= a), u_partner - u_self, v(i), -1.0)]
        blocks += [rows(kept_share(share <= T - a), -u_self, t(i), -1.0)]
        b_hi += [np.ones(R), np.zeros(R)]
    for i, h in enumerate(heavy):
        blocks += [rows(-kept_share(share >= h), None, z(i), 1.0), rows(None, u_self, z(i), 1.0)]
        blocks += [rows(-kept_share(share <= T - h), None, r(i), 1.0), rows(None, u_self, r(i), 1.0)]
        blocks += [rows(None, -u_partner, r(i), 1.0)]
        b_hi += [np.zeros(R), np.ones(R), np.zeros(R), np.ones(R), np.zeros(R)]
    h_rows, h_cols, h_vals, count = [], [], [], 0
    aux_cols = lambda block: width + block * R + slots  # noqa: E731
    for i, a in enumerate(small):
        for j, h in enumerate([*heavy, np.inf]):
            if not (a <= h and a + h > T):
                continue
            below = np.flatnonzero(share <= T - a)
            cols, vals = [below, aux_cols(v(i)), aux_cols(t(i))], [-var_c[below], np.ones(R), np.ones(R)]
            if j < nh:
                above = np.flatnonzero(share >= h)
                cols += [above, aux_cols(z(j)), aux_cols(r(j))]
                vals += [var_c[above], -np.ones(R), -np.ones(R)]
            cols = np.concatenate(cols)
            h_rows.append(np.full(cols.size, count))
            h_cols.append(cols)
            h_vals.append(np.concatenate(vals).astype(np.float64))
            count += 1
    cat = np.concatenate
    hall = csr_matrix((cat(h_vals), (cat(h_rows), cat(h_cols))), shape=(count, width + n_aux))
    M = vstack([*blocks, hall]).tocsr()
    return M, np.full(M.shape[0], -np.inf), cat([*b_hi, np.zeros(count)]), n_aux


def realize(w: np.ndarray, old: np.ndarray, counts: np.ndarray, changed: np.ndarray, time_limit: float = 60.0):
    """The placement with the relaxation's ``counts`` that keeps the slots of ``old`` not marked
    ``changed``, refills the marked ones (a refilled slot may get its old expert back, so at most
    ``changed.sum()`` slots change) and has the smallest largest GPU load (an assignment MIP), or
    ``None`` where there is none or HiGHS finds none in time."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    E, P = w.shape[0], old.shape[0] // 2
    slots, keep = np.flatnonzero(changed), np.flatnonzero(changed == 0)
    need = counts - np.bincount(old[keep], minlength=E)
    if (need < 0).any() or need.sum() != slots.size or (counts < 1).any():
        return None
    experts = np.flatnonzero(need > 0)
    nq, ne = slots.size, experts.size
    if nq == 0:
        return old.copy()
    share = w / counts
    x = lambda i: i * ne + np.arange(ne)  # noqa: E731  x[i, j]: changed slot i takes expert j
    peak = nq * ne  # the last column: the largest GPU load
    rows, cols, vals, lo, hi = [], [], [], [], []
    for i in range(nq):
        rows.append(np.full(ne, len(lo)))
        cols.append(x(i))
        vals.append(np.ones(ne))
        lo.append(1.0)
        hi.append(1.0)
    for j in range(ne):
        rows.append(np.full(nq, len(lo)))
        cols.append(np.arange(nq) * ne + j)
        vals.append(np.ones(nq))
        lo.append(float(need[experts[j]]))
        hi.append(float(need[experts[j]]))
    where = {int(q): i for i, q in enumerate(slots)}
    for p in range(P):
        fixed, c, v = 0.0, [np.array([peak])], [np.array([-1.0])]
        for q in (2 * p, 2 * p + 1):
            if q in where:
                c.append(x(where[q]))
                v.append(share[experts])
            else:
                fixed += share[old[q]]
        rows.append(np.full(sum(a.size for a in c), len(lo)))
        cols += c
        vals += v
        lo.append(-np.inf)
        hi.append(-fixed)
    cat = np.concatenate
    A = csr_matrix((cat(vals), (cat(rows), cat(cols))), shape=(len(lo), peak + 1))
    cost = np.zeros(peak + 1)
    cost[peak] = 1.0
    integrality = np.ones(peak + 1)
    integrality[peak] = 0
    res = milp(
        cost, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
        bounds=Bounds(0, cat([np.ones(peak), [np.inf]])), options={"time_limit": time_limit},
    )  # fmt: skip
    if res.x is None:
        return None
    phy = old.copy()
    phy[slots] = experts[res.x[:peak].reshape(nq, ne).argmax(axis=1)]
    return phy


def peak_load(w: np.ndarray, phy: np.ndarray) -> float:
    """The largest GPU load of the placement ``phy [R]`` (two slots per GPU, loads split evenly)."""
    counts = np.bincount(phy, minlength=w.shape[0])
    s = w[phy] / counts[phy]
    return float((s[0::2] + s[1::2]).max())


def realized_test(
    w: np.ndarray,
    old: np.ndarray,
    k: int,
    T: float,
    time_limit: float = 60.0,
    waste_rows: int = WASTE_ROWS,
    changed_rows: int = CHANGED_ROWS,
) -> tuple[bool | None, float]:
    """``budget_feasible`` at ``T``, and the largest load of the placement ``realize`` makes of a
    feasible solution (``inf`` if none, or if it would change more than ``k`` slots)."""
    f, counts, changed = budget_solve(w, old, k, T, time_limit, waste_rows, changed_rows)
    phy = realize(w, old, counts, changed, time_limit) if f else None
    if phy is None or int((phy != old).sum()) > k:
        return f, float("inf")
    return f, peak_load(w, phy)


def budget_bound(
    w: np.ndarray,
    old: np.ndarray,
    k: int,
    lo: float,
    hi: float,
    steps: int,
    time_limit: float = 60.0,
    waste_rows: int = WASTE_ROWS,
    changed_rows: int = CHANGED_ROWS,
) -> tuple[float, int, float]:
    """The last ``T`` of a bisection on ``[lo, hi]`` where the relaxation is proven infeasible (``lo``
    if none), how many tests HiGHS left undecided (counted as feasible), and the smallest largest
    load of a placement within the budget that ``realize`` made of a feasible test's solution
    (``inf`` if none). That load is achievable, so the bisection goes on below it."""
    undecided, found = 0, float("inf")
    for _ in range(steps):
        if lo >= hi:
            break
        T = 0.5 * (lo + hi)
        f, peak = realized_test(w, old, k, T, time_limit, waste_rows, changed_rows)
        if f is False:
            lo = T
        else:
            undecided += f is None
            found = min(found, peak)
            hi = min(T, found)
    return lo, undecided, found


def _layer(job: tuple) -> tuple[float, int, float]:
    w, old, k, lo, hi, span, steps, limits = job
    t0 = time.perf_counter()
    # The incremental replan is a placement within the budget: the model must admit its largest load.
    f, found = realized_test(w, old, k, hi * (1 + 1e-9), *limits)
    if f is False:
        raise RuntimeError(f"the model excludes the incremental replan's largest load {hi!r} (a bug)")
    found, undecided, top = min(hi, found), int(f is None), min(hi, found)
    if span is not None and lo < hi / (1 + span) < top:  # first the bottom of a narrow range below it
        f, peak = realized_test(w, old, k, hi / (1 + span), *limits)
        found, undecided, steps = min(found, peak), undecided + (f is None), steps - 1
        if f is False:
            lo = hi / (1 + span)
        else:
            top = min(found, hi / (1 + span))
    bound, more, peak = budget_bound(w, old, k, lo, min(top, found), steps, *limits)
    found, undecided = min(found, peak), undecided + more
    if bound > found * (1 + 1e-9):
        raise RuntimeError(f"the proven bound {bound!r} lies above a placement within the budget {found!r} (a bug)")
    elapsed = time.perf_counter() - t0
    print(f"  a layer: bound {bound:.6g}, found {found:.6g} ({undecided} undecided), {elapsed:.0f} s", file=sys.stderr)
    return bound, undecided, found


def measure(
    before: Path,
    after: Path,
    share: float,
    steps: int,
    jobs: int,
    time_limit: float,
    waste_rows: int = WASTE_ROWS,
    changed_rows: int = CHANGED_ROWS,
    layers: list[int] | None = None,
    span: float | None = None,
) -> dict:
    w = read_loads(after).weight
    R, G, N, P = DEPLOYMENT.args
    k = int(share * R)
    t0 = time.perf_counter()
    old = eplb.rebalance_experts(read_loads(before).weight, R, G, N, P, backend="cpu")[0]
    if layers is not None:
        if max(layers) >= w.shape[0] or min(layers) < 0:
            raise ValueError(f"--layers: {after.name} has {w.shape[0]} layers, got {layers}")
        w, old = w[layers], old[layers]
    greedy = eplb.rebalance_experts(w, R, G, N, P, backend="cpu")
    inc = eplb.rebalance_experts(w, R, G, N, P, backend="cpu", method="refined", old_phy2log=old, max_moves=k)
    plans = (("greedy", greedy), ("inc", inc))
    peak = {name: metrics.gpu_loads(w, p[0], p[2], P).double().amax(dim=1) for name, p in plans}
    mean = w.double().sum(dim=1) / P
    certified = metrics.lower_bound(w, R, P, num_groups=G, num_nodes=N).double()
    w64 = w.to(torch.float32).double().numpy()  # the float32 loads every backend plans on
    limits = (time_limit, waste_rows, changed_rows)
    layer_jobs = [
        (w64[i], old[i].numpy(), k, float(certified[i]), float(peak["inc"][i]), span, steps, limits)
        for i in range(w.shape[0])
    ]
    with ProcessPoolExecutor(jobs) as pool:
        out = list(pool.map(_layer, layer_jobs))
    bound = torch.tensor([o[0] for o in out], dtype=torch.float64)
    found = torch.tensor([o[2] for o in out], dtype=torch.float64)
    g, i, c, f = mean / peak["greedy"], mean / peak["inc"], mean / bound, mean / found
    per_layer = dict(
        greedy=g.tolist(), incremental=i.tolist(), found=f.tolist(), ceiling=c.tolist(), undecided=[o[1] for o in out]
    )
    return dict(
        before=before.name, after=after.name, layers=w.shape[0], layer_indices=layers, max_moves=k,
        moved=float(metrics.migration_count(old, inc[0]).double().mean()) / R,
        greedy=float(g.mean()), incremental=float(i.mean()), found=float(f.mean()), ceiling=float(c.mean()),
        incremental_vs_greedy=float(i.mean() / g.mean()), found_vs_greedy=float(f.mean() / g.mean()),
        ceiling_vs_greedy=float(c.mean() / g.mean()),
        layers_below_greedy=int((c < g * (1 - 1e-12)).sum()), undecided=sum(o[1] for o in out),
        ceiling_below_incremental_layers=int((c < i * (1 - 1e-9)).sum()), seconds=time.perf_counter() - t0,
        per_layer=per_layer,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pair",
        type=Path,
        nargs=2,
        action="append",
        required=True,
        metavar=("OLD", "NEW"),
        help="the placement in service is the greedy plan of OLD; the loads of NEW arrive (repeat for more)",
    )
    p.add_argument("--share", type=float, default=0.15, help="max_moves = int(share * R) (default 0.15)")
    p.add_argument("--steps", type=int, default=8, help="bisection steps per layer (default 8)")
    p.add_argument("--time-limit", type=float, default=20.0, help="seconds per HiGHS test (default 20)")
    p.add_argument(
        "--waste-rows",
        type=int,
        default=WASTE_ROWS,
        help=f"heavy shares whose pairing row counts the wasted small replicas (default {WASTE_ROWS}; 0: none)",
    )
    p.add_argument(
        "--changed-rows",
        type=int,
        default=CHANGED_ROWS,
        help=f"shares a of the changed part's pairing rows (default {CHANGED_ROWS}; 0: none)",
    )
    p.add_argument(
        "--span",
        type=float,
        default=None,
        help="first test T = (incremental largest load) / (1 + SPAN); proven there, bisect above it (default: none)",
    )
    p.add_argument("--layers", type=str, default=None, help="comma-separated layer indices (default: every layer)")
    p.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    p.add_argument("--out", type=Path, default=Path("bench-out/budget-bound"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.jobs < 1:
        p.error("--steps and --jobs must be at least 1")
    if args.waste_rows < 0 or args.changed_rows < 0:
        p.error(f"--waste-rows and --changed-rows must be >= 0, got {args.waste_rows}, {args.changed_rows}")
    layers = None
    if args.layers is not None:
        try:
            layers = sorted({int(x) for x in args.layers.split(",")})
        except ValueError:
            p.error(f"--layers must be comma-separated layer indices, got {args.layers!r}")
        if layers[0] < 0:
            p.error(f"--layers must be >= 0, got {args.layers!r}")
    if args.span is not None and args.span <= 0:
        p.error(f"--span must be positive, got {args.span}")
    if not 0.0 <= args.share <= 1.0:
        p.error(f"--share must be in [0, 1], got {args.share}")
    if args.time_limit <= 0:
        p.error(f"--time-limit must be positive, got {args.time_limit}")
    for path in (path for pair in args.pair for path in pair):
        if not path.is_file():
            p.error(f"--pair {path}: no such file")
    try:
        import scipy  # noqa: F401
    except ImportError:
        p.error("needs SciPy: pip install scipy")
    head = (f"{'old placement from -> new loads':56s} {'greedy':>7s} {'incr.':>7s} {'found':>7s} {'ceiling':>7s} "
            f"{'incr/gr':>7s} {'fnd/gr':>7s} {'ceil/gr':>7s} {'below':>5s} {'undec':>5s} {'s':>5s}")  # fmt: skip
    lines = [f"decode EP144 {DEPLOYMENT.args}, max_moves = int({args.share} * R): mean balancedness over "
             f"{'layers ' + ','.join(map(str, layers)) if layers else 'all layers'}; found: the best placement "
             "within the budget (the incremental replan or a realized relaxation solution); ceiling: mean / the "
             f"proven budgeted bound ({args.steps} bisection steps, {args.time_limit:g} s per test, "
             f"{args.waste_rows} waste rows, {args.changed_rows} changed-part rows); below: layers whose ceiling is "
             "under the greedy replan's balancedness; undec: tests HiGHS left undecided (counted as feasible)",
             head]  # fmt: skip
    print("\n".join(lines), flush=True)
    rows = []
    for before, after in args.pair:
        try:
            r = measure(before, after, args.share, args.steps, args.jobs, args.time_limit, args.waste_rows,
                        args.changed_rows, layers, args.span)  # fmt: skip
        except ValueError as e:
            p.error(str(e))
        rows.append(r)
        line = (f"{r['before'] + ' -> ' + r['after']:56s} {r['greedy']:7.4f} {r['incremental']:7.4f} "
                f"{r['found']:7.4f} {r['ceiling']:7.4f} {r['incremental_vs_greedy']:7.3f} "
                f"{r['found_vs_greedy']:7.3f} {r['ceiling_vs_greedy']:7.3f} "
                f"{r['layers_below_greedy']:5d} {r['undecided']:5d} {r['seconds']:5.0f}")  # fmt: skip
        lines.append(line)
        print(line, flush=True)
        if r["ceiling_below_incremental_layers"]:
            raise SystemExit(f"{r['after']}: the proven ceiling lies below the incremental replan (a bug)")
    g, c = sum(r["greedy"] for r in rows), sum(r["ceiling"] for r in rows)
    f = sum(r["found"] for r in rows)
    verdict = (f"over the {len(rows)} pair(s): greedy {g / len(rows):.4f}, found {f / len(rows):.4f} ({f / g:.3f}x), "
               f"ceiling {c / len(rows):.4f} ({c / g:.3f}x the greedy replan); pairs whose ceiling is under the "
               "greedy replan: "
               f"{sum(r['ceiling'] < r['greedy'] for r in rows)}")  # fmt: skip
    lines.append(verdict)
    print(verdict)
    doc = {"steps": args.steps, "time_limit": args.time_limit, "share": args.share, "waste_rows": args.waste_rows,
           "changed_rows": args.changed_rows, "deployment": DEPLOYMENT.name, "rows": rows}  # fmt: skip
    write_results(args.out, "budget_bound.py", argv, doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
