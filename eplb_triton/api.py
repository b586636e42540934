"""The public, drop-in API: DeepSeek's ``eplb`` functions with a ``backend=`` keyword.

Every function validates its arguments (SPEC.md "Validation"), never mutates its input, accepts
any real dtype on any device, and returns ``int64`` tensors on the input's device.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from . import cpu, reference
from ._validation import Config, check_backend, check_config, check_count, check_values, check_weight

_Arrays = tuple[np.ndarray, ...]


def _resolve_backend(backend: object, weight: torch.Tensor) -> str:
    backend = check_backend(backend)
    if backend == "auto":
        return "triton" if weight.is_cuda and _triton_available() else "cpu"
    if backend == "triton" and not (weight.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(
            "backend='triton' needs a CUDA tensor for weight (or TRITON_INTERPRET=1 set before import "
            f"to run the kernels on the CPU interpreter), got a tensor on {weight.device}"
        )
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _float32_cpu(weight: torch.Tensor) -> torch.Tensor:
    """The float32 CPU copy every CPU backend works on, after the value check."""
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    check_values(w)
    return w


def _to_device(arrays: _Arrays, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays)


def _run_cpu(
    weight: torch.Tensor, backend: str, fast: Callable[[np.ndarray], _Arrays], literal: Callable[[torch.Tensor], tuple]
) -> tuple[torch.Tensor, ...]:
    w = _float32_cpu(weight)
    if backend == "reference":
        return tuple(t.to(weight.device) for t in literal(w))
    return _to_device(fast(w.numpy()), weight.device)


def _raise_if_flagged(weight: torch.Tensor, invalid: torch.Tensor) -> None:
    """The kernels skip and flag rows with NaN, inf or negative loads: raise the CPU path's error."""
    if bool(invalid.any()):
        check_values(weight.detach().to(device="cpu", dtype=torch.float32))
        raise ValueError("weight must be finite and >= 0 in float32")  # flagged in float32 on the device


def _rebalance_triton(weight: torch.Tensor, cfg: Config):
    from .kernels import rebalance as kernels

    return kernels.rebalance(weight, cfg.num_replicas, cfg.num_groups, cfg.num_nodes, cfg.num_gpus)


def _empty(device: torch.device, *shapes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(s, dtype=torch.int64, device=device) for s in shapes)


def balanced_packing(
    weight: torch.Tensor, num_packs: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the ``n`` items of each row into ``num_packs`` packs of ``n / num_packs`` items each.

    Greedy, heaviest item first, into the least-loaded pack that is not full (SPEC.md).

    Args:
        weight: ``[X, n]`` item weights, any real dtype, finite and ``>= 0``.
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
        raise ValueError(f"number of items ({n}, weight.shape[1]) must be a multiple of num_packs ({m})")
    backend = _resolve_backend(backend, weight)
    if X == 0:
        return _empty(weight.device, (0, n), (0, n))  # type: ignore[return-value]
    if backend == "triton":
        from .kernels import rebalance as kernels

        pack, rank, invalid = kernels.balanced_packing(weight, m)
        _raise_if_flagged(weight, invalid)
        return pack, rank
    return _run_cpu(  # type: ignore[return-value]
        weight, backend, lambda w: cpu.balanced_packing(w, m), lambda w: reference.balanced_packing(w, m)
    )


def replicate_experts(
    weight: torch.Tensor, num_phy: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give ``num_phy - E`` redundant slots to the experts with the largest load per replica.

    Args:
        weight: ``[X, E]`` loads, any real dtype, finite and ``>= 0``.
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
    if R < E:
        raise ValueError(f"num_phy ({R}) must be >= the number of logical experts ({E}, weight.shape[1])")
    backend = _resolve_backend(backend, weight)
    if X == 0:
        return _empty(weight.device, (0, R), (0, R), (0, E))  # type: ignore[return-value]
    if backend == "triton":
        from .kernels import rebalance as kernels

        phy2log, rank, cnt, invalid = kernels.replicate_experts(weight, R)
        _raise_if_flagged(weight, invalid)
        return phy2log, rank, cnt
    return _run_cpu(  # type: ignore[return-value]
        weight, backend, lambda w: cpu.replicate_experts(w, R)[:3], lambda w: reference.replicate_experts(w, R)
    )


def _hierarchical(weight: torch.Tensor, cfg: Config, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """phy2log, phyrank, logcnt for an already validated ``cfg`` (global policy: G = N = 1)."""
    R, G, N, P = cfg.num_replicas, cfg.num_groups, cfg.num_nodes, cfg.num_gpus
    return _run_cpu(  # type: ignore[return-value]
        weight,
        backend,
        lambda w: cpu.rebalance_experts_hierarchical(w, R, G, N, P),
        lambda w: reference.rebalance_experts_hierarchical(w, R, G, N, P),
    )


def rebalance_experts_hierarchical(
    weight: torch.Tensor,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hierarchical policy: groups to nodes, replicas within nodes, replicas to GPUs.

    Args:
        weight: ``[num_layers, num_logical_experts]`` loads, any real dtype, finite and ``>= 0``.
        num_physical_experts: total slots ``R``, a multiple of ``num_gpus``, ``>= E``.
        num_groups: expert groups ``G`` (a divisor of ``E`` and a multiple of ``num_nodes``).
        num_nodes: server nodes ``N``.
        num_gpus: GPUs ``P``, a multiple of ``num_nodes``.
        backend: ``"auto"``, ``"cpu"``, ``"reference"`` or ``"triton"``.

    Returns:
        ``(phy2log [L, R], phyrank [L, R], logcnt [L, E])``, int64.
    """
    cfg = check_config(
        weight, num_physical_experts, num_groups, num_nodes, num_gpus,
        require_hierarchical=True, replicas_name="num_physical_experts",
    )  # fmt: skip
    backend = _resolve_backend(backend, weight)
    if cfg.num_layers == 0:
        return _empty(weight.device, (0, cfg.num_replicas), (0, cfg.num_replicas), (0, cfg.num_experts))  # type: ignore[return-value]
    if backend == "triton":
        out = _rebalance_triton(weight, cfg)
        _raise_if_flagged(weight, out.invalid)
        return out.phy2log, out.phyrank, out.logcnt
    return _hierarchical(weight, cfg, backend)


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry point of the expert-parallelism load balancer (drop-in for ``eplb.rebalance_experts``).

    Uses the hierarchical policy when ``num_groups % num_nodes == 0``, else the global policy.

    Args:
        weight: ``[num_layers, num_logical_experts]`` measured load of each expert, any real
            dtype, finite and ``>= 0``, on any device.
        num_replicas: physical expert slots ``R`` (a multiple of ``num_gpus``, ``>= E``).
        num_groups: expert groups ``G`` (must divide ``E``).
        num_nodes: server nodes ``N``; ``num_gpus`` must be a multiple of it.
        num_gpus: GPUs ``P``.
        backend: ``"auto"`` (Triton for CUDA tensors, else CPU), ``"cpu"``, ``"reference"``
            or ``"triton"``.

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
    backend = _resolve_backend(backend, weight)
    L, E, R = cfg.num_layers, cfg.num_experts, cfg.num_replicas
    if L == 0:
        return _empty(weight.device, (0, R), (0, E, 0), (0, E))  # type: ignore[return-value]
    if backend == "triton":
        out = _rebalance_triton(weight, cfg.effective())
        # The one host synchronisation of the drop-in API: X = max(logcnt), and the value check.
        width, flagged = torch.stack([out.logcnt.max(), out.invalid.max().to(torch.int64)]).tolist()
        if flagged:
            _raise_if_flagged(weight, out.invalid)
        return out.phy2log, out.log2phy[:, :, :width].contiguous(), out.logcnt
    if backend == "reference":
        w = _float32_cpu(weight)
        return tuple(  # type: ignore[return-value]
            t.to(weight.device) for t in reference.rebalance_experts(w, R, cfg.num_groups, cfg.num_nodes, cfg.num_gpus)
        )
    eff = cfg.effective()
    w = _float32_cpu(weight).numpy()
    phy2log, phyrank, logcnt = cpu.rebalance_experts_hierarchical(w, R, eff.num_groups, eff.num_nodes, eff.num_gpus)
    log2phy = cpu.log2phy_from(phy2log, phyrank, E, int(logcnt.max()))
    return _to_device((phy2log, log2phy, logcnt), weight.device)  # type: ignore[return-value]
