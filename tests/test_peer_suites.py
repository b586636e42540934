"""The DeepSeek-behaviour cases of the peers' own EPLB test suites (vLLM's
tests/distributed/test_eplb_algo.py exercises DeepSeek's policy with these calls), rewritten
against eplb-triton's API, on every backend. The argument-validation case included: a call that
DeepSeek serves with its global fallback must work, and a bad one must raise AssertionError."""

import pytest
import torch

import eplb_triton as eplb

BACKENDS = ["reference", "cpu", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def plan(weight, *args, backend):
    out = eplb.rebalance_experts(torch.tensor(weight).to(DEVICE), *args, backend=backend)
    return tuple(t.cpu() for t in out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_published_example(backend):
    weight = [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
    phy2log, log2phy, logcnt = plan(weight, 16, 4, 2, 8, backend=backend)
    assert phy2log.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert log2phy.shape == (2, 12, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_gpu_and_equal_weights(backend):
    phy2log, _, logcnt = plan([[10, 20, 30, 40]], 4, 1, 1, 1, backend=backend)
    assert sorted(phy2log[0].tolist()) == [0, 1, 2, 3] and logcnt.tolist() == [[1, 1, 1, 1]]
    _, _, logcnt = plan([[50] * 8], 8, 2, 2, 4, backend=backend)
    assert (logcnt == 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_imbalance_gets_the_replicas(backend):
    _, _, logcnt = plan([[1000, 1, 1, 1, 1, 1, 1, 1]], 12, 2, 2, 4, backend=backend)
    # one group per node, 6 slots per node for 4 experts: node 0's 2 spares both go to expert 0
    # (1000 / 2 > 1); node 1's experts all carry 1, so its spares go to 4, then 5 (lower index first)
    assert logcnt.tolist() == [[3, 1, 1, 1, 2, 2, 1, 1]]
    _, _, logcnt = plan([[100, 50, 200, 75, 150, 25, 300, 80]], 12, 4, 2, 4, backend=backend)
    assert int(logcnt[0, 6]) >= 2 and int(logcnt.sum()) == 12


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiple_layers_and_other_shapes(backend):
    weight = [[10, 20, 30, 40, 50, 60], [60, 50, 40, 30, 20, 10], [25, 25, 25, 25, 25, 25]]
    phy2log, _, logcnt = plan(weight, 8, 2, 2, 4, backend=backend)
    assert phy2log.shape == (3, 8) and (logcnt.sum(1) == 8).all()
    phy2log, _, logcnt = plan([[50, 100, 75, 120, 90, 60, 80, 110, 40, 70, 95, 85, 65, 55, 45, 35]], 24, 8, 4, 8,
                              backend=backend)  # fmt: skip
    assert phy2log.shape == (1, 24) and int(logcnt.sum()) == 24
    weight = [[200, 150, 100, 50, 25, 12], [12, 25, 50, 100, 150, 200]]
    _, _, logcnt = plan(weight, 10, 3, 1, 2, backend=backend)
    assert int(logcnt[0, 0]) >= 2 and int(logcnt[1, 5]) >= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_argument_validation_like_deepseek(backend):
    # 3 groups on 2 nodes: DeepSeek falls back to the global policy instead of failing
    phy2log, _, logcnt = plan([[10, 20, 30, 40]], 8, 3, 2, 4, backend=backend)
    assert phy2log.shape == (1, 8) and logcnt.shape == (1, 4)
    phy2log, _, logcnt = plan([[10, 20, 30, 40, 50, 60]], 8, 3, 2, 4, backend=backend)
    assert int(logcnt.sum()) == 8
    # 7 slots on 4 GPUs: DeepSeek asserts, and callers catch AssertionError
    with pytest.raises(AssertionError):
        plan([[10, 20, 30, 40]], 7, 2, 2, 4, backend=backend)
