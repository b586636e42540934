"""Per-step load recording fused with token dispatch: the first job of the online loop.

:func:`record_dispatch` adds one MoE layer's routed ``topk_ids`` to per-expert counts and maps each
token to a physical replica of its expert; on CUDA it is one Triton kernel
(:mod:`eplb_triton.kernels.dispatch`), elsewhere :func:`eplb_triton.reference.record_dispatch` (torch).
"""

from __future__ import annotations

import torch

from . import backends
from ._validation import EplbArgumentError, check_count, check_split, is_integer_dtype


def _check_topk_ids(topk_ids) -> None:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise EplbArgumentError(
            f"topk_ids must be a 2-D tensor [num_tokens, top_k], got {getattr(topk_ids, 'shape', topk_ids)}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")


def _check_dispatch_args(topk_ids, log2phy, logcnt, counts) -> None:
    _check_topk_ids(topk_ids)
    if log2phy.dim() != 2 or logcnt.shape != (log2phy.shape[0],) or counts.shape != logcnt.shape:
        raise EplbArgumentError(
            f"log2phy must be [E, X] with logcnt and counts [E], got {tuple(log2phy.shape)}, "
            f"{tuple(logcnt.shape)}, {tuple(counts.shape)}"
        )
    if counts.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"counts must be int64 (or int32, which wraps past 2**31 - 1), got {counts.dtype}")
    for name, t in (("log2phy", log2phy), ("logcnt", logcnt)):
        if not is_integer_dtype(t.dtype):
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    devices = {t.device for t in (topk_ids, log2phy, logcnt, counts)}
    if len(devices) != 1:
        raise EplbArgumentError(
            f"topk_ids, log2phy, logcnt and counts must be on one device, got {sorted(map(str, devices))}"
        )


def _int_vector(name: str, t: object, E: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not is_integer_dtype(t.dtype):
        raise TypeError(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != (E,):
        raise EplbArgumentError(f"{name} must have shape [num_experts={E}], got {list(t.shape)}")
    if t.device != device:
        raise EplbArgumentError(f"{name} must be on topk_ids' device {device}, got {t.device}")
    return t.long()


def _split_dispatch(
    served: backends.Backend, topk_ids: torch.Tensor, phy2log: torch.Tensor, log2phy: torch.Tensor,
    logcnt: torch.Tensor, num_gpus: int, local: torch.Tensor, group_counts: torch.Tensor | None,
    offsets: torch.Tensor | None, check: bool, counts_name: str = "counts",
) -> torch.Tensor:  # fmt: skip
    """The balanced split of the step's counts (``group_counts``, or this batch's ``local``) and the
    assignment of this batch's entries (numbered from ``offsets``) to slots by its quotas."""
    totals = local if group_counts is None else group_counts
    if group_counts is not None and (check or topk_ids.device.type == "cpu"):  # free on the host
        need = local + (0 if offsets is None else offsets)
        short = torch.nonzero(totals < need).flatten()
        if short.numel():
            e = int(short[0])
            raise EplbArgumentError(
                f"{counts_name}[{e}] ({int(totals[e])}) must be >= this batch's entries of expert {e} "
                f"({int(local[e])}) plus offsets[{e}] ({int(need[e] - local[e])}): {counts_name} are the "
                "step's totals"
            )
    quota = served.split(totals[None], phy2log.view(1, -1), num_gpus, log2phy.shape[1])[0]
    return served.fill(topk_ids, quota, log2phy, logcnt, offsets).to(topk_ids.dtype)


def dispatch(
    topk_ids: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    *,
    split: str = "balanced",
    counts: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    num_experts: int | None = None,
    check: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Map one layer's routed entries to physical slots, splitting each expert's tokens of this
    step among its replicas so that the largest GPU load is as small as it can be.

    ``split="balanced"`` (docs/algorithm.md section 11): the quotas of the slots are the balanced
    split of the step's counts over the placement: integer, exactly optimal (the largest GPU load
    is the smallest any integer split reaches, ``ceil`` of the linear program's), deterministic;
    then the entries of expert ``e``, in row-major order, fill its replicas in slot order by those
    quotas. ``split="even"``: token ``t``'s choice ``e`` goes to replica ``t % logcnt[e]``, the rule
    of :func:`record_dispatch`. Replicas are numbered in slot order.

    Across ranks, each rank dispatches its own tokens: pass the group's counts of the step
    (``counts``, e.g. an all-reduce of every rank's ``bincount``) and the entries of each expert on
    the ranks before this one (``offsets``), so that the group's totals per slot match the split
    (:class:`eplb_triton.OnlineBalancer` does this with one all-gather of ``[E]`` counts per layer).

    Args:
        topk_ids: ``[T, k]`` int32/int64 logical expert ids; ids outside ``[0, E)`` get slot ``-1``.
        phy2log: ``[R]`` integer placement of the layer (every expert in ``[0, E)`` with a slot).
        num_gpus: ``P``; slot ``q`` lives on GPU ``q // (R / P)``.
        split: ``"balanced"`` or ``"even"``.
        counts: ``[E]`` the step's counts per expert over the whole group (default: ``topk_ids``' own).
            Must be at least this batch's entries plus ``offsets`` (checked on the CPU, and with
            ``check`` on a GPU).
        offsets: ``[E]`` entries of each expert that come before this batch's (default: none).
        num_experts: ``E`` (default: ``counts``' length, else ``max(phy2log) + 1``, a host read).
        check: raise on ids outside ``[0, E)`` and on ``counts`` too small (synchronises on a GPU).
        backend: ``"auto"`` (Triton for CUDA tensors: the split kernel and torch, no host
            synchronisation), ``"triton"``, ``"cpu"`` (NumPy) or ``"reference"`` (literal).

    Returns:
        ``[T, k]`` slots in ``topk_ids``' dtype. Identical on every backend.

    Example:
        >>> dispatch(torch.tensor([[0], [0], [0], [1]]), torch.tensor([0, 1, 0, 2]), 2, num_experts=3).tolist()
        [[0], [2], [2], [1]]
    """
    _check_topk_ids(topk_ids)
    if not isinstance(phy2log, torch.Tensor) or phy2log.dtype.is_floating_point or phy2log.dtype == torch.bool:
        raise TypeError(f"phy2log must be an integer tensor, got {getattr(phy2log, 'dtype', type(phy2log).__name__)}")
    if phy2log.dim() != 1 or phy2log.numel() == 0:
        raise EplbArgumentError(f"phy2log must be 1-D [num_replicas] (one layer), got {list(phy2log.shape)}")
    if phy2log.device != topk_ids.device:
        raise EplbArgumentError(f"phy2log must be on topk_ids' device {topk_ids.device}, got {phy2log.device}")
    R = phy2log.numel()
    P = check_count("num_gpus", num_gpus)
    if R % P:
        raise EplbArgumentError(f"num_replicas ({R}, phy2log.shape[0]) must be a multiple of num_gpus ({P})")
    split = check_split(split)
    if num_experts is not None:
        E = check_count("num_experts", num_experts)
    elif counts is not None and isinstance(counts, torch.Tensor) and counts.dim() == 1:
        E = counts.shape[0]
    else:
        E = int(phy2log.max()) + 1
    dev = topk_ids.device
    group_counts = None if counts is None else _int_vector("counts", counts, E, dev)
    offsets = None if offsets is None else _int_vector("offsets", offsets, E, dev)
    served = backends.resolve(backend, dev)
    phy2log = phy2log.long()
    if check or dev.type == "cpu":  # a host read: free on the CPU
        low, high = (int(v) for v in torch.stack([phy2log.min(), phy2log.max()]).tolist())
        present = torch.zeros(E, dtype=torch.bool, device=dev).scatter_(0, phy2log.clamp(0, E - 1), True)
        if low < 0 or high >= E or not bool(present.all()):
            raise EplbArgumentError(f"phy2log must hold expert ids in [0, {E}) and every expert at least once")
    plan = served.slot_order(phy2log.view(1, -1), E)
    width = int(plan.logcnt.max()) if served.host_reads_are_free else R - E + 1  # the most replicas of one expert
    log2phy = served.log2phy(plan, width)[0]
    logcnt = plan.logcnt[0]
    if split == "even":  # the record counts the invalid ids itself: no separate count
        scratch = torch.zeros(E, dtype=torch.int64, device=dev)
        invalid = torch.zeros(1, dtype=torch.int64, device=dev)
        slots = served.record(topk_ids, log2phy, logcnt, scratch, invalid)
        if check and int(invalid):
            raise EplbArgumentError(f"topk_ids has {int(invalid)} ids outside [0, {E})")
        return slots
    local, bad = served.count(topk_ids, E)
    if check and int(bad):
        raise EplbArgumentError(f"topk_ids has {int(bad)} ids outside [0, {E})")
    return _split_dispatch(served, topk_ids, phy2log, log2phy, logcnt, P, local, group_counts, offsets, check)


def record_dispatch(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    counts: torch.Tensor,
    *,
    invalid: torch.Tensor | None = None,
    check: bool = False,
    backend: str = "auto",
    split: str = "even",
    phy2log: torch.Tensor | None = None,
    num_gpus: int | None = None,
    group_counts: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Count one layer's routed tokens per expert and map each to a physical replica.

    ``split="even"``: token ``t``'s choice ``e`` goes to replica ``t % logcnt[e]`` of ``e``, i.e.
    slot ``log2phy[e, t % logcnt[e]]``: even and deterministic. ``split="balanced"``: the step's
    counts are split among the replicas so that the largest GPU load is as small as it can be, and
    the entries fill the replicas (in ``log2phy`` order) by those quotas (:func:`dispatch`; needs
    the layer's ``phy2log`` and ``num_gpus``, and across ranks ``group_counts`` and ``offsets``).
    Ids outside ``[0, E)`` are not counted and get slot ``-1``.

    Args:
        topk_ids: ``[num_tokens, top_k]`` int32/int64 logical expert ids.
        log2phy: ``[E, X]`` slots of each expert (``-1`` padded), e.g. one layer of a planner's.
        logcnt: ``[E]`` replicas of each expert.
        counts: ``[E]`` int64, accumulated in place (int32 is accepted and wraps past ``2**31 - 1``).
        invalid: optional ``[1]`` int64 (or int32) device counter of invalid ids, accumulated in place.
        check: raise ``ValueError`` on invalid ids and on an expert without a replica
            (``logcnt < 1``) (synchronises with the host; on the CPU ``logcnt`` is checked always).
        backend: ``"auto"`` (the Triton kernel for CUDA tensors, else torch), ``"triton"``, or
            ``"cpu"`` / ``"reference"`` (both: :func:`eplb_triton.reference.record_dispatch`, torch on
            any device).
        split: ``"even"`` (the default) or ``"balanced"``.
        phy2log: ``[R]`` the layer's placement (``split="balanced"``).
        num_gpus: ``P`` (``split="balanced"``).
        group_counts, offsets: ``[E]`` as ``counts`` and ``offsets`` of :func:`dispatch`.

    Returns:
        ``[num_tokens, top_k]`` physical slot ids, ``topk_ids``' dtype.
    """
    return _record_dispatch(
        topk_ids, log2phy, logcnt, counts, invalid=invalid, check=check, backend=backend, split=split,
        phy2log=phy2log, num_gpus=num_gpus, group_counts=group_counts, offsets=offsets,
    )  # fmt: skip


def _record_dispatch(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    counts: torch.Tensor,
    *,
    invalid: torch.Tensor | None,
    check: bool,
    backend: str,
    split: str,
    phy2log: torch.Tensor | None,
    num_gpus: int | None,
    group_counts: torch.Tensor | None,
    offsets: torch.Tensor | None,
    counted: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`record_dispatch`; ``counted``: this batch's ``(counts [E], invalid ids)`` when the caller
    has them already (``OnlineBalancer.record`` counts them for the all-gather), else counted here."""
    _check_dispatch_args(topk_ids, log2phy, logcnt, counts)
    if (check or topk_ids.device.type == "cpu") and logcnt.numel() and int(logcnt.min()) < 1:  # free on the host
        e = int(torch.argmin(logcnt))
        raise EplbArgumentError(f"logcnt[{e}] ({int(logcnt[e])}) must be >= 1: every expert needs a replica")
    split = check_split(split)
    served = backends.resolve(backend, topk_ids.device)
    if invalid is None:
        invalid = torch.zeros(1, dtype=torch.int64, device=topk_ids.device)
    before = invalid.clone() if check else None
    if split == "even":
        phy = served.record(topk_ids, log2phy, logcnt, counts, invalid)
    else:
        E, dev = logcnt.shape[0], topk_ids.device
        if phy2log is None or num_gpus is None:
            raise EplbArgumentError("split='balanced' needs the layer's phy2log and num_gpus")
        if not isinstance(phy2log, torch.Tensor) or phy2log.dim() != 1 or phy2log.device != dev:
            raise EplbArgumentError(f"phy2log must be the layer's [num_replicas] placement on {dev}")
        if not is_integer_dtype(phy2log.dtype):
            raise TypeError(f"phy2log must be an integer tensor, got {phy2log.dtype}")
        P = check_count("num_gpus", num_gpus)
        if phy2log.numel() % P:
            raise EplbArgumentError(f"num_replicas ({phy2log.numel()}) must be a multiple of num_gpus ({P})")
        totals = None if group_counts is None else _int_vector("group_counts", group_counts, E, dev)
        offsets = None if offsets is None else _int_vector("offsets", offsets, E, dev)
        local, bad = served.count(topk_ids, E) if counted is None else counted
        counts += local.to(counts.dtype)
        invalid += bad.to(invalid.dtype)
        phy = _split_dispatch(
            served, topk_ids, phy2log.long(), log2phy, logcnt, P, local, totals, offsets, check, "group_counts"
        )  # fmt: skip
    if check:
        n_bad = int((invalid - before).item())
        if n_bad:
            E = logcnt.shape[0]
            raise EplbArgumentError(
                f"topk_ids has {n_bad} ids outside [0, {E}) (they were skipped and dispatched to -1)"
            )
    return phy
