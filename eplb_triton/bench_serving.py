"""The serving benchmark (``bench_layers.py --serving --loads FILE ...``): rearrangements over load
files in sequence, as an engine replans from the placement in service.

The first file's greedy plan is in service; each next file's loads arrive and every policy replans
from *its own* previous placement (each policy is a chain of its own). Per rearrangement and policy:
the share of slots whose expert changes (the weights that move) and the balancedness of the new
placement on the new loads. Policies:

* ``vllm-default``: vLLM's ``DefaultEplbPolicy`` with the placement in service, the installed
  package's own code, or the file given as ``--vllm-policy PATH/default.py``; without either, its
  rule (the greedy, then experts that stay on a GPU keep their slot) as this package computes it;
* ``relabelled``: the adapter's replan, the greedy relabelled to the placement in service;
* ``max_moves=k%``: incremental replans with a budget of k% of the slots;
* ``gated``: the relabelled replan behind the ``min_gain`` gate: layers that would gain less than
  ``min_gain`` keep their placement.

The lost-GPU report (``--lost-gpu``): for each pair of consecutive files, the first file's greedy
plan is in service, the next file's loads arrive and the GPU carrying the most of them is lost.
Replans around it (``active_gpus``, docs/algorithm.md section 12) from the placement in service:
``relabelled`` (the full plan relabelled to it), ``forced only`` (``max_moves=0``: only the experts
the lost GPU held alone move) and ``max_moves=k%`` (12.1). Per row: the share of live slots
whose expert changes and the balancedness over the live GPUs.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

from . import metrics
from ._validation import moves_in_slots
from .api import rebalance_experts
from .configs import Deployment
from .io import Loads
from .placement import replica_counts, stable_order

BUDGETS = (0.10, 0.15, 0.25)
MIN_GAIN = 0.02
LOST_BUDGETS = (0.05, 0.15)


def load_vllm_policy(path: Path | None = None):
    """vLLM's ``DefaultEplbPolicy``: from ``path`` (its ``default.py``, beside ``abstract.py``), else the
    installed package, else ``None``."""
    if path is None:
        try:
            from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
        except ImportError:
            return None
        return DefaultEplbPolicy
    folder = Path(path).parent
    if not (folder / "abstract.py").is_file():
        raise ValueError(f"--vllm-policy {path}: expected vLLM's default.py beside its abstract.py")
    package = types.ModuleType("vllm_eplb_policy")
    package.__path__ = [str(folder)]
    sys.modules["vllm_eplb_policy"] = package
    for name in ("abstract", "default"):
        spec = importlib.util.spec_from_file_location(f"vllm_eplb_policy.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["vllm_eplb_policy.default"].DefaultEplbPolicy


def _vllm(policy, w: torch.Tensor, d: Deployment, old: torch.Tensor) -> torch.Tensor:
    if policy is None:  # its rule, computed here
        phy2log = rebalance_experts(w, *d.args, backend="cpu")[0]
        return phy2log.gather(1, stable_order(old, phy2log, d.gpus))
    out = policy.rebalance_experts(w, *d.args, old)
    return (out if isinstance(out, torch.Tensor) else out[0]).cpu().to(torch.int64)


def _balancedness(w: torch.Tensor, phy2log: torch.Tensor, gpus: int, live: torch.Tensor | None = None) -> float:
    """Mean balancedness of ``phy2log`` on ``w``; with ``live [P]`` bools, over those GPUs (``-1``: an empty slot)."""
    loads = metrics.gpu_loads(w, phy2log, replica_counts(phy2log, w.shape[1]).clamp_min(1), gpus)
    return float(metrics.balancedness(loads if live is None else loads[:, live]).mean())


def serving_report(files: list[Loads], deployments: list[Deployment], policy=None, log=print) -> list[dict]:
    """One row per (deployment, rearrangement, policy)."""
    rows = []
    for d in deployments:
        fitting = d.fitting(files)
        if len(fitting) < 2:
            continue
        start = rebalance_experts(fitting[0].weight, *d.args, backend="cpu")[0]
        names = ["vllm-default", "relabelled", *(f"max_moves={round(100 * b)}%" for b in BUDGETS), "gated"]
        current = dict.fromkeys(names, start)
        for step, f in enumerate(fitting[1:], start=1):
            w = f.weight
            new = {"vllm-default": _vllm(policy, w, d, current["vllm-default"])}
            new["relabelled"] = rebalance_experts(w, *d.args, backend="cpu", old_phy2log=current["relabelled"])[0]
            for b in BUDGETS:
                name = f"max_moves={round(100 * b)}%"
                k = moves_in_slots(b, d.replicas)
                new[name] = rebalance_experts(w, *d.args, backend="cpu", old_phy2log=current[name], max_moves=k)[0]
            new["gated"] = rebalance_experts(
                w, *d.args, backend="cpu", old_phy2log=current["gated"], min_gain=MIN_GAIN
            )[0]
            for name in names:
                changed = new[name] != current[name]
                rows.append({
                    "deployment": d.name, "step": step, "from": fitting[step - 1].path.name, "to": f.path.name,
                    "policy": name, "moved": float(changed.double().mean()),
                    "layers_changed": int(changed.any(dim=1).sum()), "layers": w.shape[0],
                    "before": _balancedness(w, current[name], d.gpus), "after": _balancedness(w, new[name], d.gpus),
                })  # fmt: skip
            current = new
            log(f"{d.name:20s} rearrangement {step} ({f.path.name}): "
                + ", ".join(f"{r['policy']} {r['moved']:.1%}" for r in rows[-len(names):]))  # fmt: skip
    return rows


def format_serving(rows: list[dict], real_vllm: bool) -> str:
    """Mean over the rearrangements, per deployment and policy."""
    lines = [
        f"vllm-default: {'the installed vLLM code' if real_vllm else 'its rule, computed by this package'}; "
        f"gated: min_gain = {MIN_GAIN}",
        f"{'deployment':20s} {'policy':16s} {'rearr.':>6s} {'moved':>7s} {'balanced (after)':>16s} "
        f"{'layers changed':>14s}",
    ]
    keys = list(dict.fromkeys((r["deployment"], r["policy"]) for r in rows))
    for dep, pol in keys:
        mine = [r for r in rows if r["deployment"] == dep and r["policy"] == pol]
        moved = sum(r["moved"] for r in mine) / len(mine)
        after = sum(r["after"] for r in mine) / len(mine)
        changed = sum(r["layers_changed"] for r in mine) / sum(r["layers"] for r in mine)
        lines.append(f"{dep:20s} {pol:16s} {len(mine):6d} {moved:7.1%} {after:16.4f} {changed:14.1%}")
    return "\n".join(lines)


def lost_gpu_report(files: list[Loads], deployments: list[Deployment], log=print) -> list[dict]:
    """One row per (deployment, file pair, policy); see the module doc. A deployment whose nodes
    cannot lose a GPU (too few slots left for a node's experts) is skipped with a line in ``log``."""
    rows = []
    for d in deployments:
        fitting = d.fitting(files)
        S = d.replicas // d.gpus
        for a, b in zip(fitting, fitting[1:], strict=False):
            old = rebalance_experts(a.weight, *d.args, backend="cpu")[0]
            w = b.weight
            lost = int(metrics.gpu_loads(w, old, replica_counts(old, w.shape[1]), d.gpus).sum(dim=0).argmax())
            mask = torch.tensor([g != lost for g in range(d.gpus)])
            live_slots = mask.repeat_interleave(S)
            budgets = {"relabelled": None, "forced only": 0}
            budgets.update({f"max_moves={round(100 * x)}%": moves_in_slots(x, d.replicas) for x in LOST_BUDGETS})
            try:
                plans = {
                    name: rebalance_experts(w, *d.args, old_phy2log=old, active_gpus=mask, max_moves=k)[0]
                    for name, k in budgets.items()
                }  # fmt: skip (CPU tensors: the CPU path)
            except ValueError as exc:  # e.g. a node left with fewer slots than its experts
                log(f"{d.name:20s} lost GPU: skipped ({exc})")
                break
            for name, new in plans.items():
                changed = (new != old) & live_slots
                rows.append({
                    "deployment": d.name, "from": a.path.name, "to": b.path.name, "lost_gpu": lost,
                    "policy": name, "moved": float(changed.double().sum() / (live_slots.sum() * w.shape[0])),
                    "before": _balancedness(w, old, d.gpus), "after": _balancedness(w, new, d.gpus, mask),
                })  # fmt: skip
            log(f"{d.name:20s} lost GPU {lost} ({a.path.name} -> {b.path.name}): "
                + ", ".join(f"{r['policy']} {r['moved']:.1%}" for r in rows[-len(plans):]))  # fmt: skip
    return rows


def format_lost_gpu(rows: list[dict]) -> str:
    """Mean over the file pairs, per deployment and policy."""
    lines = [f"{'deployment':20s} {'policy':16s} {'pairs':>6s} {'moved':>7s} {'balanced (live GPUs)':>20s}"]
    for dep, pol in dict.fromkeys((r["deployment"], r["policy"]) for r in rows):
        mine = [r for r in rows if r["deployment"] == dep and r["policy"] == pol]
        moved = sum(r["moved"] for r in mine) / len(mine)
        after = sum(r["after"] for r in mine) / len(mine)
        lines.append(f"{dep:20s} {pol:16s} {len(mine):6d} {moved:7.1%} {after:20.4f}")
    return "\n".join(lines)
