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
from .placement import log2phy_from_rank, max_gpu_load, relabel, slot_order_ranks


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
    phy2log, phyrank = relabel(old_phy2log, phy2log, phyrank, E, P, N)
    if max_moves is None:
        return phy2log, phyrank, logcnt
    old_rank, old_cnt = slot_order_ranks(old_phy2log, E)
    inc = backends.run(
        "search", backend, weight, old_phy2log, old_rank, old_cnt, P, N, old_phy2log, max_moves
    )  # fmt: skip
    w32 = weight.detach().to(torch.float32)
    moved = (phy2log != old_phy2log).sum(dim=1)
    full_wins = (moved <= max_moves) & (max_gpu_load(w32, phy2log, logcnt, P) < max_gpu_load(w32, inc[0], inc[2], P))
    pick = full_wins[:, None]
    return (
        torch.where(pick, phy2log, inc[0]),
        torch.where(pick, phyrank, inc[1]),
        torch.where(pick, logcnt, inc[2]),
    )
