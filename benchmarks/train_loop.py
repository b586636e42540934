"""A small MoE model trained with online expert rebalancing: the loop production engines run.

Each step: the router picks top-k experts per token; OnlineBalancer.record counts them and maps
every token to a physical replica (slot); the step's real GPU loads are the tokens per GPU of
those slots. Every --interval steps the balancer plans a new placement from its window. The same
routed tokens under the placement without rebalancing (expert e alone on GPU e * P // E) give the
contrast. The input distribution drifts, so the hot experts change during training.

    python benchmarks/train_loop.py --steps 300 --out bench-out/train_loop

Three balancers see the same routed tokens: the default one (a full greedy replan each time,
slot-stable, each expert's tokens split evenly among its replicas), the same with each step's tokens
split by that step's counts (``split="balanced"``), and an incremental one (``method="refined"``,
``max_moves`` = --budget of the slots per layer). Prints balancedness (mean GPU load / max) per
step with each and without rebalancing, the slots and bytes of expert weights moved per rebalance,
and the per-step cost of recording; writes train_loop.json and train_loop.png (with matplotlib)
under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from eplb_triton import OnlineBalancer


class TinyMoE(nn.Module):
    """Router + E two-layer experts; ``num_layers`` MoE blocks with residual connections."""

    def __init__(self, num_layers: int, dim: int, hidden: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.routers = nn.ModuleList(nn.Linear(dim, experts) for _ in range(num_layers))
        for router in self.routers:  # skewed from the start: low-index experts are favoured
            nn.init.normal_(router.weight, std=0.3)
            with torch.no_grad():
                router.bias.copy_(torch.linspace(1.5, -1.5, experts))
        self.w_in = nn.Parameter(torch.randn(num_layers, experts, dim, hidden) / dim**0.5)
        self.w_out = nn.Parameter(torch.randn(num_layers, experts, hidden, dim) / hidden**0.5)

    def forward(self, x: torch.Tensor, on_route) -> torch.Tensor:
        for layer, router in enumerate(self.routers):
            scores = router(x).softmax(dim=-1)
            gate, ids = scores.topk(self.top_k, dim=-1)  # [T, k]
            on_route(layer, ids)
            out = torch.zeros_like(x)
            for e in ids.unique().tolist():
                token, slot = (ids == e).nonzero(as_tuple=True)
                h = torch.relu(x[token] @ self.w_in[layer, e]) @ self.w_out[layer, e]
                out.index_add_(0, token, h * gate[token, slot].unsqueeze(1))
            x = x + out
        return x


def balancedness(loads: torch.Tensor) -> float:
    return float(loads.float().mean() / loads.float().max().clamp_min(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--interval", type=int, default=20, help="rebalance every this many steps (window too)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--replicas", type=int, default=24)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512, help="tokens per step")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=0.15,
                   help="incremental balancer: max_moves = max(1, int(budget * replicas)) slots per layer")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("bench-out/train_loop"))
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    E, R, P = args.experts, args.replicas, args.gpus
    S = R // P

    model = TinyMoE(args.layers, args.dim, 2 * args.dim, E, args.top_k).to(dev)
    teacher = nn.Sequential(nn.Linear(args.dim, args.dim), nn.Tanh()).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    max_moves = max(1, int(args.budget * R))
    shape = (args.layers, E, R, args.groups, args.nodes, P)
    balancer = OnlineBalancer(*shape, window=args.interval, rebalance_interval=args.interval, device=dev)
    incremental = OnlineBalancer(*shape, window=args.interval, rebalance_interval=args.interval, device=dev,
                                 method="refined", max_moves=max_moves)  # fmt: skip
    # the default balancer's placements, each step's tokens split by that step's counts
    split = OnlineBalancer(*shape, window=args.interval, rebalance_interval=args.interval, device=dev,
                           split="balanced")  # fmt: skip
    identity_gpu = torch.arange(E, device=dev) * P // E
    # bytes of one expert's weights in one layer (w_in and w_out)
    expert_bytes = (model.w_in[0, 0].numel() + model.w_out[0, 0].numel()) * model.w_in.element_size()

    rows = []
    record_s: list[float] = []
    step_loads: dict[str, list[torch.Tensor]] = {}

    def on_route(layer: int, ids: torch.Tensor) -> None:
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        phy = balancer.record(layer, ids)
        sync()
        record_s.append(time.perf_counter() - t0)
        step_loads["with"].append(torch.bincount((phy // S).view(-1), minlength=P))
        phy_inc = incremental.record(layer, ids)
        step_loads["incremental"].append(torch.bincount((phy_inc // S).view(-1), minlength=P))
        phy_split = split.record(layer, ids)
        step_loads["balanced"].append(torch.bincount((phy_split // S).view(-1), minlength=P))
        step_loads["without"].append(torch.bincount(identity_gpu[ids].view(-1), minlength=P))

    for step in range(args.steps):
        # the input distribution drifts: which experts are hot changes over training
        angle = 2 * torch.pi * step / args.steps
        shift = torch.zeros(args.dim, device=dev)
        shift[0], shift[1] = 2 * torch.cos(torch.tensor(angle)), 2 * torch.sin(torch.tensor(angle))
        x = torch.randn(args.tokens, args.dim, device=dev) + shift
        step_loads = {"with": [], "incremental": [], "balanced": [], "without": []}
        loss = nn.functional.mse_loss(model(x, on_route), teacher(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        rebalanced = balancer.step()
        incremental.step()
        split.step()
        row = {
            "step": step,
            "loss": float(loss.detach()),
            "with_rebalancing": statistics.mean(balancedness(g) for g in step_loads["with"]),
            "incremental": statistics.mean(balancedness(g) for g in step_loads["incremental"]),
            "balanced_split": statistics.mean(balancedness(g) for g in step_loads["balanced"]),
            "without": statistics.mean(balancedness(g) for g in step_loads["without"]),
            "rebalanced": rebalanced,
        }
        rows.append(row)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {row['loss']:.4f} balancedness: full replans {row['with_rebalancing']:.3f}, "
                  f"with the balanced split {row['balanced_split']:.3f}, incremental {row['incremental']:.3f}, "
                  f"without {row['without']:.3f}", flush=True)  # fmt: skip

    after_first = [r for r in rows if r["step"] >= args.interval]

    def moved(history: list[dict]) -> dict:
        slots = [h["migrated_slots"] for h in history] or [0.0]
        return {
            "slots_per_rebalance": statistics.mean(slots),
            "bytes_per_rebalance": statistics.mean(slots) * expert_bytes,
        }

    summary = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": vars(args) | {"out": str(args.out), "device": str(dev), "max_moves": max_moves},
        "balancedness_with_rebalancing": statistics.mean(r["with_rebalancing"] for r in after_first),
        "balancedness_incremental": statistics.mean(r["incremental"] for r in after_first),
        "balancedness_balanced_split": statistics.mean(r["balanced_split"] for r in after_first),
        "balancedness_without": statistics.mean(r["without"] for r in after_first),
        "record_us_per_layer_step_median": statistics.median(record_s) * 1e6,
        "expert_bytes": expert_bytes,
        "moved_full_replans": moved(balancer.history_records()),
        "moved_incremental": moved(incremental.history_records()),
        "rebalances": balancer.history_records(),
        "rebalances_incremental": incremental.history_records(),
        "rows": rows,
    }
    full, inc = summary["moved_full_replans"], summary["moved_incremental"]
    print(
        f"after the first window ({len(after_first)} steps): balancedness with full replans "
        f"{summary['balancedness_with_rebalancing']:.3f} (with the balanced split "
        f"{summary['balancedness_balanced_split']:.3f}; {full['slots_per_rebalance']:.1f} slots, "
        f"{full['bytes_per_rebalance'] / 1e3:.1f} kB moved per rebalance), incremental (max_moves={max_moves}) "
        f"{summary['balancedness_incremental']:.3f} ({inc['slots_per_rebalance']:.1f} slots, "
        f"{inc['bytes_per_rebalance'] / 1e3:.1f} kB), without {summary['balancedness_without']:.3f}; "
        f"record+dispatch {summary['record_us_per_layer_step_median']:.1f} us per layer per step (median, "
        f"{summary['device']})"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_loop.json").write_text(json.dumps(summary, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'eplb-triton[bench]'): no plot", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([r["with_rebalancing"] for r in rows], label=f"full replan every {args.interval} steps")
    ax.plot([r["balanced_split"] for r in rows], label="full replan, each step's tokens split by its counts")
    ax.plot([r["incremental"] for r in rows], label=f"incremental, max_moves={max_moves} slots per layer")
    ax.plot([r["without"] for r in rows], label="no rebalancing")
    planned = [r["step"] for r in rows if r["rebalanced"]]
    for i, step in enumerate(planned):  # one legend entry for all of them
        ax.axvline(step, color="grey", alpha=0.25, label="placement changed" if i == 0 else "_nolegend_")
    ax.set_xlabel("step")
    ax.set_ylabel("balancedness (mean / max GPU load)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"TinyMoE {args.layers}x{E} experts, top-{args.top_k}, {R} slots on {P} GPUs")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out / "train_loop.png", dpi=110)
    print(f"wrote {args.out / 'train_loop.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
