"""Where eplb-triton's placements differ from DeepSeek's published ``eplb.py``, and why.

    python benchmarks/deepseek_parity.py --deepseek PATH/eplb.py --loads FILE [FILE ...] [--out DIR]

``PATH/eplb.py`` is DeepSeek's published module (github.com/deepseek-ai/EPLB), supplied by the
user; nothing of it is vendored. For every deployment of ``eplb_triton.configs.DEEPSEEK_V3`` and
every layer of every load file, it compares ``rebalance_experts`` of both:

* as published: DeepSeek sorts with torch's non-stable sort, so on exactly equal loads its
  order is unspecified; the share of layers whose ``phy2log`` or ``logcnt`` differ, and whether
  the max GPU load is nevertheless identical on every layer;
* with ``torch.Tensor.sort`` made stable while DeepSeek's code runs (lower index first on ties,
  the rule of docs/algorithm.md): the share of layers that still differ (expected: none).

Writes ``summary.txt`` and ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from eplb_triton.bench import deepseek_agreement, deepseek_provenance, load_deepseek, provenance
from eplb_triton.configs import DEEPSEEK_V3
from eplb_triton.io import read_loads


@contextlib.contextmanager
def stable_sorts():
    """Make ``Tensor.sort`` stable (ties: lower index first) for the duration."""
    original = torch.Tensor.sort

    def sort(self, *args, **kwargs):
        kwargs["stable"] = True
        if args:  # Tensor.sort(dim, descending) positionally
            kwargs.setdefault("dim", args[0])
            if len(args) > 1:
                kwargs.setdefault("descending", args[1])
        return original(self, **kwargs)

    torch.Tensor.sort = sort
    try:
        yield
    finally:
        torch.Tensor.sort = original


def compare(module, paths: list[Path]) -> list[dict]:
    """:func:`eplb_triton.bench.deepseek_agreement` as published, and again with stable sorts."""
    files = [read_loads(p) for p in paths]
    deployments = list(DEEPSEEK_V3.values())
    rows = deepseek_agreement(files, deployments, module)
    with stable_sorts():
        stable = deepseek_agreement(files, deployments, module)
    for row, again in zip(rows, stable, strict=True):
        row["differ_with_stable_sort"] = again["differ"]
        row["replicas_renumbered_with_stable_sort"] = again["replicas_renumbered"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepseek", type=Path, required=True, help="path of DeepSeek's eplb.py")
    p.add_argument("--loads", type=Path, nargs="+", required=True, help="load files (SGLang JSON, .pt, .npy, .csv)")
    p.add_argument("--out", type=Path, default=Path("bench-out/deepseek-parity"), help="output folder")
    args = p.parse_args(argv)
    try:
        module = load_deepseek(args.deepseek)
    except ValueError as exc:
        raise SystemExit(f"deepseek_parity: error: {exc}") from None
    rows = compare(module, args.loads)
    lines = [
        f"{'deployment':22s} {'layers':>6s} {'differ':>7s} {'share':>6s} {'same max GPU load':>17s} "
        f"{'renumbered':>10s} {'differ, stable sort':>19s} {'renumbered, stable':>18s}"
    ]
    for r in rows:
        lines.append(
            f"{r['deployment']:22s} {r['layers']:6d} {r['differ']:7d} {r['differ_share']:6.1%} "
            f"{str(r['same_max_gpu_load']):>17s} {r['replicas_renumbered']:10d} {r['differ_with_stable_sort']:19d} "
            f"{r['replicas_renumbered_with_stable_sort']:18d}"
        )
    table = "\n".join(lines)
    print(table)
    info = provenance()
    info["loads"] = [p.name for p in args.loads]
    info["deepseek_eplb"] = deepseek_provenance(args.deepseek)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"provenance": info, "rows": rows}, indent=1))
    header = "\n".join(f"{k}: {v}" for k, v in info.items())
    (args.out / "summary.txt").write_text(f"{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
