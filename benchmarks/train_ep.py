"""A small MoE trained with real expert parallelism and per-step rebalancing, one process per rank.

    torchrun --nproc-per-node 4 benchmarks/train_ep.py --out bench-out/train_ep

Every rank holds the dense parameters (input projection, one router per MoE layer, head), kept
identical by all-reducing their gradients (the loss is normalised by the global token count, so
the SUM is the gradient of the global mean), and its own slots ``rank * S .. rank * S + S - 1`` of
every MoE layer's experts as slot-major parameters ``w_in [S, dim, hidden]`` and
``w_out [S, hidden, dim]``. Expert weights are initialised by logical expert id (one seeded
generator per layer and expert), so the replicas of :func:`eplb_triton.initial_placement` start
identical. One step:

1. each rank draws its own batch; the input distribution drifts, so the hot experts change;
2. per MoE layer the router picks the top-k experts, :func:`assign_slots` gives each (token,
   choice) a physical slot (``OnlineBalancer.record``), the entries travel to their slot's rank
   with an autograd ``all_to_all_single``, are processed by the slot's expert and come back the
   same way; outputs are combined with the gate weights;
3. ``loss.backward()`` (through the exchanges), all-reduce of the dense gradients,
   :func:`eplb_triton.sync_replica_grads` (every copy of an expert gets the sum of all copies'
   gradients), ``Adam.step()``, ``zero_grad``;
4. ``OnlineBalancer.step()``; when a placement changed, :func:`eplb_triton.rearrange_expert_weights`
   moves the weights with their Adam moments (``optimizer=``).

The same training runs three times, same seed: with rebalancing (every ``--interval`` steps, at
most ``--budget * R`` slots per layer), the same with each step's tokens split among the replicas
by the step's counts (the balanced split; the placements are the same, only where each token
computes changes; ``--split balanced`` makes it the first run), and with the initial placement
kept. The losses of the runs agree to rounding (relative 3e-16 with ``--dtype float64``, 3e-4 after 150 float32 steps):
rebalancing changes where an expert computes, not what. Balancedness is measured from the real
exchanges (mean / max of the entries each rank receives, averaged over layers).
Writes ``train_ep.csv`` (a row per run and step), ``train_ep.json`` (provenance, summary, medians
of each balancer piece's cost on rank 0) and ``train_ep.png`` under ``--out``. Only rank 0 prints.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import eplb_triton as eplb

# How each expert's tokens are divided among its replicas (see assign_slots).
SPLITS = ("even", "balanced")


@dataclass
class TrainConfig:
    """One training run; every rank must use the same values."""

    layers: int = 2
    experts: int = 16
    replicas: int = 24
    groups: int = 1
    nodes: int = 1
    top_k: int = 2
    dim: int = 32
    hidden: int = 64
    tokens: int = 256  # per rank and step
    steps: int = 150
    interval: int = 10  # plan every this many steps, on a window of as many steps
    budget: float = 0.25  # max_moves = max(1, int(budget * replicas)) slots per layer and plan
    method: str = "refined"
    min_gain: float = 0.01
    lr: float = 3e-3
    skew: float = 2.0  # router bias spread: a few hot experts
    drift: float = 2.0  # radius of the circle the input distribution's centre goes round
    drift_period: int = 150  # steps for one turn
    split: str = "even"
    seed: int = 0
    dtype: torch.dtype = torch.float32

    @property
    def max_moves(self) -> int:
        return max(1, int(self.budget * self.replicas))


def _seed(*parts: int) -> int:
    """A generator seed from integers, the same in every process (unlike ``hash``)."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + p + 1) % (2**62)
    return s


class DenseParts(nn.Module):
    """The replicated, non-expert parameters: input projection, one router per MoE layer, head.
    Built from ``cfg.seed`` alone, so every rank builds the same values."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        g = torch.Generator().manual_seed(_seed(cfg.seed, 1))
        d, E = cfg.dim, cfg.experts

        def linear(n_in: int, n_out: int, std: float) -> nn.Linear:
            lin = nn.Linear(n_in, n_out, dtype=torch.float64)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * std)
                lin.bias.zero_()
            return lin

        self.top_k = cfg.top_k
        self.embed = linear(d, d, d**-0.5)
        self.routers = nn.ModuleList(linear(d, E, 0.3) for _ in range(cfg.layers))
        for router in self.routers:  # a few hot experts, which ones differs per layer
            bias = torch.linspace(cfg.skew, -cfg.skew, E, dtype=torch.float64)
            with torch.no_grad():
                router.bias.copy_(bias[torch.randperm(E, generator=g)])
        self.head = linear(d, d, d**-0.5)
        self.to(cfg.dtype)

    def route(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate [T, k], topk_ids [T, k])``: the top-k experts of each token and their softmax weights."""
        scores = self.routers[layer](h).softmax(dim=-1)
        return scores.topk(self.top_k, dim=-1)


def expert_init(cfg: TrainConfig, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_in [dim, hidden], w_out [hidden, dim])`` of logical expert ``expert`` in ``layer``: a
    generator per (layer, expert), so every replica of it starts with the same values."""
    g = torch.Generator().manual_seed(_seed(cfg.seed, 2, layer, expert))
    w_in = torch.randn(cfg.dim, cfg.hidden, generator=g, dtype=torch.float64) * cfg.dim**-0.5
    w_out = torch.randn(cfg.hidden, cfg.dim, generator=g, dtype=torch.float64) * cfg.hidden**-0.5
    return w_in.to(cfg.dtype), w_out.to(cfg.dtype)


def expert_forward(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """One expert: ``[n, dim] -> [n, dim]``."""
    return torch.relu(x @ w_in) @ w_out


def make_batch(cfg: TrainConfig, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [tokens, dim], target [tokens, dim])`` of ``rank`` at ``step``. The inputs' centre goes
    round a circle of radius ``drift`` in the first two dimensions (period ``drift_period``), so the
    hot experts change;
    the target is a fixed random function of the input (a teacher built from ``cfg.seed``)."""
    g = torch.Generator().manual_seed(_seed(cfg.seed, 3, step, rank))
    d = cfg.dim
    angle = 2 * math.pi * step / cfg.drift_period
    x = torch.randn(cfg.tokens, d, generator=g, dtype=torch.float64)
    x[:, 0] += cfg.drift * math.cos(angle)
    x[:, 1] += cfg.drift * math.sin(angle)
    t = torch.Generator().manual_seed(_seed(cfg.seed, 4))
    a = torch.randn(d, d, generator=t, dtype=torch.float64) * d**-0.5
    b = torch.randn(d, d, generator=t, dtype=torch.float64) * d**-0.5
    target = torch.tanh(x @ a) @ b
    return x.to(cfg.dtype), target.to(cfg.dtype)


def assign_slots(balancer: eplb.OnlineBalancer, layer: int, topk_ids: torch.Tensor, split: str) -> torch.Tensor:
    """The one place where every (token, choice) gets its physical slot, ``[T, k]``; the choice is
    counted in the balancer's window on the way. ``"even"``: token ``t``'s choice ``e`` goes to
    replica ``t % logcnt[e]`` of ``e``. The slot decides everything downstream (destination rank
    ``slot // S``, which expert computes). ``"balanced"``: the step's tokens of every expert are
    split among its replicas by the group's counts of this step so that the largest GPU load is as
    small as it can be (``OnlineBalancer(split="balanced")``: one all-gather of the counts)."""
    if split not in SPLITS or split != balancer.split:
        raise ValueError(f"split must be one of {SPLITS} and the balancer's ({balancer.split!r}), got {split!r}")
    return balancer.record(layer, topk_ids)


class _Exchange(torch.autograd.Function):
    """``all_to_all_single`` with autograd: the backward sends the gradients back the way the values
    came. What ``torch.distributed.nn.functional.all_to_all_single`` does (deprecated); torch's
    functional collective (``all_to_all_single_autograd``) computes the same, but on gloo (torch 2.13,
    CPU) 3 of 48 runs of the tests aborted at interpreter exit with it (``terminate called without an
    active exception``), none in 40 with this."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _Exchange.apply(grad, in_splits, out_splits, ctx.group), None, None, None


@dataclass
class Timings:
    """Seconds on this rank, one entry per call."""

    record: list[float] = field(default_factory=list)  # per layer and step
    allreduce: list[float] = field(default_factory=list)  # the dense gradients' all-reduce, per step (for scale)
    sync: list[float] = field(default_factory=list)  # sync_replica_grads, per step
    step: list[float] = field(default_factory=list)  # OnlineBalancer.step without a plan
    plan: list[float] = field(default_factory=list)  # OnlineBalancer.step that planned
    move: list[float] = field(default_factory=list)  # rearrange_expert_weights, per change
    train_step: list[float] = field(default_factory=list)  # the whole step


class ExpertParallelMoE(nn.Module):
    """Dense parts on every rank, this rank's expert slots ``[S, ...]`` per layer, and the all-to-all
    dispatch. ``forward`` returns the loss term of this rank (normalised by the global token count)
    and, per layer, the entries every rank received ``[world]``."""

    def __init__(self, cfg: TrainConfig, phy2log: torch.Tensor, rank: int, world: int, group, device):
        super().__init__()
        if cfg.replicas % world:
            raise ValueError(f"replicas ({cfg.replicas}) must be a multiple of the world size ({world})")
        self.cfg, self.rank, self.world, self.group = cfg, rank, world, group
        self.S = S = cfg.replicas // world
        self.dense = DenseParts(cfg)
        w_in, w_out = [], []
        for layer in range(cfg.layers):
            mine = [expert_init(cfg, layer, int(e)) for e in phy2log[layer, rank * S : (rank + 1) * S]]
            w_in.append(nn.Parameter(torch.stack([w for w, _ in mine])))
            w_out.append(nn.Parameter(torch.stack([w for _, w in mine])))
        self.w_in, self.w_out = nn.ParameterList(w_in), nn.ParameterList(w_out)
        self.to(device)

    def expert_params(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        return [(self.w_in[i], self.w_out[i]) for i in range(self.cfg.layers)]

    def dense_params(self) -> list[nn.Parameter]:
        return list(self.dense.parameters())

    def moe(self, layer: int, h: torch.Tensor, gate: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, list]:
        T, k = slots.shape
        S, world, dev = self.S, self.world, h.device
        flat = slots.reshape(-1)
        order = torch.argsort(flat, stable=True)  # entries by slot: by destination rank, then by slot
        sent_slots = flat[order]
        send = torch.bincount(sent_slots // S, minlength=world)
        table = [torch.empty_like(send) for _ in range(world)]  # table[src][dst]: entries src sends dst
        dist.all_gather(table, send, group=self.group)
        table = torch.stack(table).tolist()
        send_splits = table[self.rank]
        recv_splits = [row[self.rank] for row in table]
        recv_slots = torch.empty(sum(recv_splits), dtype=sent_slots.dtype, device=dev)
        dist.all_to_all_single(recv_slots, sent_slots, recv_splits, send_splits, group=self.group)
        x_recv = _Exchange.apply(h[order // k], recv_splits, send_splits, self.group)
        # each received entry through its slot's expert, slot by slot
        local = recv_slots - self.rank * S
        by_slot = torch.argsort(local, stable=True)
        chunks = x_recv[by_slot].split(torch.bincount(local, minlength=S).tolist())
        y = torch.cat([expert_forward(c, self.w_in[layer][s], self.w_out[layer][s]) for s, c in enumerate(chunks)])
        y_recv = torch.empty_like(y).index_copy(0, by_slot, y)
        y_sent = _Exchange.apply(y_recv, send_splits, recv_splits, self.group)
        y_entries = torch.empty_like(y_sent).index_copy(0, order, y_sent).view(T, k, -1)
        received = [sum(row[dst] for row in table) for dst in range(world)]
        return (y_entries * gate.unsqueeze(-1)).sum(dim=1), received

    def forward(self, x, target, assign: Callable[[int, torch.Tensor], torch.Tensor]):
        h = self.dense.embed(x)
        received = []
        for layer in range(self.cfg.layers):
            gate, ids = self.dense.route(layer, h)
            out, got = self.moe(layer, h, gate, assign(layer, ids))
            h = h + out
            received.append(got)
        y = self.dense.head(h)
        global_tokens = x.shape[0] * self.world  # every rank has the same batch size
        return ((y - target) ** 2).sum() / (global_tokens * y.shape[1]), received


@dataclass
class StepResult:
    """What one step did, as every rank sees it."""

    step: int
    loss: float  # global mean
    balancedness: float  # mean over layers of mean / max entries received per rank
    received: list[list[int]]  # [layer][rank] entries received
    changed: bool  # the balancer changed a placement and the weights moved
    slots_changed: int = 0  # slots (all layers) whose expert changed
    experts_sent: int = 0  # (layer, expert) transfers between ranks, all ranks
    bytes_sent: int = 0  # their bytes: weights and the optimizer state that moved with them
    seconds: float = 0.0  # this rank's wall time of the step


def _moved_bytes_per_expert(params: list[tuple[nn.Parameter, nn.Parameter]], opt: torch.optim.Optimizer) -> int:
    """Bytes of one expert of one layer as rearrange_expert_weights(optimizer=) moves it: each tensor's
    slot, its state tensors shaped like it, and its pending .grad."""
    total = 0
    for t in params[0]:
        state = opt.state.get(t, {})
        n = 1 + sum(1 for v in state.values() if torch.is_tensor(v) and v.shape == t.shape) + (t.grad is not None)
        total += n * t[0].numel() * t.element_size()
    return total


def train(
    cfg: TrainConfig,
    *,
    rebalance: bool = True,
    group=None,
    device: torch.device | str = "cpu",
    on_step: Callable | None = None,
    log: Callable[[StepResult, str], None] | None = None,
    timings: Timings | None = None,
) -> list[StepResult]:
    """Train ``cfg.steps`` steps on this rank of ``group`` (the world by default).

    ``on_step(step, model, optimizer, balancer, result)`` runs after each step (after the weights
    moved); ``log(result, line)`` gets a line per step on the ranks that pass it. Returns every step's result.
    """
    device = torch.device(device)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    L, E, R = cfg.layers, cfg.experts, cfg.replicas
    init = eplb.initial_placement(L, E, R)
    balancer = eplb.OnlineBalancer(
        L, E, R, cfg.groups, cfg.nodes, world, window=cfg.interval,
        rebalance_interval=cfg.interval if rebalance else cfg.steps + 1, process_group=group, device=device,
        method=cfg.method, max_moves=cfg.max_moves, min_gain=cfg.min_gain, initial_phy2log=init, split=cfg.split,
    )  # fmt: skip
    model = ExpertParallelMoE(cfg, init, rank, world, group, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    old = balancer.phy2log.clone()
    phy2log_cpu = old.to("cpu", copy=True)  # sync_replica_grads reads the placement on the host: a host copy
    times = timings if timings is not None else Timings()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def assign(layer: int, ids: torch.Tensor) -> torch.Tensor:
        sync()
        t0 = time.perf_counter()
        slots = assign_slots(balancer, layer, ids, cfg.split)
        sync()
        times.record.append(time.perf_counter() - t0)
        return slots

    results = []
    for step in range(cfg.steps):
        t_step = time.perf_counter()
        x, target = (t.to(device) for t in make_batch(cfg, step, rank))
        loss, received = model(x, target, assign)
        loss.backward()
        dense = model.dense_params()
        flat = torch.cat([p.grad.reshape(-1) for p in dense] + [loss.detach().reshape(1)])  # the loss rides along
        sync()
        t0 = time.perf_counter()
        dist.all_reduce(flat, group=group)
        times.allreduce.append(time.perf_counter() - t0)
        for p, g in zip(dense, flat.split([p.numel() for p in dense] + [1]), strict=False):
            p.grad.copy_(g.view_as(p))
        global_loss = float(flat[-1])
        sync()
        t0 = time.perf_counter()
        eplb.sync_replica_grads(model.expert_params(), phy2log_cpu, group)
        sync()
        times.sync.append(time.perf_counter() - t0)
        opt.step()
        opt.zero_grad(set_to_none=True)  # nothing pending moves with the weights
        t0 = time.perf_counter()
        changed = balancer.step()
        planned = balancer.steps % balancer.rebalance_interval == 0
        (times.plan if planned else times.step).append(time.perf_counter() - t0)
        moved = [0, 0, 0]
        if changed:
            expert_bytes = _moved_bytes_per_expert(model.expert_params(), opt)
            sync()
            t0 = time.perf_counter()
            stats = eplb.rearrange_expert_weights(model.expert_params(), old, balancer.phy2log, group, optimizer=opt)
            sync()
            times.move.append(time.perf_counter() - t0)
            slots_changed = int((old != balancer.phy2log).sum())
            old.copy_(balancer.phy2log)
            phy2log_cpu = old.to("cpu", copy=True)
            sent = torch.tensor([stats.sent, stats.sent * expert_bytes], dtype=torch.int64, device=device)
            dist.all_reduce(sent, group=group)  # every rank changed too: the placements agree
            moved = [slots_changed, *map(int, sent.tolist())]
        seconds = time.perf_counter() - t_step
        times.train_step.append(seconds)
        per_layer = [statistics.mean(r) / max(max(r), 1) for r in received]
        result = StepResult(step, global_loss, statistics.mean(per_layer), received, changed, *moved, seconds)
        results.append(result)
        if on_step is not None:
            on_step(step, model, opt, balancer, result)
        if log is not None:
            line = f"step {step:4d} loss {result.loss:.5f} balancedness {result.balancedness:.3f}"
            if changed:
                line += (
                    f"  rebalanced: {result.slots_changed} slots changed, {result.experts_sent} experts sent, "
                    f"{result.bytes_sent / 1e3:.1f} kB (weights + Adam moments)"
                )
            log(result, line)
    return results


def _median_us(values: list[float]) -> float | None:
    return statistics.median(values) * 1e6 if values else None


def _plot(path: Path, runs: dict[str, list[StepResult]], cfg: TrainConfig, world: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for name, rows in runs.items():
        top.plot([r.step for r in rows], [r.balancedness for r in rows], label=name, lw=1)
        bottom.plot([r.step for r in rows], [r.loss for r in rows], label=name, lw=1)
    changes = [r.step for r in runs["with rebalancing"] if r.changed]
    for i, s in enumerate(changes):
        top.axvline(s, color="grey", alpha=0.25, label="placement changed" if i == 0 else "_nolegend_")
    top.set_ylabel("balancedness\n(mean / max entries received per rank)")
    top.set_ylim(0, 1.02)
    top.legend(loc="lower right")
    bottom.set_ylabel("loss (global mean)")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.legend(loc="upper right")
    top.set_title(
        f"{cfg.layers} MoE layers x {cfg.experts} experts, top-{cfg.top_k}, {cfg.replicas} slots on {world} ranks "
        f"(plan every {cfg.interval} steps, max_moves={cfg.max_moves})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--interval", type=int, default=d.interval, help="plan every this many steps (window too)")
    p.add_argument("--budget", type=float, default=d.budget, help="max_moves = max(1, int(budget * replicas))")
    p.add_argument("--method", default=d.method, choices=("greedy", "refined"))
    p.add_argument("--min-gain", type=float, default=d.min_gain)
    p.add_argument("--split", default=d.split, choices=SPLITS, help="how an expert's tokens divide among replicas")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--experts", type=int, default=d.experts)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--groups", type=int, default=d.groups)
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per rank and step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: nccl, one GPU per rank")
    p.add_argument("--log-every", type=int, default=1, help="print every this many steps (rebalances always)")
    p.add_argument("--out", type=Path, default=Path("bench-out/train_ep"))
    args = p.parse_args(argv)
    if args.steps <= args.interval:
        p.error(
            f"--steps ({args.steps}) must be greater than --interval ({args.interval}): "
            "the runs are compared from the first plan on"
        )
    cfg = TrainConfig(
        layers=args.layers, experts=args.experts, replicas=args.replicas, groups=args.groups, nodes=args.nodes,
        top_k=args.top_k, dim=args.dim, hidden=args.hidden, tokens=args.tokens, steps=args.steps,
        interval=args.interval, budget=args.budget, method=args.method, min_gain=args.min_gain, lr=args.lr,
        drift_period=args.steps, split=args.split, seed=args.seed, dtype=getattr(torch, args.dtype),
    )  # fmt: skip
    t_start = time.perf_counter()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl")
    else:
        torch.set_num_threads(1)  # one process per rank; several threads each only oversubscribe the cores
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def say(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    runs: dict[str, list[StepResult]] = {}
    timings: dict[str, Timings] = {}
    variants = [("with rebalancing", True, cfg.split)]
    if cfg.split == "even":  # the same placements, each step's tokens split by its own counts
        variants.append(("with rebalancing, balanced split", True, "balanced"))
    variants.append(("without rebalancing", False, cfg.split))
    for name, rebalance, split in variants:
        say(f"== {name}: {world} ranks, {cfg.replicas} slots for {cfg.experts} experts x {cfg.layers} layers")
        timings[name] = Timings()

        def log(result: StepResult, line: str) -> None:
            if result.changed or result.step % args.log_every == 0:
                print(line, flush=True)

        runs[name] = train(
            replace(cfg, split=split), rebalance=rebalance, device=device, log=log if rank == 0 else None,
            timings=timings[name],
        )  # fmt: skip
    dist.barrier()
    elapsed = time.perf_counter() - t_start
    if rank == 0:
        _report(args, cfg, world, device, runs, timings, elapsed)
    dist.destroy_process_group()
    return 0


def _report(args, cfg, world, device, runs, timings, elapsed) -> None:
    with_rb, without = runs["with rebalancing"], runs["without rebalancing"]
    t = timings["with rebalancing"]
    after = slice(cfg.interval, None)  # from the first plan on
    changes = [r for r in with_rb if r.changed]
    loss_diff = max(abs(a.loss - b.loss) / abs(b.loss) for a, b in zip(with_rb, without, strict=True))
    step_us = _median_us(t.train_step)
    overhead = {
        "record_us_per_layer": _median_us(t.record),
        "sync_replica_grads_us": _median_us(t.sync),
        "balancer_step_us_no_plan": _median_us(t.step),
        "balancer_step_us_plan": _median_us(t.plan),
        "rearrange_us_per_change": _median_us(t.move),
        "dense_allreduce_us": _median_us(t.allreduce),
        "train_step_us": step_us,
        "train_step_us_without_rebalancing": _median_us(timings["without rebalancing"].train_step),
    }
    pieces = sum(map(sum, (t.record, t.sync, t.step, t.plan, t.move)))
    overhead["balancer_share_of_step_time"] = pieces / sum(t.train_step)  # all pieces, amortised over the run
    balanced = runs.get("with rebalancing, balanced split")
    summary = {
        "balancedness_with_rebalancing": statistics.mean(r.balancedness for r in with_rb[after]),
        "balancedness_with_rebalancing_balanced_split": (
            None if balanced is None else statistics.mean(r.balancedness for r in balanced[after])
        ),
        "balancedness_without_rebalancing": statistics.mean(r.balancedness for r in without[after]),
        "placement_changes": len(changes),
        "slots_changed_per_change": statistics.mean(r.slots_changed for r in changes) if changes else 0,
        "experts_sent_per_change": statistics.mean(r.experts_sent for r in changes) if changes else 0,
        "bytes_sent_per_change": statistics.mean(r.bytes_sent for r in changes) if changes else 0,
        "bytes_sent_total": sum(r.bytes_sent for r in changes),
        "final_loss_with_rebalancing": with_rb[-1].loss,
        "final_loss_without_rebalancing": without[-1].loss,
        "max_relative_loss_difference_between_runs": loss_diff,
        "overhead_medians_rank0": overhead,
        "elapsed_s": elapsed,
    }
    o = overhead
    print(
        f"\nbalancedness from step {cfg.interval} on: with rebalancing {summary['balancedness_with_rebalancing']:.3f}"
        + (
            ""
            if balanced is None
            else f" ({summary['balancedness_with_rebalancing_balanced_split']:.3f} with the balanced split)"
        )
        + f", without {summary['balancedness_without_rebalancing']:.3f}; {len(changes)} placement changes, "
        f"{summary['slots_changed_per_change']:.1f} slots changed, {summary['experts_sent_per_change']:.1f} experts "
        f"({summary['bytes_sent_per_change'] / 1e3:.1f} kB) sent per change; losses of the two runs differ by "
        f"{loss_diff:.1e} (relative, at most)\n"
        f"cost on rank 0 (medians): record {o['record_us_per_layer']:.0f} us per layer, sync_replica_grads "
        f"{o['sync_replica_grads_us']:.0f} us, balancer.step {o['balancer_step_us_no_plan']:.0f} us "
        f"({o['balancer_step_us_plan'] or 0:.0f} us when it plans), rearrange {o['rearrange_us_per_change'] or 0:.0f} "
        f"us per change; all of them {o['balancer_share_of_step_time']:.0%} of the step time; for scale: the dense "
        f"all-reduce {o['dense_allreduce_us']:.0f} us, whole step {step_us / 1e3:.1f} ms "
        f"({o['train_step_us_without_rebalancing'] / 1e3:.1f} ms without rebalancing); {elapsed:.1f} s in all",
        flush=True,
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train_ep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "loss", "balancedness", *(f"received_l{i}" for i in range(cfg.layers)),
                    "changed", "slots_changed", "experts_sent", "bytes_sent", "step_ms_rank0"])  # fmt: skip
        for name, rows in runs.items():
            for r in rows:
                w.writerow([name, r.step, f"{r.loss:.9g}", f"{r.balancedness:.6f}",
                            *("/".join(map(str, x)) for x in r.received), int(r.changed), r.slots_changed,
                            r.experts_sent, r.bytes_sent, f"{r.seconds * 1e3:.2f}"])  # fmt: skip
    config = asdict(cfg) | {"dtype": str(cfg.dtype).removeprefix("torch."), "max_moves": cfg.max_moves}
    provenance = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],  # other work on the host inflates every timing
        "backend": dist.get_backend(),
        "world_size": world,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "eplb_triton": eplb.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"torchrun --nproc-per-node {world} benchmarks/train_ep.py " + " ".join(sys.argv[1:]),
    }
    doc = {"provenance": provenance, "config": config, "summary": summary}
    (out / "train_ep.json").write_text(json.dumps(doc, indent=1) + "\n")
    try:
        _plot(out / "train_ep.png", runs, cfg, world)
    except ImportError:
        print("matplotlib not installed (pip install 'eplb-triton[bench]'): no plot", file=sys.stderr)
    print(f"wrote {out}/train_ep.csv, train_ep.json, train_ep.png", file=sys.stderr)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
