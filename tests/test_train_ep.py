"""benchmarks/train_ep.py proves training with replicas and rebalancing: real ranks (gloo), float64.

Each rank trains the script's model (its own loop, ``train_ep.train``) with replicas and a balancer
that re-plans every two steps. Beside it, in the same process, a reference trains the same model
WITHOUT expert parallelism or replicas: the E logical experts as ``[L, E, ...]`` parameters, the
union of all ranks' batches, a plain per-expert loop, the same initialisation by logical expert and
the same Adam. After every step (and so after every move of weights), every rank records the losses,
its dense parameters and, gathered from all ranks, every slot's weights and Adam moments next to the
reference's of the slot's logical expert. One run per world size and split; the tests below check
the records.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import spawn
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_ep.py"
spec = importlib.util.spec_from_file_location("train_ep", SCRIPT)
te = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = te  # dataclasses look their module up while the script runs
spec.loader.exec_module(te)

TOL = 1e-6  # relative; float64 runs agree to ~1e-13, summation order is all that differs

# Tiny, with a fast and wide drift so that the plan changes often: 8 slots for 6 experts, a re-plan
# every 2 steps with min_gain=0 and at most 2 slots moved per layer; R = 8 splits over 2 and 4 ranks.
# The placement changes at 5 of the 10 steps with 2 and with 4 ranks.
CFG = dict(
    layers=2, experts=6, replicas=8, top_k=2, dim=4, hidden=6, tokens=16, steps=10, interval=2, budget=0.25,
    method="refined", min_gain=0.0, lr=0.02, skew=1.5, drift=6.0, drift_period=10, dtype=torch.float64,
)  # fmt: skip


class Reference(nn.Module):
    """The same model in one process, no replicas: expert ``e`` of layer ``l`` is ``w_in[l, e]``."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.dense = te.DenseParts(cfg)
        pairs = [[te.expert_init(cfg, layer, e) for e in range(cfg.experts)] for layer in range(cfg.layers)]
        self.w_in = nn.Parameter(torch.stack([torch.stack([a for a, _ in row]) for row in pairs]))
        self.w_out = nn.Parameter(torch.stack([torch.stack([b for _, b in row]) for row in pairs]))

    def forward(self, x, target):
        h = self.dense.embed(x)
        for layer in range(self.cfg.layers):
            gate, ids = self.dense.route(layer, h)
            out = torch.zeros_like(h)
            for e in range(self.cfg.experts):
                token, choice = (ids == e).nonzero(as_tuple=True)
                y = torch.relu(h[token] @ self.w_in[layer, e]) @ self.w_out[layer, e]
                out = out.index_add(0, token, y * gate[token, choice].unsqueeze(1))
            h = h + out
        return ((self.dense.head(h) - target) ** 2).mean()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _gather(tensors: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """Every rank's copy of each local ``[S, ...]`` tensor, concatenated by rank: ``[R, ...]``."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat)
    out = []
    for i, t in enumerate(tensors):
        start = sum(u.numel() for u in tensors[:i])
        out.append(torch.cat([p[start : start + t.numel()].view_as(t) for p in parts]))
    return out


def _compare_slots(slots: torch.Tensor, logical: torch.Tensor, phy2log: torch.Tensor) -> tuple[float, bool]:
    """Max relative difference of each slot to its logical expert's reference, and whether all
    replicas of each expert are bitwise equal. ``slots [R, ...]``, ``logical [E, ...]``, ``phy2log [R]``."""
    rel = max(_rel(slots[q], logical[int(e)]) for q, e in enumerate(phy2log))
    same = all(torch.equal(slots[q], slots[int((phy2log == e).nonzero()[0])]) for q, e in enumerate(phy2log))
    return rel, same


def _worker(rank: int, world: int, out: str, split: str) -> None:
    torch.set_num_threads(1)
    cfg = te.TrainConfig(**CFG, split=split)
    ref = Reference(cfg)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr)
    records = []

    def on_step(step, model, opt, balancer, result):
        batches = [te.make_batch(cfg, step, r) for r in range(world)]  # the union of all ranks' batches
        ref_opt.zero_grad()
        ref_loss = ref(torch.cat([x for x, _ in batches]), torch.cat([t for _, t in batches]))
        ref_loss.backward()
        ref_opt.step()
        phy2log = balancer.phy2log.cpu()
        rec = {
            "step": step,
            "loss": result.loss,
            "ref_loss": float(ref_loss.detach()),
            "changed": result.changed,
            "slots_changed": result.slots_changed,
            "phy2log": phy2log.tolist(),
            "dense": max(_rel(a, b) for a, b in zip(model.dense.parameters(), ref.dense.parameters(), strict=True)),
            "weights": [],
            "states": [],
        }
        for layer, pair in enumerate(model.expert_params()):
            for param, logical in zip(pair, (ref.w_in, ref.w_out), strict=True):
                slots, *moments = _gather([param, *(opt.state[param][k] for k in ("exp_avg", "exp_avg_sq"))], world)
                rec["weights"].append(_compare_slots(slots, logical[layer].detach(), phy2log[layer]))
                for k, got in zip(("exp_avg", "exp_avg_sq"), moments, strict=True):
                    rec["states"].append(_compare_slots(got, ref_opt.state[logical][k][layer], phy2log[layer]))
        records.append(rec)

    te.train(cfg, rebalance=True, on_step=on_step)
    Path(out, f"rank{rank}.json").write_text(json.dumps(records))


@pytest.fixture(scope="module", params=[(2, "even"), (4, "even"), (2, "balanced")], ids=lambda p: f"world{p[0]}-{p[1]}")
def run(request, tmp_path_factory):
    """Every rank's records of one training run with ``world`` ranks, each expert's tokens divided
    among its replicas by ``split`` (``"balanced"``: by each step's counts, all-gathered per layer)."""
    world, split = request.param
    out = tmp_path_factory.mktemp(f"train_ep_world{world}_{split}")
    spawn(world, _worker, str(out), split)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _moves(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r["changed"] and r["slots_changed"] > 0]


def test_training_with_replicas_and_rebalancing_equals_one_process_without(run):
    for rank, records in enumerate(run):
        assert [r["phy2log"] for r in records] == [r["phy2log"] for r in run[0]], f"rank {rank} planned differently"
        assert len(_moves(records)) >= 2, "the placement must change at least twice for the test to mean anything"
        assert all(r["slots_changed"] > 0 for r in records if r["changed"]), "step() said changed, nothing moved"
        for r in records:
            where = f"rank {rank}, step {r['step']}"
            assert abs(r["loss"] - r["ref_loss"]) <= TOL * abs(r["ref_loss"]), (
                f"{where}: loss {r['loss']!r}, reference {r['ref_loss']!r}"
            )
            assert r["dense"] <= TOL, f"{where}: dense parameters differ from the reference by {r['dense']:.2e}"
            for i, (rel, same) in enumerate(r["weights"]):
                assert same, f"{where}: replicas of an expert differ (layer {i // 2}, tensor {i % 2})"
                assert rel <= TOL, f"{where}: expert weights differ from the reference by {rel:.2e} (tensor {i})"
    initial = te.eplb.initial_placement(CFG["layers"], CFG["experts"], CFG["replicas"]).tolist()
    assert run[0][-1]["phy2log"] != initial, "training ended in the placement it started from"


def test_optimizer_state_moves_with_its_slots(run):
    for rank, records in enumerate(run):
        moved = set(_moves(records))
        assert len(moved) >= 2
        for r in records:
            where = f"rank {rank}, step {r['step']}" + (" (after a move)" if r["step"] in moved else "")
            for i, (rel, same) in enumerate(r["states"]):
                name = ("exp_avg", "exp_avg_sq")[i % 2]
                assert same, f"{where}: replicas' {name} differ (layer {i // 4}, tensor {i // 2 % 2})"
                assert rel <= TOL, f"{where}: {name} differs from the reference's by {rel:.2e} (layer {i // 4})"


def test_torchrun_runs_the_example_and_writes_its_outputs(tmp_path):
    """The example as the README runs it (torchrun, gloo), shortened: every run's rows, a summary."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(SCRIPT),
           "--steps", "12", "--interval", "4", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "balancedness" in done.stdout
    with open(out / "train_ep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    runs = ("with rebalancing", "with rebalancing, balanced split", "without rebalancing")
    assert [(r["run"], int(r["step"])) for r in rows] == [(name, s) for name in runs for s in range(12)]
    summary = json.loads((out / "train_ep.json").read_text())["summary"]
    assert summary["placement_changes"] >= 1
    # Rebalancing changes only where tokens go, never the loss (float32: summation order differs).
    assert summary["max_relative_loss_difference_between_runs"] < 1e-3
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional (the bench extra)
        assert (out / "train_ep.png").stat().st_size > 0
