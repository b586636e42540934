"""Online rebalancing inside training and serving loops.

The loop that production engines run, at microsecond cost per step:

1. during the forward pass, :meth:`OnlineBalancer.record` adds each MoE layer's routed
   ``topk_ids`` to per-expert counts and maps every token to a physical replica of its expert
   (one fused Triton kernel on GPU);
2. :meth:`OnlineBalancer.step` closes the step: it rolls a window (or an EMA) of counts and, when
   due, all-reduces the window over the expert-parallel group and plans a new placement on the
   device, without host synchronisation;
3. :func:`eplb_triton.distributed.rearrange_expert_weights` moves the expert weights to match.

New placements keep every expert that stays on a GPU in the slot it already occupies
(:func:`stable_slots`), so only slots whose expert really changes need new weights.
"""

from __future__ import annotations

import os
from collections import deque

import torch
import torch.distributed as dist

from . import metrics
from ._validation import check_config, check_count, resolve_device

# ----------------------------------------------------------------------------------------------
# Recording and dispatch
# ----------------------------------------------------------------------------------------------


def _check_dispatch_args(topk_ids, log2phy, logcnt, counts) -> None:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError(
            f"topk_ids must be a 2-D tensor [num_tokens, top_k], got {getattr(topk_ids, 'shape', topk_ids)}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if log2phy.dim() != 2 or logcnt.shape != (log2phy.shape[0],) or counts.shape != logcnt.shape:
        raise ValueError(
            f"log2phy must be [E, X] with logcnt and counts [E], got {tuple(log2phy.shape)}, "
            f"{tuple(logcnt.shape)}, {tuple(counts.shape)}"
        )
    if counts.dtype != torch.int32:
        raise TypeError(f"counts must be int32, got {counts.dtype}")
    devices = {t.device for t in (topk_ids, log2phy, logcnt, counts)}
    if len(devices) != 1:
        raise ValueError(f"topk_ids, log2phy, logcnt and counts must be on one device, got {sorted(map(str, devices))}")


def record_dispatch_reference(
    topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch implementation of :func:`record_dispatch` (the kernels' oracle, and the CPU path).

    Returns ``(physical ids, number of invalid ids)``; ``counts`` is accumulated in place.
    """
    T, K = topk_ids.shape
    E = logcnt.shape[0]
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < E)
    counts += torch.bincount(ids[valid], minlength=E).to(counts.dtype)
    e = ids.clamp(0, E - 1)
    token = torch.arange(T, device=ids.device).unsqueeze(1).expand(T, K)
    phy = log2phy[e, token % logcnt[e]]
    phy = torch.where(valid, phy, torch.full_like(phy, -1)).to(topk_ids.dtype)
    return phy, (~valid).sum().to(torch.int32).view(1)


def record_dispatch(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    counts: torch.Tensor,
    *,
    invalid: torch.Tensor | None = None,
    check: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Count one layer's routed tokens per expert and map each to a physical replica.

    Token ``t``'s choice ``e`` goes to replica ``t % logcnt[e]`` of ``e``, i.e. slot
    ``log2phy[e, t % logcnt[e]]``: even and deterministic. Ids outside ``[0, E)`` are not counted
    and get slot ``-1``.

    Args:
        topk_ids: ``[num_tokens, top_k]`` int32/int64 logical expert ids.
        log2phy: ``[E, X]`` slots of each expert (``-1`` padded), e.g. one layer of a planner's.
        logcnt: ``[E]`` replicas of each expert.
        counts: ``[E]`` int32, accumulated in place.
        invalid: optional ``[1]`` int32 device counter of invalid ids, accumulated in place.
        check: raise ``ValueError`` on invalid ids (synchronises with the host).
        backend: ``"auto"`` (Triton kernel for CUDA tensors, torch otherwise), ``"triton"``, ``"torch"``.

    Returns:
        ``[num_tokens, top_k]`` physical slot ids, ``topk_ids``' dtype.
    """
    _check_dispatch_args(topk_ids, log2phy, logcnt, counts)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and topk_ids.is_cuda)
    if use_triton and not (topk_ids.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
    if invalid is None:
        invalid = torch.zeros(1, dtype=torch.int32, device=topk_ids.device)
    before = invalid.clone() if check else None
    if use_triton:
        from .kernels import dispatch

        phy = dispatch.record_dispatch(topk_ids, log2phy, logcnt, counts, invalid)
    else:
        phy, bad = record_dispatch_reference(topk_ids, log2phy, logcnt, counts)
        invalid += bad
    if check:
        n_bad = int((invalid - before).item())
        if n_bad:
            E = logcnt.shape[0]
            raise ValueError(f"topk_ids has {n_bad} ids outside [0, {E}) (they were skipped and dispatched to -1)")
    return phy


# ----------------------------------------------------------------------------------------------
# Placements that move few weights
# ----------------------------------------------------------------------------------------------


def _occurrence(keys: torch.Tensor) -> torch.Tensor:
    """For each entry of each row, how many earlier entries of the row have the same key."""
    sorted_keys, order = torch.sort(keys, dim=1, stable=True)
    first = torch.searchsorted(sorted_keys, sorted_keys, right=False)
    occ_sorted = torch.arange(keys.shape[1], device=keys.device).expand_as(keys) - first
    return torch.empty_like(keys).scatter_(1, order, occ_sorted)


def _count_in(keys: torch.Tensor, sorted_other: torch.Tensor) -> torch.Tensor:
    """How many entries of each row of ``sorted_other`` equal each key."""
    return torch.searchsorted(sorted_other, keys, right=True) - torch.searchsorted(sorted_other, keys, right=False)


def stable_slots(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Reorder the slots of ``new_phy2log`` within each GPU to keep experts where they already are.

    Each GPU keeps exactly the multiset of experts ``new_phy2log`` gives it (so every GPU load
    is unchanged); among its slots, an expert that the GPU already held stays in its old slot,
    and the experts it gains fill the freed slots in order. Vectorised, no host synchronisation.

    Args:
        old_phy2log, new_phy2log: ``[L, R]`` int64 placements.
        num_gpus: ``P``; GPU ``p`` holds slots ``p * R/P .. (p+1) * R/P - 1``.

    Returns:
        ``[L, R]`` int64, a per-GPU permutation of ``new_phy2log``.
    """
    L, R = new_phy2log.shape
    P = check_count("num_gpus", num_gpus)
    if old_phy2log.shape != new_phy2log.shape or R % P:
        raise ValueError(
            f"phy2log shapes {tuple(old_phy2log.shape)}, {tuple(new_phy2log.shape)} and num_gpus {P} mismatch"
        )
    S = R // P
    dev = new_phy2log.device
    old = old_phy2log.to(dev, torch.int64)
    gpu = (torch.arange(R, device=dev) // S).expand(L, R)
    old_key = gpu * R + old  # (GPU, expert) keys: expert ids are < E <= R
    new_key = gpu * R + new_phy2log
    sorted_old, _ = torch.sort(old_key, dim=1)
    sorted_new, _ = torch.sort(new_key, dim=1)
    # an old slot stays if its GPU still wants that many copies of its expert
    keep = _occurrence(old_key) < _count_in(old_key, sorted_new)
    # new entries beyond the copies the GPU already had are the ones to place
    surplus = _occurrence(new_key) >= _count_in(new_key, sorted_old)
    # k-th free slot of a GPU <- k-th surplus entry of that GPU (both in slot order)
    free = ~keep
    free_rank = (torch.cumsum(free.view(L, P, S).long(), dim=2) - 1).view(L, R)
    surplus_rank = (torch.cumsum(surplus.view(L, P, S).long(), dim=2) - 1).view(L, R)
    # free_slot[l, gpu * S + k] = the k-th free slot of that GPU (column R takes the others)
    index = torch.where(free, gpu * S + free_rank, torch.full_like(gpu, R))
    free_slot = torch.full((L, R + 1), R, dtype=torch.int64, device=dev)
    free_slot.scatter_(1, index, torch.arange(R, device=dev).expand(L, R))
    target = torch.where(surplus, gpu * S + surplus_rank, torch.full_like(gpu, R))
    dest = torch.where(surplus, free_slot.gather(1, target), torch.full_like(target, R))  # R: not placed
    out = torch.where(keep, old, torch.zeros_like(old))
    out = torch.cat([out, torch.zeros(L, 1, dtype=torch.int64, device=dev)], dim=1)
    out.scatter_(1, dest, torch.where(surplus, new_phy2log, torch.zeros_like(new_phy2log)))
    return out[:, :R].contiguous()


def log2phy_of(phy2log: torch.Tensor, num_experts: int, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``log2phy [L, E, width]`` of a placement, replicas numbered in slot order, ``-1`` padded."""
    L, R = phy2log.shape
    if out is None:
        out = torch.empty((L, num_experts, width), dtype=torch.int64, device=phy2log.device)
    out.fill_(-1)
    rank = _occurrence(phy2log)
    out.view(L, -1).scatter_(1, phy2log * width + rank, torch.arange(R, device=phy2log.device).expand(L, R))
    return out


# ----------------------------------------------------------------------------------------------
# The balancer
# ----------------------------------------------------------------------------------------------


class OnlineBalancer:
    """Per-step load recording and periodic rebalancing for one MoE model's expert placement.

    Args:
        num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus: the configuration
            ``L, E, R, G, N, P`` (validated as :func:`eplb_triton.rebalance_experts` does).
        window: plan on the summed counts of the last ``window`` steps (default:
            ``rebalance_interval``). Exclusive with ``ema_decay``.
        ema_decay: plan on an exponential moving average, ``ema = decay * ema + (1 - decay) * counts``
            each step, ``0 < decay < 1``.
        rebalance_interval: plan every this many steps.
        balancedness_threshold: if given, also check at every step whether a layer's balancedness
            under the current window fell below this value, and re-plan those layers at once
            (costs one all-reduce and one planning launch per step; still no host sync).
        process_group: ``torch.distributed`` group whose ranks share the placement; counts are
            summed over it before planning. Default: the default group when initialised, else none.
        device: where buffers live (default: CUDA if available, else CPU). On CUDA the planning and
            the recording are Triton kernels; on CPU, the NumPy path and torch.
        keep_slots: reorder each new placement so experts that stay on a GPU keep their slot
            (:func:`stable_slots`); fewer weights move. The GPU loads are the same either way.
        history_size: rebalances kept in :attr:`history`.
        backend: ``"auto"`` (``"triton"`` on CUDA, else ``"cpu"``), ``"triton"`` (the GPU planner
            and recording kernel; on CPU only under ``TRITON_INTERPRET=1``) or ``"cpu"`` (NumPy
            planning, torch recording).

    All state lives in static tensors updated in place: :attr:`phy2log` ``[L, R]``,
    :attr:`log2phy` ``[L, E, R - E + 1]`` (``-1`` padded), :attr:`logcnt` ``[L, E]``, the step
    counts :attr:`counts` ``[L, E]`` int32 and the window. :meth:`record` and the window roll are
    safe to capture in a CUDA graph; :meth:`step` decides on the host when to plan (a step count,
    no device read) and plans without synchronising.
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
        window: int | None = None,
        ema_decay: float | None = None,
        rebalance_interval: int = 100,
        balancedness_threshold: float | None = None,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        keep_slots: bool = True,
        history_size: int = 1000,
        backend: str = "auto",
    ):
        L = check_count("num_layers", num_layers)
        E = check_count("num_experts", num_experts)
        self.config = check_config(torch.empty((L, E), device="meta"), num_replicas, num_groups, num_nodes, num_gpus)
        self.rebalance_interval = check_count("rebalance_interval", rebalance_interval)
        if window is not None and ema_decay is not None:
            raise ValueError("give either window or ema_decay, not both")
        if ema_decay is not None:
            if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 < ema_decay < 1.0:
                raise ValueError(f"ema_decay ({ema_decay!r}) must be a number with 0 < ema_decay < 1")
            self.window = None
        else:
            self.window = check_count("window", window if window is not None else self.rebalance_interval)
        self.ema_decay = ema_decay
        if balancedness_threshold is not None and not (0.0 < float(balancedness_threshold) <= 1.0):
            raise ValueError(f"balancedness_threshold ({balancedness_threshold!r}) must be in (0, 1]")
        self.balancedness_threshold = balancedness_threshold
        self.keep_slots = bool(keep_slots)
        self.process_group = process_group
        self.device = resolve_device(device)
        if backend not in ("auto", "triton", "cpu"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'cpu', got {backend!r}")
        self.backend = ("triton" if self.device.type == "cuda" else "cpu") if backend == "auto" else backend

        R = self.config.num_replicas
        dev = self.device
        self.counts = torch.zeros((L, E), dtype=torch.int32, device=dev)
        self.invalid_ids = torch.zeros(1, dtype=torch.int32, device=dev)
        if self.window is not None:
            self._ring = torch.zeros((self.window, L, E), dtype=torch.int64, device=dev)
            self._pos = torch.zeros(1, dtype=torch.int64, device=dev)
        else:
            self._ema = torch.zeros((L, E), dtype=torch.float32, device=dev)
        self.phy2log = torch.empty((L, R), dtype=torch.int64, device=dev)
        self.logcnt = torch.empty((L, E), dtype=torch.int64, device=dev)
        self.log2phy = torch.empty((L, E, R - E + 1), dtype=torch.int64, device=dev)
        self.balancedness = torch.ones(L, dtype=torch.float64, device=dev)
        self.last_balancedness = torch.ones(L, dtype=torch.float64, device=dev)
        self.steps = 0
        self.history: deque[dict] = deque(maxlen=history_size)
        self._planner = None
        if self.backend == "triton":
            from .planner import EplbPlanner

            self._planner = EplbPlanner(L, E, R, num_groups, num_nodes, num_gpus, device=dev)
        # the placement for equal loads until the first plan
        phy2log, logcnt = self._plan(torch.ones((L, E), dtype=torch.float32, device=dev))
        self._install(phy2log, logcnt)

    # -- recording --------------------------------------------------------------------------------

    def record(self, layer: int, topk_ids: torch.Tensor, *, check: bool = False) -> torch.Tensor:
        """Count layer ``layer``'s routed ``topk_ids [tokens, top_k]`` and return their physical slots.

        Invalid ids are skipped (slot ``-1``) and counted in :attr:`invalid_ids`; ``check=True``
        raises ``ValueError`` on them instead (synchronises).
        """
        L = self.config.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
            raise ValueError(f"layer ({layer!r}) must be an int in [0, {L})")
        return record_dispatch(
            topk_ids, self.log2phy[layer], self.logcnt[layer], self.counts[layer], invalid=self.invalid_ids,
            check=check, backend="triton" if self.backend == "triton" else "torch",
        )  # fmt: skip

    # -- stepping ---------------------------------------------------------------------------------

    def window_loads(self) -> torch.Tensor:
        """This rank's loads the next plan would use: the window sum (int64) or the EMA (float32)."""
        return self._ring.sum(dim=0) if self.window is not None else self._ema.clone()

    def step(self) -> bool:
        """Close a step: roll the window with this step's counts, then plan when due.

        Returns whether a plan was computed in this step (every ``rebalance_interval`` steps; every
        step when a ``balancedness_threshold`` is set, applied only to layers below it then).
        """
        if self.window is not None:
            self._ring.index_copy_(0, self._pos, self.counts.to(torch.int64).unsqueeze(0))
            self._pos.add_(1).remainder_(self.window)
        else:
            self._ema.mul_(self.ema_decay).add_(self.counts.to(torch.float32), alpha=1.0 - self.ema_decay)
        self.counts.zero_()
        self.steps += 1
        if self.steps % self.rebalance_interval == 0:
            self.rebalance()
            return True
        if self.balancedness_threshold is not None:
            self.rebalance(only_below=self.balancedness_threshold)
            return True
        return False

    def rebalance(self, only_below: float | None = None) -> None:
        """All-reduce the window over the group and install a new placement (no host sync).

        ``only_below``: re-plan only the layers whose current balancedness is below it.
        """
        loads = self.window_loads()
        group = self._group()
        if group is not None:
            dist.all_reduce(loads, op=dist.ReduceOp.SUM, group=group)
        P = self.config.num_gpus
        old_phy2log, old_logcnt = self.phy2log.clone(), self.logcnt.clone()
        before = metrics.balancedness(metrics.gpu_loads(loads, old_phy2log, old_logcnt, P))
        phy2log, logcnt = self._plan(loads)
        if self.keep_slots:
            phy2log = stable_slots(old_phy2log, phy2log, P)
        after = metrics.balancedness(metrics.gpu_loads(loads, phy2log, logcnt, P))
        if only_below is not None:
            replan = (before < only_below).unsqueeze(1)
            phy2log = torch.where(replan, phy2log, old_phy2log)
            logcnt = torch.where(replan, logcnt, old_logcnt)
            after = torch.where(replan.squeeze(1), after, before)
        self._install(phy2log, logcnt)
        self.last_balancedness.copy_(before)
        self.balancedness.copy_(after)
        self.history.append({
            "step": self.steps,
            "before": before.mean(),
            "after": after.mean(),
            "worst_after": after.min(),
            "migrated_slots": metrics.migration_count(old_phy2log, phy2log).sum(),
        })  # fmt: skip

    def history_records(self) -> list[dict]:
        """:attr:`history` with host numbers, for logging (reads the device once per entry)."""
        return [{k: (v if isinstance(v, int) else float(v)) for k, v in h.items()} for h in self.history]

    # -- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume: configuration, step count, counts, window and placement."""
        c = self.config
        state = {
            "config": (c.num_layers, c.num_experts, c.num_replicas, c.num_groups, c.num_nodes, c.num_gpus),
            "window": self.window,
            "ema_decay": self.ema_decay,
            "steps": self.steps,
            "counts": self.counts.clone(),
            "invalid_ids": self.invalid_ids.clone(),
            "phy2log": self.phy2log.clone(),
            "logcnt": self.logcnt.clone(),
            "balancedness": self.balancedness.clone(),
            "last_balancedness": self.last_balancedness.clone(),
        }
        if self.window is not None:
            state.update(ring=self._ring.clone(), pos=self._pos.clone())
        else:
            state.update(ema=self._ema.clone())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output into this balancer's buffers, in place."""
        c = self.config
        mine = (c.num_layers, c.num_experts, c.num_replicas, c.num_groups, c.num_nodes, c.num_gpus)
        if tuple(state.get("config", ())) != mine:
            raise ValueError(f"state_dict is for configuration {state.get('config')}, this balancer has {mine}")
        if state.get("window") != self.window or state.get("ema_decay") != self.ema_decay:
            raise ValueError(
                f"state_dict has window={state.get('window')}, ema_decay={state.get('ema_decay')}; "
                f"this balancer has window={self.window}, ema_decay={self.ema_decay}"
            )
        self.steps = int(state["steps"])
        for name in ("counts", "invalid_ids", "phy2log", "logcnt", "balancedness", "last_balancedness"):
            getattr(self, name).copy_(state[name])
        if self.window is not None:
            self._ring.copy_(state["ring"])
            self._pos.copy_(state["pos"])
        else:
            self._ema.copy_(state["ema"])
        log2phy_of(self.phy2log, c.num_experts, self.log2phy.shape[2], out=self.log2phy)

    # -- internals --------------------------------------------------------------------------------

    def _group(self) -> dist.ProcessGroup | None:
        if self.process_group is not None:
            return self.process_group
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def _plan(self, loads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(phy2log, logcnt) for ``loads``: the GPU planner's buffers on CUDA, the CPU path elsewhere."""
        if self._planner is not None:
            phy2log, _, logcnt = self._planner.plan(loads)
            return phy2log, logcnt
        from .api import rebalance_experts_hierarchical

        # the policy's own pipeline: no log2phy here, _install derives it after stable_slots
        p = self.config.effective()
        phy2log, _, logcnt = rebalance_experts_hierarchical(
            loads, p.num_replicas, p.num_groups, p.num_nodes, p.num_gpus, backend="cpu"
        )
        return phy2log.to(self.device), logcnt.to(self.device)

    def _install(self, phy2log: torch.Tensor, logcnt: torch.Tensor) -> None:
        self.phy2log.copy_(phy2log)
        self.logcnt.copy_(logcnt)
        log2phy_of(self.phy2log, self.config.num_experts, self.log2phy.shape[2], out=self.log2phy)
