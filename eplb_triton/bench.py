"""Latency of every backend against the number of layers, and placement quality on real loads.

Run as ``python benchmarks/bench_layers.py`` or ``eplb-triton bench`` (same arguments):

* latency: medians over repeats with warm-up excluded (``time.perf_counter`` for the CPU
  backends, ``triton.testing.do_bench`` for Triton when CUDA is present), for named models or a
  custom ``--experts/--replicas/--groups/--nodes/--gpus``, on synthetic skewed loads; the literal
  reference gets a time budget per point and is skipped past it, with a note;
* quality (``--loads FILE``, repeatable): per deployment, balancedness (mean over layers and
  worst layer), the SPEC lower bound's ceiling on it, and the balancedness with no rebalancing.

Writes ``latency.csv``, ``results.json`` (with provenance), ``summary.txt`` (the printed tables)
and ``latency.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import metrics
from ._validation import check_shape_config
from .api import rebalance_experts
from .configs import DEEPSEEK_V3, MODELS, Deployment
from .io import read_loads

FULL_LAYERS = [1, 8, 16, 32, 58, 64, 128, 256]
QUICK_LAYERS = [1, 8, 58]


def synthetic_loads(layers: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Skewed integer token counts (Pareto): a few hot experts per layer, as in real MoE routing."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.floor(rng.pareto(1.2, (layers, experts)) * 1000).astype(np.int64))


def provenance() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu": _cpu_name(),
        "cpu_count": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_cpu_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_gpu_s(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median") / 1e3


def sweep_latency(models: list[Deployment], layers: list[int], backends: list[str], repeats: int, budget_s: float,
                  log=print, native: bool = False) -> list[dict]:  # fmt: skip
    """One row per (model, layers, backend); skipped points carry a ``note`` and no time.

    ``native``: add each model's own layer count (e.g. 94 for Qwen3-235B) to the sweep.
    """
    per_model = {m.name: sorted(set(layers) | ({m.layers} if native and m.layers else set())) for m in models}
    rows = []
    total = sum(len(v) for v in per_model.values()) * len(backends)
    done = 0
    for model in models:
        last_ref: tuple[int, float] | None = None  # (layers, seconds) of the last reference point
        for L in per_model[model.name]:
            w = synthetic_loads(L, model.experts, seed=L)
            for backend in backends:
                done += 1
                row = {"model": model.name, "layers": L, "backend": backend, "median_ms": None, "note": ""}
                if backend == "reference" and last_ref is not None:
                    predicted = last_ref[1] * L / last_ref[0] * (min(repeats, 3) + 1)
                    if predicted > budget_s:
                        row["note"] = f"skipped: predicted {predicted:.0f} s > budget {budget_s:.0f} s"
                if not row["note"]:
                    if backend == "triton":
                        wd = w.cuda()
                        seconds = median_gpu_s(partial(rebalance_experts, wd, *model.args, backend="triton"))
                    else:
                        n = min(repeats, 3) if backend == "reference" else repeats
                        seconds = median_cpu_s(partial(rebalance_experts, w, *model.args, backend=backend), n)
                        if backend == "reference":
                            last_ref = (L, seconds)
                    row["median_ms"] = seconds * 1e3
                rows.append(row)
                shown = f"{row['median_ms']:10.3f} ms" if row["median_ms"] is not None else row["note"]
                log(f"[{done:3d}/{total}] {model.name:26s} L={L:<4d} {backend:>9s}  {shown}")
    return rows


def quality_report(paths: list[Path], deployments: list[Deployment], log=print) -> list[dict]:
    rows = []
    for path in paths:
        loads = read_loads(path)
        for note in loads.notes:
            log(f"{path.name}: {note}")
        w = loads.weight
        L, E = w.shape
        for d in deployments:
            if d.experts != E:
                log(f"{path.name}: {d.name} skipped: it has {d.experts} experts, the file has {E}")
                continue
            phy2log, _, logcnt = rebalance_experts(w, *d.args, backend="cpu")
            after = metrics.balancedness(metrics.gpu_loads(w, phy2log, logcnt, d.gpus))
            before = metrics.balancedness(metrics.identity_gpu_loads(w, d.gpus))
            ceiling = w.double().sum(1) / d.gpus / metrics.lower_bound(w, d.replicas, d.gpus)
            rows.append({
                "file": path.name, "deployment": d.name, "policy": d.policy, "layers": L,
                "balancedness_mean": metrics.summarize(after)["mean"],
                "balancedness_worst": metrics.summarize(after)["worst"],
                "bound_mean": metrics.summarize(ceiling)["mean"],
                "no_rebalance_mean": metrics.summarize(before)["mean"],
                "no_rebalance_worst": metrics.summarize(before)["worst"],
            })  # fmt: skip
    return rows


def format_latency(rows: list[dict], backends: list[str]) -> str:
    lines = [f"{'model':26s} {'layers':>6s} " + " ".join(f"{b + ' ms':>13s}" for b in backends)]
    keys = sorted({(r["model"], r["layers"]) for r in rows}, key=lambda k: (list(MODELS).index(k[0])
                  if k[0] in MODELS else 99, k[0], k[1]))  # fmt: skip
    by_key = {(r["model"], r["layers"], r["backend"]): r for r in rows}
    for model, L in keys:
        cells = []
        for b in backends:
            r = by_key.get((model, L, b))
            cells.append(f"{r['median_ms']:13.3f}" if r and r["median_ms"] is not None else f"{'skipped':>13s}")
        lines.append(f"{model:26s} {L:6d} " + " ".join(cells))
    return "\n".join(lines)


def format_quality(rows: list[dict]) -> str:
    head = (f"{'file':28s} {'deployment':20s} {'policy':12s} {'mean':>6s} {'worst':>6s} {'bound':>6s} "
            f"{'no-rebal':>8s} {'worst':>6s}")  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['file']:28s} {r['deployment']:20s} {r['policy']:12s} {r['balancedness_mean']:6.3f} "
            f"{r['balancedness_worst']:6.3f} {r['bound_mean']:6.3f} {r['no_rebalance_mean']:8.3f} "
            f"{r['no_rebalance_worst']:6.3f}"
        )
    return "\n".join(lines)


def plot_latency(rows: list[dict], backends: list[str], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = min(2, len(models))
    nrows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
    for ax, model in zip(axes.flat, models, strict=False):
        for b in backends:
            pts = [(r["layers"], r["median_ms"]) for r in rows if r["model"] == model and r["backend"] == b
                   and r["median_ms"] is not None]  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=b)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("layers")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(models) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"layers {QUICK_LAYERS}, 3 repeats (< 2 min on 2 CPU cores)")
    p.add_argument("--layers", type=int, nargs="+",
                   help=f"layer counts (default {FULL_LAYERS} and each model's own)")  # fmt: skip
    p.add_argument("--models", nargs="+", choices=[*MODELS, "custom"], help="default: all named models")
    for name in ("experts", "replicas", "groups", "nodes", "gpus"):
        p.add_argument(f"--{name}", type=int, help="custom configuration (all five together)")
    p.add_argument("--backends", nargs="+", choices=["reference", "cpu", "triton"], help="default: all available")
    p.add_argument("--repeats", type=int, help="timed repeats per point (default 10, --quick 3)")
    p.add_argument("--reference-budget", type=float, default=None, metavar="S",
                   help="skip the reference past this predicted time per point (default 20, --quick 8)")  # fmt: skip
    p.add_argument("--loads", type=Path, action="append", default=[], metavar="FILE",
                   help="real load file for the quality report (repeatable)")  # fmt: skip
    p.add_argument("--no-latency", action="store_true", help="only the quality report")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default bench-out)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    try:
        return _main(argv, prog)
    except (ValueError, TypeError) as exc:  # bad configuration or load file
        print(f"{prog or 'bench'}: error: {exc}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None, prog: str | None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    custom = [getattr(args, n) for n in ("experts", "replicas", "groups", "nodes", "gpus")]
    have_custom = all(v is not None for v in custom)
    if any(v is not None for v in custom) and not have_custom:
        parser.error("--experts, --replicas, --groups, --nodes and --gpus go together")
    selected = args.models or (["custom"] if have_custom else list(MODELS))
    if "custom" in selected and not have_custom:
        parser.error("--models custom needs --experts, --replicas, --groups, --nodes and --gpus")
    models = [Deployment("custom", *custom, layers=0) if n == "custom" else MODELS[n] for n in selected]
    layers = args.layers or (QUICK_LAYERS if args.quick else FULL_LAYERS)
    repeats = args.repeats or (3 if args.quick else 10)
    budget = args.reference_budget if args.reference_budget is not None else (8.0 if args.quick else 20.0)
    has_gpu = torch.cuda.is_available()
    backends = args.backends or ["reference", "cpu", *(["triton"] if has_gpu else [])]
    if "triton" in backends and not has_gpu:
        parser.error("--backends triton needs a CUDA device")
    for m in models:  # the same rules as the API, before any time is spent
        check_shape_config(max(layers), m.experts, *m.args)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    info = provenance()
    log(f"device: {info['gpu'] or 'no GPU (CPU backends only)'}; cpu: {info['cpu']}; torch {info['torch']}, "
        f"triton {info['triton']}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"provenance": info, "args": {k: str(v) for k, v in vars(args).items()}}
    tables: list[str] = []
    if not args.no_latency and models:
        rows = sweep_latency(models, layers, backends, repeats, budget, log, native=args.layers is None)
        for r in rows:
            m = next(d for d in models if d.name == r["model"])
            r.update(experts=m.experts, replicas=m.replicas, groups=m.groups, nodes=m.nodes, gpus=m.gpus)
            r.update(device=info["gpu"] if r["backend"] == "triton" else info["cpu"], date=info["date"],
                     torch=info["torch"], triton=info["triton"])  # fmt: skip
        result["latency"] = rows
        tables.append(format_latency(rows, backends))
        print(tables[-1])
        with open(args.out / "latency.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        title = f"eplb-triton rebalance_experts, {info['gpu'] or info['cpu']}, torch {info['torch']}, {info['date']}"
        if plot_latency(rows, backends, args.out / "latency.png", title):
            log(f"wrote {args.out / 'latency.png'}")
        else:
            log("matplotlib not installed (pip install 'eplb-triton[bench]'): no plot")
    if args.loads:
        quality = quality_report(
            args.loads, list(DEEPSEEK_V3.values()) + [m for m in models if m.name == "custom"], log
        )
        result["quality"] = quality
        tables.append(format_quality(quality))
        print()
        print(tables[-1])
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    header = "\n".join(f"{k}: {v}" for k, v in info.items())
    (args.out / "summary.txt").write_text("\n\n".join([header, *tables]) + "\n")
    log(f"wrote {args.out / 'results.json'}")
    return 0
