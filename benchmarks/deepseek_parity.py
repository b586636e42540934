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
import importlib.util
import json
import sys
from pathlib import Path

import torch

import eplb_triton as eplb
from eplb_triton import metrics
from eplb_triton.bench import provenance
from eplb_triton.configs import DEEPSEEK_V3
from eplb_triton.io import read_loads


def load_module(path: Path):
    """DeepSeek's module from a file path; a clear error if it is not one."""
    if not path.is_file():
        raise SystemExit(f"deepseek_parity: error: --deepseek {path}: no such file")
    spec = importlib.util.spec_from_file_location("deepseek_eplb", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "rebalance_experts", None)):
        raise SystemExit(f"deepseek_parity: error: --deepseek {path} defines no rebalance_experts")
    return module


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
    rows = []
    for d in DEEPSEEK_V3.values():
        layers = differ = differ_stable = 0
        same_max = True
        for path in paths:
            w = read_loads(path).weight
            ours = eplb.rebalance_experts(w, *d.args, backend="cpu")
            theirs = module.rebalance_experts(w, *d.args)
            with stable_sorts():
                theirs_stable = module.rebalance_experts(w, *d.args)

            def differs(a, b=ours):
                return (a[0] != b[0]).any(1) | (a[2] != b[2]).any(1)

            layers += w.shape[0]
            differ += int(differs(theirs).sum())
            differ_stable += int(differs(theirs_stable).sum())
            peak_ours = metrics.gpu_loads(w, ours[0], ours[2], d.gpus).max(1).values
            peak_theirs = metrics.gpu_loads(w, theirs[0], theirs[2], d.gpus).max(1).values
            same_max &= bool(torch.equal(peak_ours, peak_theirs))
        rows.append({
            "deployment": d.name, "layers": layers, "differ": differ, "differ_share": differ / layers,
            "same_max_gpu_load_every_layer": same_max, "differ_with_stable_sort": differ_stable,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepseek", type=Path, required=True, help="path of DeepSeek's eplb.py")
    p.add_argument("--loads", type=Path, nargs="+", required=True, help="load files (SGLang JSON, .pt, .npy, .csv)")
    p.add_argument("--out", type=Path, default=Path("bench-out/deepseek-parity"), help="output folder")
    args = p.parse_args(argv)
    module = load_module(args.deepseek)
    rows = compare(module, args.loads)
    lines = [
        f"{'deployment':22s} {'layers':>6s} {'differ':>7s} {'share':>6s} {'same max GPU load':>17s} "
        f"{'differ, stable sort':>19s}"
    ]
    for r in rows:
        lines.append(
            f"{r['deployment']:22s} {r['layers']:6d} {r['differ']:7d} {r['differ_share']:6.1%} "
            f"{str(r['same_max_gpu_load_every_layer']):>17s} {r['differ_with_stable_sort']:19d}"
        )
    table = "\n".join(lines)
    print(table)
    info = provenance()
    info["loads"] = [p.name for p in args.loads]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"provenance": info, "rows": rows}, indent=1))
    header = "\n".join(f"{k}: {v}" for k, v in info.items())
    (args.out / "summary.txt").write_text(f"{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
