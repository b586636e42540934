"""Latency of every backend against the number of layers, and placement quality on real loads.

Run as ``python benchmarks/bench_layers.py`` or ``eplb-triton bench`` (same arguments):

* latency: medians over repeats with warm-up excluded (``time.perf_counter`` for the CPU
  backends, ``triton.testing.do_bench`` for Triton when CUDA is present), for named models or a
  custom ``--experts/--replicas/--groups/--nodes/--gpus``, on synthetic skewed loads; the literal
  reference gets a time budget per point and is skipped past it, with a note;
* quality (``--loads FILE``, repeatable): per deployment, balancedness (mean over layers and
  worst layer), the proven ceiling on it (``bound``: mean GPU load over :func:`metrics.lower_bound` of the
  deployment's policy; no placement is better balanced), ``of opt`` (mean over layers of balancedness over
  that ceiling: at least the placement's share of the optimum), and the balancedness with no rebalancing;
* serving (``--serving`` with two or more ``--loads``): rearrangements over the files in sequence,
  slots moved and balancedness per policy (:mod:`eplb_triton.bench_serving`);
* dispatch (``--dispatch`` with ``--loads``): per-step balancedness of the even and the balanced
  split against the LP optimum, on steps sampled from the loads (:mod:`eplb_triton.bench_dispatch`);
* methods (``--methods`` with ``--loads``): ``method="refined"`` against the greedy per file, the
  incremental replan (``max_moves`` = 15% of R) between consecutive files, and the budget curve
  (balancedness against slots moved, ``max_moves`` from 0 to R) for one deployment;
* DeepSeek's published implementation (``--deepseek PATH/eplb.py``, the file ``eplb.py`` of
  github.com/deepseek-ai/EPLB, supplied by the user; nothing of it ships here): its
  ``rebalance_experts`` timed on the same loads as an extra backend column ``deepseek`` (CPU,
  with the reference's time budget) and, with ``--loads``, per deployment the share of layers
  where its ``phy2log`` or ``logcnt`` differ from ours and whether the max GPU load is the same
  on every layer (they differ only where loads tie).

Load files are read the same way whatever their format: all-zero layers (a model's dense layers)
are dropped with a note, and every layer keeps its model layer index (its row in the file).

Writes ``latency.csv``, ``results.json`` (with provenance), ``summary.txt`` (the printed tables),
``latency.png`` and (``--methods``) ``budget_curve.csv``/``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import hashlib
import importlib.util
import json
import math
import multiprocessing
import platform
import statistics
import sys
import time
from functools import partial
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from . import metrics
from ._validation import check_shape_config
from .api import rebalance_experts
from .bench_dispatch import BATCHES as DISPATCH_BATCHES
from .bench_dispatch import dispatch_report, format_dispatch, plot_dispatch
from .bench_serving import format_lost_gpu, format_serving, load_vllm_policy, lost_gpu_report, serving_report
from .configs import DEEPSEEK_V3, MODELS, Deployment
from .io import Loads, OneLineParser, one_line, read_loads
from .placement import replica_counts

FULL_LAYERS = [1, 8, 16, 32, 58, 64, 128, 256]
QUICK_LAYERS = [1, 8, 58]
DEEPSEEK = "deepseek"  # the backend column of DeepSeek's published rebalance_experts (--deepseek FILE)
BUDGETED = ("reference", DEEPSEEK)  # slow Python loops: at most 3 repeats, skipped past the time budget


def load_deepseek(path: Path) -> ModuleType:
    """DeepSeek's published ``eplb`` module (``eplb.py`` of github.com/deepseek-ai/EPLB) from the user's file.

    Raises:
        ValueError: one line: no such file, not importable, or no ``rebalance_experts`` function in it.
    """
    shown = f"--deepseek {one_line(path, limit=None)}"
    if not path.exists():
        raise ValueError(f"{shown}: no such file")
    if not path.is_file():
        raise ValueError(f"{shown}: not a file (expected DeepSeek's eplb.py)")
    loader = SourceFileLoader("eplb_triton_deepseek_eplb", str(path))  # any file name, not only *.py
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    try:
        loader.exec_module(module)
    except Exception as exc:  # SyntaxError, ImportError, ...: the user's file, one line
        raise ValueError(f"{shown}: cannot import it ({type(exc).__name__}: {one_line(exc)})") from None
    if not callable(getattr(module, "rebalance_experts", None)):
        raise ValueError(f"{shown}: defines no rebalance_experts function (expected DeepSeek's eplb.py)")
    return module


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# sha256 of every published version of eplb.py in github.com/deepseek-ai/EPLB -> its commit
DEEPSEEK_VERSIONS = {
    "25b37ccd83aef2369c68f2b4bb596608a4f289956d97d9a3504bfd3159459e29": "d52c72d (2025-03-24, the newest)",
    "cbebf43827fbae30cc0df69c45928bb3f6fe0f7c007035af3fcc41241c5d83e8": "e1100fe (2025-03-21)",
    "a952549162b5b26b8d12d767fe23a0c0e4b173b7d2941492ae68dfe2dd7d0caa": "9d303fa (2025-02-27)",
    "b712dfa7f7a7b23e2fbed46470bdd2998ba6d81aab20cc667c444172c62e46ad": "48c86cb (2025-02-27)",
    "71503cc72f073c4e8d34a9b61a92ec0abde4ec719d5cf229baa91f8178f419cb": "fc36b96 (2025-02-27)",
    "f64ac531dc4021f075199604fe73fb1875be2a5197827ec9480106dcf39e6dec": "f9bc62e (2025-02-26, the first)",
}


def deepseek_provenance(path: Path) -> dict:
    """The file timed as DeepSeek's: its path, sha256, and the published commit it matches (if any)."""
    digest = file_sha256(path)
    commit = DEEPSEEK_VERSIONS.get(digest, "none: matches no published version of eplb.py")
    return {"path": str(path), "sha256": digest, "commit": commit}


def _spin() -> None:  # pragma: no cover (runs in the busy processes)
    while True:
        pass


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` processes that keep a core busy each while the block runs, as on a serving host."""
    if count < 0:
        raise ValueError(f"--busy ({count}) must be >= 0")
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    procs = [ctx.Process(target=_spin, daemon=True) for _ in range(count)]
    for proc in procs:
        proc.start()
    try:
        if procs:
            time.sleep(0.5)  # let the scheduler see them before any timing
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join()


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
                  log=print, native: bool = False, deepseek: ModuleType | None = None) -> list[dict]:  # fmt: skip
    """One row per (model, layers, backend); skipped points carry a ``note`` and no time.

    ``native``: add each model's own layer count (e.g. 94 for Qwen3-235B) to the sweep.
    ``deepseek``: DeepSeek's module, timed as the backend ``"deepseek"`` (on the CPU, as it runs).
    """
    if DEEPSEEK in backends and deepseek is None:
        raise ValueError("the deepseek backend needs DeepSeek's module (--deepseek PATH/eplb.py)")
    per_model = {m.name: sorted(set(layers) | ({m.layers} if native and m.layers else set())) for m in models}
    rows = []
    total = sum(len(v) for v in per_model.values()) * len(backends)
    done = 0
    for model in models:
        last: dict[str, tuple[int, float]] = {}  # budgeted backend -> (layers, seconds) of its last point
        for L in per_model[model.name]:
            w = synthetic_loads(L, model.experts, seed=L)
            for backend in backends:
                done += 1
                row = {"model": model.name, "layers": L, "backend": backend, "median_ms": None, "note": ""}
                if backend in last:
                    predicted = last[backend][1] * L / last[backend][0] * (min(repeats, 3) + 1)
                    if predicted > budget_s:
                        row["note"] = f"skipped: predicted {predicted:.0f} s > budget {budget_s:.0f} s"
                if not row["note"]:
                    if backend == "triton":
                        wd = w.cuda()
                        seconds = median_gpu_s(partial(rebalance_experts, wd, *model.args, backend="triton"))
                    else:
                        fn = (partial(deepseek.rebalance_experts, w, *model.args) if backend == DEEPSEEK
                              else partial(rebalance_experts, w, *model.args, backend=backend))  # fmt: skip
                        try:
                            seconds = median_cpu_s(fn, min(repeats, 3) if backend in BUDGETED else repeats)
                        except Exception as exc:
                            if backend != DEEPSEEK:
                                raise
                            seconds = None  # the user's module refused this shape: say so, time the rest
                            row["note"] = f"failed: {type(exc).__name__}: {one_line(exc, limit=80)}"
                        if backend in BUDGETED and seconds is not None:
                            last[backend] = (L, seconds)
                    row["median_ms"] = seconds * 1e3 if seconds is not None else None
                rows.append(row)
                shown = f"{row['median_ms']:10.3f} ms" if row["median_ms"] is not None else row["note"]
                log(f"[{done:3d}/{total}] {model.name:26s} L={L:<4d} {backend:>9s}  {shown}")
    return rows


def ceiling(w: torch.Tensor, d: Deployment) -> torch.Tensor:
    """``[L]`` the proven ceiling on balancedness: mean GPU load over :func:`metrics.lower_bound` of the
    deployment's policy (no placement that policy can return is better balanced)."""
    return metrics.ceiling(w, d.replicas, d.gpus, num_groups=d.groups, num_nodes=d.nodes)


def quality_report(files: list[Loads], deployments: list[Deployment], log=print) -> list[dict]:
    rows = []
    for loads in files:
        path = loads.path
        w = loads.weight
        L, E = w.shape
        for d in deployments:
            if d.experts != E:
                log(f"{path.name}: {d.name} skipped: it has {d.experts} experts, the file has {E}")
                continue
            phy2log, log2phy, logcnt = rebalance_experts(w, *d.args, backend="cpu")
            after = metrics.balancedness(metrics.gpu_loads(w, phy2log, logcnt, d.gpus))
            before = metrics.balancedness(metrics.identity_gpu_loads(w, d.gpus))
            top = ceiling(w, d)
            rows.append({
                "file": path.name, "deployment": d.name, "policy": d.policy, "layers": L,
                "balancedness_mean": metrics.summarize(after)["mean"],
                "balancedness_worst": metrics.summarize(after)["worst"],
                "bound_mean": metrics.summarize(top)["mean"],
                "of_optimum_mean": float((after / top).mean()),  # >= the placement's share of the optimum
                "no_rebalance_mean": metrics.summarize(before)["mean"],
                "no_rebalance_worst": metrics.summarize(before)["worst"],
            })  # fmt: skip
    return rows


def _max_gpu_load(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, gpus: int) -> torch.Tensor:
    """``[L]`` max GPU load (:func:`eplb_triton.metrics.gpu_loads`), each GPU's replica shares summed in
    sorted order: placements that put the same shares on a GPU, in any slot order, give the same float."""
    share = (weight.double() / logcnt.double()).gather(1, phy2log)
    return share.view(share.shape[0], gpus, -1).sort(dim=-1).values.sum(dim=-1).max(dim=1).values


def deepseek_agreement(files: list[Loads], deployments: list[Deployment], deepseek: ModuleType) -> list[dict]:
    """Per deployment, over every layer of every file: DeepSeek's ``rebalance_experts`` against ours.

    ``differ``: layers whose ``phy2log`` or ``logcnt`` are not equal; ``same_max_gpu_load``: whether
    the max GPU load (the quantity EPLB minimises) is the same on every layer. DeepSeek orders equal
    loads with torch's non-stable sort, so layers with ties may differ while balancing equally well.
    ``replicas_renumbered``: layers with equal ``phy2log`` and ``logcnt`` whose ``log2phy`` differs:
    the replicas of one expert have equal loads, so the sort also decides which replica number goes
    to which of its slots.
    """
    rows = []
    for d in deployments:
        fitting = d.fitting(files)
        if not fitting:
            continue
        layers = differ = renumbered = 0
        same_max = True
        for loads in fitting:
            w = loads.weight
            phy2log, log2phy, logcnt = rebalance_experts(w, *d.args, backend="cpu")
            theirs = deepseek.rebalance_experts(w, *d.args)
            theirs_phy2log, theirs_logcnt = torch.as_tensor(theirs[0]).cpu(), torch.as_tensor(theirs[2]).cpu()
            if theirs_phy2log.shape != phy2log.shape or theirs_logcnt.shape != logcnt.shape:
                raise ValueError(
                    f"--deepseek: rebalance_experts returned phy2log {tuple(theirs_phy2log.shape)} and logcnt "
                    f"{tuple(theirs_logcnt.shape)} for {loads.path.name} and {d.name}; expected "
                    f"{tuple(phy2log.shape)} and {tuple(logcnt.shape)}"
                )
            differs = (theirs_phy2log != phy2log).any(1) | (theirs_logcnt != logcnt).any(1)
            peak = _max_gpu_load(w, phy2log, logcnt, d.gpus)
            theirs_peak = _max_gpu_load(w, theirs_phy2log, theirs_logcnt, d.gpus)
            layers += w.shape[0]
            differ += int(differs.sum())
            theirs_log2phy = torch.as_tensor(theirs[1]).cpu()
            if theirs_log2phy.shape == log2phy.shape:
                renumbered += int(((theirs_log2phy != log2phy).flatten(1).any(1) & ~differs).sum())
            else:  # a different X = max(logcnt) means different counts: counted in differ already
                renumbered += 0
            same_max &= bool(torch.equal(peak, theirs_peak))
        rows.append({
            "deployment": d.name, "policy": d.policy, "files": [f.path.name for f in fitting], "layers": layers,
            "differ": differ, "differ_share": differ / layers, "same_max_gpu_load": same_max,
            "replicas_renumbered": renumbered,
        })  # fmt: skip
    return rows


BUDGET_SHARE = 0.15  # the incremental rows: max_moves = 15% of the slots


def _bal(w: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, gpus: int) -> torch.Tensor:
    return metrics.balancedness(metrics.gpu_loads(w, phy2log, logcnt, gpus))


def _moved_share(old: torch.Tensor, new: torch.Tensor) -> float:
    return float(metrics.migration_count(old, new).double().mean()) / old.shape[1]


def refined_report(files: list[Loads], deployments: list[Deployment], repeats: int, log=print) -> list[dict]:
    """Per file and deployment: the greedy against ``method="refined"`` (CPU path), and its time."""
    rows = []
    for loads in files:
        w = loads.weight
        for d in deployments:
            if d.experts != w.shape[1]:
                continue
            greedy = rebalance_experts(w, *d.args, backend="cpu")
            run = partial(rebalance_experts, w, *d.args, backend="cpu", method="refined")
            refined = run()
            g, r = _bal(w, greedy[0], greedy[2], d.gpus), _bal(w, refined[0], refined[2], d.gpus)
            bound = ceiling(w, d)
            gap = float(bound.mean() - g.mean())
            rows.append({
                "file": loads.path.name, "deployment": d.name, "policy": d.policy, "layers": w.shape[0],
                "greedy_mean": float(g.mean()), "refined_mean": float(r.mean()), "refined_worst": float(r.min()),
                "bound_mean": float(bound.mean()), "of_optimum_mean": float((r / bound).mean()),
                "gap_closed": float(r.mean() - g.mean()) / gap if gap > 1e-12 else float("nan"),
                "worse_layers": int((r < g).sum()), "better_layers": int((r > g).sum()),
                "cpu_ms": median_cpu_s(run, repeats) * 1e3,
            })  # fmt: skip
            log(f"refined {loads.path.name} {d.name}: {rows[-1]['greedy_mean']:.4f} -> {rows[-1]['refined_mean']:.4f}")
    return rows


def incremental_report(files: list[Loads], deployments: list[Deployment], repeats: int, log=print) -> list[dict]:
    """Consecutive files as "the loads the placement was planned for -> the new loads".

    The placement in service is the greedy plan of the first file. On the second file's loads: a
    full greedy replan (as numbered, and relabelled to the old placement), the refined plan
    relabelled, and the incremental replan with ``max_moves`` = 15% of the slots.
    """
    rows = []
    for before, after in zip(files, files[1:], strict=False):
        w = after.weight
        for d in deployments:
            if d.experts != w.shape[1] or d.experts != before.weight.shape[1]:
                continue
            old = rebalance_experts(before.weight, *d.args, backend="cpu")[0]
            k = int(BUDGET_SHARE * d.replicas)
            greedy = rebalance_experts(w, *d.args, backend="cpu")
            relabelled = rebalance_experts(w, *d.args, backend="cpu", old_phy2log=old)
            refined = rebalance_experts(w, *d.args, backend="cpu", method="refined", old_phy2log=old)
            run = partial(rebalance_experts, w, *d.args, backend="cpu", method="refined", old_phy2log=old, max_moves=k)
            inc = run()
            g = _bal(w, greedy[0], greedy[2], d.gpus)
            i = _bal(w, inc[0], inc[2], d.gpus)
            old_cnt = replica_counts(old, w.shape[1])
            rows.append({
                "from": before.path.name, "to": after.path.name, "deployment": d.name, "policy": d.policy,
                "max_moves": k,
                "old_on_new_mean": float(_bal(w, old, old_cnt, d.gpus).mean()),
                "greedy_mean": float(g.mean()), "greedy_moved": _moved_share(old, greedy[0]),
                "relabelled_moved": _moved_share(old, relabelled[0]),
                "refined_mean": float(_bal(w, refined[0], refined[2], d.gpus).mean()),
                "refined_moved": _moved_share(old, refined[0]),
                "incremental_mean": float(i.mean()), "incremental_moved": _moved_share(old, inc[0]),
                "incremental_vs_greedy": float(i.mean() / g.mean()),
                "incremental_cpu_ms": median_cpu_s(run, repeats) * 1e3,
            })  # fmt: skip
            r = rows[-1]
            log(f"incremental {before.path.name} -> {after.path.name} {d.name}: {r['incremental_mean']:.4f} "
                f"({r['incremental_vs_greedy']:.3f}x greedy), moved {r['incremental_moved']:.1%}")  # fmt: skip
    return rows


def budget_curve(before: Loads, after: Loads, d: Deployment, points: int = 17) -> list[dict]:
    """Balancedness against slots moved for ``max_moves`` from 0 to ``R`` (method refined)."""
    old = rebalance_experts(before.weight, *d.args, backend="cpu")[0]
    w = after.weight
    rows = []
    for k in sorted({round(d.replicas * j / (points - 1)) for j in range(points)}):
        phy2log, _, logcnt = rebalance_experts(
            w, *d.args, backend="cpu", method="refined", old_phy2log=old, max_moves=k
        )
        rows.append({"max_moves": k, "moved": _moved_share(old, phy2log),
                     "balancedness": float(_bal(w, phy2log, logcnt, d.gpus).mean())})  # fmt: skip
    greedy = rebalance_experts(w, *d.args, backend="cpu")
    rows.append({"max_moves": None, "label": "greedy replan", "moved": _moved_share(old, greedy[0]),
                 "balancedness": float(_bal(w, greedy[0], greedy[2], d.gpus).mean())})  # fmt: skip
    return rows


def plot_budget_curve(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curve = [r for r in rows if r["max_moves"] is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([100 * r["moved"] for r in curve], [r["balancedness"] for r in curve], marker="o",
            label="incremental, method='refined' (max_moves 0..R)")  # fmt: skip
    for r in rows:
        if r["max_moves"] is None:
            ax.scatter([100 * r["moved"]], [r["balancedness"]], color="black", marker="x", zorder=3, label=r["label"])
    ax.set_xlabel("slots moved (% of R, mean over layers)")
    ax.set_ylabel("mean balancedness")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def format_refined(rows: list[dict]) -> str:
    lines = [f"{'file':28s} {'deployment':20s} {'greedy':>7s} {'refined':>7s} {'worst':>7s} {'bound':>7s} "
             f"{'of opt':>7s} {'closed':>7s} {'worse':>5s} {'cpu ms':>8s}"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r['file']:28s} {r['deployment']:20s} {r['greedy_mean']:7.4f} {r['refined_mean']:7.4f} "
            f"{r['refined_worst']:7.4f} {r['bound_mean']:7.4f} {r['of_optimum_mean']:7.2%} {r['gap_closed']:7.1%} "
            f"{r['worse_layers']:5d} {r['cpu_ms']:8.1f}"
        )
    return "\n".join(lines)


def format_incremental(rows: list[dict]) -> str:
    lines = [f"{'from -> to':50s} {'deployment':20s} {'old':>6s} {'greedy':>6s} {'moved':>6s} {'relab.':>6s} "
             f"{'refin.':>6s} {'moved':>6s} {'incr.':>6s} {'moved':>6s} {'x gr.':>6s} {'cpu ms':>7s}"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r['from'] + ' -> ' + r['to']:50s} {r['deployment']:20s} {r['old_on_new_mean']:6.4f} "
            f"{r['greedy_mean']:6.4f} {r['greedy_moved']:6.1%} {r['relabelled_moved']:6.1%} "
            f"{r['refined_mean']:6.4f} {r['refined_moved']:6.1%} {r['incremental_mean']:6.4f} "
            f"{r['incremental_moved']:6.1%} {r['incremental_vs_greedy']:6.3f} {r['incremental_cpu_ms']:7.1f}"
        )
    return "\n".join(lines)


def format_latency(rows: list[dict], backends: list[str]) -> str:
    """Median ms per backend; with the ``deepseek`` column, also ``ds/<backend>``: DeepSeek's time over
    that backend's (how many times faster it is than DeepSeek's implementation)."""
    ours = [b for b in backends if b != DEEPSEEK] if DEEPSEEK in backends else []
    lines = [f"{'model':26s} {'layers':>6s} " + " ".join(f"{b + ' ms':>13s}" for b in backends)
             + "".join(f" {'ds/' + b:>11s}" for b in ours)]  # fmt: skip
    keys = sorted({(r["model"], r["layers"]) for r in rows}, key=lambda k: (list(MODELS).index(k[0])
                  if k[0] in MODELS else 99, k[0], k[1]))  # fmt: skip
    ms = {(r["model"], r["layers"], r["backend"]): r["median_ms"] for r in rows}
    for model, L in keys:
        cells = []
        for b in backends:
            t = ms.get((model, L, b))
            cells.append(f"{t:13.3f}" if t is not None else f"{'skipped':>13s}")
        for b in ours:
            t, t_ds = ms.get((model, L, b)), ms.get((model, L, DEEPSEEK))
            cells.append(f"{t_ds / t:10.1f}x" if t and t_ds is not None else f"{'-':>11s}")
        lines.append(f"{model:26s} {L:6d} " + " ".join(cells))
    return "\n".join(lines)


def format_quality(rows: list[dict]) -> str:
    head = (f"{'file':28s} {'deployment':20s} {'policy':12s} {'mean':>6s} {'worst':>6s} {'bound':>6s} "
            f"{'of opt':>7s} {'no-rebal':>8s} {'worst':>6s}")  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['file']:28s} {r['deployment']:20s} {r['policy']:12s} {r['balancedness_mean']:6.3f} "
            f"{r['balancedness_worst']:6.3f} {r['bound_mean']:6.3f} {r['of_optimum_mean']:7.2%} "
            f"{r['no_rebalance_mean']:8.3f} {r['no_rebalance_worst']:6.3f}"
        )
    return "\n".join(lines)


def format_agreement(rows: list[dict]) -> str:
    lines = [f"{'deployment':20s} {'policy':12s} {'layers':>6s} {'differ':>6s} {'share':>6s}  same max GPU load  "
             "same phy2log, replicas renumbered"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r['deployment']:20s} {r['policy']:12s} {r['layers']:6d} {r['differ']:6d} {r['differ_share']:6.1%}  "
            f"{'yes, every layer' if r['same_max_gpu_load'] else 'NO':17s}  {r['replicas_renumbered']}"
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


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"layers {QUICK_LAYERS}, 3 repeats, reference budget 8 s (< 2 min on 2 CPU cores; "
                        "default: off)")  # fmt: skip
    p.add_argument("--layers", type=int, nargs="+", metavar="L",
                   help=f"layer counts (default: {FULL_LAYERS} and each model's own; --quick: "
                        f"{QUICK_LAYERS})")  # fmt: skip
    p.add_argument("--models", nargs="+", choices=[*MODELS, "custom"], metavar="MODEL",
                   help=f"{', '.join([*MODELS, 'custom'])} (default: all named models, or custom when "
                        "--experts ... --gpus are given)")  # fmt: skip
    for name, what in (("experts", "logical experts E"), ("replicas", "slots R"), ("groups", "expert groups G"),
                       ("nodes", "nodes N"), ("gpus", "GPUs P")):  # fmt: skip
        p.add_argument(f"--{name}", type=int, help=f"custom configuration: {what} (all five together; default: none)")
    p.add_argument("--backends", nargs="+", choices=["reference", "cpu", "triton"],
                   help="backends to time (default: reference, cpu, and triton when CUDA is present)")  # fmt: skip
    p.add_argument("--repeats", type=int,
                   help="timed repeats per point (default: 10, --quick 3; reference and deepseek at "
                        "most 3)")  # fmt: skip
    p.add_argument("--reference-budget", type=float, default=None, metavar="S",
                   help="skip the reference and deepseek past this predicted time per point, in seconds "
                        "(default: 20, --quick 8)")  # fmt: skip
    p.add_argument("--loads", type=Path, action="append", default=[], metavar="FILE",
                   help="real load file for the quality report (repeatable; default: none)")  # fmt: skip
    p.add_argument("--deepseek", type=Path, metavar="PATH/eplb.py",
                   help="DeepSeek's published eplb.py (github.com/deepseek-ai/EPLB): time its rebalance_experts "
                        "as the backend 'deepseek' and, with --loads, compare its placements with ours "
                        "(default: none)")  # fmt: skip
    p.add_argument("--no-latency", action="store_true", help="only the quality report; needs --loads (default: off)")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="time while N other processes keep a core busy each, as on a serving host "
                        "(default: 0)")  # fmt: skip
    p.add_argument("--methods", action="store_true",
                   help="with --loads: also method='refined' per file, incremental replans (max_moves = 15%% "
                        "of R) between consecutive files, and the budget curve (default: off)")  # fmt: skip
    p.add_argument("--dispatch", action="store_true",
                   help="with --loads: per-step balancedness of the even and the balanced split and the LP optimum, "
                        f"batches of {', '.join(map(str, DISPATCH_BATCHES))} tokens (default: off)")  # fmt: skip
    p.add_argument("--serving", action="store_true",
                   help="with two or more --loads: rearrangements over the files in sequence, slots moved and "
                        "balancedness of vLLM's default policy, the relabelled replan, max_moves budgets and "
                        "the min_gain gate (default: off)")  # fmt: skip
    p.add_argument("--lost-gpu", action="store_true",
                   help="with two or more --loads: for each pair of consecutive files, the GPU carrying the most "
                        "load is lost; slots moved and balancedness of replans around it (default: off)")  # fmt: skip
    p.add_argument("--vllm-policy", type=Path, metavar="PATH/default.py",
                   help="with --serving: vLLM's policy file to run as vllm-default (default: the installed vLLM, "
                        "else its rule computed here)")  # fmt: skip
    p.add_argument("--budget-deployment", default="decode-EP64", choices=[*DEEPSEEK_V3, "custom"], metavar="NAME",
                   help=f"deployment of the budget curve: {', '.join(DEEPSEEK_V3)} or custom "
                        "(default: decode-EP64)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default: bench-out)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    try:
        return _main(argv, prog)
    except (ValueError, TypeError) as exc:  # bad configuration or load file
        print(f"{prog or 'bench'}: error: {one_line(exc, limit=None)}", file=sys.stderr)
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
    if args.no_latency and not args.loads:
        parser.error("--no-latency needs --loads FILE: without the latency sweep only the quality report is left")
    if args.methods and not args.loads:
        parser.error("--methods needs --loads FILE: the methods are measured on real loads")
    if args.dispatch and not args.loads:
        parser.error("--dispatch needs --loads FILE: steps are sampled from real loads")
    if args.serving and len(args.loads) < 2:
        parser.error("--serving needs two or more --loads FILE: a rearrangement goes from one to the next")
    if args.lost_gpu and len(args.loads) < 2:
        parser.error("--lost-gpu needs two or more --loads FILE: a GPU is lost as one file's loads follow another's")
    if args.vllm_policy is not None and not args.serving:
        parser.error("--vllm-policy goes with --serving: only the serving report runs vLLM's policy")
    vllm_policy = load_vllm_policy(args.vllm_policy) if args.serving else None
    if args.busy < 0:
        parser.error(f"--busy ({args.busy}) must be >= 0")
    for m in models:  # the same rules as the API, before any time is spent
        check_shape_config(max(layers), m.experts, *m.args)
    deepseek = load_deepseek(args.deepseek) if args.deepseek is not None else None
    if deepseek is not None:
        backends = [DEEPSEEK, *backends]
    files = [read_loads(path) for path in args.loads]  # bad files fail here, before any timing

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    info = provenance()
    info["busy_processes"] = args.busy
    if args.deepseek is not None:
        info["deepseek_eplb"] = deepseek_provenance(args.deepseek)
    log(f"device: {info['gpu'] or 'no GPU (CPU backends only)'}; cpu: {info['cpu']}; torch {info['torch']}, "
        f"triton {info['triton']}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"provenance": info, "args": {k: str(v) for k, v in vars(args).items()}}
    tables: list[str] = []
    if not args.no_latency and models:
        if args.busy:
            log(f"timing with {args.busy} busy process(es)")
        with busy_processes(args.busy):
            rows = sweep_latency(models, layers, backends, repeats, budget, log, native=args.layers is None,
                                 deepseek=deepseek)  # fmt: skip
        for r in rows:
            m = next(d for d in models if d.name == r["model"])
            r.update(experts=m.experts, replicas=m.replicas, groups=m.groups, nodes=m.nodes, gpus=m.gpus)
            r.update(device=info["gpu"] if r["backend"] == "triton" else info["cpu"], date=info["date"],
                     torch=info["torch"], triton=info["triton"], busy=args.busy)  # fmt: skip
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
    if files:
        for loads in files:
            for note in loads.notes:
                log(f"{loads.path.name}: {note}")
        deployments = list(DEEPSEEK_V3.values()) + [m for m in models if m.name == "custom"]
        quality = quality_report(files, deployments, log)
        result["quality"] = quality
        tables.append("placement quality (balancedness; bound: the proven ceiling, mean GPU load over a lower bound "
                      "on the max GPU load of every placement of the policy; of opt: mean of balancedness / bound, "
                      "at least the placement's share of the optimum)\n" + format_quality(quality))  # fmt: skip
        print()
        print(tables[-1])
        if deepseek is not None:
            log("comparing placements with DeepSeek's rebalance_experts on the load files")
            agreement = deepseek_agreement(files, deployments, deepseek)
            result["deepseek_agreement"] = agreement
            tables.append(
                "DeepSeek's eplb.py against eplb-triton on the real layers (differ: phy2log or logcnt not equal)\n"
                + format_agreement(agreement)
            )
            print()
            print(tables[-1])
    if files and args.methods:
        log("method='refined' on every file (CPU path)")
        with busy_processes(args.busy):
            refined = refined_report(files, deployments, repeats, log)
        result["refined"] = refined
        tables.append(
            "method='refined' against the greedy (balancedness means; closed: share of the gap to the proven "
            "bound, so at least this share of the gap to the optimum; of opt: refined's balancedness over the "
            "proven ceiling, a floor on its share of the optimum; worse: layers where refined < greedy)\n"
            + format_refined(refined)
        )
        print()
        print(tables[-1])
        if len(files) > 1:
            with busy_processes(args.busy):
                incremental = incremental_report(files, deployments, repeats, log)
            result["incremental"] = incremental
            tables.append(
                "Consecutive files: the greedy plan of the first serves the second's loads. old: that placement; "
                "greedy: full replan and slots moved; relab.: slots moved by the greedy relabelled to the old "
                "placement; refin.: method='refined' relabelled; incr.: max_moves = 15% of R; x gr.: incr. / greedy\n"
                + format_incremental(incremental)
            )
            print()
            print(tables[-1])
            d = (
                next(m for m in deployments if m.name == args.budget_deployment)
                if args.budget_deployment == "custom" and have_custom
                else DEEPSEEK_V3.get(args.budget_deployment)
            )
            if d is None:
                parser.error("--budget-deployment custom needs --experts, --replicas, --groups, --nodes and --gpus")
            fitting = d.fitting(files)
            if len(fitting) > 1:
                curve = budget_curve(fitting[0], fitting[1], d)
                result["budget_curve"] = {"deployment": d.name, "from": fitting[0].path.name,
                                          "to": fitting[1].path.name, "points": curve}  # fmt: skip
                with open(args.out / "budget_curve.csv", "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=["max_moves", "moved", "balancedness", "label"])
                    writer.writeheader()
                    writer.writerows(curve)
                title = (f"{d.name}: the placement for {fitting[0].path.name} on {fitting[1].path.name}'s loads\n"
                         f"{info['cpu']}, torch {info['torch']}, {info['date'][:10]}")  # fmt: skip
                if plot_budget_curve(curve, args.out / "budget_curve.png", title):
                    log(f"wrote {args.out / 'budget_curve.png'}")
    if files and args.serving:
        names = ("prefill-EP32", "prefill-EP32-global", "decode-EP64", "decode-EP144")
        log("serving: rearrangements over the load files in sequence (CPU path)")
        rows = serving_report(files, [DEEPSEEK_V3[n] for n in names], vllm_policy, log=log)
        result["serving"] = rows
        result["serving_vllm"] = "the installed vLLM code" if vllm_policy is not None else "its rule, computed here"
        tables.append(
            "Rearrangements over the files in sequence (each policy from its own placement in service): share of "
            "slots moved, balancedness of the new placement on the new loads (means over rearrangements)\n"
            + format_serving(rows, vllm_policy is not None)
        )
        print()
        print(tables[-1])
    if files and args.lost_gpu:
        names = ("prefill-EP32", "prefill-EP32-global", "decode-EP64", "decode-EP144")
        log("lost GPU: replans around the GPU carrying the most load, from the placement in service (CPU path)")
        rows = lost_gpu_report(files, [DEEPSEEK_V3[n] for n in names], log=log)
        result["lost_gpu"] = rows
        tables.append(
            "A GPU lost between consecutive files (the one carrying the most of the new loads): share of live "
            "slots moved, balancedness over the live GPUs (means over file pairs)\n" + format_lost_gpu(rows)
        )
        print()
        print(tables[-1])
    if files and args.dispatch:
        names = ("prefill-EP32", "prefill-EP32-global", "decode-EP64", "decode-EP144")
        log("per-step dispatch: even and balanced split against the LP optimum (CPU path)")
        rows = dispatch_report(files, [DEEPSEEK_V3[n] for n in names], repeats=repeats, log=log)
        result["dispatch"] = rows
        tables.append(
            "Per-step balancedness (mean / max GPU token load, mean over layers and steps) of a static greedy "
            "placement: even split, balanced split, LP optimum (fractional tokens), integral optimum ceil(T*); "
            "at opt: (layer, step) pairs where the balanced split reaches ceil(T*); rounds: the split's largest "
            "round count; CPU: NumPy split per layer (all layers of a step) and one layer's whole dispatch call "
            "(8 x 8,192 entries), at 8,192 tokens\n" + format_dispatch(rows)
        )
        print()
        print(tables[-1])
        with open(args.out / "dispatch.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
        title = f"per-step dispatch, {info['cpu']}, torch {info['torch']}, {info['date'][:10]}"
        if plot_dispatch(rows, args.out / "dispatch.png", title):
            log(f"wrote {args.out / 'dispatch.png'}")
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    header = "\n".join(f"{k}: {v}" for k, v in info.items())
    (args.out / "summary.txt").write_text("\n\n".join([header, *tables]) + "\n")
    log(f"wrote {args.out / 'results.json'}")
    return 0
