"""benchmarks/pairing_lp.py: the LP bound with two slots per GPU is a bound (never above the exact
optimum), admits the optimum's placement, and the script reports it between refined and the
certified ceiling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import load_script
from test_bounds import optimum

import eplb_triton as eplb

pytest.importorskip("scipy", reason="the LP bound solves with SciPy's HiGHS (the test extra)")

plp = load_script("pairing_lp")


def _cases():
    rng = np.random.default_rng(7)
    for i in range(40):
        P = int(rng.integers(2, 5))
        E = int(rng.integers(2, min(2 * P, 5) + 1))
        skew = rng.choice([0.5, 1.5, 3.0])
        w = np.round(rng.pareto(skew, E) * 100 + 1).astype(np.float32)
        if i % 5 == 0:
            w[0] = w.sum() * 2  # one expert dominates
        yield w, 2 * P, P


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{len(c[0])}-R{c[1]}")
def test_lp_bound_never_above_the_optimum_and_admits_it(case):
    w32, R, P = case
    w = w32.astype(np.float64)
    opt = optimum(w.tolist(), R, 1, 1, P)
    # The optimum's own placement satisfies the model (a relative hair above: T - h is rounded).
    assert plp.lp_feasible(w, R, opt * (1 + 1e-9)), "the model excludes a placement that reaches the optimum"
    certified = float(eplb.metrics.lower_bound(torch.from_numpy(w32)[None], R, P)[0])
    assert certified <= opt * (1 + 1e-12)
    lp = plp.lp_bound(w, R, certified, opt, 12)
    assert certified <= lp <= opt, (certified, lp, opt)


def test_lp_bound_is_tighter_than_the_certified_one_somewhere():
    gains = []
    for w32, R, P in CASES:
        w = w32.astype(np.float64)
        certified = float(eplb.metrics.lower_bound(torch.from_numpy(w32)[None], R, P)[0])
        gains.append(plp.lp_bound(w, R, certified, optimum(w.tolist(), R, 1, 1, P), 12) > certified * (1 + 1e-6))
    assert any(gains), "the LP bound never improved on the certified bound: the bisection does nothing"


def test_the_script_reports_lp_between_refined_and_certified(tmp_path):
    rng = np.random.default_rng(3)
    loads = tmp_path / "loads.npy"
    np.save(loads, (rng.pareto(1.2, (2, plp.DEPLOYMENT.experts)) * 50 + 1).astype(np.float32))
    out = tmp_path / "out"
    assert plp.main(["--loads", str(loads), "--steps", "3", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["layers"] == 2
    assert row["refined"] <= row["lp_ceiling"] + 1e-12 <= row["certified_ceiling"] + 2e-12
    assert row["greedy"] <= row["refined"] + 1e-12
    assert "closed/LP" in (out / "summary.txt").read_text()


@pytest.mark.parametrize(("args", "message"), [(["--steps", "0"], "--steps"), ([], "no such file")])
def test_bad_arguments_exit_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        plp.main(["--loads", str(tmp_path / "missing.json"), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
