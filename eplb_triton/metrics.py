"""Placement quality measures of docs/algorithm.md, vectorised over layers, on any device.

Loads are taken in float64 here: these are reports, not part of the algorithm's contract. Like
the drop-in functions, every measure also takes numpy arrays (numpy results) or nested lists.
"""

from __future__ import annotations

import torch

from . import bounds
from ._arrays import accepts_arrays
from ._validation import EplbArgumentError, check_count, check_weight, is_integer_dtype


def _check_placement(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> int:
    L, E = check_weight(weight)
    P = check_count("num_gpus", num_gpus)
    for name, t in (("phy2log", phy2log), ("logcnt", logcnt)):
        if not is_integer_dtype(t.dtype):
            raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if phy2log.dim() != 2 or phy2log.shape[0] != L:
        raise EplbArgumentError(f"phy2log must be [num_layers={L}, num_replicas], got shape {tuple(phy2log.shape)}")
    if tuple(logcnt.shape) != (L, E):
        raise EplbArgumentError(f"logcnt must have weight's shape {(L, E)}, got {tuple(logcnt.shape)}")
    if phy2log.shape[1] % P:
        raise EplbArgumentError(
            f"num_replicas ({phy2log.shape[1]}, phy2log.shape[1]) must be a multiple of num_gpus ({P})"
        )
    return P


@accepts_arrays("weight", "phy2log", "logcnt")
def gpu_loads(
    weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int, *, check_ids: bool = True
) -> torch.Tensor:
    """Load of each GPU: each replica takes an equal share of its expert's tokens.

    Args:
        weight: ``[L, E]`` loads.
        phy2log: ``[L, R]`` integer expert of each slot; slot ``q`` lives on GPU
            ``q // (R / num_gpus)``; ``-1``: an empty slot (a lost GPU's), no load.
        logcnt: ``[L, E]`` integer replicas of each expert.
        num_gpus: ``P``.
        check_ids: check that ``phy2log`` holds ids in ``[-1, E)`` (one host read; an id out of
            range would otherwise index past ``weight``, a device-side assert on CUDA). The
            library's own callers, whose placements are valid by construction, pass ``False`` to
            stay free of host synchronisation.

    Returns:
        ``[L, P]`` float64 on ``weight.device``.
    """
    P = _check_placement(weight, phy2log, logcnt, num_gpus)
    if check_ids and phy2log.numel():
        E = weight.shape[1]
        low, high = (int(v) for v in torch.stack([phy2log.min(), phy2log.max()]).tolist())
        if low < -1 or high >= E:
            raise EplbArgumentError(
                f"phy2log must hold expert ids in [0, {E}) or -1 (an empty slot), found {low if low < -1 else high}"
            )
    dev = weight.device
    share = weight.detach().to(torch.float64) / logcnt.to(dev, torch.float64)
    phy = phy2log.to(dev, torch.int64)
    per_slot = share.gather(1, phy.clamp_min(0))
    per_slot = torch.where(phy >= 0, per_slot, 0.0)  # an empty slot (a lost GPU's) carries nothing
    return per_slot.view(per_slot.shape[0], P, -1).sum(-1)


@accepts_arrays("weight")
def identity_gpu_loads(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """GPU loads with no rebalancing: expert ``e`` alone on GPU ``e * P // E``, no redundant copies.

    The contrast for a placement's balancedness (experts split as evenly as ``E / P`` allows).

    Returns:
        ``[L, P]`` float64 on ``weight.device``.
    """
    L, E = check_weight(weight)
    P = check_count("num_gpus", num_gpus)
    gpu = torch.arange(E, device=weight.device) * P // E
    loads = torch.zeros((L, P), dtype=torch.float64, device=weight.device)
    return loads.index_add_(1, gpu, weight.detach().to(torch.float64))


@accepts_arrays("loads")
def balancedness(loads: torch.Tensor) -> torch.Tensor:
    """Mean over max GPU load of each layer (1.0 is perfect; an all-zero layer counts as 1.0; a layer
    with a NaN or negative load has no balancedness: NaN).

    Args:
        loads: ``[L, P]`` GPU loads (see :func:`gpu_loads`).

    Returns:
        ``[L]`` float64.
    """
    if loads.dim() != 2 or loads.shape[1] == 0:
        raise EplbArgumentError(
            f"loads must be 2-D [num_layers, num_gpus] with num_gpus >= 1, got {tuple(loads.shape)}"
        )
    loads = loads.to(torch.float64)
    peak = loads.max(dim=1).values
    mean = loads.mean(dim=1)
    out = torch.where(peak > 0, mean / peak.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(mean))
    return torch.where((loads >= 0).all(dim=1), out, torch.full_like(out, float("nan")))  # NaN >= 0 is False


@accepts_arrays("per_layer")
def summarize(per_layer: torch.Tensor) -> dict[str, float]:
    """``{"mean": ..., "worst": ...}`` of a per-layer balancedness (host values, for reports)."""
    if per_layer.numel() == 0:
        return {"mean": float("nan"), "worst": float("nan")}
    return {"mean": float(per_layer.mean()), "worst": float(per_layer.min())}


@accepts_arrays("weight")
def lower_bound(
    weight: torch.Tensor, num_replicas: int, num_gpus: int, *, num_groups: int = 1, num_nodes: int = 1
) -> torch.Tensor:
    """A proven lower bound on the max GPU load of every placement of the policy that runs.

    ``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)`` runs the
    hierarchical policy when ``num_groups % num_nodes == 0`` (the default ``1, 1``: one node holding
    every expert, the global problem), else the global one; the bound holds for every placement
    that policy could return, by any method (for the hierarchical policy: placements that keep each
    group's copies on one node, which an incremental replan from an old placement that splits them
    need not; docs/algorithm.md section 8,
    :mod:`eplb_triton.bounds`): the mean GPU load and the smallest possible largest share; with
    2 to 4 slots per GPU, a pairing certificate (a GPU holds at most one replica above half the
    load); for the hierarchical policy, the smallest over the splits of the groups among the nodes
    of the largest node's bound. ``mean / bound`` is a ceiling on the balancedness any placement
    can reach, and ``bound / peak`` a floor on a placement's share of the optimum.

    Returns:
        ``[L]`` float64 on ``weight.device``.
    """
    L, E = check_weight(weight)
    R = check_count("num_replicas", num_replicas)
    P = check_count("num_gpus", num_gpus)
    if R < E:
        raise EplbArgumentError(f"num_replicas ({R}) must be >= the number of logical experts ({E})")
    w64 = weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    bound = bounds.lower_bound(w64, R, num_groups, num_nodes, P)
    return torch.from_numpy(bound).to(weight.device)


@accepts_arrays("weight")
def ceiling(
    weight: torch.Tensor, num_replicas: int, num_gpus: int, *, num_groups: int = 1, num_nodes: int = 1
) -> torch.Tensor:
    """The proven ceiling on balancedness: mean GPU load over :func:`lower_bound` (same arguments),
    ``1.0`` where every load is zero. No placement of the policy that runs is better balanced.

    Returns:
        ``[L]`` float64 on ``weight.device``.
    """
    bound = lower_bound(weight, num_replicas, num_gpus, num_groups=num_groups, num_nodes=num_nodes)
    mean = weight.detach().to(dtype=torch.float64).sum(dim=1).to(bound.device) / num_gpus
    return torch.where(bound > 0, mean / bound.clamp_min(1e-300), 1.0)


@accepts_arrays("old_phy2log", "new_phy2log")
def migration_count(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor) -> torch.Tensor:
    """Slots per layer whose expert changes (each must receive a full expert's weights).

    Returns:
        ``[L]`` int64.
    """
    if old_phy2log.shape != new_phy2log.shape or old_phy2log.dim() != 2:
        raise EplbArgumentError(
            f"old_phy2log and new_phy2log must be 2-D of one shape, got {tuple(old_phy2log.shape)} "
            f"and {tuple(new_phy2log.shape)}"
        )
    return (old_phy2log != new_phy2log.to(old_phy2log.device)).sum(dim=1)
