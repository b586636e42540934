"""The online balancer: windowed load statistics and periodic, sync-free re-planning.

The loop that production engines run, at microsecond cost per step:

1. during the forward pass, :meth:`OnlineBalancer.record` adds each MoE layer's routed
   ``topk_ids`` to per-expert counts and maps every token to a physical replica of its expert
   (:mod:`eplb_triton.recording`; one fused Triton kernel on GPU);
2. :meth:`OnlineBalancer.step` closes the step: it rolls a window (or an EMA) of counts and, when
   due, all-reduces the window over the expert-parallel group and plans a new placement on the
   device, without host synchronisation;
3. :func:`eplb_triton.distributed.rearrange_expert_weights` moves the expert weights to match.

New placements keep every expert that stays on a GPU in the slot it already occupies
(:func:`eplb_triton.placement.stable_slots`), so only slots whose expert really changes need new
weights.
"""

from __future__ import annotations

import numbers
from collections import deque

import numpy as np
import torch
import torch.distributed as dist

from . import backends, metrics, pipeline
from ._validation import (
    EplbArgumentError,
    check_count,
    check_max_moves,
    check_method,
    check_placement,
    check_shape_config,
    check_split,
    is_integer_dtype,
    resolve_device,
)
from .backends import Plan
from .distributed import check_ranks_agree
from .launch import log2phy_width
from .placement import occurrence, replica_counts
from .recording import _record_dispatch, record_dispatch

# torch 2.13 deprecates all_gather_into_tensor for all_gather_single (same arguments); older torch
# (the floor, 2.11 on the GPU machines) has only the former.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
            under the current window fell below this value, and re-plan those layers early. A
            layer re-plans early only when its window holds at least ``min_window`` steps and the
            new plan passes the ``min_gain`` gate. Costs one all-reduce of the window and one host
            read of the per-layer verdict per step; a planning launch only when a layer is below.
        min_window: steps the window (or the EMA) must hold before an early re-plan (default: the
            full ``window``; with ``ema_decay``, ``rebalance_interval``).
        split: how :meth:`record` splits each expert's tokens of a step among its replicas:
            ``"even"`` (token ``t``'s choice ``e`` to replica ``t % logcnt[e]``) or ``"balanced"``
            (the split that makes the step's largest GPU load as small as it can be,
            :func:`eplb_triton.dispatch`). With a process group, ``"balanced"`` costs one all-gather
            of ``[world, E]`` int64 counts per layer per step (``8 * world * E`` bytes received per
            rank, e.g. 16 KiB for 8 ranks and 256 experts), so that every rank splits by the group's
            counts and its entries take their place after the lower ranks'.
        initial_phy2log: ``[L, R]`` the placement the model's expert weights were built in, e.g.
            :func:`eplb_triton.initial_placement` (slot ``q`` holds expert ``q % E``); replicas are
            numbered in slot order. Default: the greedy placement for equal loads, which the
            weights must then be laid out in.
        min_gain: a layer takes a new plan (early or periodic) only when it lowers the layer's
            largest GPU load on the window by at least this fraction (default 0.01: a re-plan costs
            weight transfers); otherwise it keeps its placement and nothing moves. ``0`` takes
            every plan that is strictly better.
        process_group: ``torch.distributed`` group whose ranks share the placement; counts are
            summed over it before planning. Default: the default group when initialised, else none.
        device: where buffers live (default: CUDA if available, else CPU). On CUDA the planning and
            the recording are Triton kernels; on CPU, the NumPy path and torch.
        keep_slots: reorder each new placement so experts that stay on a GPU keep their slot
            (:func:`stable_slots`); fewer weights move. The GPU loads are the same either way.
        history_size: rebalances kept in :attr:`history`.
        check_agreement: when a process group is in use, check with one all-gather of a digest that
            every rank computed the same plan before installing it (every rank raises the same
            ``ValueError`` otherwise, and the previous placement stays). This reads the plan on the
            host: one synchronisation per plan. Planning is deterministic, so ranks disagree only
            after a fault (a rank that skipped a step, a corrupted checkpoint); ``False`` skips it.
        backend: one of :data:`eplb_triton.backends.BACKENDS`: ``"auto"`` (``"triton"`` on CUDA,
            else ``"cpu"``), ``"triton"`` (the sync-free GPU planner and the recording kernel; on
            CPU only under ``TRITON_INTERPRET=1``), ``"cpu"`` (NumPy planning, torch recording) or
            ``"reference"`` (the literal planner, torch recording).
        method: ``"greedy"`` or ``"refined"`` (docs/algorithm.md section 10). With ``"refined"``
            (and ``keep_slots``) each plan is relabelled to the current placement by the exact
            node/GPU assignment, not only slot-stable within GPUs.
        max_moves: if given, every plan is an incremental replan from the current placement:
            at most this many slots per layer change (docs/algorithm.md 10.4); it uses the
            current placement whatever ``keep_slots`` says.

    All state lives in static tensors updated in place: :attr:`phy2log` ``[L, R]``,
    :attr:`phyrank` ``[L, R]``, :attr:`log2phy` ``[L, E, R - E + 1]`` (``-1`` padded),
    :attr:`logcnt` ``[L, E]``, the step counts :attr:`counts` ``[L, E]`` and the window (int64, or
    a float64 EMA); no counter wraps below ``2**63 - 1`` tokens per expert. :attr:`invalid_ids`
    ``[1]`` int64 counts the skipped ids since construction or the last checkpoint load (zero it
    to reset). :attr:`last_replanned` ``[L]`` bool marks the layers whose placement the last
    :meth:`step` changed. :meth:`record` and the window roll are safe to capture in a CUDA graph;
    :meth:`step` decides on the host when to plan (a step count, no device read) and plans without
    synchronising (but for ``check_agreement``).
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
        check_agreement: bool = True,
        method: str = "greedy",
        max_moves: int | None = None,
        min_window: int | None = None,
        min_gain: float = 0.01,
        initial_phy2log: torch.Tensor | None = None,
        split: str = "even",
    ):
        self.config = check_shape_config(num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus)
        L, E = self.config.num_layers, self.config.num_experts
        self.rebalance_interval = check_count("rebalance_interval", rebalance_interval)
        if window is not None and ema_decay is not None:
            raise EplbArgumentError("give either window or ema_decay, not both")
        if ema_decay is not None:
            if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 < ema_decay < 1.0:
                raise EplbArgumentError(f"ema_decay ({ema_decay!r}) must be a number with 0 < ema_decay < 1")
            self.window = None
        else:
            self.window = check_count("window", window if window is not None else self.rebalance_interval)
        self.ema_decay = ema_decay
        if balancedness_threshold is not None:
            b = balancedness_threshold
            if isinstance(b, (bool, np.bool_)) or not isinstance(b, numbers.Real):
                raise TypeError(f"balancedness_threshold must be a number or None, got {type(b).__name__}")
            if not 0.0 < b <= 1.0:
                raise EplbArgumentError(f"balancedness_threshold ({b!r}) must be in (0, 1]")
            balancedness_threshold = float(b)
        self.balancedness_threshold = balancedness_threshold
        horizon = self.window if self.window is not None else self.rebalance_interval
        self.min_window = horizon if min_window is None else check_count("min_window", min_window)
        if self.window is not None and self.min_window > self.window:
            raise EplbArgumentError(f"min_window ({self.min_window}) must be <= window ({self.window})")
        if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0.0 <= min_gain < 1.0:
            raise EplbArgumentError(f"min_gain ({min_gain!r}) must be a number with 0 <= min_gain < 1")
        self.min_gain = float(min_gain)
        self.split = check_split(split)
        self.keep_slots = bool(keep_slots)
        self.process_group = process_group
        self.check_agreement = bool(check_agreement)
        self.device = resolve_device(device)
        self._backend = backends.resolve(backend, self.device, experts=E, replicas=self.config.num_replicas)
        self.backend = self._backend.name
        self.method = check_method(method)
        self.max_moves = check_max_moves(max_moves)

        R = self.config.num_replicas
        dev = self.device
        # int64 wherever counts accumulate: a step's counts, the invalid-id counter, the window
        self.counts = torch.zeros((L, E), dtype=torch.int64, device=dev)
        self.invalid_ids = torch.zeros(1, dtype=torch.int64, device=dev)
        if self.window is not None:
            self._ring = torch.zeros((self.window, L, E), dtype=torch.int64, device=dev)
            self._pos = torch.zeros(1, dtype=torch.int64, device=dev)
        else:
            self._ema = torch.zeros((L, E), dtype=torch.float64, device=dev)
        self.phy2log = torch.empty((L, R), dtype=torch.int64, device=dev)
        self.phyrank = torch.empty((L, R), dtype=torch.int64, device=dev)
        self.logcnt = torch.empty((L, E), dtype=torch.int64, device=dev)
        self.width = log2phy_width(E, R)
        self.log2phy = torch.empty((L, E, self.width), dtype=torch.int64, device=dev)
        self.balancedness = torch.ones(L, dtype=torch.float64, device=dev)
        self.last_balancedness = torch.ones(L, dtype=torch.float64, device=dev)
        self.last_replanned = torch.zeros(L, dtype=torch.bool, device=dev)
        self.steps = 0
        if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 0:
            raise EplbArgumentError(f"history_size ({history_size!r}) must be an int >= 0")
        self.history: deque[dict] = deque(maxlen=history_size)
        if initial_phy2log is not None:  # the layout the model's weights were built in
            phy2log = check_placement(initial_phy2log, "initial_phy2log", self.config, dev)
            self._install(self._backend.slot_order(phy2log, E))
        else:  # the greedy placement for equal loads
            equal = torch.ones((L, E), dtype=torch.float32, device=dev)
            self._install(pipeline.plan(self._backend, equal, self.config.effective(), validate=False))

    # -- recording --------------------------------------------------------------------------------

    def record(self, layer: int, topk_ids: torch.Tensor, *, check: bool = False) -> torch.Tensor:
        """Count layer ``layer``'s routed ``topk_ids [tokens, top_k]`` and return their physical slots.

        Invalid ids are skipped (slot ``-1``) and counted in :attr:`invalid_ids`; ``check=True``
        raises ``ValueError`` on them instead (synchronises).
        """
        L = self.config.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
            raise EplbArgumentError(f"layer ({layer!r}) must be an int in [0, {L})")
        args = (topk_ids, self.log2phy[layer], self.logcnt[layer], self.counts[layer])
        if self.split == "even":
            return record_dispatch(*args, invalid=self.invalid_ids, check=check, backend=self.backend)
        totals = offsets = counted = None
        group = self._group()
        if group is not None:  # the step's counts over the group, and the entries of the ranks before this one
            E = self.config.num_experts
            counted = local, _ = self._backend.count(topk_ids, E)  # counted once: the record reuses it
            gathered = torch.empty(dist.get_world_size(group) * E, dtype=torch.int64, device=local.device)
            _all_gather_single(gathered, local, group=group)
            gathered = gathered.view(-1, E)
            totals = gathered.sum(dim=0)
            offsets = gathered[: dist.get_rank(group)].sum(dim=0)
        return _record_dispatch(
            *args, invalid=self.invalid_ids, check=check, backend=self.backend, split="balanced",
            phy2log=self.phy2log[layer], num_gpus=self.config.num_gpus, group_counts=totals, offsets=offsets,
            counted=counted,
        )  # fmt: skip

    # -- stepping ---------------------------------------------------------------------------------

    def window_loads(self) -> torch.Tensor:
        """This rank's loads the next plan would use: the window sum (int64) or the EMA (float64)."""
        return self._ring.sum(dim=0) if self.window is not None else self._ema.clone()

    @property
    def window_steps(self) -> int:
        """Steps the window holds (at most ``window``), or the steps the EMA has seen."""
        return self.steps if self.window is None else min(self.steps, self.window)

    def step(self) -> bool:
        """Close a step: roll the window with this step's counts, then plan when due.

        A plan is due every ``rebalance_interval`` steps; with a ``balancedness_threshold``, also at
        any step where the window holds ``min_window`` steps and some layer is below the threshold
        (only those layers are re-planned then). Every plan passes the ``min_gain`` gate per layer.

        Returns:
            Whether some layer's placement changed (then move the weights); the layers are in
            :attr:`last_replanned`. Reading that verdict is one host synchronisation per plan.
        """
        if self.window is not None:
            self._ring.index_copy_(0, self._pos, self.counts.unsqueeze(0))
            self._pos.add_(1).remainder_(self.window)
        else:
            self._ema.mul_(self.ema_decay).add_(self.counts.to(torch.float64), alpha=1.0 - self.ema_decay)
        self.counts.zero_()
        self.steps += 1
        self.last_replanned.zero_()
        if self.steps % self.rebalance_interval == 0:
            return bool(self.rebalance().any())
        if self.balancedness_threshold is not None and self.window_steps >= self.min_window:
            return bool(self.rebalance(only_below=self.balancedness_threshold).any())
        return False

    def rebalance(self, only_below: float | None = None) -> torch.Tensor:
        """All-reduce the window over the group, plan, and install the plan where it pays.

        A layer takes the new plan when it lowers the layer's largest GPU load on the window by at
        least ``min_gain`` (relative); with ``only_below``, only layers whose current balancedness
        is below it are considered, and nothing is planned (one host read) when none is.

        Returns:
            ``[L]`` bool on the device: the layers whose placement changed (also :attr:`last_replanned`).
        """
        loads = self.window_loads()
        group = self._group()
        if group is not None:
            dist.all_reduce(loads, op=dist.ReduceOp.SUM, group=group)
        P = self.config.num_gpus
        old = Plan(self.phy2log.clone(), self.phyrank.clone(), self.logcnt.clone())
        old_loads = metrics.gpu_loads(loads, old.phy2log, old.logcnt, P, check_ids=False)
        before = metrics.balancedness(old_loads)
        keep = None
        candidates = torch.ones_like(before, dtype=torch.bool)
        if only_below is not None:
            candidates = before < only_below
            if not bool(candidates.any()):
                return self.last_replanned.zero_()
            keep = (~candidates, old)  # the other layers are neither searched nor relabelled
        new = self._plan(loads, old, keep)
        new_loads = metrics.gpu_loads(loads, new.phy2log, new.logcnt, P, check_ids=False)
        take = candidates & pipeline.gain_of_peaks(old_loads.amax(dim=1), new_loads.amax(dim=1), self.min_gain)
        after = torch.where(take, metrics.balancedness(new_loads), before)
        new = Plan(*(torch.where(take.view(-1, 1), n, o) for n, o in zip(new, old, strict=True)))
        if group is not None and self.check_agreement:
            check_ranks_agree(list(new), group, names=["phy2log", "phyrank", "logcnt"])
        self._install(new)
        self.last_balancedness.copy_(before)
        self.balancedness.copy_(after)
        self.last_replanned.copy_(take)
        self.history.append({
            "step": self.steps,
            "before": before.mean(),
            "after": after.mean(),
            "worst_after": after.min(),
            "replanned_layers": take.sum(),
            "migrated_slots": metrics.migration_count(old.phy2log, new.phy2log).sum(),
        })  # fmt: skip
        return self.last_replanned

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
            "phyrank": self.phyrank.clone(),
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
        """Restore :meth:`state_dict` output into this balancer's buffers, in place: all or nothing.

        Everything is checked before anything is assigned (keys, shapes, dtypes, expert ids in
        ``[0, E)``, ``logcnt`` equal to the counts of ``phy2log``, ``phyrank`` numbering each
        expert's replicas ``0 .. logcnt - 1``, counts finite and ``>= 0``, ``steps >= 0``, the window
        position in range); a bad state raises ``ValueError`` naming the key and changes nothing.
        Checkpoints of 0.1 (int32 counts, no ``phyrank``: replicas numbered in slot order) load too.
        """
        values = self._checked_state(state)
        self.steps = values.pop("steps")
        for name, value in values.items():
            getattr(self, name).copy_(value)
        self._install(Plan(self.phy2log, self.phyrank, self.logcnt))

    def _checked_state(self, state: object) -> dict:
        """The validated state as ``{attribute: value}``; raises ``ValueError`` naming the bad key."""
        if not isinstance(state, dict):
            raise EplbArgumentError(f"state_dict must be a dict, got {type(state).__name__}")
        c = self.config
        L, E, R = c.num_layers, c.num_experts, c.num_replicas
        tensors = ["counts", "invalid_ids", "phy2log", "logcnt", "balancedness", "last_balancedness"]
        tensors += ["ring", "pos"] if self.window is not None else ["ema"]
        missing = [k for k in ("config", "window", "ema_decay", "steps", *tensors) if k not in state]
        if missing:
            raise EplbArgumentError(f"state_dict is missing {', '.join(map(repr, missing))}")
        mine = (L, E, R, c.num_groups, c.num_nodes, c.num_gpus)
        if tuple(state["config"]) != mine:
            raise EplbArgumentError(f"state_dict is for configuration {state['config']}, this balancer has {mine}")
        if state["window"] != self.window or state["ema_decay"] != self.ema_decay:
            raise EplbArgumentError(
                f"state_dict has window={state['window']}, ema_decay={state['ema_decay']}; "
                f"this balancer has window={self.window}, ema_decay={self.ema_decay}"
            )
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise EplbArgumentError(f"state_dict['steps'] must be an int >= 0, got {steps!r}")

        def tensor(key: str, shape: tuple[int, ...], kind: str) -> torch.Tensor:
            t = state[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise EplbArgumentError(f"state_dict[{key!r}] must be a tensor of shape {shape}, got {got}")
            if kind == "int" and not is_integer_dtype(t.dtype):
                raise EplbArgumentError(f"state_dict[{key!r}] must have an integer dtype, got {t.dtype}")
            if kind == "float" and not t.dtype.is_floating_point:
                raise EplbArgumentError(f"state_dict[{key!r}] must have a floating dtype, got {t.dtype}")
            t = t.detach().to(self.device, torch.int64 if kind == "int" else torch.float64)
            if kind == "float" and not bool(torch.isfinite(t).all()):
                raise EplbArgumentError(f"state_dict[{key!r}] must be finite")
            if bool((t < 0).any()):
                raise EplbArgumentError(f"state_dict[{key!r}] must be >= 0")
            return t

        out = {
            "steps": steps,
            "counts": tensor("counts", (L, E), "int"),
            "invalid_ids": tensor("invalid_ids", (1,), "int"),
            "phy2log": tensor("phy2log", (L, R), "int"),
            "logcnt": tensor("logcnt", (L, E), "int"),
            "balancedness": tensor("balancedness", (L,), "float"),
            "last_balancedness": tensor("last_balancedness", (L,), "float"),
        }
        if bool((out["phy2log"] >= E).any()):
            raise EplbArgumentError(f"state_dict['phy2log'] has expert ids outside [0, {E})")
        counted = replica_counts(out["phy2log"], E)
        if not torch.equal(counted, out["logcnt"]):
            raise EplbArgumentError("state_dict['logcnt'] must count the slots of each expert in state_dict['phy2log']")
        if not bool((counted > 0).all()):  # record() maps tokens modulo the count
            layer, expert = (int(i) for i in (counted == 0).nonzero()[0])
            raise EplbArgumentError(
                f"state_dict['phy2log'] must hold every expert in every layer: expert {expert} is missing "
                f"from layer {layer}"
            )
        # replicas of 0.1 checkpoints were numbered in slot order
        phyrank = tensor("phyrank", (L, R), "int") if "phyrank" in state else occurrence(out["phy2log"])
        # every (expert, rank) with rank < logcnt exactly once: ranks below the count, and no repeats
        keys = torch.sort(out["phy2log"] * R + phyrank, dim=1).values
        if bool((phyrank >= out["logcnt"].gather(1, out["phy2log"])).any()) or bool(
            (keys[:, 1:] == keys[:, :-1]).any()
        ):
            raise EplbArgumentError("state_dict['phyrank'] must number the replicas of each expert 0 .. logcnt - 1")
        out["phyrank"] = phyrank
        if self.window is not None:
            out["_ring"] = tensor("ring", (self.window, L, E), "int")
            pos = tensor("pos", (1,), "int")
            if int(pos) >= self.window:
                raise EplbArgumentError(f"state_dict['pos'] ({int(pos)}) must be in [0, window={self.window})")
            out["_pos"] = pos
        else:
            out["_ema"] = tensor("ema", (L, E), "float")
        return out

    # -- internals --------------------------------------------------------------------------------

    def _group(self) -> dist.ProcessGroup | None:
        if self.process_group is not None:
            return self.process_group
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def _plan(self, loads: torch.Tensor, current: Plan, keep: tuple | None) -> Plan:
        """The plan for ``loads`` (:func:`eplb_triton.pipeline.plan`), without host synchronisation:
        relabelled to ``current`` (the exact node/GPU assignment for ``method="refined"``, slot order
        within each GPU for the greedy) with ``keep_slots``, or replanned from it with ``max_moves``."""
        relabel = self.keep_slots or self.max_moves is not None
        exact = self.method != "greedy" or self.max_moves is not None
        return pipeline.plan(
            self._backend, loads, self.config.effective(), method=self.method,
            old_phy2log=current.phy2log if relabel else None, max_moves=self.max_moves,
            relabel_to_old="gpus" if exact else "slots", keep=keep, validate=False,
        )  # fmt: skip

    def _install(self, plan: Plan) -> None:
        self.phy2log.copy_(plan.phy2log)
        self.phyrank.copy_(plan.phyrank)
        self.logcnt.copy_(plan.logcnt)
        self.log2phy.copy_(self._backend.log2phy(plan, self.width))
