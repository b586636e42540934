"""The methods beyond the greedy (docs/algorithm.md section 10), for every backend.

:func:`plan` is the one place that composes them:

1. the greedy of the policy that runs (``backends.run("rebalance", ...)``);
2. ``method="refined"``: the local search from the greedy (``backends.run("search", ...)``);
3. ``old_phy2log``: the result relabelled to keep experts where they are (:func:`placement.relabel`);
4. ``max_moves``: the local search from ``old_phy2log`` under the budget, and the relabelled
   full plan instead wherever it fits the budget and has a smaller largest GPU load.

Every step is vectorised over layers and stays on the input's device; only the backend's own
steps differ, and they return identical tensors.
"""

from __future__ import annotations

import torch

from . import backends, reference
from ._validation import Config
from .placement import _block_overlap, log2phy_from_rank, max_gpu_load, relabel, slot_order_ranks


def log2phy(backend: str, phy2log: torch.Tensor, phyrank: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """The ``log2phy`` of a placement, ``X = max(logcnt)`` wide, by the backend's family rule."""
    if backend == "reference":
        return reference.log2phy(phy2log.cpu(), phyrank.cpu(), logcnt.cpu()).to(phy2log.device)
    return log2phy_from_rank(phy2log, phyrank, logcnt.shape[1], int(logcnt.max()))


def plan(
    weight: torch.Tensor, cfg: Config, backend: str, method: str, old_phy2log: torch.Tensor | None,
    max_moves: int | None, greedy: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(phy2log, phyrank, logcnt)`` of the effective configuration ``cfg`` (validated arguments).

    ``greedy``: the greedy plan ``(phy2log, phyrank, logcnt)`` when the caller already has it
    (the GPU planner's buffers); it is not modified.
    """
    E, P, N = cfg.num_experts, cfg.num_gpus, cfg.num_nodes
    if greedy is None:
        phy2log, phyrank, logcnt, _ = backends.run("rebalance", backend, weight, cfg, False)
    else:
        phy2log, phyrank, logcnt = greedy
    if method == "refined":
        phy2log, phyrank, logcnt = backends.run("search", backend, weight, phy2log, phyrank, logcnt, P, N)
    if old_phy2log is None:
        return phy2log, phyrank, logcnt
    if max_moves is None:
        return (*relabel(old_phy2log, phy2log, phyrank, E, P, N), logcnt)
    old_rank, old_cnt = slot_order_ranks(old_phy2log, E)
    inc = backends.run(
        "search", backend, weight, old_phy2log, old_rank, old_cnt, P, N, old_phy2log, max_moves
    )  # fmt: skip
    # the relabelled full plan, where it fits the budget and has a smaller largest GPU load
    out = [t.clone() for t in inc]
    rows = _may_fit(old_phy2log, phy2log, E, P, max_moves)
    if rows.numel():
        old = old_phy2log[rows]
        full_phy, full_rank = relabel(old, phy2log[rows], phyrank[rows], E, P, N)
        full_cnt = logcnt[rows]
        w32 = weight.detach()[rows].to(torch.float32)
        fits = (full_phy != old).sum(dim=1) <= max_moves
        better = max_gpu_load(w32, full_phy, full_cnt, P) < max_gpu_load(w32, out[0][rows], out[2][rows], P)
        take = (fits & better)[:, None]
        for o, full in zip(out, (full_phy, full_rank, full_cnt), strict=True):
            o[rows] = torch.where(take, full, o[rows])
    return tuple(out)


def _may_fit(old_phy2log: torch.Tensor, phy2log: torch.Tensor, E: int, P: int, max_moves: int) -> torch.Tensor:
    """The layers whose relabelled plan could differ from ``old`` in at most ``max_moves`` slots.

    Any numbering of the plan's GPUs keeps at most ``sum over its GPUs g of max over old GPUs h of
    overlap(g, h)`` slots (docs/algorithm.md 10.3), so a layer that must move more than
    ``max_moves`` by that bound cannot take the full plan, and skipping its assignment changes no
    result. On the CPU only (the assignment is the costly part there); elsewhere every layer, with
    no host read.
    """
    L, R = phy2log.shape
    if phy2log.device.type != "cpu":
        return torch.arange(L, device=phy2log.device)
    kept_at_most = _block_overlap(phy2log, old_phy2log, P, E).amax(dim=2).sum(dim=1)
    return torch.nonzero(R - kept_at_most <= max_moves).flatten()
