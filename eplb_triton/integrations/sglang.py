"""SGLang: its ``deepseek`` EPLB algorithm, computed by :func:`eplb_triton.rebalance_experts`.

SGLang (``sglang/srt/eplb/eplb_algorithms/``) picks the algorithm by ``--eplb-algorithm``
(``auto``, ``deepseek``, ``deepseek_hierarchical``, ``deepseek_vec``, ...); its dispatcher
``eplb_algorithms.rebalance_experts(tokens_per_expert, num_physical_experts,
num_local_physical_experts, num_groups, num_nodes, algorithm)`` sums ``tokens_per_expert`` over its
first dimension and, for ``deepseek`` and ``deepseek_hierarchical`` (what ``auto`` selects), calls
``eplb_algorithms.deepseek.rebalance_experts`` by module attribute, with keywords.
:func:`install` replaces that attribute with :func:`rebalance_experts` in the calling process;

The algorithm call gets no current placement, but SGLang's process holds it while it plans
(``expert_location.get_global_expert_location_metadata().physical_to_logical_map_cpu``, replaced
only after the plan, when the weights move). When that map holds every expert, the plan is
relabelled to it exactly (:func:`eplb_triton.rebalance_experts` with ``old_phy2log``): the same GPU
loads with fewer experts moved, and SGLang's updater copies only the slots whose expert changed.
The options of :mod:`eplb_triton.integrations._options` apply (``method``, ``max_moves``,
``min_gain``; :func:`install`'s keywords or the ``EPLB_TRITON_*`` environment variables).
SGLang computes placements in its scheduler processes, so run ``install`` there: from a
``sglang.srt.plugins`` entry point (SGLang's ``load_plugins`` runs those in every scheduler
process), or in a launcher that calls it before ``sglang.launch_server``'s ``main`` when the
processes are forked. The ``elasticity_aware`` algorithms (forced by elastic EP) become
:func:`rebalance_experts_elastic`; ``deepseek_vec`` is left as it is.
"""

from __future__ import annotations

import sys

import torch

from .._validation import EplbArgumentError, check_active_gpus, check_config, check_count
from ..api import rebalance_experts as _rebalance_experts
from ._options import PlanOptions, full_placement, replan

OPTIONS: PlanOptions = PlanOptions.from_env()
"""``method``, ``max_moves``, ``min_gain``: from the environment, or :func:`install`'s keywords."""


def current_placement(num_layers: int, num_replicas: int) -> torch.Tensor | None:
    """SGLang's placement in service, ``[L, R]`` int64 on the CPU, or ``None`` (SGLang not running in
    this process, no metadata yet, or a map of another shape, e.g. around an elastic scale-up).

    Read from the already imported ``sglang.srt.eplb.expert_location`` (a running SGLang has it: it
    calls the algorithms); never imported here, which would load all of SGLang (seconds, and it
    sets cache variables) in a process that only plans."""
    location = sys.modules.get("sglang.srt.eplb.expert_location")
    if location is None or not hasattr(location, "get_global_expert_location_metadata"):
        return None
    meta = location.get_global_expert_location_metadata()
    old = getattr(meta, "physical_to_logical_map_cpu", None)
    if not isinstance(old, torch.Tensor) or tuple(old.shape) != (num_layers, num_replicas):
        return None
    return old


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int | None,
    num_nodes: int,
    num_gpus: int,
    enable_hierarchical: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGLang's ``eplb_algorithms.deepseek.rebalance_experts``, on ``eplb_triton``.

    Unlike DeepSeek's ``eplb``, SGLang picks the policy with ``enable_hierarchical`` rather than
    ``num_groups % num_nodes``; the global policy ignores ``num_groups`` and ``num_nodes``.

    Args:
        weight: ``[num_layers, num_logical_experts]`` load of each expert, any real dtype, any device
            (CUDA loads run the Triton kernel).
        num_replicas: physical experts ``R``, a multiple of ``num_gpus``.
        num_groups: expert groups ``G`` (``None`` is accepted when ``enable_hierarchical`` is false).
        num_nodes: server nodes ``N``.
        num_gpus: GPUs ``P`` (SGLang passes ``num_physical_experts // num_local_physical_experts``).
        enable_hierarchical: ``True`` for ``deepseek_hierarchical`` (needs ``G % N == 0``), ``False``
            for ``deepseek`` (the global policy).

    Returns:
        ``(phy2log [L, R], log2phy [L, E, X], logcnt [L, E])``, int64 on the CPU as SGLang's are;
        ``log2phy`` is ``-1`` padded to ``X = max(logcnt)``.

    Example:
        >>> w = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
        >>> phy2log, log2phy, logcnt = rebalance_experts(w, 16, 4, 2, 8, enable_hierarchical=True)
        >>> phy2log[0].tolist(), log2phy.shape
        ([5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], torch.Size([1, 12, 2]))
    """
    if not enable_hierarchical:
        num_groups, num_nodes = 1, 1
    elif num_groups is None or check_count("num_groups", num_groups) % check_count("num_nodes", num_nodes):
        # SGLang asserts it; eplb_triton would run the global policy instead
        raise EplbArgumentError(
            f"enable_hierarchical needs num_groups ({num_groups}) to be a multiple of num_nodes ({num_nodes})"
        )
    L, E = weight.shape
    old = full_placement(current_placement(L, num_replicas), L, E, num_replicas)
    if old is None:
        out = _rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, method=OPTIONS.method)
    else:
        out = replan(weight, num_replicas, num_groups, num_nodes, num_gpus, old, OPTIONS, "auto")
    return tuple(t.cpu() for t in out)  # type: ignore[return-value]


def rebalance_experts_elastic(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int | None,
    num_nodes: int,
    num_gpus: int,
    enable_hierarchical: bool,
    active_ranks: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGLang's ``eplb_algorithms.elasticity_aware.rebalance_experts``, on ``eplb_triton``.

    Plans around the lost ranks (``active_ranks`` 0) with :func:`eplb_triton.rebalance_experts`'s
    ``active_gpus`` (docs/algorithm.md section 12) from the placement in service when it holds
    every expert: relabelled to it, and with the options' ``max_moves`` and ``min_gain``, only the
    experts the lost ranks held alone (and live slots that were empty) move, plus at most ``max_moves``
    slots per layer (12.1). Unlike SGLang's, the
    hierarchical policy stays hierarchical (groups on their nodes) as long as every node keeps
    enough live slots for its groups; otherwise, as SGLang does, the global policy plans the live
    slots. Only the first ``num_gpus`` entries of ``active_ranks`` count (its length is SGLang's rank
    capacity, which may be larger).

    Returns:
        SGLang's layout: ``(phy2log [L, R], log2phy [L, E, X], logcnt [L, E])`` int64 on the CPU;
        a lost rank's slots hold expert 0 in ``phy2log`` (a filler), ``log2phy`` never lists them and
        ``logcnt`` counts the live replicas.
    """
    active = torch.as_tensor(active_ranks).detach().cpu().reshape(-1)[:num_gpus].bool()
    if bool(active.all()):
        return rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, enable_hierarchical)
    L, E = weight.shape
    groups, nodes = (num_groups, num_nodes) if enable_hierarchical else (1, 1)
    if enable_hierarchical and num_groups is None:  # as rebalance_experts says it
        raise EplbArgumentError(f"enable_hierarchical needs num_groups ({num_groups}) to be a multiple of num_nodes")
    if enable_hierarchical:
        try:  # every node must keep enough live slots for its groups; else plan globally, as SGLang does
            check_active_gpus(active, check_config(weight, num_replicas, groups, nodes, num_gpus))
        except EplbArgumentError:
            groups, nodes = 1, 1
    old = full_placement(current_placement(L, num_replicas), L, E, num_replicas)
    if old is None:
        out = _rebalance_experts(
            weight, num_replicas, groups, nodes, num_gpus, method=OPTIONS.method, active_gpus=active
        )
    else:  # the moves the lost ranks force, then the options' budget and gate
        out = replan(weight, num_replicas, groups, nodes, num_gpus, old, OPTIONS, "auto", active_gpus=active)
    phy2log, log2phy, logcnt = out
    return phy2log.clamp_min(0).cpu(), log2phy.cpu(), logcnt.cpu()


def install(*, method: str | None = None, max_moves: int | float | None = None, min_gain: float | None = None) -> None:
    """Make SGLang's ``deepseek`` and ``deepseek_hierarchical`` algorithms run :func:`rebalance_experts`,
    and its ``elasticity_aware`` ones (elastic EP) :func:`rebalance_experts_elastic`.

    Idempotent; affects the calling process only (module docstring).

    Args:
        method, max_moves, min_gain: override the options read from the environment (a keyword left
            ``None`` keeps it); see :mod:`eplb_triton.integrations._options`.

    Example:
        >>> from eplb_triton.integrations import sglang as eplb_sglang
        >>> eplb_sglang.install(max_moves=0.15)  # needs SGLang
    """
    global OPTIONS
    options = OPTIONS.replace(method=method, max_moves=max_moves, min_gain=min_gain)
    from sglang.srt.eplb.eplb_algorithms import deepseek

    OPTIONS = options
    deepseek.rebalance_experts = rebalance_experts
    try:  # elastic EP (SGLang >= 0.5.x): the algorithm that plans around lost ranks
        from sglang.srt.eplb.eplb_algorithms import elasticity_aware
    except ImportError:
        return
    elasticity_aware.rebalance_experts = rebalance_experts_elastic
