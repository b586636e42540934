"""vLLM: an EPLB policy class whose placements come from :func:`eplb_triton.rebalance_experts`.

vLLM (``vllm/distributed/eplb/``) looks its policy class up in the dict
``vllm.distributed.eplb.policy.EPLB_POLICIES`` by ``--eplb-config.policy``, which only accepts
``"default"``; :func:`register` puts :class:`EplbTritonPolicy` under that key. The policy runs in
the worker processes, so ``register`` must run there too: from a ``vllm.general_plugins`` entry
point (vLLM loads those in every process), or before the engine starts when the workers are forked.

The policy interface changed in vLLM 0.19, and :class:`EplbTritonPolicy` follows the installed one:

* vLLM >= 0.19: ``rebalance_experts(...)`` returns ``phy2log [L, R]`` only, an int64 CPU tensor;
  vLLM derives ``log2phy`` and the replica counts itself.
* vLLM 0.13 - 0.18: it returns ``(phy2log [L, R], log2phy [L, E, R - E + 1], logcnt [L, E])``,
  int64 on ``weight.device``; ``log2phy`` is ``-1`` padded to ``num_redundant_experts + 1`` columns
  (not to ``max(logcnt)`` as DeepSeek's ``eplb`` pads it).

Both forms are what vLLM's ``DefaultEplbPolicy`` returns. vLLM >= 0.14 passes the placement in
service (``old_global_expert_indices``). When it holds every expert (no ``-1`` slot), the new plan is
relabelled to it exactly (:func:`eplb_triton.rebalance_experts` with ``old_phy2log``: nodes, then
GPUs by a maximum-overlap assignment, then slots): the same GPU loads as vLLM's plan with fewer
experts moved; and the options of :mod:`eplb_triton.integrations._options` apply (``method``,
``max_moves``, ``min_gain``; set by :func:`register` or the ``EPLB_TRITON_*`` environment variables,
read when this module is imported). Otherwise (no map, or ``-1`` slots after an elastic scale-up) the
new placement is only reordered within each GPU so that experts already there keep their slot, as
vLLM's ``preserve_intragpu_slots`` does (:func:`eplb_triton.placement.stable_order`). Every rank
computes the same plan from the same inputs (vLLM broadcasts nothing).

Two things can make a placement differ from vLLM's default: ties between equal loads (vLLM sorts
with NumPy's unstable sort; docs/algorithm.md: lower index first), and choices that float rounding
decides (vLLM divides and sums GPU loads in float64; docs/algorithm.md, like DeepSeek's ``eplb.py``,
in float32); and, with a full map, the relabelling above.
"""

from __future__ import annotations

import inspect
import typing
from typing import ClassVar

import torch

from .._validation import EplbArgumentError
from ..api import rebalance_experts as _rebalance_experts
from ..placement import reorder_log2phy, stable_order
from ._options import PlanOptions, full_placement, replan

try:
    from vllm.distributed.eplb.policy import AbstractEplbPolicy as _PolicyBase
except ImportError:  # vLLM is not installed: the same classmethod on a plain class
    _PolicyBase = object


def _returns_maps(policy: type) -> bool:
    """Whether a vLLM policy class returns ``(phy2log, log2phy, logcnt)`` (vLLM 0.14 - 0.18) rather
    than ``phy2log`` alone (vLLM >= 0.19), read from its ``rebalance_experts`` return annotation."""
    method = getattr(policy, "rebalance_experts", None)
    if method is None:
        return False
    annotation = inspect.signature(method).return_annotation
    if isinstance(annotation, str):  # under ``from __future__ import annotations``
        return annotation.strip("'\" ").startswith(("tuple[", "Tuple[", "typing.Tuple["))
    return typing.get_origin(annotation) is tuple


class EplbTritonPolicy(_PolicyBase):
    """vLLM's EPLB policy interface, computed by :func:`eplb_triton.rebalance_experts`.

    A subclass of vLLM's ``AbstractEplbPolicy`` when vLLM is importable, else a plain class with
    the same classmethod. Placements are ``DefaultEplbPolicy``'s, up to ties and float rounding
    (module docstring).

    Example:
        >>> w = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
        >>> phy2log = EplbTritonPolicy.rebalance_experts(w, 16, 4, 2, 8)  # vLLM >= 0.19 (or none)
        >>> phy2log[0].tolist()
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]
    """

    returns_maps: ClassVar[bool] = _returns_maps(_PolicyBase)
    """``True``: return ``(phy2log, log2phy, logcnt)`` (vLLM 0.13 - 0.18); ``False``: ``phy2log``."""
    backend: ClassVar[str] = "auto"
    """The ``eplb_triton`` backend: ``"auto"`` runs Triton for CUDA loads, else the CPU path."""
    options: ClassVar[PlanOptions] = PlanOptions.from_env()
    """``method``, ``max_moves``, ``min_gain``: from the environment, or :func:`register`'s keywords."""

    @classmethod
    def rebalance_experts(
        cls,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Entry point of vLLM's expert-parallelism load balancer.

        Args:
            weight: ``[num_layers, num_logical_experts]`` load of each expert, any real dtype.
            num_replicas: physical experts ``R``, a multiple of ``num_ranks``.
            num_groups: expert groups ``G``; ``G % num_nodes == 0`` selects the hierarchical policy.
            num_nodes: server nodes ``N``.
            num_ranks: EP ranks (GPUs) ``P``.
            old_global_expert_indices: optional ``[num_layers, >= R]`` current ``phy2log`` (its first
                ``R`` columns are read, as vLLM does): with every expert in it, the plan is relabelled
                to it (and :attr:`options` apply); else the new placement is only reordered within
                each GPU so that experts already there keep their slot (ids outside ``[0, E)``, such
                as vLLM's ``-1``, match nothing).

        Returns:
            ``phy2log [L, R]`` int64 on the CPU when :attr:`returns_maps` is ``False`` (vLLM >= 0.19);
            else ``(phy2log [L, R], log2phy [L, E, R - E + 1], logcnt [L, E])`` int64 on
            ``weight.device``, ``log2phy`` padded with ``-1``.
        """
        old = old_global_expert_indices
        if old is not None and (old.dim() != 2 or old.shape[0] != weight.shape[0] or old.shape[1] < num_replicas):
            raise EplbArgumentError(
                f"old_global_expert_indices must have shape [{weight.shape[0]}, >= {num_replicas}] (layers, slots), "
                f"got {list(old.shape)}"
            )
        full = full_placement(old, weight.shape[0], weight.shape[1], num_replicas)
        if full is not None:
            phy2log, log2phy, logcnt = replan(
                weight, num_replicas, num_groups, num_nodes, num_ranks, full, cls.options, cls.backend
            )
        else:
            phy2log, log2phy, logcnt = _rebalance_experts(
                weight, num_replicas, num_groups, num_nodes, num_ranks, backend=cls.backend, method=cls.options.method
            )
            if old is not None:
                order = _kept_slot_order(old, phy2log, logcnt.shape[1], num_ranks)
                phy2log = phy2log.gather(1, order)
                if cls.returns_maps:
                    log2phy = reorder_log2phy(log2phy, order)
        if not cls.returns_maps:
            return phy2log.cpu()
        width = num_replicas - logcnt.shape[1] + 1  # vLLM: num_redundant_experts + 1
        log2phy = torch.nn.functional.pad(log2phy, (0, width - log2phy.shape[2]), value=-1)
        return phy2log, log2phy, logcnt


def register(*, method: str | None = None, max_moves: int | float | None = None, min_gain: float | None = None) -> None:
    """Make vLLM's ``"default"`` EPLB policy :class:`EplbTritonPolicy` in this process (idempotent).

    Args:
        method, max_moves, min_gain: override the options read from the environment (a keyword left
            ``None`` keeps it); see :mod:`eplb_triton.integrations._options`.

    Example:
        >>> from eplb_triton.integrations import vllm as eplb_vllm
        >>> eplb_vllm.register(max_moves=0.15, min_gain=0.02)  # needs vLLM; in every vLLM process
    """
    options = EplbTritonPolicy.options.replace(method=method, max_moves=max_moves, min_gain=min_gain)
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    EplbTritonPolicy.options = options
    EPLB_POLICIES["default"] = EplbTritonPolicy


def _kept_slot_order(old: torch.Tensor, phy2log: torch.Tensor, num_experts: int, num_gpus: int) -> torch.Tensor:
    """The gather order of vLLM's ``preserve_intragpu_slots`` on ``phy2log``, by :func:`stable_order`."""
    R = phy2log.shape[1]
    old = old[:, :R].to(device=phy2log.device, dtype=torch.int64)  # vLLM reads the first R slots
    old = torch.where((old >= 0) & (old < num_experts), old, -1)  # -1: an empty slot, which matches nothing
    return stable_order(old, phy2log, num_gpus)
