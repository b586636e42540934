"""Latency of every backend against the number of layers, and placement quality on real loads.

    python benchmarks/bench_layers.py --quick
    python benchmarks/bench_layers.py --loads ../shared/data/deepseek-v3-sglang/prefill_in4096.json

The same as ``eplb-triton bench``; ``--help`` lists the options (see eplb_triton/bench.py).
"""

import sys

from eplb_triton.bench import main

if __name__ == "__main__":
    sys.exit(main(prog="bench_layers.py"))
