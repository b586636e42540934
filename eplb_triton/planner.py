"""Sync-free, CUDA-graph-safe planning for per-step use, and the ``torch.library`` op behind it.

:class:`EplbPlanner` is built once for a configuration. It owns static output buffers and each
:meth:`EplbPlanner.plan` call rewrites them in place with one kernel launch: no host
synchronisation, no allocation of outputs, fixed shapes. A training or serving step can therefore
capture it in a CUDA graph, or call it from a ``torch.compile``-d function without graph breaks
(``torch.ops.eplb_triton.rebalance_`` has a fake implementation).
"""

from __future__ import annotations

import torch

from . import backends, launch, pipeline
from ._validation import (
    Config,
    EplbArgumentError,
    check_max_moves,
    check_method,
    check_old_placement,
    check_placement,
    check_shape_config,
    check_weight,
    resolve_device,
)
from .backends import TRITON, Plan
from .placement import log2phy_from_rank, slot_order_ranks

_MUTATED = ("phy2log", "phyrank", "logcnt", "log2phy", "invalid", "scratch_i", "scratch_f")


@torch.library.custom_op("eplb_triton::rebalance_", mutates_args=_MUTATED)
def rebalance_(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    phyrank: torch.Tensor,
    logcnt: torch.Tensor,
    log2phy: torch.Tensor,
    invalid: torch.Tensor,
    scratch_i: torch.Tensor,
    scratch_f: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> None:
    """Write the plan for ``weight`` into the given buffers (see :func:`eplb_triton.launch.rebalance`).

    ``num_groups``/``num_nodes`` are those of the policy that runs: pass 1, 1 for the global policy.
    """
    L, E = weight.shape
    cfg = Config(L, E, num_replicas, num_groups, num_nodes, num_gpus)
    buffers = launch.RebalanceBuffers(phy2log, phyrank, logcnt, log2phy, invalid, scratch_i, scratch_f)
    launch.rebalance(weight, cfg, out=buffers)


@rebalance_.register_fake
def _rebalance_fake(weight, phy2log, phyrank, logcnt, log2phy, invalid, scratch_i, scratch_f, R, G, N, P) -> None:
    return None


class EplbPlanner:
    """Plans placements for one configuration into static buffers, without host synchronisation.

    Args:
        num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus: the configuration
            (``L, E, R, G, N, P``), validated as :func:`eplb_triton.rebalance_experts` does.
        device: where the buffers live (a CUDA device; CPU only under ``TRITON_INTERPRET=1``).
        method: ``"greedy"`` (one kernel launch per plan) or ``"refined"`` (the greedy, then the
            local search kernel: docs/algorithm.md section 10; with two slots per GPU under the
            global policy, then the pairing kernel: section 13).
        max_moves: if given, :meth:`plan` needs ``old_phy2log`` and replans incrementally: at most
            this many slots per layer differ from it (docs/algorithm.md 10.4).
        initial_phy2log: ``[L, R]`` the placement the buffers start with (the layout the model was
            built in, e.g. :func:`eplb_triton.initial_placement`); default: the plan for equal loads.

    Attributes (static tensors, rewritten in place by :meth:`plan`):
        phy2log: ``[L, R]`` int64, logical expert of each slot.
        log2phy: ``[L, E, R - E + 1]`` int64, slots of each expert, ``-1`` padded to a fixed width.
        logcnt: ``[L, E]`` int64, replicas of each expert.
        phyrank: ``[L, R]`` int64, replica number of each slot.
        invalid: ``[L]`` int32, 1 where the last plan's loads were not all finite and ``>= 0``:
            such a layer keeps its previous placement (checking on the host would synchronise).

    Before the first :meth:`plan`, the buffers hold ``initial_phy2log`` (replicas numbered in slot
    order) or the plan for equal loads.

    Example:
        >>> planner = EplbPlanner(58, 256, 288, 8, 4, 32, device="cuda")
        >>> phy2log, log2phy, logcnt = planner.plan(loads)  # capturable in a CUDA graph
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_gpus: int,
        *,
        device: torch.device | str = "cuda",
        method: str = "greedy",
        max_moves: int | None = None,
        initial_phy2log: torch.Tensor | None = None,
    ):
        self.config: Config = check_shape_config(num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus)
        L, E = self.config.num_layers, self.config.num_experts
        launch.check_limits(E, self.config.num_replicas)
        self._policy = self.config.effective()
        self.device = resolve_device(device)
        if not (self.device.type == "cuda" or backends.interpreter_active()):
            raise EplbArgumentError(
                f"EplbPlanner runs the Triton kernels and needs a CUDA device, got {self.device} (set "
                "TRITON_INTERPRET=1 before import for the CPU interpreter); on the CPU use "
                "rebalance_experts(..., backend='cpu') or OnlineBalancer(..., device='cpu')"
            )
        self.method = check_method(method)
        self.max_moves = check_max_moves(max_moves)
        if initial_phy2log is not None:  # the layout the model's expert weights were built in
            initial_phy2log = check_placement(initial_phy2log, "initial_phy2log", self.config, self.device)
        self._buffers = b = launch.RebalanceBuffers.allocate(self._policy, self.device)
        if initial_phy2log is None:  # the plan for equal loads
            launch.rebalance(torch.ones((L, E), dtype=torch.float32, device=self.device), self._policy, out=b)
        else:  # no launch: every buffer the kernel would write is written here
            phyrank, logcnt = slot_order_ranks(initial_phy2log, E)
            b.phy2log.copy_(initial_phy2log)
            b.phyrank.copy_(phyrank)
            b.logcnt.copy_(logcnt)
            log2phy_from_rank(b.phy2log, b.phyrank, E, b.log2phy.shape[2], out=b.log2phy)
            b.invalid.zero_()

    phy2log = property(lambda self: self._buffers.phy2log)
    phyrank = property(lambda self: self._buffers.phyrank)
    logcnt = property(lambda self: self._buffers.logcnt)
    log2phy = property(lambda self: self._buffers.log2phy)
    invalid = property(lambda self: self._buffers.invalid)

    def plan(
        self, weight: torch.Tensor, old_phy2log: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rewrite the placement for new loads and return ``(phy2log, log2phy, logcnt)``.

        Args:
            weight: ``[L, E]`` loads of any real dtype on the planner's device. Only metadata is
                checked here (no synchronisation); a layer with NaN, inf or negative loads keeps
                its previous placement and is flagged in :attr:`invalid`.
            old_phy2log: ``[L, R]`` integer placement in service (for example :attr:`phy2log`
                itself, which is then copied before the kernel rewrites it): the plan is relabelled to it, or with
                ``max_moves`` replanned incrementally from it. Only its shape and dtype are
                checked here (its values are the caller's contract: ids in ``[0, E)``, every expert
                present). Still no host synchronisation.

        Returns:
            The planner's own static buffers (not copies).
        """
        L, E = check_weight(weight)
        cfg = self.config
        if (L, E) != (cfg.num_layers, cfg.num_experts):
            raise EplbArgumentError(
                f"weight must have shape [num_layers={cfg.num_layers}, num_experts={cfg.num_experts}], "
                f"got {tuple(weight.shape)}"
            )
        if weight.device != self.device:
            raise EplbArgumentError(f"weight must be on the planner's device {self.device}, got {weight.device}")
        old, max_moves = check_old_placement(old_phy2log, self.max_moves, cfg, self.device, check_data=False)
        b, p = self._buffers, self._policy
        if old is not None and old.untyped_storage().data_ptr() == b.phy2log.untyped_storage().data_ptr():
            old = old.clone()  # the planner's own phy2log: the kernel below rewrites it before it is read
        beyond = self.method != "greedy" or old is not None
        if beyond:
            previous = Plan(b.phy2log.clone(), b.phyrank.clone(), b.logcnt.clone())
        torch.ops.eplb_triton.rebalance_(
            weight, b.phy2log, b.phyrank, b.logcnt, b.log2phy, b.invalid, b.scratch_i, b.scratch_f,
            p.num_replicas, p.num_groups, p.num_nodes, p.num_gpus,
        )  # fmt: skip
        if beyond:
            greedy = Plan(b.phy2log.clone(), b.phyrank.clone(), b.logcnt.clone())
            # flagged layers keep their previous placement; the search and the assignments skip them
            new = pipeline.plan(
                TRITON, weight, p, method=self.method, old_phy2log=old, max_moves=max_moves, start=greedy,
                keep=(b.invalid != 0, previous),
            )  # fmt: skip
            for buf, n in zip((b.phy2log, b.phyrank, b.logcnt), new, strict=True):
                buf.copy_(n)
            log2phy_from_rank(b.phy2log, b.phyrank, cfg.num_experts, b.log2phy.shape[2], out=b.log2phy)
        return b.phy2log, b.log2phy, b.logcnt
