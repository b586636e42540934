"""How close ``method="refined"`` gets to the optimum with two slots per GPU: an LP bound.

    python benchmarks/pairing_lp.py --loads FILE [--loads FILE ...] [--steps 10] [--jobs 2] [--out DIR]

For decode EP144 (``E = 256``, ``R = 288``, ``P = 144``: two slots per GPU, the global policy) and
every layer of every load file, it bisects a target load ``T`` between the certified bound
(``metrics.lower_bound``, docs/algorithm.md section 8) and the largest GPU load of refined's
placement, testing the **linear-programming relaxation** of an exact model of "some placement has
its largest GPU load ``<= T``" (SciPy's HiGHS). Where the relaxation is infeasible, no placement
reaches ``T``; the last infeasible ``T`` is a proven lower bound on the optimum, usually tighter
than the certified one. So refined's share of the gap from the greedy to this bound is at least
its share of the gap to the optimum.

The model for one layer and a target ``T`` (loads ``w[e]`` in float64):

* ``a[e]``, the fewest copies with ``w[e] / a[e] <= T``; ``B = R - sum a`` spare slots (``B < 0``:
  infeasible);
* a variable ``y[e, c] in [0, 1]`` (binary in the exact model) for every count ``c`` of
  ``a[e] .. a[e] + B``: ``sum_c y[e, c] = 1`` per expert and ``sum c y[e, c] = R``;
* for every share ``h = w[e] / c > T / 2`` among the candidates: the replicas of share ``>= h``
  are at most those of share ``<= T - h``, ``sum_{s >= h} c y <= sum_{s <= T - h} c y``.

Every placement whose largest GPU load is at most ``T`` satisfies it: a GPU holds two replicas,
two replicas above ``T / 2`` cannot share one, so each replica of share ``>= h`` needs its own
partner of share ``<= T - h`` (up to the rounding of that float64 subtraction: the bound is proven
to a relative 1e-16). Needs SciPy (``pip install scipy``; in the test extra). Writes
``summary.txt`` and ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

import eplb_triton as eplb
from eplb_triton import metrics
from eplb_triton.bench import provenance
from eplb_triton.configs import DEEPSEEK_V3
from eplb_triton.io import read_loads

DEPLOYMENT = DEEPSEEK_V3["decode-EP144"]


def count_model(w: np.ndarray, R: int, T: float):
    """The count variables and constraints of the model above for a target ``T``.

    Returns ``(var_e, var_c, share, A, lo, hi)``: variable ``k`` is "expert ``var_e[k]`` has
    ``var_c[k]`` copies" (share ``share[k]``), and ``lo <= A y <= hi`` are the one-count-per-expert,
    ``R``-slots and pairing rows; ``None`` when even the fewest copies exceed ``R``.
    """
    from scipy.sparse import csr_matrix

    E = w.shape[0]
    a = np.maximum(1.0, np.ceil(w / T))  # then exactly the fewest copies c >= 1 with w / c <= T
    while (up := w / a > T).any():
        a = np.where(up, a + 1.0, a)
    while (down := (a > 1.0) & (w / np.maximum(a - 1.0, 1.0) <= T)).any():
        a = np.where(down, a - 1.0, a)
    a = a.astype(np.int64)
    spare = R - int(a.sum())
    if spare < 0:
        return None
    var_e = np.repeat(np.arange(E), spare + 1)  # variable k: expert var_e[k] with var_c[k] copies
    var_c = (a[:, None] + np.arange(spare + 1)).reshape(-1)
    share = w[var_e] / var_c
    n = var_e.size
    rows, cols, vals, lo, hi = [var_e], [np.arange(n)], [np.ones(n)], [np.ones(E)], [np.ones(E)]
    rows.append(np.full(n, E)), cols.append(np.arange(n)), vals.append(var_c.astype(np.float64))
    lo.append([R]), hi.append([R])
    heavy = np.unique(share[share > T * 0.5])
    for i, h in enumerate(heavy):
        above, below = np.flatnonzero(share >= h), np.flatnonzero(share <= T - h)
        rows.append(np.full(above.size + below.size, E + 1 + i))
        cols.append(np.concatenate([above, below]))
        vals.append(np.concatenate([var_c[above], -var_c[below]]).astype(np.float64))
    lo.append(np.full(heavy.size, -np.inf)), hi.append(np.zeros(heavy.size))
    A = csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(E + 1 + heavy.size, n))
    return var_e, var_c, share, A, np.concatenate(lo), np.concatenate(hi)


def lp_feasible(w: np.ndarray, R: int, T: float) -> bool:
    """Whether the LP relaxation of the model above is feasible for the float64 loads ``w [E]``."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    model = count_model(w, R, T)
    if model is None:
        return False
    var_e, _, _, A, lo, hi = model
    res = milp(np.zeros(var_e.size), constraints=LinearConstraint(A, lo, hi), bounds=Bounds(0, 1))
    if res.status not in (0, 2):
        raise RuntimeError(f"HiGHS returned status {res.status} ({res.message}) at T = {T!r}")
    return res.status == 0


def lp_bound(w: np.ndarray, R: int, lo: float, hi: float, steps: int) -> float:
    """The last ``T`` of a bisection on ``[lo, hi]`` where the relaxation is infeasible (``lo`` if none)."""
    for _ in range(steps):
        T = 0.5 * (lo + hi)
        if lp_feasible(w, R, T):
            hi = T
        else:
            lo = T
    return lo


def _layer(job: tuple[np.ndarray, int, float, float, int]) -> float:
    w, R, lo, hi, steps = job
    return lp_bound(w, R, lo, hi, steps) if lo < hi else lo


def measure(path: Path, steps: int, jobs: int) -> dict:
    w = read_loads(path).weight
    R, G, N, P = DEPLOYMENT.args
    t0 = time.perf_counter()
    greedy = eplb.rebalance_experts(w, R, G, N, P, backend="cpu")
    refined = eplb.rebalance_experts(w, R, G, N, P, backend="cpu", method="refined")
    peak = {}
    for name, plan in (("greedy", greedy), ("refined", refined)):
        peak[name] = metrics.gpu_loads(w, plan[0], plan[2], P).double().amax(dim=1)
    mean = w.double().sum(dim=1) / P
    certified = metrics.lower_bound(w, R, P, num_groups=G, num_nodes=N).double()
    w64 = w.to(torch.float32).double().numpy()  # the float32 loads every backend plans on
    layer_jobs = [(w64[i], R, float(certified[i]), float(peak["refined"][i]), steps) for i in range(w.shape[0])]
    with ProcessPoolExecutor(jobs) as pool:
        lp = torch.tensor(list(pool.map(_layer, layer_jobs)), dtype=torch.float64)

    def bal(x: torch.Tensor) -> float:
        return float((mean / x).mean())

    g, r, c, b = bal(peak["greedy"]), bal(peak["refined"]), bal(certified), bal(lp)
    return dict(
        file=path.name, layers=w.shape[0], greedy=g, refined=r, certified_ceiling=c, lp_ceiling=b,
        closed_vs_certified=(r - g) / (c - g) if c > g else 1.0, closed_vs_lp=(r - g) / (b - g) if b > g else 1.0,
        lp_above_refined_layers=int((lp > peak["refined"] * (1 + 1e-9)).sum()), seconds=time.perf_counter() - t0,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", type=Path, action="append", required=True, help="a load file (repeat for more)")
    p.add_argument("--steps", type=int, default=10, help="bisection steps per layer (default 10)")
    p.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    p.add_argument("--out", type=Path, default=Path("bench-out/pairing-lp"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.jobs < 1:
        p.error("--steps and --jobs must be at least 1")
    for path in args.loads:
        if not path.is_file():
            p.error(f"--loads {path}: no such file")
    try:
        import scipy  # noqa: F401
    except ImportError:
        p.error("needs SciPy: pip install scipy")
    rows = []
    head = (f"{'file':28s} {'greedy':>7s} {'refined':>7s} {'LP ceil':>7s} {'cert.':>7s} {'closed/LP':>9s} "
            f"{'closed/cert':>11s} {'s':>6s}")  # fmt: skip
    lines = [f"decode EP144 {DEPLOYMENT.args}: mean balancedness over layers; LP ceil: mean / LP bound "
             f"({args.steps} bisection steps); cert.: mean / metrics.lower_bound; closed: refined's share of the "
             "gap from the greedy to that ceiling", head]  # fmt: skip
    print("\n".join(lines), flush=True)
    for path in args.loads:
        r = measure(path, args.steps, args.jobs)
        rows.append(r)
        line = (f"{r['file']:28s} {r['greedy']:7.4f} {r['refined']:7.4f} {r['lp_ceiling']:7.4f} "
                f"{r['certified_ceiling']:7.4f} {r['closed_vs_lp']:9.1%} {r['closed_vs_certified']:11.1%} "
                f"{r['seconds']:6.0f}")  # fmt: skip
        lines.append(line)
        print(line, flush=True)
        if r["lp_above_refined_layers"]:
            raise SystemExit(f"{r['file']}: the LP bound lies above refined's load on some layer (a bug)")
    m = {k: statistics.mean(r[k] for r in rows) for k in ("greedy", "refined", "lp_ceiling", "certified_ceiling")}
    total = (f"{'mean':28s} {m['greedy']:7.4f} {m['refined']:7.4f} {m['lp_ceiling']:7.4f} "
             f"{m['certified_ceiling']:7.4f} "
             f"{(m['refined'] - m['greedy']) / (m['lp_ceiling'] - m['greedy']):9.1%} "
             f"{(m['refined'] - m['greedy']) / (m['certified_ceiling'] - m['greedy']):11.1%}")  # fmt: skip
    lines.append(total)
    print(total)
    doc = {"steps": args.steps, "deployment": DEPLOYMENT.name, "rows": rows, "mean": m}
    write_results(args.out, "pairing_lp.py", argv, doc, lines)
    return 0


def write_results(out: Path, script: str, argv: list[str] | None, doc: dict, lines: list[str]) -> None:
    """``results.json`` (the provenance, then ``doc``) and ``summary.txt`` (the provenance, then
    ``lines``) under ``out``; the command is ``python benchmarks/<script>`` with ``argv``."""
    out.mkdir(parents=True, exist_ok=True)
    info = provenance() | {"command": f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)}
    (out / "results.json").write_text(json.dumps({"provenance": info} | doc, indent=1) + "\n")
    (out / "summary.txt").write_text("\n".join(f"{k}: {v}" for k, v in info.items()) + "\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {out}/summary.txt, results.json", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
