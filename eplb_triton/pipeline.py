"""The one planning pipeline (docs/algorithm.md sections 5-10), for every backend and every caller.

:func:`plan` composes, per layer and vectorised over layers on the input's device:

1. the greedy of the policy that runs (``backend.greedy``), or the caller's greedy plan;
2. ``method="refined"``: the local search from the greedy (``backend.search``), and with two slots
   per GPU under the global policy deficit-driven replication after it (``backend.pairs``);
3. ``old_phy2log``: the result relabelled to keep experts where they are: the exact node and GPU
   assignment then slot order (``relabel="gpus"``, :func:`placement.relabel`), or only slot order
   within each GPU (``relabel="slots"``, :func:`placement.stable_order`);
4. ``max_moves``: the local search from ``old_phy2log`` under the budget (with two slots per GPU
   under the global policy, then the count repair, ``backend.repair``), and the relabelled full plan
   instead wherever it fits the budget and has a smaller largest GPU load;
5. ``keep``: rows that keep a previous placement; the search and the assignments skip them.

The drop-in API, :class:`eplb_triton.EplbPlanner` and :class:`eplb_triton.OnlineBalancer` all
call it; only the backend's own operations differ, and they return identical tensors.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._validation import Config, select_policy
from .backends import Backend, Plan, float32_numpy
from .metrics import gpu_loads
from .placement import block_overlap, max_gpu_load, relabel, stable_order

Relabel = Literal["gpus", "slots"]


def plan(
    backend: Backend,
    weight: torch.Tensor,
    cfg: Config,
    *,
    method: str = "greedy",
    old_phy2log: torch.Tensor | None = None,
    max_moves: int | None = None,
    relabel_to_old: Relabel = "gpus",
    start: Plan | None = None,
    keep: tuple[torch.Tensor, Plan] | None = None,
    validate: bool = True,
    min_gain: float | None = None,
) -> Plan:
    """The plan of the effective configuration ``cfg`` (the global policy is ``G = N = 1``) for ``weight``.

    Args:
        backend: the resolved backend (:func:`eplb_triton.backends.resolve`).
        weight: ``[L, E]`` loads, validated in shape; values are checked by the greedy (``validate``).
        method: ``"greedy"`` or ``"refined"``.
        old_phy2log: ``[L, R]`` int64 placement in service on ``weight``'s device, or ``None``.
        max_moves: with ``old_phy2log``: the incremental replan's budget per layer.
        relabel_to_old: how a full plan is made to keep experts of ``old_phy2log`` in place.
        start: the greedy plan when the caller already has it (the GPU planner's buffers); not modified.
        keep: ``(rows [L] bool, previous)``: those rows return ``previous``'s placement, and the
            search and the relabelling's assignments skip them.
        validate: passed to ``backend.greedy``.
        min_gain: with ``old_phy2log``: a layer keeps ``old_phy2log`` (replicas in slot order) unless
            the plan lowers its largest GPU load on ``weight`` by at least this fraction (:func:`gains`).

    Returns:
        A :class:`Plan` on ``weight``'s device.
    """
    E, P, N = cfg.num_experts, cfg.num_gpus, cfg.num_nodes
    skip = None if keep is None else keep[0]
    result = start if start is not None else backend.greedy(weight, cfg, validate=validate)
    if method == "refined":
        result = backend.search(weight, result, P, N, skip=skip)
        if takes_pairs(cfg):
            result = backend.pairs(weight, result, skip=skip)
    # the placement in service with its replicas in slot order: the budgeted search's start, the gate's
    current = None
    if old_phy2log is not None and (max_moves is not None or min_gain is not None):
        current = backend.slot_order(old_phy2log, E)
    if old_phy2log is not None:
        if max_moves is not None:
            result = _incremental(backend, weight, cfg, result, current, max_moves, skip)
        elif relabel_to_old == "gpus":
            phy2log, phyrank = relabel(
                old_phy2log, result.phy2log, result.phyrank, E, P, N, backend.assign, skip, backend.host_reads_are_free
            )  # fmt: skip
            result = Plan(phy2log, phyrank, result.logcnt)
        else:
            order = stable_order(old_phy2log, result.phy2log, P)
            result = Plan(result.phy2log.gather(1, order), result.phyrank.gather(1, order), result.logcnt)
    if min_gain is not None and current is not None:
        take = gains(weight, current, result, P, min_gain)
        result = Plan(*(torch.where(take.view(-1, 1), r, c) for r, c in zip(result, current, strict=True)))
    if keep is not None:
        rows, previous = keep
        result = Plan(*(torch.where(rows.view(-1, 1), p, r) for p, r in zip(previous, result, strict=True)))
    return result


def takes_pairs(cfg: Config) -> bool:
    """``method="refined"`` adds deficit-driven replication (docs/algorithm.md section 13) after the
    local search: two slots per GPU under the global policy (``cfg`` the effective configuration)."""
    return cfg.num_replicas == 2 * cfg.num_gpus and select_policy(cfg.num_groups, cfg.num_nodes)[0] == "global"


def gains(weight: torch.Tensor, current: Plan, new: Plan, num_gpus: int, min_gain: float) -> torch.Tensor:
    """The replan gate: ``[L]`` bool, the layers where ``new`` lowers the largest GPU load of ``current``
    on ``weight`` by at least ``min_gain`` (relative): ``new_max <= (1 - min_gain) * current_max`` and
    ``new_max < current_max`` (an equal load is no gain, whatever ``min_gain``). GPU loads as
    :func:`eplb_triton.metrics.gpu_loads` sums them (float64); no host synchronisation."""
    now = gpu_loads(weight, current.phy2log, current.logcnt, num_gpus, check_ids=False).amax(dim=1)
    then = gpu_loads(weight, new.phy2log, new.logcnt, num_gpus, check_ids=False).amax(dim=1)
    return gain_of_peaks(now, then, min_gain)


def gain_of_peaks(now: torch.Tensor, then: torch.Tensor, min_gain: float) -> torch.Tensor:
    """:func:`gains` for largest GPU loads already computed: ``[L]`` bool."""
    return (then < now) & (then <= (1.0 - min_gain) * now)


def _incremental(
    backend: Backend, weight: torch.Tensor, cfg: Config, full: Plan, old: Plan, max_moves: int,
    skip: torch.Tensor | None,
) -> Plan:  # fmt: skip
    """docs/algorithm.md 10.4: the budgeted search from ``old`` (the placement in service, replicas in
    slot order), with two slots per GPU under the global policy its count repair toward ``full``'s
    counts (10.8), and the relabelled ``full`` plan instead where it fits the budget and has a smaller
    largest GPU load."""
    E, P, N = cfg.num_experts, cfg.num_gpus, cfg.num_nodes
    old_phy2log = old.phy2log
    out = backend.search(weight, old, P, N, old_phy2log=old_phy2log, max_moves=max_moves, skip=skip)
    if takes_pairs(cfg) and max_moves > 0:  # two slots per GPU: the count repair (10.8)
        out = backend.repair(weight, out, old_phy2log, full.logcnt, max_moves, skip=skip)
    out = [t.clone() for t in out]
    rows = _may_fit(backend, old_phy2log, full.phy2log, E, P, max_moves)
    if rows is None or rows.numel():
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        old_rows = pick(old_phy2log)
        sub_skip = None if skip is None else pick(skip)
        full_phy, full_rank = relabel(
            old_rows, pick(full.phy2log), pick(full.phyrank), E, P, N, backend.assign, sub_skip,
            backend.host_reads_are_free,
        )  # fmt: skip
        full_cnt = pick(full.logcnt)
        w32 = pick(weight.detach()).to(torch.float32)
        fits = (full_phy != old_rows).sum(dim=1) <= max_moves
        better = max_gpu_load(w32, full_phy, full_cnt, P) < max_gpu_load(w32, pick(out[0]), pick(out[2]), P)
        take = (fits & better)[:, None]
        for o, f in zip(out, (full_phy, full_rank, full_cnt), strict=True):
            if rows is None:
                o.copy_(torch.where(take, f, o))
            else:
                o[rows] = torch.where(take, f, o[rows])
    return Plan(*out)


def _may_fit(
    backend: Backend, old_phy2log: torch.Tensor, phy2log: torch.Tensor, E: int, P: int, max_moves: int
) -> torch.Tensor | None:
    """The layers whose relabelled plan could differ from ``old`` in at most ``max_moves`` slots, or
    ``None`` for every layer.

    Any numbering of the plan's GPUs keeps at most ``sum over its GPUs g of max over old GPUs h of
    overlap(g, h)`` slots (docs/algorithm.md 10.3), so a layer that must move more than
    ``max_moves`` by that bound cannot take the full plan, and skipping its assignment changes no
    result. Only where host reads are free (the assignment is the costly part there); elsewhere
    every layer, with no host read.
    """
    if not backend.host_reads_are_free:
        return None
    R = phy2log.shape[1]
    kept_at_most = block_overlap(phy2log, old_phy2log, P, E, read_bound=True).amax(dim=2).sum(dim=1)
    return torch.nonzero(R - kept_at_most <= max_moves).flatten()


# ----------------------------------------------------------------------------------------------
# Planning around lost GPUs (docs/algorithm.md section 12)
# ----------------------------------------------------------------------------------------------


def refill(old: torch.Tensor, weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """docs/algorithm.md 12.1: the fewest changes that make ``old [L, R']`` (ids in ``[0, E']``;
    ``E'`` marks a slot to refill: a lost GPU's expert, another node's, an empty slot) a placement
    of ``E' = num_experts`` experts: every expert at least once. ``weight [L, E']`` the loads.

    Per layer, on the host (a replan around lost GPUs is rare), with ``w[e]`` the float64 of the
    float32 load and ``c[e]`` the current copies: each expert without a copy, heaviest first (the
    lowest id on ties), takes the first slot to refill, or when none is left the last slot of the
    expert of the smallest ``w[e] / c[e]`` among those with two copies or more (the lowest id on
    ties); the slots left to refill then go, in slot order, to the expert of the largest
    ``w[e] / c[e]`` (the lowest id on ties), as the greedy replicates."""
    E = num_experts
    loads = weight.detach().to(torch.float32).to(torch.float64).cpu().tolist()
    rows = []
    for row, w in zip(old.cpu().tolist(), loads, strict=True):
        cnt = [0] * E
        slots_of: list[list[int]] = [[] for _ in range(E)]
        refills = []
        for q, e in enumerate(row):
            if e < E:
                cnt[e] += 1
                slots_of[e].append(q)
            else:
                refills.append(q)
        refills.reverse()  # popped from the end: the first slot first
        for m in sorted((e for e in range(E) if cnt[e] == 0), key=lambda e: (-w[e], e)):
            if refills:
                q = refills.pop()
            else:  # the copy whose loss raises a share least
                x = min((e for e in range(E) if cnt[e] >= 2), key=lambda e: (w[e] / cnt[e], e))
                q = slots_of[x].pop()
                cnt[x] -= 1
            row[q] = m
            cnt[m] += 1
            slots_of[m].append(q)
        for q in reversed(refills):
            y = max(range(E), key=lambda e: (w[e] / cnt[e], -e))
            row[q] = y
            cnt[y] += 1
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64, device=old.device).view(old.shape)


def _old_packing(old_phy2log: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """``(node [L, G], rank [L, G])`` of each group in ``old_phy2log`` where its slots keep the
    hierarchical rule (every group's copies on one node, ``G / N`` groups per node; a group's rank
    is its order by id among its node's), else ``-1`` rows."""
    eff = cfg.effective()
    G, N, E, R = eff.num_groups, eff.num_nodes, cfg.num_experts, cfg.num_replicas
    gs, per_node = E // G, R // N
    node = torch.full((old_phy2log.shape[0], G), -1, dtype=torch.int64)
    rank = torch.full_like(node, -1)
    for layer, row in enumerate(old_phy2log.cpu().tolist()):
        at: list[set[int]] = [set() for _ in range(G)]
        for q, e in enumerate(row):
            if e >= 0:
                at[e // gs].add(q // per_node)
        if any(len(n) != 1 for n in at):
            continue
        home = [next(iter(n)) for n in at]
        if any(home.count(n) != G // N for n in range(N)):
            continue
        node[layer] = torch.tensor(home)
        rank[layer] = torch.tensor([home[:g].count(home[g]) for g in range(G)])
    return node.to(old_phy2log.device), rank.to(old_phy2log.device)


def plan_live(
    backend: Backend,
    weight: torch.Tensor,
    cfg: Config,
    live: list[int],
    *,
    method: str = "greedy",
    old_phy2log: torch.Tensor | None = None,
    max_moves: int | None = None,
    min_gain: float | None = None,
) -> Plan:
    """The plan with only the GPUs ``live`` (increasing GPU ids) usable: their slots get the experts,
    the other GPUs' slots none (``phy2log`` and ``phyrank`` ``-1`` there; ``logcnt`` counts the live
    replicas).

    The global policy (``cfg.effective()`` with ``G = N = 1``) plans the ``S x len(live)`` live slots
    as one problem of ``len(live)`` GPUs. The hierarchical policy keeps its groups-to-nodes packing,
    and plans each node as a global problem of its groups' experts on its live GPUs. With
    ``old_phy2log``, each problem is relabelled to the old placement of its live GPUs. With
    ``max_moves`` or ``min_gain`` as well (docs/algorithm.md 12.1), each problem's old placement is
    first refilled (:func:`refill`: the moves the lost GPUs force), and the problem is replanned
    from it under the budget and the gate, as :func:`plan` does; the hierarchical policy then keeps
    the old placement's groups-to-nodes packing in the layers where it follows the rule, splits
    ``max_moves`` evenly among the nodes (the first ``max_moves % N`` take one more) and gates
    each node's problem on its own.
    """
    eff = cfg.effective()
    L, E, R, P = cfg.num_layers, cfg.num_experts, cfg.num_replicas, cfg.num_gpus
    G, N = eff.num_groups, eff.num_nodes
    S, Pn, dev = R // P, P // N, weight.device
    refilled = old_phy2log is not None and (max_moves is not None or min_gain is not None)  # 12.1
    # The value check first (one host read; a lost GPU's replan is rare): the sub-problems below see
    # group sums and a node's columns, whose errors would name entries that are not ``weight``'s.
    float32_numpy(weight)
    phy2log = torch.full((L, R), -1, dtype=torch.int64, device=dev)
    phyrank = torch.full((L, R), -1, dtype=torch.int64, device=dev)
    logcnt = torch.zeros((L, E), dtype=torch.int64, device=dev)
    if N == 1:  # global: one problem on the live GPUs, experts as they are
        mlog2log = torch.arange(E, device=dev).expand(L, E)
        parts = [(0, live)]
    else:  # hierarchical: groups to nodes as the pipeline packs them (float32 group sums, in order)
        gs, gpn = E // G, G // N
        w3 = weight.detach().to(torch.float32).view(L, G, gs)
        gload = torch.zeros((L, G), dtype=torch.float32, device=dev)
        for k in range(gs):
            gload += w3[:, :, k]
        gpack, grank = backend.pack(gload, N)
        if refilled:
            node, rank = _old_packing(old_phy2log, cfg)  # keep the old layout where it has one
            kept = (node[:, :1] >= 0).expand_as(node)
            gpack, grank = torch.where(kept, node, gpack), torch.where(kept, rank, grank)
        log2mlog = (((gpack * gpn + grank) * gs)[:, :, None] + torch.arange(gs, device=dev)).view(L, E)
        mlog2log = torch.empty_like(log2mlog).scatter_(1, log2mlog, torch.arange(E, device=dev).expand(L, E))
        parts = [(n, [g for g in live if g // Pn == n]) for n in range(N)]
    En = E // N
    for n, gpus in parts:
        experts = mlog2log[:, n * En : (n + 1) * En]  # [L, En] this problem's experts, in mlog order
        slots = torch.tensor([g * S + i for g in gpus for i in range(S)], dtype=torch.int64, device=dev)
        old = None
        if old_phy2log is not None:  # the old placement of these GPUs, in this problem's expert ids
            local = torch.full((L, E), En, dtype=torch.int64, device=dev)  # En: foreign, matches nothing
            local.scatter_(1, experts, torch.arange(En, device=dev).expand(L, En))
            held = old_phy2log[:, slots]
            old = torch.where(held < 0, En, local.gather(1, held.clamp_min(0)))  # -1: an empty slot
        sub = Config(L, En, len(slots), 1, 1, len(gpus))
        w_sub = weight.gather(1, experts)
        if refilled:
            old = refill(old, w_sub, En)
        # the layer's budget, split among the nodes' problems (the first ones take the remainder)
        k = None if max_moves is None else max_moves // len(parts) + (n < max_moves % len(parts))
        part = plan(backend, w_sub, sub, method=method, old_phy2log=old, max_moves=k, min_gain=min_gain)
        phy2log[:, slots] = experts.gather(1, part.phy2log)
        phyrank[:, slots] = part.phyrank
        logcnt.scatter_(1, experts, part.logcnt)
    return Plan(phy2log, phyrank, logcnt)
