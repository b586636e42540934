"""pytest-benchmark suite for the CPU path, so speed regressions show up in numbers.

Not part of the default test run (pyproject's testpaths is tests/). Run:
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-autosave
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-compare   # against the last saved run
"""

import pytest

import eplb_triton as eplb
from eplb_triton.bench import synthetic_loads
from eplb_triton.configs import MODELS


@pytest.mark.parametrize("layers", [1, 58, 256])
@pytest.mark.parametrize("model", list(MODELS), ids=str)
def test_rebalance_cpu(benchmark, model, layers):
    d = MODELS[model]
    w = synthetic_loads(layers, d.experts)
    phy2log, _, logcnt = benchmark(eplb.rebalance_experts, w, *d.args, backend="cpu")
    assert phy2log.shape == (layers, d.replicas) and int(logcnt.sum()) == layers * d.replicas


@pytest.mark.parametrize("num_phy", [288, 512])
def test_replicate_cpu(benchmark, num_phy):
    w = synthetic_loads(58, 256)
    benchmark(eplb.replicate_experts, w, num_phy, backend="cpu")


@pytest.mark.parametrize("num_packs", [8, 144])
def test_packing_cpu(benchmark, num_packs):
    w = synthetic_loads(58, 288)
    benchmark(eplb.balanced_packing, w, num_packs, backend="cpu")


@pytest.fixture
def one_core_busy():
    """Another process keeps a core busy, as on a serving host (bench_layers.py --busy 1)."""
    from eplb_triton.bench import busy_processes

    with busy_processes(1):
        yield


@pytest.mark.parametrize("model", list(MODELS), ids=str)
def test_rebalance_cpu_one_core_busy(benchmark, model, one_core_busy):
    d = MODELS[model]
    w = synthetic_loads(58, d.experts)
    phy2log, _, _ = benchmark(eplb.rebalance_experts, w, *d.args, backend="cpu")
    assert phy2log.shape == (58, d.replicas)
