"""What the serving adapters share: the planning options, read from the environment or set in code,
and the call that replans from the placement in service.

Options (each adapter's ``register``/``install`` takes them as keywords; every engine process also
reads them from the environment when the adapter module is imported):

* ``method`` (``EPLB_TRITON_METHOD``): ``"greedy"`` (default, DeepSeek's algorithm) or ``"refined"``;
* ``max_moves`` (``EPLB_TRITON_MAX_MOVES``): an incremental replan from the placement in service, at
  most this many slots per layer change: an int, or a fraction of the slots in ``(0, 1]`` (``0.15``:
  15% of ``R``); default none (a full replan, relabelled to keep experts in place);
* ``min_gain`` (``EPLB_TRITON_MIN_GAIN``): a layer keeps its placement (nothing moves) unless the new
  plan lowers its largest GPU load on the measured loads by at least this fraction; default none.

These need the placement in service, every expert in it at least once. Without one (or with
empty ``-1`` slots, which an elastic scale-up leaves), the adapters plan from scratch and only keep
experts that stay on a GPU in their slot, as the engines' own policies do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .._validation import EplbArgumentError, check_max_moves, check_method, check_min_gain, moves_in_slots
from ..api import rebalance_experts

ENV = {"method": "EPLB_TRITON_METHOD", "max_moves": "EPLB_TRITON_MAX_MOVES", "min_gain": "EPLB_TRITON_MIN_GAIN"}


@dataclass(frozen=True)
class PlanOptions:
    """Validated planning options of an adapter (module docstring)."""

    method: str = "greedy"
    max_moves: int | float | None = None
    min_gain: float | None = None

    def __post_init__(self) -> None:
        check_method(self.method)
        check_min_gain(self.min_gain)
        if isinstance(self.max_moves, float):
            if not 0.0 < self.max_moves <= 1.0:
                raise EplbArgumentError(f"max_moves as a fraction of the slots must be in (0, 1], got {self.max_moves}")
        else:
            check_max_moves(self.max_moves)

    def budget(self, num_replicas: int) -> int | None:
        """``max_moves`` in slots for ``num_replicas`` slots per layer."""
        return moves_in_slots(self.max_moves, num_replicas)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> PlanOptions:
        """The options the environment sets (module docstring); a bad value raises naming the variable."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field, name in ENV.items():
            raw = env.get(name, "").strip()
            if not raw:
                continue
            try:
                if field == "method":
                    values[field] = raw
                elif field == "min_gain":
                    values[field] = float(raw)
                else:
                    values[field] = int(raw) if raw.lstrip("+-").isdigit() else float(raw)  # as --max-moves
                cls(**values)  # validates what is there so far
            except (ValueError, TypeError) as exc:
                raise EplbArgumentError(f"environment variable {name}={raw!r}: {exc}") from None
        return cls(**values)

    def replace(self, **changes: object) -> PlanOptions:
        """These options with the given ones (``None`` values leave an option as it is)."""
        current = {"method": self.method, "max_moves": self.max_moves, "min_gain": self.min_gain}
        current.update({k: v for k, v in changes.items() if v is not None})
        return PlanOptions(**current)


def full_placement(
    old: torch.Tensor | None, num_layers: int, num_experts: int, num_replicas: int
) -> torch.Tensor | None:
    """``old[:, :R]`` as int64 when it is a placement the planner can start from (every id in
    ``[0, E)``, every expert in every layer), else ``None``."""
    if old is None or old.dim() != 2 or old.shape[0] != num_layers or old.shape[1] < num_replicas:
        return None
    head = old[:, :num_replicas].to(torch.int64)
    if head.numel() == 0 or bool(((head < 0) | (head >= num_experts)).any()):
        return None
    present = torch.zeros((num_layers, num_experts), dtype=torch.bool, device=head.device).scatter_(1, head, True)
    return head if bool(present.all()) else None


def replan(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, old: torch.Tensor,
    options: PlanOptions, backend: str, active_gpus: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`eplb_triton.rebalance_experts` from the placement in service ``old [L, R]``: relabelled
    to it, incremental with ``max_moves``, gated by ``min_gain``; with ``active_gpus``, around the
    lost GPUs (the moves they force, then the budget; docs/algorithm.md 12.1)."""
    return rebalance_experts(
        weight, num_replicas, num_groups, num_nodes, num_gpus, backend=backend, method=options.method,
        old_phy2log=old.to(weight.device), max_moves=options.budget(num_replicas), min_gain=options.min_gain,
        active_gpus=active_gpus,
    )  # fmt: skip
