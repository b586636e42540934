"""How far an incremental replan can get within its budget: a proven ceiling, two slots per GPU.

    python benchmarks/budget_bound.py --pair OLD NEW [--pair OLD NEW ...] [--share 0.15] [--steps 8]
        [--time-limit 20] [--jobs 2] [--out DIR]

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
looser).

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
  other replica, so a kept GPU with a big one wastes none; without one, all its small ones.

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


def budget_feasible(
    w: np.ndarray, old: np.ndarray, k: int, T: float, time_limit: float = 60.0, waste_rows: int = WASTE_ROWS
) -> bool | None:
    """Whether the relaxation above is feasible for the float64 loads ``w [E]``, the placement in
    service ``old [R]`` (two slots per GPU) and the budget ``k``; ``None`` if HiGHS gave up."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix, hstack, vstack

    R, E = old.shape[0], w.shape[0]
    model = count_model(w, R, T)
    if model is None:
        return False
    var_e, var_c, share, A, lo, hi = model
    n = var_e.size
    by_expert = np.bincount(old, minlength=E)
    # Rows on [y | u]: kept slots among the copies (E), the budget (1), a GPU keeping both slots (R/2).
    kept = csr_matrix((var_c.astype(np.float64), (var_e, np.arange(n))), shape=(E, n))
    kept_u = csr_matrix((np.ones(R), (old, np.arange(R))), shape=(E, R))
    budget = csr_matrix(np.ones((1, R)))
    gpu = np.arange(R) // 2
    slot_of = [np.flatnonzero(var_e == e) for e in range(E)]
    g_rows = np.concatenate([np.full(slot_of[old[q]].size, gpu[q]) for q in range(R)])
    g_cols = np.concatenate([slot_of[old[q]] for q in range(R)])
    g_vals = np.concatenate([share[slot_of[old[q]]] for q in range(R)])
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
    res = milp(
        np.zeros(n + R + nz), constraints=LinearConstraint(M, lo, hi),
        integrality=cat([np.ones(n + R), np.zeros(nz)]), bounds=Bounds(0, cat([np.ones(n + R), np.full(nz, 2.0)])),
        options={"time_limit": time_limit},
    )  # fmt: skip
    if res.status == 0:
        return True
    if res.status == 2:
        return False
    if res.status == 1:  # the time limit
        return None
    raise RuntimeError(f"HiGHS returned status {res.status} ({res.message}) at T = {T!r}")


def budget_bound(
    w: np.ndarray,
    old: np.ndarray,
    k: int,
    lo: float,
    hi: float,
    steps: int,
    time_limit: float = 60.0,
    waste_rows: int = WASTE_ROWS,
) -> tuple[float, int]:
    """The last ``T`` of a bisection on ``[lo, hi]`` where the relaxation is proven infeasible (``lo``
    if none), and how many tests HiGHS left undecided (counted as feasible)."""
    undecided = 0
    for _ in range(steps):
        T = 0.5 * (lo + hi)
        f = budget_feasible(w, old, k, T, time_limit, waste_rows)
        if f is False:
            lo = T
        else:
            hi = T
            undecided += f is None
    return lo, undecided


def _layer(job: tuple) -> tuple[float, int]:
    w, old, k, lo, hi, steps, time_limit, waste_rows = job
    # The incremental replan is a placement within the budget: the model must admit its largest load.
    if budget_feasible(w, old, k, hi * (1 + 1e-9), time_limit, waste_rows) is False:
        raise RuntimeError(f"the model excludes the incremental replan's largest load {hi!r} (a bug)")
    t0 = time.perf_counter()
    found = budget_bound(w, old, k, lo, hi, steps, time_limit, waste_rows) if lo < hi else (lo, 0)
    print(f"  a layer: bound {found[0]:.6g} ({found[1]} undecided), {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return found


def measure(
    before: Path, after: Path, share: float, steps: int, jobs: int, time_limit: float, waste_rows: int = WASTE_ROWS
) -> dict:
    w = read_loads(after).weight
    R, G, N, P = DEPLOYMENT.args
    k = int(share * R)
    t0 = time.perf_counter()
    old = eplb.rebalance_experts(read_loads(before).weight, R, G, N, P, backend="cpu")[0]
    greedy = eplb.rebalance_experts(w, R, G, N, P, backend="cpu")
    inc = eplb.rebalance_experts(w, R, G, N, P, backend="cpu", method="refined", old_phy2log=old, max_moves=k)
    plans = (("greedy", greedy), ("inc", inc))
    peak = {name: metrics.gpu_loads(w, p[0], p[2], P).double().amax(dim=1) for name, p in plans}
    mean = w.double().sum(dim=1) / P
    certified = metrics.lower_bound(w, R, P, num_groups=G, num_nodes=N).double()
    w64 = w.to(torch.float32).double().numpy()  # the float32 loads every backend plans on
    layer_jobs = [
        (w64[i], old[i].numpy(), k, float(certified[i]), float(peak["inc"][i]), steps, time_limit, waste_rows)
        for i in range(w.shape[0])
    ]
    with ProcessPoolExecutor(jobs) as pool:
        found = list(pool.map(_layer, layer_jobs))
    bound = torch.tensor([f[0] for f in found], dtype=torch.float64)
    g, i, c = mean / peak["greedy"], mean / peak["inc"], mean / bound
    per_layer = dict(greedy=g.tolist(), incremental=i.tolist(), ceiling=c.tolist(), undecided=[f[1] for f in found])
    return dict(
        before=before.name, after=after.name, layers=w.shape[0], max_moves=k,
        moved=float(metrics.migration_count(old, inc[0]).double().mean()) / R,
        greedy=float(g.mean()), incremental=float(i.mean()), ceiling=float(c.mean()),
        incremental_vs_greedy=float(i.mean() / g.mean()), ceiling_vs_greedy=float(c.mean() / g.mean()),
        layers_below_greedy=int((c < g * (1 - 1e-12)).sum()), undecided=sum(f[1] for f in found),
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
    p.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    p.add_argument("--out", type=Path, default=Path("bench-out/budget-bound"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.jobs < 1:
        p.error("--steps and --jobs must be at least 1")
    if args.waste_rows < 0:
        p.error(f"--waste-rows must be >= 0, got {args.waste_rows}")
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
    head = (f"{'old placement from -> new loads':56s} {'greedy':>7s} {'incr.':>7s} {'ceiling':>7s} {'incr/gr':>7s} "
            f"{'ceil/gr':>7s} {'below':>5s} {'undec':>5s} {'s':>5s}")  # fmt: skip
    lines = [f"decode EP144 {DEPLOYMENT.args}, max_moves = int({args.share} * R): mean balancedness over layers; "
             f"ceiling: mean / the proven budgeted bound ({args.steps} bisection steps, {args.time_limit:g} s per "
             f"test, {args.waste_rows} waste rows); below: layers whose ceiling is under the greedy replan's "
             "balancedness; undec: tests HiGHS left undecided (counted as feasible)", head]  # fmt: skip
    print("\n".join(lines), flush=True)
    rows = []
    for before, after in args.pair:
        r = measure(before, after, args.share, args.steps, args.jobs, args.time_limit, args.waste_rows)
        rows.append(r)
        line = (f"{r['before'] + ' -> ' + r['after']:56s} {r['greedy']:7.4f} {r['incremental']:7.4f} "
                f"{r['ceiling']:7.4f} {r['incremental_vs_greedy']:7.3f} {r['ceiling_vs_greedy']:7.3f} "
                f"{r['layers_below_greedy']:5d} {r['undecided']:5d} {r['seconds']:5.0f}")  # fmt: skip
        lines.append(line)
        print(line, flush=True)
        if r["ceiling_below_incremental_layers"]:
            raise SystemExit(f"{r['after']}: the proven ceiling lies below the incremental replan (a bug)")
    g, c = sum(r["greedy"] for r in rows), sum(r["ceiling"] for r in rows)
    verdict = (f"over the {len(rows)} pair(s): greedy {g / len(rows):.4f}, ceiling {c / len(rows):.4f} "
               f"({c / g:.3f}x the greedy replan); pairs whose ceiling is under the greedy replan: "
               f"{sum(r['ceiling'] < r['greedy'] for r in rows)}")  # fmt: skip
    lines.append(verdict)
    print(verdict)
    doc = {"steps": args.steps, "time_limit": args.time_limit, "share": args.share, "waste_rows": args.waste_rows,
           "deployment": DEPLOYMENT.name, "rows": rows}  # fmt: skip
    write_results(args.out, "budget_bound.py", argv, doc, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
