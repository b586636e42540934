"""Latency of every backend of ``rebalance_experts`` against the number of layers.

Usage:
    python benchmarks/bench_layers.py --quick
    python benchmarks/bench_layers.py --loads ../shared/data/deepseek-v3-sglang/prefill_in4096.json

Medians over repeats, warm-up excluded: ``time.perf_counter`` for the CPU backends,
``triton.testing.do_bench`` for the Triton backend (when CUDA is present).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

import eplb_triton as eplb

# name: (experts, replicas, groups, nodes, gpus)
MODELS = {
    "deepseek-v3-prefill-ep32": (256, 288, 8, 4, 32),
    "deepseek-v3-decode-ep144": (256, 288, 8, 18, 144),
}


def synthetic_loads(layers: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Skewed integer loads: a few hot experts per layer, like real MoE routing."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.floor(rng.pareto(1.2, (layers, experts)) * 1000).astype(np.int64))


def time_cpu(fn, repeats: int, budget_s: float) -> float:
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few layer counts and repeats (< 2 minutes on 2 cores)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="layer counts to sweep")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)

    layers = args.layers or ([1, 8, 58] if args.quick else [1, 8, 16, 32, 58, 64, 128, 256])
    repeats = args.repeats or (5 if args.quick else 20)
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}", file=sys.stderr)
    print(f"{'model':28s} {'layers':>6s} {'backend':>10s} {'median ms':>10s}")
    for name, (E, R, G, N, P) in MODELS.items():
        for L in layers:
            w = synthetic_loads(L, E)
            for backend in ("reference", "cpu"):
                if backend == "reference" and L > 58:
                    continue  # seconds per call: the trend is clear by then
                t = time_cpu(lambda w=w, b=backend: eplb.rebalance_experts(w, R, G, N, P, backend=b), repeats, 10.0)  # noqa: B023
                print(f"{name:28s} {L:6d} {backend:>10s} {t * 1e3:10.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
