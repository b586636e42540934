"""The per-step dispatch benchmark (``bench_layers.py --dispatch --loads ...``).

For each deployment, a static greedy placement of a real load file serves steps of sampled
tokens: every token picks ``top_k`` distinct experts with probabilities proportional to the
layer's loads (Gumbel top-k, seeded). Per step and layer the GPU token loads are measured for

* ``even``: what ``record_dispatch(split="even")`` does (token ``t``'s choice ``e`` to replica
  ``t % logcnt[e]``), from the sampled ids;
* ``balanced``: the quotas of the balanced split (``split.balanced_split``; the slots of
  ``dispatch(split="balanced")`` realise them exactly);
* ``optimum``: the linear program's optimum ``T*`` (fractional tokens), computed as the balanced
  split of the counts scaled by 1024, divided back: ``ceil(1024 T*) / 1024``, within 1/1024 of a
  token of ``T*``; and the integral optimum ``ceil(T*)``, the best any integer split reaches
  (``layers at optimum``: the share of (layer, step) pairs whose balanced split reaches it).

Balancedness is mean / max GPU token load, averaged over layers and steps. The CPU time is the
NumPy split of all layers of a step (per layer), and the whole ``dispatch`` call of one layer.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .api import rebalance_experts
from .configs import Deployment
from .io import Loads
from .recording import dispatch
from .split import balanced_split

BATCHES = [256, 1024, 4096, 8192, 16384, 65536]
SCALE = 1024  # the optimum's resolution: 1/SCALE of a token


def steps_for(tokens: int) -> int:
    """Sampled steps per batch size: more for small batches, whose balancedness varies more."""
    return 8 if tokens <= 1024 else 4 if tokens <= 8192 else 2 if tokens <= 16384 else 1


def sample_ids(weight: torch.Tensor, tokens: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """``[L, tokens, top_k]`` expert ids: per token ``top_k`` distinct experts, probability
    proportional to the layer's loads (Gumbel top-k), in chunks to bound memory."""
    L, E = weight.shape
    logp = torch.log(weight.double().clamp_min(1e-9) / weight.double().sum(1, keepdim=True).clamp_min(1e-9))
    out = torch.empty((L, tokens, top_k), dtype=torch.int64)
    chunk = max(1, (1 << 22) // E)
    for a in range(0, tokens, chunk):
        b = min(tokens, a + chunk)
        u = torch.rand((L, b - a, E), generator=gen, dtype=torch.float64).clamp_(1e-300, 1.0)
        out[:, a:b] = (logp[:, None, :] - torch.log(-torch.log(u))).topk(top_k, dim=2).indices
    return out


def _even_loads(ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, R: int, P: int) -> np.ndarray:
    """``[L, P]`` GPU token loads of the even rule, for ``ids [L, T, k]``."""
    L, T, k = ids.shape
    token = torch.arange(T).view(1, T, 1).expand(L, T, k)
    replica = token % logcnt.gather(1, ids.reshape(L, -1)).view(L, T, k)
    slot = log2phy.view(L, -1).gather(1, (ids * log2phy.shape[2] + replica).reshape(L, -1))
    per_slot = torch.zeros((L, R), dtype=torch.int64).scatter_add_(1, slot, torch.ones_like(slot))
    return per_slot.view(L, P, -1).sum(2).numpy()


def _files_for(d: Deployment, files: list[Loads]) -> list[Loads]:
    """Prefill deployments take the prefill files, decode ones the decode files (all when none match)."""
    kind = d.name.split("-")[0]
    fitting = d.fitting(files)
    matching = [f for f in fitting if f.path.name.startswith(kind)]
    return matching or fitting


def dispatch_report(
    files: list[Loads], deployments: list[Deployment], batches: list[int] = BATCHES, top_k: int = 8, seed: int = 0,
    repeats: int = 5, log=print,
) -> list[dict]:  # fmt: skip
    """One row per (deployment, file, tokens per step): balancedness of even / balanced / optima."""
    rows = []
    samples: dict[tuple[str, int], list[torch.Tensor]] = {}
    for d in deployments:
        for f in _files_for(d, files):
            w = f.weight
            L = w.shape[0]
            phy2log, log2phy, logcnt = rebalance_experts(w, *d.args, backend="cpu")
            plan = (w.double() / logcnt.double()).gather(1, phy2log).view(L, d.gpus, -1).sum(2)
            planned = float((plan.mean(1) / plan.amax(1)).mean())
            for tokens in batches:
                key = (f.path.name, tokens)
                if key not in samples:
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + tokens)
                    samples[key] = [sample_ids(w, tokens, top_k, gen) for _ in range(steps_for(tokens))]
                even, bal, opt, integral, at_optimum, rounds = [], [], [], [], [], []
                for ids in samples[key]:
                    counts = np.stack([np.bincount(ids[i].reshape(-1).numpy(), minlength=d.experts) for i in range(L)])
                    mean = counts.sum(1) / d.gpus
                    even.append(mean / _even_loads(ids, log2phy, logcnt, d.replicas, d.gpus).max(1))
                    quota, r = balanced_split(counts, phy2log.numpy(), d.gpus, return_rounds=True)
                    peak = quota.reshape(L, d.gpus, -1).sum(2).max(1)
                    bal.append(mean / peak)
                    scaled = balanced_split(counts * SCALE, phy2log.numpy(), d.gpus)
                    scaled_peak = scaled.reshape(L, d.gpus, -1).sum(2).max(1)
                    opt.append(mean / (scaled_peak / SCALE))
                    best = -(-scaled_peak // SCALE)  # ceil(T*): ceil(1024 T*) / 1024 rounds up to it
                    integral.append(mean / best)
                    at_optimum.append(peak == best)
                    rounds.append(r)
                even, bal, opt, integral, at_optimum, rounds = (
                    np.concatenate(x) for x in (even, bal, opt, integral, at_optimum, rounds)
                )
                row = {
                    "deployment": d.name, "file": f.path.name, "tokens": tokens, "steps": len(samples[key]),
                    "planned": planned, "even": float(even.mean()), "balanced": float(bal.mean()),
                    "optimum": float(opt.mean()), "integral_optimum": float(integral.mean()),
                    "layers_at_optimum": float(at_optimum.mean()), "even_worst": float(even.min()),
                    "balanced_worst": float(bal.min()), "balanced_vs_optimum": float(bal.mean() / opt.mean()),
                    "rounds_mean": float(rounds.mean()), "rounds_max": int(rounds.max()),
                }  # fmt: skip
                if tokens == 8192:
                    row.update(_cpu_times(samples[key][0], phy2log, d, repeats))
                rows.append(row)
                log(f"{d.name:20s} {f.path.name:26s} {tokens:6d} tokens: even {row['even']:.4f} balanced "
                    f"{row['balanced']:.4f} optimum {row['optimum']:.4f} (rounds max {row['rounds_max']})")  # fmt: skip
    return rows


def _cpu_times(ids: torch.Tensor, phy2log: torch.Tensor, d: Deployment, repeats: int) -> dict:
    """Medians, per layer: the NumPy split of all layers of the step, and one layer's dispatch call."""
    L = ids.shape[0]
    counts = np.stack([np.bincount(ids[i].reshape(-1).numpy(), minlength=d.experts) for i in range(L)])
    split_s, layer_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        balanced_split(counts, phy2log.numpy(), d.gpus)
        split_s.append((time.perf_counter() - t0) / L)
        t0 = time.perf_counter()
        dispatch(ids[0], phy2log[0], d.gpus, num_experts=d.experts, backend="cpu")
        layer_s.append(time.perf_counter() - t0)
    return {
        "split_ms_per_layer": statistics.median(split_s) * 1e3,
        "dispatch_ms_one_layer": statistics.median(layer_s) * 1e3,
    }


def format_dispatch(rows: list[dict]) -> str:
    lines = [
        f"{'deployment':20s} {'file':26s} {'tokens':>6s} {'planned':>7s} {'even':>7s} {'balanced':>8s} "
        f"{'LP opt':>7s} {'int opt':>7s} {'at opt':>6s} {'rounds':>6s} {'split ms/layer':>14s} {'dispatch ms':>11s}"
    ]
    for r in rows:
        timed = "split_ms_per_layer" in r
        times = f"{r['split_ms_per_layer']:14.3f} {r['dispatch_ms_one_layer']:11.3f}" if timed else ""
        lines.append(
            f"{r['deployment']:20s} {r['file']:26s} {r['tokens']:6d} {r['planned']:7.4f} {r['even']:7.4f} "
            f"{r['balanced']:8.4f} {r['optimum']:7.4f} {r['integral_optimum']:7.4f} {r['layers_at_optimum']:6.1%} "
            f"{r['rounds_max']:6d} {times}"
        )
    return "\n".join(lines)


def plot_dispatch(rows: list[dict], path: Path, title: str) -> bool:
    """Balancedness against tokens per step, one panel per deployment: even, balanced, optimum."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(dict.fromkeys(r["deployment"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        mine = [r for r in rows if r["deployment"] == name]
        for f in dict.fromkeys(r["file"] for r in mine):
            sel = sorted((r for r in mine if r["file"] == f), key=lambda r: r["tokens"])
            x = [r["tokens"] for r in sel]
            ax.plot(x, [r["even"] for r in sel], "o--", color="tab:gray", label="even split")
            ax.plot(x, [r["balanced"] for r in sel], "o-", color="tab:blue", label="balanced split")
            ax.plot(x, [r["optimum"] for r in sel], ":", color="black", label="LP optimum (fractional tokens)")
            ax.axhline(sel[0]["planned"], color="tab:green", alpha=0.4, label="placement (planned loads)")
        ax.set_xscale("log", base=2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("tokens per step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("per-step balancedness (mean / max GPU)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=4, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
