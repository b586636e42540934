"""The public, drop-in API: DeepSeek's ``eplb`` functions with a ``backend=`` keyword.

Every function validates its arguments (docs/algorithm.md, "Validation"), never mutates its input,
accepts any real dtype on any device, and returns ``int64`` tensors on the input's device.
``weight`` may also be a numpy array (the outputs are then int64 numpy arrays) or a nested list of
numbers (torch outputs). Bad argument values raise :class:`EplbArgumentError`, which is both a
``ValueError`` and an ``AssertionError`` (DeepSeek's ``eplb`` asserts its rules); wrong types raise
``TypeError``. Both name the argument and the rule.
"""

from __future__ import annotations

import torch

from . import backends, pipeline
from ._arrays import accepts_arrays
from ._validation import (
    EplbArgumentError,
    check_active_gpus,
    check_config,
    check_count,
    check_method,
    check_min_gain,
    check_old_placement,
    check_slots,
    check_weight,
)


def _empty(device: torch.device, *shapes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(s, dtype=torch.int64, device=device) for s in shapes)


@accepts_arrays("weight")
def balanced_packing(
    weight: torch.Tensor, num_packs: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the ``n`` items of each row into ``num_packs`` packs of ``n / num_packs`` items each.

    Greedy, heaviest item first, into the least-loaded pack that is not full (docs/algorithm.md).

    Args:
        weight: ``[X, n]`` item weights, any real dtype, finite and ``>= 0``; a tensor, numpy array or nested list.
        num_packs: number of packs; must divide ``n``.
        backend: ``"auto"``, ``"cpu"``, ``"reference"`` or ``"triton"``.

    Returns:
        ``(pack_index, rank_in_pack)``, each ``[X, n]`` int64.

    Example:
        >>> pack, rank = balanced_packing(torch.tensor([[4, 3, 2, 1]]), 2)
        >>> pack.tolist(), rank.tolist()
        ([[0, 1, 1, 0]], [[0, 0, 1, 1]])
    """
    X, n = check_weight(weight)
    m = check_count("num_packs", num_packs)
    if n % m:
        raise EplbArgumentError(f"number of items ({n}, weight.shape[1]) must be a multiple of num_packs ({m})")
    served = backends.resolve(backend, weight.device, items=n)
    if X == 0:
        return _empty(weight.device, (0, n), (0, n))  # type: ignore[return-value]
    return served.pack(weight, m)


@accepts_arrays("weight")
def replicate_experts(
    weight: torch.Tensor, num_phy: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give ``num_phy - E`` redundant slots to the experts with the largest load per replica.

    Args:
        weight: ``[X, E]`` loads, any real dtype, finite and ``>= 0``; a tensor, numpy array or nested list.
        num_phy: number of physical slots, ``>= E``.
        backend: ``"auto"``, ``"cpu"``, ``"reference"`` or ``"triton"``.

    Returns:
        ``(phy2log [X, num_phy], rank [X, num_phy], logcnt [X, E])``, int64: the expert of each
        slot, the replica number of each slot, the number of replicas of each expert.

    Example:
        >>> phy2log, rank, cnt = replicate_experts(torch.tensor([[6, 2, 3]]), 5)
        >>> phy2log.tolist(), cnt.tolist()  # 6/2 = 3 ties with 3/1: the lower expert wins
        ([[0, 1, 2, 0, 0]], [[3, 1, 1]])
    """
    X, E = check_weight(weight)
    R = check_count("num_phy", num_phy)
    check_slots("num_phy", R, X)
    if R < E:
        raise EplbArgumentError(f"num_phy ({R}) must be >= the number of logical experts ({E}, weight.shape[1])")
    served = backends.resolve(backend, weight.device, experts=E, replicas=R)
    if X == 0:
        return _empty(weight.device, (0, R), (0, R), (0, E))  # type: ignore[return-value]
    return served.replicate(weight, R)


def _check_plan_args(method, old_phy2log, max_moves, min_gain, active_gpus, cfg, device):
    """The planning arguments beyond DeepSeek's, validated and combined:
    ``(method, old, max_moves, min_gain, live)``."""
    method = check_method(method)
    min_gain = check_min_gain(min_gain)
    live = check_active_gpus(active_gpus, cfg)
    # Empty slots (-1) and missing experts: a placement only relabelled to, or one that active_gpus
    # refills first (docs/algorithm.md 12.1); one kept as it is (max_moves, min_gain) must be whole.
    whole = live is None and (max_moves is not None or min_gain is not None)
    old, max_moves = check_old_placement(old_phy2log, max_moves, cfg, device, allow_empty=not whole)
    if min_gain is not None and old is None:
        raise EplbArgumentError("min_gain needs old_phy2log: the gate compares the new plan with it")
    return method, old, max_moves, min_gain, live


@accepts_arrays("weight", "old_phy2log")
def rebalance_experts_hierarchical(
    weight: torch.Tensor,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    backend: str = "auto",
    method: str = "greedy",
    old_phy2log: torch.Tensor | None = None,
    max_moves: int | None = None,
    min_gain: float | None = None,
    active_gpus: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hierarchical policy: groups to nodes, replicas within nodes, replicas to GPUs.

    Args:
        weight: ``[num_layers, num_logical_experts]`` loads, any real dtype, finite and ``>= 0``; a
            tensor, numpy array or nested list.
        num_physical_experts: total slots ``R``, a multiple of ``num_gpus``, ``>= E``.
        num_groups: expert groups ``G`` (a divisor of ``E`` and a multiple of ``num_nodes``).
        num_nodes: server nodes ``N``.
        num_gpus: GPUs ``P``, a multiple of ``num_nodes``.
        backend: ``"auto"``, ``"cpu"``, ``"reference"`` or ``"triton"``.
        method, old_phy2log, max_moves, min_gain, active_gpus: as for :func:`rebalance_experts`.

    Returns:
        ``(phy2log [L, R], phyrank [L, R], logcnt [L, E])``, int64.
    """
    cfg = check_config(
        weight, num_physical_experts, num_groups, num_nodes, num_gpus,
        require_hierarchical=True, replicas_name="num_physical_experts",
    )  # fmt: skip
    served = backends.resolve(backend, weight.device, experts=cfg.num_experts, replicas=cfg.num_replicas)
    method, old, max_moves, min_gain, live = _check_plan_args(
        method, old_phy2log, max_moves, min_gain, active_gpus, cfg, weight.device
    )
    if cfg.num_layers == 0:
        return _empty(weight.device, (0, cfg.num_replicas), (0, cfg.num_replicas), (0, cfg.num_experts))  # type: ignore[return-value]
    if live is not None:
        return tuple(
            pipeline.plan_live(
                served, weight, cfg, live, method=method, old_phy2log=old, max_moves=max_moves, min_gain=min_gain
            )
        )
    return tuple(
        pipeline.plan(served, weight, cfg, method=method, old_phy2log=old, max_moves=max_moves, min_gain=min_gain)
    )


@accepts_arrays("weight", "old_phy2log")
def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    backend: str = "auto",
    method: str = "greedy",
    old_phy2log: torch.Tensor | None = None,
    max_moves: int | None = None,
    min_gain: float | None = None,
    active_gpus: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry point of the expert-parallelism load balancer (drop-in for ``eplb.rebalance_experts``).

    Uses the hierarchical policy when ``num_groups % num_nodes == 0``, else the global policy
    (:func:`eplb_triton._validation.select_policy`).

    Args:
        weight: ``[num_layers, num_logical_experts]`` measured load of each expert, any real
            dtype, finite and ``>= 0``: a tensor on any device, a numpy array (numpy outputs) or a
            nested list.
        num_replicas: physical expert slots ``R`` (a multiple of ``num_gpus``, ``>= E``).
        num_groups: expert groups ``G`` (must divide ``E`` when the hierarchical policy runs).
        num_nodes: server nodes ``N`` (must divide ``num_gpus`` when the hierarchical policy runs).
        num_gpus: GPUs ``P``.
        backend: ``"auto"`` (Triton for CUDA tensors, else CPU), ``"cpu"``, ``"reference"``
            or ``"triton"``.
        method: ``"greedy"`` (DeepSeek's algorithm, the default) or ``"refined"``: the greedy,
            then a local search per layer (swap slots between GPUs, one or two at a time, or
            turn a replica of a lightly loaded expert into one of a heavy expert) that lowers the
            layer's largest GPU load, and with two slots per GPU under the global policy a pairing
            of replica counts chosen for it (deficit-driven replication, section 13); never worse
            than the greedy (docs/algorithm.md section 10).
        old_phy2log: ``[L, R]`` the placement in service. The result is relabelled (nodes, then
            GPUs, by an exact maximum-overlap assignment, then slots) to keep experts where they
            are: same GPU loads, fewer slots to move. It may have empty slots (``-1``, a plan around
            lost GPUs), which match nothing, except with ``max_moves`` or ``min_gain`` and no
            ``active_gpus`` (a placement kept as it is must be whole). Under the
            hierarchical policy an old placement that splits a group's copies over nodes (vLLM's
            round-robin start) keeps them split with ``max_moves`` or ``min_gain``: those results
            hold the groups-to-nodes rule only where ``old_phy2log`` does.
        max_moves: with ``old_phy2log``, an incremental replan: at most ``max_moves`` slots per
            layer differ from ``old_phy2log``; the search starts from the old placement, and the
            relabelled full plan is taken instead where it fits the budget and is better.
        min_gain: with ``old_phy2log``, the replan gate: a layer keeps ``old_phy2log`` (nothing
            moves; replicas numbered in slot order) unless the new plan lowers its largest GPU load
            on ``weight`` by at least this fraction, ``0 <= min_gain < 1`` (``0``: any strict gain).
        active_gpus: ``[P]`` bools: plan with only these GPUs usable (docs/algorithm.md section 12).
            The lost GPUs' slots get no expert (``-1`` in ``phy2log``, listed nowhere in
            ``log2phy``; ``logcnt`` counts the live replicas); every expert keeps a replica on a live
            GPU. The global policy plans the live slots as one problem; the hierarchical policy
            keeps its groups-to-nodes packing and plans every node on its live GPUs. With
            ``old_phy2log`` each problem is relabelled to what the live GPUs hold; with
            ``max_moves`` or ``min_gain`` too, each problem's old placement is first refilled with
            the fewest changes (every live slot that was empty or held another node's expert gets
            one, every expert left without a live copy gets a slot),
            and ``max_moves`` counts the moves beyond those (docs/algorithm.md 12.1).

    Returns:
        ``(phy2log [L, R], log2phy [L, E, X], logcnt [L, E])``, int64 on ``weight.device``:
        the logical expert of each slot, the slots of each expert padded with ``-1`` to
        ``X = max(logcnt)`` (``X = 0`` when ``L == 0``), and the replica count of each expert.
        On the Triton path, reading ``X`` is the one host synchronisation.

    Example:
        >>> w = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
        >>> phy2log, log2phy, logcnt = rebalance_experts(w, 16, 4, 2, 8)
        >>> phy2log[0].tolist()
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]
    """
    cfg = check_config(weight, num_replicas, num_groups, num_nodes, num_gpus)
    served = backends.resolve(backend, weight.device, experts=cfg.num_experts, replicas=cfg.num_replicas)
    method, old, max_moves, min_gain, live = _check_plan_args(
        method, old_phy2log, max_moves, min_gain, active_gpus, cfg, weight.device
    )
    L, E, R = cfg.num_layers, cfg.num_experts, cfg.num_replicas
    if L == 0:
        return _empty(weight.device, (0, R), (0, E, 0), (0, E))  # type: ignore[return-value]
    if live is not None:
        plan = pipeline.plan_live(
            served, weight, cfg, live, method=method, old_phy2log=old, max_moves=max_moves, min_gain=min_gain
        )
        return plan.phy2log, served.log2phy(plan, int(plan.logcnt.max())), plan.logcnt
    if method == "greedy" and old is None:  # the fast path: the greedy builds log2phy as it plans
        plan, log2phy = served.greedy_with_log2phy(weight, cfg.effective())
        return plan.phy2log, log2phy, plan.logcnt
    plan = pipeline.plan(
        served, weight, cfg.effective(), method=method, old_phy2log=old, max_moves=max_moves, min_gain=min_gain
    )
    return plan.phy2log, served.log2phy(plan, int(plan.logcnt.max())), plan.logcnt
