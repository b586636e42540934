"""benchmarks/budget_bound.py: the budgeted bound with two slots per GPU is a bound (never above the
smallest largest load within the budget, found exhaustively), admits that placement, is exact with
no budget, and the script reports its ceiling above the incremental replan."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from helpers import load_script

import eplb_triton as eplb

pytest.importorskip("scipy", reason="the budgeted bound solves with SciPy's HiGHS (the test extra)")

bb = load_script("budget_bound")


def _peak(w: np.ndarray, phy: tuple[int, ...] | np.ndarray) -> float:
    phy = np.asarray(phy)
    cnt = np.bincount(phy, minlength=w.size)
    s = w[phy] / cnt[phy]
    return float((s[0::2] + s[1::2]).max())


def best_placement(w: np.ndarray, old: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """The smallest largest GPU load over every placement with every expert that differs from
    ``old`` in at most ``k`` slots, and one such placement (exhaustive: every set of changed slots,
    every new expert)."""
    E, R = w.size, old.size
    best = (_peak(w, old), old.copy())
    for j in range(1, k + 1):
        for slots in itertools.combinations(range(R), j):
            for experts in itertools.product(*[[e for e in range(E) if e != old[q]] for q in slots]):
                phy = old.copy()
                phy[list(slots)] = experts
                if np.unique(phy).size == E and _peak(w, phy) < best[0]:
                    best = (_peak(w, phy), phy)
    return best


def best_within(w: np.ndarray, old: np.ndarray, k: int) -> float:
    return best_placement(w, old, k)[0]


def _cases():
    rng = np.random.default_rng(11)
    for i in range(40):
        P = int(rng.integers(2, 6))
        R = 2 * P
        E = int(rng.integers(2, min(R, 6) + 1))
        w = np.round(rng.pareto(rng.choice([0.7, 1.5, 3.0]), E) * 100 + 1).astype(np.float32).astype(np.float64)
        if i % 4 == 0:
            w[0] = w.sum() * 2  # one expert dominates
        old = np.concatenate([np.arange(E), rng.integers(0, E, R - E)])
        rng.shuffle(old)
        yield w, old, int(rng.integers(0, 4 if P < 5 else 3))
    # Two heavy experts share GPU 0; the best single move (slot 0 to expert 4) keeps one of them there.
    yield np.array([10.0, 10.0, 1.0, 1.0, 1.0]), np.array([0, 1, 2, 3, 4, 0]), 1


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{c[0].size}-R{c[1].size}-k{c[2]}")
def test_budget_bound_never_above_the_best_within_the_budget_and_admits_it(case):
    w, old, k = case
    opt = best_within(w, old, k)
    # That placement satisfies the model (a relative hair above: the float64 sums are rounded).
    assert bb.budget_feasible(w, old, k, opt * (1 + 1e-9)) is True, "the model excludes a placement within the budget"
    assert bb.budget_feasible(w, old, k, opt * (1 + 1e-9), waste_rows=0, changed_rows=0) is True
    w32 = torch.from_numpy(w.astype(np.float32))[None]
    certified = float(eplb.metrics.lower_bound(w32, old.size, old.size // 2)[0])
    lo, undecided, found = bb.budget_bound(w, old, k, certified, opt * 1.5, 12)
    assert certified <= lo <= opt and undecided == 0, (certified, lo, opt)
    assert found >= opt * (1 - 1e-12), "a realized placement beats the exhaustive optimum: not within the budget"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{c[0].size}-R{c[1].size}-k{c[2]}")
def test_realize_rebuilds_the_best_placement_from_its_counts_and_changed_slots(case):
    w, old, k = case
    opt, phy = best_placement(w, old, k)
    counts, changed = np.bincount(phy, minlength=w.size), (phy != old).astype(np.int64)
    made = bb.realize(w, old, counts, changed)
    assert made is not None
    np.testing.assert_array_equal(np.bincount(made, minlength=w.size), counts)
    np.testing.assert_array_equal(made[changed == 0], old[changed == 0])
    assert (made != old).sum() <= changed.sum() and bb.peak_load(w, made) == pytest.approx(opt, rel=1e-12)
    # Counts below what the kept slots hold have no placement.
    if (counts > 1).any():
        fewer = counts - (counts > 1)
        assert bb.realize(w, old, fewer, np.zeros_like(changed)) is None


# Cases where a kept slot whose partner changed cannot take another kept slot as its partner: the
# bound without the changed-part rows is 0.93, 0.88, 0.95 of the optimum within the budget.
CHANGED_PART = [
    (np.array([175.0, 186.0, 384.0]), np.array([0, 2, 1, 1, 2, 2, 0, 0, 1, 0]), 2),
    (np.array([2.0, 29.0, 56.0, 19.0, 2.0, 33.0, 64.0]), np.array([3, 2, 0, 1, 3, 4, 4, 4, 5, 6]), 2),
    (np.array([18.0, 24.0, 67.0, 6.0]), np.array([3, 3, 0, 1, 2, 2, 0, 3, 0, 2]), 2),
]


@pytest.mark.parametrize("case", CHANGED_PART, ids=lambda c: f"E{c[0].size}-R{c[1].size}-k{c[2]}")
def test_the_changed_part_rows_make_the_bound_exact_here(case):
    w, old, k = case
    opt = best_within(w, old, k)
    assert bb.budget_feasible(w, old, k, opt * (1 + 1e-9)) is True
    assert bb.budget_feasible(w, old, k, opt * (1 - 1e-6)) is False
    assert bb.budget_feasible(w, old, k, opt * 0.99, changed_rows=0) is True, "the rows are what binds"


@pytest.mark.parametrize("case", CASES[:8], ids=lambda c: f"E{c[0].size}-R{c[1].size}")
def test_with_no_budget_the_bound_is_the_old_placement(case):
    w, old, _ = case
    peak = _peak(w, old)
    assert bb.budget_feasible(w, old, 0, peak * (1 + 1e-9)) is True
    assert bb.budget_feasible(w, old, 0, peak * (1 - 1e-6)) is False, "with k = 0 nothing may change"


def test_the_budget_binds_somewhere():
    """The budget rows do something: for some case the bound within the budget is above the best
    placement with up to four changed slots (which the count model alone cannot see)."""
    binds = []
    for w, old, k in CASES:
        free = best_within(w, old, min(old.size, 4))  # every placement of up to 4 changes
        binds.append(not bb.budget_feasible(w, old, k, free * (1 + 1e-9)))
    assert any(binds)


def test_the_script_reports_the_ceiling_above_the_incremental_replan(tmp_path):
    rng = np.random.default_rng(5)
    paths = []
    for name in ("old", "new"):
        paths.append(tmp_path / f"{name}.npy")
        np.save(paths[-1], (rng.pareto(1.2, (1, bb.DEPLOYMENT.experts)) * 50 + 1).astype(np.float32))
    out = tmp_path / "out"
    assert bb.main(["--pair", *map(str, paths), "--steps", "2", "--time-limit", "5", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["layers"] == 1 and row["max_moves"] == int(0.15 * bb.DEPLOYMENT.replicas)
    assert row["incremental"] <= row["ceiling"] * (1 + 1e-9)
    assert "ceil/gr" in (out / "summary.txt").read_text()
    assert row["incremental"] <= row["found"] <= row["ceiling"] * (1 + 1e-9)
    with pytest.raises(SystemExit) as e:  # the files have one layer
        bb.main(["--pair", *map(str, paths), "--layers", "0,1", "--out", str(out)])
    assert e.value.code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps"),
        (["--share", "2"], "--share"),
        (["--time-limit", "0"], "--time-limit"),
        (["--waste-rows", "-1"], "--waste-rows"),
        (["--changed-rows", "-1"], "--changed-rows"),
        (["--span", "0"], "--span"),
        (["--layers", "a,b"], "--layers"),
        (["--layers", "-1"], "--layers"),
        ([], "no such file"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, capsys, args, message):
    missing = str(tmp_path / "missing.json")
    with pytest.raises(SystemExit) as e:
        bb.main(["--pair", missing, missing, *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
