"""Real DeepSeek-V3 loads (../shared/data): CPU path == reference on every deployment."""

import pytest
import torch
from helpers import DATA, REAL_CONFIGS, assert_same, assert_valid_placement

import eplb_triton as eplb
from eplb_triton import metrics, reference
from eplb_triton.io import read_loads

FILES = sorted(DATA.glob("*.json")) if DATA.is_dir() else []
pytestmark = pytest.mark.skipif(not FILES, reason=f"real loads not found at {DATA} (../shared/data is absent)")


@pytest.mark.parametrize("config", REAL_CONFIGS, ids=lambda c: c[0])
def test_cpu_equals_reference_on_real_loads(config):
    _, R, G, N, P = config
    w = read_loads(FILES[0]).weight
    assert w.shape == (58, 256)
    got = eplb.rebalance_experts(w, R, G, N, P, backend="cpu")
    want = reference.rebalance_experts(w, R, G, N, P)
    assert_same(got, want)
    assert_valid_placement(*got, 256, R, G, N, P)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_file_all_configs_cpu_path(path):
    w = read_loads(path).weight
    for _, R, G, N, P in REAL_CONFIGS:
        phy2log, log2phy, logcnt = eplb.rebalance_experts(w, R, G, N, P, backend="cpu")
        assert_valid_placement(phy2log, log2phy, logcnt, 256, R, G, N, P)
        loads = metrics.gpu_loads(w, phy2log, logcnt, P)
        b = metrics.balancedness(loads)
        # no placement beats the lower bound; balancedness is mean / max of the GPU loads
        assert (loads.max(1).values >= metrics.lower_bound(w, R, P) * (1 - 1e-9)).all()
        assert torch.allclose(b, loads.mean(1) / loads.max(1).values)
