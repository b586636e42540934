"""benchmarks/deepseek_parity.py with a stand-in for DeepSeek's module (the real file is the
user's; nothing of it is vendored)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_loads

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "deepseek_parity.py"
spec = importlib.util.spec_from_file_location("deepseek_parity", SCRIPT)
parity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parity)

# A stand-in that, like the published code, takes its tie order from Tensor.sort: it reverses the
# expert order before planning whenever the sort it sees is not stable on equal keys.
STAND_IN = """
import inspect
import torch
import eplb_triton as eplb

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    stable = inspect.isfunction(torch.Tensor.sort)  # the parity script's stable stand-in for the method
    out = eplb.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, backend="cpu")
    if stable:
        return out
    # layer 0: another placement with the same GPU loads multiset, as ties would give; layer 1: the
    # same placement with each expert's replicas numbered the other way round
    phy2log, log2phy, logcnt = (t.clone() for t in out)
    phy2log[0] = phy2log[0].flip(0)
    for e in range(log2phy.shape[1]):
        c = int(logcnt[1, e])
        log2phy[1, e, :c] = log2phy[1, e, :c].flip(0)
    return phy2log, log2phy, logcnt
"""


def test_stable_sorts_makes_tensor_sort_stable():
    x = torch.zeros(64)
    original = torch.Tensor.sort
    with parity.stable_sorts():
        assert torch.equal(x.sort(descending=True).indices, torch.arange(64))
        assert torch.equal(x.sort(-1, True).indices, torch.arange(64))
    assert torch.Tensor.sort is original, "restored afterwards"


def test_parity_report(tmp_path):
    module = tmp_path / "eplb.py"
    module.write_text(STAND_IN)
    loads = tmp_path / "loads.npy"
    np.save(loads, make_loads(2, 256, "skewed", 0).numpy())
    assert parity.main(["--deepseek", str(module), "--loads", str(loads), "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["deployment"] for r in rows][:2] == ["prefill-EP32", "prefill-EP32-global"]
    for r in rows:
        assert r["layers"] == 2 and r["differ"] == 1 and r["differ_with_stable_sort"] == 0
        redundant = r["deployment"] != "EP8-no-redundancy"  # no expert has two replicas to renumber there
        assert r["replicas_renumbered"] == int(redundant) and r["replicas_renumbered_with_stable_sort"] == 0


def test_a_missing_module_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        parity.main(["--deepseek", str(tmp_path / "nope.py"), "--loads", str(tmp_path / "x.npy")])
