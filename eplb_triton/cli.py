"""The ``eplb-triton`` command (also ``python -m eplb_triton``).

    eplb-triton plan --loads FILE --replicas R --groups G --nodes N --gpus P
                     [--policy auto|hierarchical|global] [--backend auto|cpu|reference|triton]
                     [--method greedy|refined] [--old PLAN.json [--max-moves K] [--min-gain F]]
                     [--active-gpus MASK] [--out plan.json] [--plot plan.png] [--top K]
    eplb-triton bench [benchmark options]   (see ``eplb-triton bench --help``)
    eplb-triton --version

Exit codes: 0 success (``eplb-triton`` alone prints the usage and the commands, exit 0); 2 bad
arguments or input, with one line on stderr.

Every load file format is read the same way: all-zero (dense) layers are dropped with a note, and
layers are labelled with their model layer index (their row in the file) in the table and the plot.

``--out`` and ``--plot`` are computed in full first, then each is written to a temporary file beside
it and renamed into place: a failure leaves the previous files as they were, never a partial one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from io import BytesIO
from pathlib import Path

import torch

from . import __version__, metrics
from ._atomic import replace_files
from ._validation import METHODS, check_config, moves_in_slots
from .api import rebalance_experts
from .backends import BACKENDS, device_for
from .io import OneLineParser as _Parser
from .io import one_line, read_loads
from .placement import replica_counts

POLICIES = ("auto", "hierarchical", "global")

_INT64_MAX = torch.iinfo(torch.int64).max


def _hottest(weight: torch.Tensor, logcnt: torch.Tensor, k: int) -> str:
    top = torch.topk(weight, min(k, weight.numel())).indices.tolist()
    return " ".join(f"e{e}x{int(logcnt[e])}" for e in top)


def placement_figure(before: torch.Tensor, after: torch.Tensor, title: str, layers: list[int], nodes: int = 1):
    """GPU x layer heatmaps of load / layer mean, before (no rebalancing) and after, as a matplotlib figure.

    ``layers[i]`` labels row ``i`` (its model layer index); with ``nodes > 1`` dividing the GPU count,
    a vertical line marks each node boundary (every ``P / nodes`` GPUs).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def relative(loads: torch.Tensor) -> torch.Tensor:
        return loads / loads.mean(dim=1, keepdim=True).clamp_min(1e-12)

    rel_before, rel_after = relative(before), relative(after)
    vmax = float(max(rel_before.max(), rel_after.max()))
    L, P = before.shape
    ticks = list(range(0, L, max(1, math.ceil(L / 40))))  # at most 40 labels: readable at any layer count
    fig, axes = plt.subplots(1, 2, figsize=(max(11.0, min(22.0, 4 + P / 6)), 3 + L / 8), sharey=True)
    try:
        for ax, data, name in ((axes[0], rel_before, "before (no rebalancing)"), (axes[1], rel_after, "after")):
            image = ax.imshow(data.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            worst = float(metrics.balancedness(data).min())
            ax.set_title(f"{name}\nworst layer mean/max = {worst:.2f}", fontsize=10)
            if nodes > 1 and P % nodes == 0:
                for k in range(1, nodes):
                    ax.axvline(k * (P // nodes) - 0.5, color="cyan", linewidth=0.8)
                ax.set_xlabel(f"GPU (lines: node boundaries, {P // nodes} GPUs per node)")
            else:
                ax.set_xlabel("GPU")
        axes[0].set_yticks(ticks, [str(layers[i]) for i in ticks])
        axes[0].set_ylabel("model layer")
        fig.colorbar(image, ax=list(axes), label="GPU load / layer mean")
        fig.suptitle(title)
    except BaseException:
        plt.close(fig)
        raise
    return fig


def render_placement(before: torch.Tensor, after: torch.Tensor, title: str, layers: list[int], nodes: int = 1) -> bytes:
    """PNG of :func:`placement_figure`."""
    fig = placement_figure(before, after, title, layers, nodes)
    import matplotlib.pyplot as plt

    try:
        png = BytesIO()
        fig.savefig(png, format="png", dpi=100)
    finally:
        plt.close(fig)
    return png.getvalue()


def _describe(exc: BaseException) -> str:
    text = one_line(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    if value > _INT64_MAX:  # indices are int64: a larger count cannot be a plan
        raise argparse.ArgumentTypeError(f"must be at most 2**63 - 1, got {value}")
    return value


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:  # hard links, case-insensitive file systems
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that cannot be written or that would overwrite an input."""
    outputs = [(name, path) for name, path in (("--out", args.out), ("--plot", args.plot)) if path is not None]
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise ValueError(f"--plot {args.plot}: the plot is a PNG, the file name must end in .png")
    for name, path in outputs:
        if _same_file(path, args.loads):
            raise ValueError(f"{name} {path} is the load file --loads {args.loads}; refusing to overwrite the input")
        target = Path(os.path.realpath(path))
        if target.is_dir():
            raise ValueError(f"{name} {path}: is a directory")
        if not target.parent.is_dir():
            raise ValueError(f"{name} {path}: no such folder {target.parent}")
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise ValueError(f"{name} {path}: folder {target.parent} is not writable")
        if target.exists() and not os.access(target, os.W_OK):
            raise ValueError(f"{name} {path}: file is not writable")
    if args.out is not None and args.plot is not None and _same_file(args.out, args.plot):
        raise ValueError(f"--out {args.out} and --plot {args.plot} are the same file")


def _read_old(path: Path, layers: list[int], replicas: int) -> torch.Tensor:
    """``phy2log`` of a plan written by ``plan --out`` for the same model layers and slot count."""
    try:
        plan = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"--old {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"--old {path}: not a JSON plan ({one_line(exc)})") from None
    if not isinstance(plan, dict) or "phy2log" not in plan:
        raise ValueError(f"--old {path}: not a plan written by 'eplb-triton plan --out' (no phy2log)")
    if plan.get("model_layers", layers) != layers:
        raise ValueError(f"--old {path}: planned for model layers {plan.get('model_layers')}, the loads have {layers}")
    rows = plan["phy2log"]
    whole = isinstance(rows, list) and all(
        isinstance(row, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in row) for row in rows
    )  # a float id (3.9) or a boolean would otherwise be truncated to an expert silently
    try:
        if not whole:
            raise TypeError
        old = torch.tensor(rows, dtype=torch.int64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"--old {path}: phy2log must be a rectangular list of integers") from None
    if tuple(old.shape) != (len(layers), replicas):
        raise ValueError(f"--old {path}: phy2log is {list(old.shape)}, this plan needs {[len(layers), replicas]}")
    return old


def _active_gpus(spec: str, gpus: int) -> list[bool]:
    """``--active-gpus``: one 0/1 per GPU, as ``11101111`` or ``1,1,1,0,1,1,1,1``."""
    digits = spec.replace(",", "").replace(" ", "")
    if not digits or set(digits) - {"0", "1"}:
        raise ValueError(f"--active-gpus {spec!r}: one 0 or 1 per GPU, e.g. 11101111 or 1,1,1,0,1,1,1,1")
    if len(digits) != gpus:
        raise ValueError(f"--active-gpus {spec!r}: {len(digits)} entries for --gpus {gpus}")
    return [d == "1" for d in digits]


def _moves(text: str) -> int | float:
    """``--max-moves``: slots per layer (an int >= 0), or a fraction of the slots in (0, 1]."""
    if text.strip().lstrip("+-").isdigit():
        value = int(text)
    else:
        try:
            fraction = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: an int, or a fraction in (0, 1]") from None
        if not 0.0 < fraction <= 1.0:
            raise argparse.ArgumentTypeError(f"a fraction of the slots must be in (0, 1], got {fraction}")
        return fraction
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _gain(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _plan(args: argparse.Namespace) -> int:
    _check_outputs(args)  # the arguments first: their errors do not depend on what is installed
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'eplb-triton[bench]'") from None
    if args.policy == "hierarchical" and args.groups % args.nodes:
        raise ValueError(
            f"--policy hierarchical needs --groups ({args.groups}) to be a multiple of --nodes ({args.nodes}); "
            "use --policy global or auto"
        )
    loads = read_loads(args.loads)
    w = loads.weight
    device = device_for(args.backend)
    # auto and hierarchical: rebalance_experts applies the one rule (select_policy); global is G = N = 1
    groups, nodes = (1, 1) if args.policy == "global" else (args.groups, args.nodes)
    cfg = check_config(w, args.replicas, groups, nodes, args.gpus)  # its errors say it best, as they are
    old = _read_old(args.old, loads.layers, args.replicas) if args.old is not None else None
    if old is None and (args.max_moves is not None or args.min_gain is not None):
        raise ValueError("--max-moves and --min-gain need --old PLAN.json: they compare with the placement in service")
    active = _active_gpus(args.active_gpus, args.gpus) if args.active_gpus is not None else None
    max_moves = moves_in_slots(args.max_moves, args.replicas)
    try:
        phy2log, log2phy, logcnt = rebalance_experts(
            w.to(device), args.replicas, groups, nodes, args.gpus, backend=args.backend, method=args.method,
            old_phy2log=None if old is None else old.to(device), max_moves=max_moves, min_gain=args.min_gain,
            active_gpus=active,
        )  # fmt: skip
    except (ValueError, MemoryError, OverflowError, RuntimeError) as exc:  # e.g. --replicas 10**12: too large
        raise ValueError(
            f"cannot plan --replicas {args.replicas} --groups {args.groups} --nodes {args.nodes} --gpus {args.gpus} "
            f"for {w.shape[0]} layers x {w.shape[1]} experts ({_describe(exc)})"
        ) from None
    phy2log, log2phy, logcnt = phy2log.cpu(), log2phy.cpu(), logcnt.cpu()
    moved = None if old is None else ((phy2log != old) & (phy2log >= 0)).sum(dim=1)
    before = metrics.identity_gpu_loads(w, args.gpus)
    after = metrics.gpu_loads(w, phy2log, logcnt, args.gpus)

    if old is not None:  # "before" is the placement in service (-1: an empty slot of a plan around lost GPUs)
        before = metrics.gpu_loads(w, old, replica_counts(old, w.shape[1]).clamp_min(1), args.gpus)
    # with lost GPUs, balance among the live ones: a lost GPU's load of 0 would cap it at (P - 1) / P
    live = slice(None) if active is None else torch.tensor(active)
    b_before, b_after = metrics.balancedness(before[:, live]), metrics.balancedness(after[:, live])
    ceiling = None  # the proven ceiling on balancedness (all GPUs live: the bound is for the whole problem)
    if active is None or all(active):
        ceiling = metrics.ceiling(w, args.replicas, args.gpus, num_groups=groups, num_nodes=nodes)
    print(f"{'layer':>5s} {'before':>7s} {'after':>7s} " + ("  bound " if ceiling is not None else "")
          + ("moved " if moved is not None else "") + " hottest experts (replicas)")  # fmt: skip
    for row, layer in enumerate(loads.layers):  # labelled with the model layer index (row in the file)
        print(
            f"{layer:5d} {float(b_before[row]):7.3f} {float(b_after[row]):7.3f} "
            + (f"{float(ceiling[row]):7.3f} " if ceiling is not None else "")
            + (f"{int(moved[row]):5d} " if moved is not None else "")
            + f" {_hottest(w[row], logcnt[row], args.top)}"
        )
    s_before, s_after = metrics.summarize(b_before), metrics.summarize(b_after)
    print(
        "balancedness (mean GPU load / max"
        + ("" if active is None else f", over the {sum(active)} live GPUs")
        + f"): before mean {s_before['mean']:.3f} worst {s_before['worst']:.3f}; "
        f"after mean {s_after['mean']:.3f} worst {s_after['worst']:.3f}"
        + ("" if moved is None else f"; slots moved {int(moved.sum())} of {moved.numel() * args.replicas}")
    )
    if ceiling is not None:
        print(
            f"bound (proven: no placement of the {cfg.policy} policy is better balanced): mean "
            f"{float(ceiling.mean()):.3f}; after / bound: mean {float((b_after / ceiling).mean()):.2%} "
            f"(at least this share of the optimum)"
        )
    config = {"replicas": args.replicas, "groups": args.groups, "nodes": args.nodes, "gpus": args.gpus,
              "layers": w.shape[0], "experts": w.shape[1], "policy": cfg.policy, "method": args.method,
              "old": None if args.old is None else str(args.old), "max_moves": max_moves,
              "min_gain": args.min_gain, "active_gpus": None if active is None else active}  # fmt: skip
    files: dict[Path, bytes] = {}  # everything is computed before any file is replaced
    if args.out is not None:
        plan = {
            "config": config,
            "loads": str(args.loads),
            "notes": loads.notes,
            "model_layers": loads.layers,  # model layer index of each row below (its row in the load file)
            "phy2log": phy2log.tolist(),
            "log2phy": log2phy.tolist(),
            "logcnt": logcnt.tolist(),
            "balancedness": {
                "before": b_before.tolist(),
                "after": b_after.tolist(),
                "bound": None if ceiling is None else ceiling.tolist(),  # proven ceiling per layer
            },
            "moved": None if moved is None else moved.tolist(),  # per layer: slots whose expert changes
        }
        files[args.out] = json.dumps(plan).encode()
    if args.plot is not None:
        config_text = f"R={args.replicas} G={args.groups} N={args.nodes} P={args.gpus}"
        title = f"{args.loads.name}: {config_text}, {cfg.policy} policy"
        files[args.plot] = render_placement(before, after, title, loads.layers, args.nodes)
    try:
        replace_files(files)
    except OSError as exc:
        raise ValueError(f"cannot write {exc.filename}: {exc.strerror}") from None
    for note in loads.notes:  # at the end: a failing call prints only its error
        print(f"{args.loads.name}: {note}", file=sys.stderr)
    for path in files:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def build_parser() -> _Parser:
    parser = _Parser(
        prog="eplb-triton",
        description="Expert-parallelism load balancer (EPLB) for MoE models: a drop-in for DeepSeek's "
        "eplb.rebalance_experts. Also runs as python -m eplb_triton.",
        epilog="Exit codes: 0 success (and this help, which eplb-triton alone prints); 2 bad arguments or input, "
        "with one line on stderr.",
    )
    parser.add_argument(
        "--version", action="version", version=f"eplb-triton {__version__}", help="print the version and exit"
    )
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", parser_class=_Parser)
    plan = sub.add_parser(
        "plan",
        help="compute a placement for a load file",
        description="Compute a placement (rebalance_experts) for a load file: print the balancedness before and "
        "after and the hottest experts' replica counts per model layer; optionally write the placement as JSON "
        "and a heatmap PNG. All-zero (dense) layers are dropped, with a note, whatever the file format.",
    )
    plan.add_argument(
        "--loads",
        type=Path,
        required=True,
        metavar="FILE",
        help="load file: .json (SGLang expert distribution), .pt/.pth, .npy or .csv; required",
    )
    plan.add_argument(
        "--replicas",
        type=_positive_int,
        required=True,
        metavar="R",
        help="physical expert slots, a multiple of --gpus; required",
    )
    plan.add_argument("--groups", type=_positive_int, required=True, metavar="G", help="expert groups; required")
    plan.add_argument("--nodes", type=_positive_int, required=True, metavar="N", help="nodes; required")
    plan.add_argument("--gpus", type=_positive_int, required=True, metavar="P", help="GPUs; required")
    plan.add_argument(
        "--policy",
        choices=POLICIES,
        default="auto",
        help="auto: hierarchical when G %% N == 0 and not G = N = 1, else global; hierarchical: "
        "the same, an error when G %% N != 0; global: G = N = 1 (default: auto)",
    )
    plan.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="auto: triton on a CUDA device, else cpu (default: auto)"
    )
    plan.add_argument(
        "--out",
        type=Path,
        metavar="FILE.json",
        help="write the placement (phy2log, log2phy, logcnt, config) as JSON (default: none)",
    )
    plan.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="write a GPU x layer heatmap of load, before and after, to exactly this PNG file (default: none)",
    )
    plan.add_argument(
        "--top", type=_positive_int, default=3, metavar="K", help="hottest experts listed per layer (default: 3)"
    )
    plan.add_argument(
        "--method", choices=METHODS, default="greedy",
        help="greedy: DeepSeek's algorithm; refined: a local search after it, and with two slots per GPU "
        "(global policy) the deficit-driven pairing (default: greedy)",
    )  # fmt: skip
    plan.add_argument(
        "--old", type=Path, metavar="PLAN.json",
        help="the placement in service, a plan written by --out: the new one is relabelled to it, and "
        "'before' and 'moved' compare with it (default: none)",
    )  # fmt: skip
    plan.add_argument(
        "--max-moves", type=_moves, metavar="K",
        help="with --old: an incremental replan, at most K slots per layer change (an int, or a fraction of "
        "the slots such as 0.15) (default: none)",
    )  # fmt: skip
    plan.add_argument(
        "--min-gain", type=_gain, metavar="X",
        help="with --old: a layer keeps its placement unless the plan lowers its largest GPU load by X "
        "(0 <= X < 1) (default: none)",
    )  # fmt: skip
    plan.add_argument(
        "--active-gpus", metavar="MASK",
        help="plan around lost GPUs: one 0/1 per GPU, e.g. 11101111; a lost GPU's slots get no expert "
        "(-1), balancedness is over the live GPUs, and the plan can be the next --old (default: every GPU)",
    )  # fmt: skip
    sub.add_parser("bench", help="run the benchmark (options: eplb-triton bench --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:], prog="eplb-triton bench")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # eplb-triton alone: what it can do, not an error
        parser.print_help()
        return 0
    try:
        return _plan(args)
    except (ValueError, TypeError) as exc:  # bad arguments or input; LoadFileError is a ValueError
        message = str(exc)
    except MemoryError as exc:  # a plan too large to hold or to write out
        message = f"out of memory ({_describe(exc)})"
    print(f"eplb-triton: error: {one_line(message, limit=None)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
