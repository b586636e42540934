"""Argument checks shared by every backend: docs/algorithm.md "Validation", as clear errors.

Shape and count rules are checked on the host from Python integers and tensor metadata, so
they never synchronise with a GPU. The value rule (finite, >= 0) needs to look at the data:
:func:`check_values` does that on a CPU tensor; the Triton path checks it inside the kernel.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import numpy as np
import torch

BACKENDS = ("auto", "cpu", "reference", "triton")  # the one vocabulary; eplb_triton.backends resolves it


class EplbArgumentError(ValueError, AssertionError):
    """A bad argument value. Both a ``ValueError`` and an ``AssertionError``: DeepSeek's ``eplb``
    asserts its argument rules, so callers written for it (vLLM, SGLang) catch ``AssertionError``.
    The message names the argument and the rule it broke."""


def _as_int(name: str, value: object, or_none: str = "") -> int:
    """A Python (or NumPy) integer as an ``int``; ``bool``, tensors and floats raise ``TypeError``."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python int{or_none}, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int{or_none}, got {type(value).__name__} ({value!r})") from None


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """An integer dtype: not floating point, not complex, not ``bool`` (ids, counts, placements)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_count(name: str, value: object) -> int:
    """A positive Python (or NumPy) integer; ``bool`` and floats are refused."""
    v = _as_int(name, value)
    if v <= 0:
        raise EplbArgumentError(f"{name} ({v}) must be a positive integer")
    return v


# Bounds checked before anything is allocated: the greedy is sequential over slots, and the
# outputs hold L x R int64 entries (plus log2phy). Real deployments are far below both
# (DeepSeek-V3: R = 288..320; 58..256 layers).
MAX_SLOTS_PER_LAYER = 1 << 16  # num_replicas (num_physical_experts, num_phy)
MAX_SLOTS = 1 << 27  # num_layers x num_replicas: 1 GiB per int64 output


def check_weight(weight: object, name: str = "weight") -> tuple[int, int]:
    """A 2-D real, dense, materialised tensor with at least one column; returns ``(rows, columns)``."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got a nested tensor")
    if weight.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {weight.layout}")
    if weight.is_quantized:
        raise TypeError(f"{name} must not be quantized, got {weight.dtype}")
    if weight.device.type == "meta":
        raise TypeError(f"{name} must hold data, got a tensor on the meta device")
    if weight.dtype == torch.bool or weight.is_complex():
        raise TypeError(f"{name} must have a real dtype (integer or floating point), got {weight.dtype}")
    # (dynamo cannot trace is_neg; a compiled caller's tensors are materialised by then)
    if not torch.compiler.is_compiling() and (weight.is_neg() or weight.is_conj()):
        raise TypeError(f"{name} has the lazy negation/conjugation bit set: pass weight.resolve_neg() instead")
    if weight.dim() != 2:
        raise EplbArgumentError(
            f"{name} must be 2-D [num_layers, num_logical_experts], got {weight.dim()}-D shape {tuple(weight.shape)}"
        )
    rows, cols = weight.shape
    if cols == 0:
        raise EplbArgumentError(f"{name} must have at least one expert (column), got shape {tuple(weight.shape)}")
    return rows, cols


def check_slots(name: str, num_slots: int, num_layers: int) -> None:
    """``num_slots`` per layer within :data:`MAX_SLOTS_PER_LAYER`, and ``layers x slots`` within :data:`MAX_SLOTS`."""
    if num_slots > MAX_SLOTS_PER_LAYER:
        raise EplbArgumentError(f"{name} ({num_slots}) must be <= {MAX_SLOTS_PER_LAYER} slots per layer")
    if num_layers * num_slots > MAX_SLOTS:
        raise EplbArgumentError(
            f"num_layers x {name} ({num_layers} x {num_slots}) must be <= {MAX_SLOTS} slots in all; "
            "plan the layers in smaller batches"
        )


def check_values(w32: torch.Tensor, name: str = "weight") -> None:
    """``w32`` is the float32 copy of the loads: every entry finite and >= 0."""
    bad = ~(torch.isfinite(w32) & (w32 >= 0))
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise EplbArgumentError(
            f"{name} must be finite and >= 0 in float32, found {float(w32[row, col])} at [{row}, {col}]"
        )


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch.device, CUDA by default when present; ``"cuda"`` pinned to the current index."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def select_policy(num_groups: int, num_nodes: int) -> tuple[str, int, int]:
    """The one policy rule (docs/algorithm.md): ``(label, G, N)`` of the pipeline that runs.

    ``G % N == 0`` selects the hierarchical policy; otherwise the global policy runs, which is the
    hierarchical pipeline with one group and one node. ``G = N = 1`` is that same pipeline, so it
    is labelled ``"global"`` too: the label names what runs, not what selected it.
    """
    if num_groups % num_nodes == 0 and (num_groups, num_nodes) != (1, 1):
        return "hierarchical", num_groups, num_nodes
    return "global", 1, 1


# Passes of the search for the pairing threshold T with two slots per GPU (docs/algorithm.md 13.1):
# three trial values of T per pass. Part of the definition: every backend runs exactly this many.
PAIR_PASSES = 3
REPAIR_PASSES = 8  # docs/algorithm.md 10.8: targets T tried by the count repair of a budgeted replan
REPAIR_UNIT_BITS = 32  # 10.8: excess over T counted in whole units of T / 2**32
# The local search's pair swap (docs/algorithm.md 10.2) runs with 4 to this many slots per GPU: with
# 3 it is a single swap of the other slots, and its candidates grow as S**4 (a GPU's S * (S - 1) / 2
# slot pairs against each of another GPU's).
PAIR_SWAP_MAX_SLOTS = 16
# ... and with at most this many slots per layer: the search kernel holds a layer in registers, and
# beyond 1024 slots its pair phase does not fit without spilling (ptxas of Triton 3.6 and 3.9).
PAIR_SWAP_MAX_REPLICAS = 1024


@dataclass(frozen=True)
class Config:
    """A validated placement problem: ``L`` layers of ``E`` experts on ``R`` slots, ``G`` groups,
    ``N`` nodes, ``P`` GPUs."""

    num_layers: int
    num_experts: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int

    @property
    def policy(self) -> str:
        """``"hierarchical"`` or ``"global"``: the label of the pipeline that runs (:func:`select_policy`)."""
        return select_policy(self.num_groups, self.num_nodes)[0]

    def effective(self) -> Config:
        """The configuration the hierarchical pipeline runs: the global policy is ``G = N = 1``."""
        _, G, N = select_policy(self.num_groups, self.num_nodes)
        return Config(self.num_layers, self.num_experts, self.num_replicas, G, N, self.num_gpus)


def check_config(
    weight: torch.Tensor,
    num_replicas: object,
    num_groups: object,
    num_nodes: object,
    num_gpus: object,
    *,
    require_hierarchical: bool = False,
    replicas_name: str = "num_replicas",
) -> Config:
    """Every rule (docs/algorithm.md) on shapes and counts. ``require_hierarchical`` adds ``G % N == 0``."""
    L, E = check_weight(weight)
    return _check_counts(L, E, num_replicas, num_groups, num_nodes, num_gpus, require_hierarchical, replicas_name)


def _check_counts(
    L: int, E: int, num_replicas: object, num_groups: object, num_nodes: object, num_gpus: object,
    require_hierarchical: bool = False, replicas_name: str = "num_replicas",
) -> Config:  # fmt: skip
    R = check_count(replicas_name, num_replicas)
    G = check_count("num_groups", num_groups)
    N = check_count("num_nodes", num_nodes)
    P = check_count("num_gpus", num_gpus)
    check_slots(replicas_name, R, L)
    if require_hierarchical and G % N:
        raise EplbArgumentError(f"num_groups ({G}) must be a multiple of num_nodes ({N}) for the hierarchical policy")
    # The divisibility rules of the pipeline that runs: the global policy is G = N = 1, so it
    # needs neither E % G == 0 nor P % N == 0 (as DeepSeek's eplb, which accepts those calls).
    _, G_run, N_run = select_policy(G, N)
    if E % G_run:
        raise EplbArgumentError(f"num_logical_experts ({E}, weight.shape[1]) must be a multiple of num_groups ({G})")
    if R % P:
        raise EplbArgumentError(f"{replicas_name} ({R}) must be a multiple of num_gpus ({P})")
    if P % N_run:
        raise EplbArgumentError(f"num_gpus ({P}) must be a multiple of num_nodes ({N})")
    if R < E:
        raise EplbArgumentError(f"{replicas_name} ({R}) must be >= num_logical_experts ({E}, weight.shape[1])")
    return Config(L, E, R, G, N, P)


def check_shape_config(
    num_layers: object,
    num_experts: object,
    num_replicas: object,
    num_groups: object,
    num_nodes: object,
    num_gpus: object,
) -> Config:
    """:func:`check_config` for objects built from a shape rather than a tensor (planner, balancer)."""
    L = check_count("num_layers", num_layers)
    E = check_count("num_experts", num_experts)
    return _check_counts(L, E, num_replicas, num_groups, num_nodes, num_gpus)


SPLITS = ("even", "balanced")  # per-step dispatch: docs/algorithm.md section 11


def check_split(split: object) -> str:
    """``split`` if it is one of :data:`SPLITS`."""
    if not isinstance(split, str) or split not in SPLITS:
        raise EplbArgumentError(f"split must be one of {SPLITS}, got {split!r}")
    return split


METHODS = ("greedy", "refined")  # docs/algorithm.md sections 10 and 13


def check_method(method: object) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {METHODS}, got {type(method).__name__}")
    if method not in METHODS:
        raise EplbArgumentError(f"method must be one of {METHODS}, got {method!r}")
    return method


def moves_in_slots(max_moves: int | float | None, num_replicas: int) -> int | None:
    """A ``max_moves`` given as a fraction of the slots (a float in ``(0, 1]``, as the adapters and the
    CLI accept it) in slots, at least one; an int (or ``None``) as it is."""
    if isinstance(max_moves, float):
        return max(1, round(max_moves * num_replicas))
    return max_moves


def check_max_moves(max_moves: object) -> int | None:
    """``None`` or a non-negative Python int (``bool`` and floats refused)."""
    if max_moves is None:
        return None
    value = _as_int("max_moves", max_moves, " or None")
    if value < 0:
        raise EplbArgumentError(f"max_moves ({value}) must be >= 0")
    return min(value, MAX_SLOTS_PER_LAYER)  # more than every slot means no limit


def check_min_gain(min_gain: object, name: str = "min_gain") -> float | None:
    """``None`` or a number with ``0 <= min_gain < 1`` (a relative gain of the largest GPU load)."""
    if min_gain is None:
        return None
    if isinstance(min_gain, (bool, np.bool_)) or not isinstance(min_gain, numbers.Real):
        raise TypeError(f"{name} must be a number or None, got {type(min_gain).__name__}")
    if not 0.0 <= float(min_gain) < 1.0:
        raise EplbArgumentError(f"{name} ({min_gain!r}) must satisfy 0 <= {name} < 1")
    return float(min_gain)


def check_active_gpus(active_gpus: object, cfg: Config) -> list[int] | None:
    """The live GPUs of ``active_gpus`` (``[P]`` bools, or 0/1) as increasing ids, or ``None`` when all
    are live. Every problem must keep enough slots: the global policy ``S x live >= E``, the
    hierarchical one ``S x live(node) >= E / N`` on every node."""
    if active_gpus is None:
        return None
    if isinstance(active_gpus, (torch.Tensor, np.ndarray)):  # 1-D only: a [P, 1] mask is a shape error
        values = active_gpus.tolist() if active_gpus.ndim == 1 else None
    elif isinstance(active_gpus, (list, tuple)):
        values = list(active_gpus)
    else:
        raise TypeError(f"active_gpus must be a 1-D tensor, array or list of bools, got {type(active_gpus).__name__}")
    P, E, R = cfg.num_gpus, cfg.num_experts, cfg.num_replicas
    if values is None or len(values) != P:
        shape = list(active_gpus.shape) if values is None else [len(values)]
        raise EplbArgumentError(f"active_gpus must have one entry per GPU (num_gpus={P}), got shape {shape}")
    if not all(v in (0, 1) and not isinstance(v, float) for v in values):
        raise EplbArgumentError("active_gpus entries must be booleans (or 0/1)")
    live = [g for g, v in enumerate(values) if v]
    if len(live) == P:
        return None
    if not live:
        raise EplbArgumentError("active_gpus marks every GPU lost: nothing can hold the experts")
    S = R // P
    _, G, N = select_policy(cfg.num_groups, cfg.num_nodes)
    Pn = P // N
    for n in range(N):
        mine = sum(1 for g in live if g // Pn == n)
        needed, what = (E // N, f"node {n}'s {G // N} expert groups") if N > 1 else (E, "the experts")
        if S * mine < needed:
            raise EplbArgumentError(
                f"active_gpus leaves {S * mine} slots ({mine} live GPUs x {S}) for {what} ({needed}); "
                "every expert needs a slot on a live GPU" + ("" if N == 1 else " of its node")
            )
    return live


def check_placement(
    value: object, name: str, cfg: Config, device: torch.device, *, check_data: bool = True, allow_empty: bool = False
) -> torch.Tensor:
    """``value`` as an int64 ``[L, R]`` tensor on ``device``: integers in ``[0, E)`` holding every
    expert in every layer. ``check_data=False`` skips the rules that read the values (no host
    synchronisation). ``allow_empty``: also ``-1`` (an empty slot, as a plan around lost GPUs
    leaves), and experts may be missing (a placement only relabelled to)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (or numpy array / nested list), got {type(value).__name__}")
    if not is_integer_dtype(value.dtype):
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    L, E, R = cfg.num_layers, cfg.num_experts, cfg.num_replicas
    if tuple(value.shape) != (L, R):
        raise EplbArgumentError(
            f"{name} must have shape [num_layers, num_replicas] = {[L, R]}, got {list(value.shape)}"
        )
    out = value.to(device=device, dtype=torch.int64)
    if check_data and out.numel():
        low, high = (int(v) for v in torch.stack([out.min(), out.max()]).tolist())
        if allow_empty:
            if low < -1 or high >= E:
                raise EplbArgumentError(
                    f"{name} must hold expert ids in [0, {E}) or -1 (an empty slot), found {low if low < -1 else high}"
                )
            return out
        if low == -1 and high < E:
            raise EplbArgumentError(
                f"{name} has empty slots (-1): a plan around lost GPUs is kept (max_moves, min_gain) only with "
                "active_gpus, which refills them; without it, it can only be relabelled to"
            )
        if low < 0 or high >= E:
            raise EplbArgumentError(f"{name} must hold expert ids in [0, {E}), found {low if low < 0 else high}")
        present = torch.zeros((L, E), dtype=torch.bool, device=device).scatter_(1, out, True)
        if not bool(present.all()):
            layer, expert = (int(i) for i in (~present).nonzero()[0])
            raise EplbArgumentError(
                f"{name} must hold every expert in every layer: expert {expert} is missing from layer {layer}"
            )
    return out


def check_old_placement(
    old_phy2log: object, max_moves: object, cfg: Config, device: torch.device, *, check_data: bool = True,
    allow_empty: bool = False,
) -> tuple[torch.Tensor | None, int | None]:  # fmt: skip
    """``old_phy2log`` as an int64 tensor on ``device`` (or ``None``) and ``max_moves`` as an int (or ``None``).

    ``old_phy2log`` must be ``[L, R]`` of integers in ``[0, E)`` holding every expert in every
    layer (:func:`check_placement`); ``max_moves`` a non-negative int and only with ``old_phy2log``.
    ``check_data=False`` skips the rules that read the values (no host synchronisation; the
    planner's hot path). ``allow_empty``: see :func:`check_placement`.
    """
    max_moves = check_max_moves(max_moves)
    if max_moves is not None and old_phy2log is None:
        raise EplbArgumentError("max_moves needs old_phy2log: the budget counts slots that differ from it")
    if old_phy2log is None:
        return None, None
    out = check_placement(old_phy2log, "old_phy2log", cfg, device, check_data=check_data, allow_empty=allow_empty)
    return out, max_moves
