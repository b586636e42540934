"""The ``eplb-triton`` command.

    eplb-triton plan --loads FILE --replicas R --groups G --nodes N --gpus P
                     [--backend auto|cpu|reference|triton] [--out plan.json] [--plot plan.png]
    eplb-triton bench [benchmark options]   (see ``eplb-triton bench --help``)

Exit codes: 0 success; 2 bad arguments or input, with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import metrics
from ._validation import BACKENDS
from .api import rebalance_experts
from .bench import OneLineParser as _Parser
from .io import read_loads


def _hottest(weight: torch.Tensor, logcnt: torch.Tensor, k: int) -> str:
    top = torch.topk(weight, min(k, weight.numel())).indices.tolist()
    return " ".join(f"e{e}x{int(logcnt[e])}" for e in top)


def plot_placement(before: torch.Tensor, after: torch.Tensor, path: Path, title: str) -> None:
    """GPU x layer heatmaps of load / layer mean, before (no rebalancing) and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def relative(loads: torch.Tensor) -> torch.Tensor:
        return loads / loads.mean(dim=1, keepdim=True).clamp_min(1e-12)

    rel_before, rel_after = relative(before), relative(after)
    vmax = float(max(rel_before.max(), rel_after.max()))
    L, P = before.shape
    fig, axes = plt.subplots(1, 2, figsize=(max(11.0, min(22.0, 4 + P / 6)), 3 + L / 8), sharey=True)
    for ax, data, name in ((axes[0], rel_before, "before (no rebalancing)"), (axes[1], rel_after, "after")):
        image = ax.imshow(data.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        worst = float(metrics.balancedness(data).min())
        ax.set_title(f"{name}\nworst layer mean/max = {worst:.2f}", fontsize=10)
        ax.set_xlabel("GPU")
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), label="GPU load / layer mean")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plan(args: argparse.Namespace) -> int:
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'eplb-triton[bench]'") from None
    loads = read_loads(args.loads)
    w = loads.weight
    device = "cuda" if args.backend in ("auto", "triton") and torch.cuda.is_available() else "cpu"
    phy2log, log2phy, logcnt = rebalance_experts(
        w.to(device), args.replicas, args.groups, args.nodes, args.gpus, backend=args.backend
    )
    phy2log, log2phy, logcnt = phy2log.cpu(), log2phy.cpu(), logcnt.cpu()
    for note in loads.notes:  # after the plan: a failing call prints only its error
        print(f"{args.loads.name}: {note}", file=sys.stderr)
    before = metrics.identity_gpu_loads(w, args.gpus)
    after = metrics.gpu_loads(w, phy2log, logcnt, args.gpus)
    b_before, b_after = metrics.balancedness(before), metrics.balancedness(after)

    print(f"{'layer':>5s} {'before':>7s} {'after':>7s}  hottest experts (replicas)")
    for layer in range(w.shape[0]):
        print(
            f"{layer:5d} {float(b_before[layer]):7.3f} {float(b_after[layer]):7.3f}  "
            f"{_hottest(w[layer], logcnt[layer], args.top)}"
        )
    s_before, s_after = metrics.summarize(b_before), metrics.summarize(b_after)
    print(
        f"balancedness (mean GPU load / max): before mean {s_before['mean']:.3f} worst {s_before['worst']:.3f}; "
        f"after mean {s_after['mean']:.3f} worst {s_after['worst']:.3f}"
    )
    config = {"replicas": args.replicas, "groups": args.groups, "nodes": args.nodes, "gpus": args.gpus,
              "layers": w.shape[0], "experts": w.shape[1],
              "policy": "hierarchical" if args.groups % args.nodes == 0 else "global"}  # fmt: skip
    if args.out is not None:
        plan = {
            "config": config,
            "loads": str(args.loads),
            "notes": loads.notes,
            "phy2log": phy2log.tolist(),
            "log2phy": log2phy.tolist(),
            "logcnt": logcnt.tolist(),
            "balancedness": {"before": b_before.tolist(), "after": b_after.tolist()},
        }
        args.out.write_text(json.dumps(plan))
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot is not None:
        title = f"{args.loads.name}: R={args.replicas} G={args.groups} N={args.nodes} P={args.gpus}"
        plot_placement(before, after, args.plot, title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def build_parser() -> _Parser:
    parser = _Parser(prog="eplb-triton", description="Expert-parallelism load balancer (EPLB) for MoE models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan = sub.add_parser("plan", help="compute a placement for a load file")
    plan.add_argument("--loads", type=Path, required=True, help="load file (.json SGLang, .pt, .npy, .csv)")
    plan.add_argument("--replicas", type=int, required=True, help="physical expert slots R")
    plan.add_argument("--groups", type=int, required=True, help="expert groups G")
    plan.add_argument("--nodes", type=int, required=True, help="nodes N")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs P")
    plan.add_argument("--backend", choices=BACKENDS, default="auto")
    plan.add_argument("--out", type=Path, help="write the placement as JSON")
    plan.add_argument("--plot", type=Path, help="write a GPU x layer heatmap of load, before and after (PNG)")
    plan.add_argument("--top", type=int, default=3, help="hottest experts listed per layer (default 3)")
    sub.add_parser("bench", help="run the benchmark (options: eplb-triton bench --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:], prog="eplb-triton bench")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _plan(args)
    except (ValueError, TypeError) as exc:
        print(f"eplb-triton: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
