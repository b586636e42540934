"""Which implementation serves a call: one object per backend, behind the :class:`Backend` protocol.

* one backend vocabulary, :data:`BACKENDS`, for every public function and for the online layer;
* :func:`resolve` is the only place that chooses: ``"auto"``, the kernels' limits, the interpreter;
  :func:`device_for` says where a backend's data should live (the command line asks it);
* three backends, one object each, with the same operations and identical results:

  - :data:`REFERENCE`: :mod:`eplb_triton.reference`, docs/algorithm.md literally (the oracle);
  - :data:`CPU`: :mod:`eplb_triton.cpu`, NumPy vectorised over rows, on one thread;
  - :data:`TRITON`: :mod:`eplb_triton.launch` and the kernels, on CUDA tensors (or the interpreter).

Every operation takes validated tensors (the public functions check arguments first), never
modifies its inputs, and returns ``int64`` tensors on the input's device. A new operation is one
method on :class:`Backend` and one on each backend; a backend that lacks it is a type error.
"""

from __future__ import annotations

import functools
import os
import re
from typing import NamedTuple, Protocol

import numpy as np
import torch

from . import cpu, launch, reference, split
from ._validation import BACKENDS, Config, EplbArgumentError
from .placement import assign_slots, log2phy_from_rank, slot_order_ranks


class Plan(NamedTuple):
    """A placement of every layer: the expert of each slot, each slot's replica number, the counts."""

    phy2log: torch.Tensor  # [L, R] int64
    phyrank: torch.Tensor  # [L, R] int64, 0 .. logcnt - 1 per expert
    logcnt: torch.Tensor  # [L, E] int64


class Backend(Protocol):
    """The operations every backend implements, with identical results (docs/algorithm.md)."""

    name: str
    host_reads_are_free: bool
    """The data lives on the host: reading values to skip work costs no synchronisation."""

    def pack(self, weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``balanced_packing`` of ``weight [X, n]``: ``(pack, rank)``, each ``[X, n]``."""
        ...

    def replicate(self, weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``replicate_experts`` of ``weight [X, E]``: ``(phy2log, rank, cnt)``."""
        ...

    def greedy(self, weight: torch.Tensor, cfg: Config, *, validate: bool = True) -> Plan:
        """The greedy of the effective configuration ``cfg`` (global policy: ``G = N = 1``) for every layer.

        ``validate``: raise :class:`EplbArgumentError` on loads that are not finite and ``>= 0``
        (on a GPU one host synchronisation); without it such layers are left unplanned (garbage),
        for callers whose loads cannot be invalid (token counts)."""
        ...

    def greedy_with_log2phy(self, weight: torch.Tensor, cfg: Config) -> tuple[Plan, torch.Tensor]:
        """:meth:`greedy` (validated) and its ``log2phy [L, E, max(logcnt)]``: the drop-in call."""
        ...

    def search(
        self, weight: torch.Tensor, start: Plan, num_gpus: int, num_nodes: int, *,
        old_phy2log: torch.Tensor | None = None, max_moves: int | None = None, skip: torch.Tensor | None = None,
    ) -> Plan:  # fmt: skip
        """The local search of docs/algorithm.md 10.2 from ``start``; ``num_nodes`` is the effective one.

        With ``old_phy2log`` and ``max_moves``, at most ``max_moves`` slots per layer end up differing
        from ``old_phy2log``. ``skip [L]`` bool: layers returned as they start, without a search."""
        ...

    def pairs(self, weight: torch.Tensor, start: Plan, *, skip: torch.Tensor | None = None) -> Plan:
        """Deficit-driven replication, two slots per GPU (docs/algorithm.md section 13), from ``start``
        (``R = 2 P`` slots; the global policy): per layer, the pairing placement where its largest GPU
        load is strictly below ``start``'s, else ``start``. ``skip [L]`` bool: layers returned as they start."""
        ...

    def repair(
        self, weight: torch.Tensor, start: Plan, old_phy2log: torch.Tensor, target: torch.Tensor, max_moves: int, *,
        skip: torch.Tensor | None = None,
    ) -> Plan:  # fmt: skip
        """The count repair of a budgeted replan, two slots per GPU (docs/algorithm.md 10.8), from the
        budgeted search's ``start``: per layer, a placement at most ``max_moves`` slots from
        ``old_phy2log`` with the replica counts moved toward ``target [L, E]`` where its largest GPU load
        is strictly below ``start``'s, else ``start``. ``skip [L]`` bool: layers returned as they start."""
        ...

    def assign(self, overlap: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The exact maximum-overlap assignment of each ``[n, n]`` problem of ``overlap [B, n, n]``
        (docs/algorithm.md 10.3): ``[B, n]`` int64, the column of each row. ``skip [B]`` bool:
        problems answered by the identity, unsolved."""
        ...

    def log2phy(self, plan: Plan, width: int) -> torch.Tensor:
        """``[L, E, width]`` int64: the slot of replica ``r`` of expert ``e``, ``-1`` past its count."""
        ...

    def record(
        self, topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, counts: torch.Tensor,
        invalid: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """One layer's record + dispatch (:func:`eplb_triton.record_dispatch`); ``counts`` and ``invalid``
        accumulate in place. Returns the slot of every routed entry, ``-1`` for invalid ids."""
        ...

    def slot_order(self, phy2log: torch.Tensor, num_experts: int) -> Plan:
        """The placement ``phy2log [L, R]`` with its replicas numbered in slot order."""
        ...

    def count(self, topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's entries per expert: ``(counts [E] int64, ids outside [0, E) [1] int64)``."""
        ...

    def split(self, counts: torch.Tensor, phy2log: torch.Tensor, num_gpus: int, max_replicas: int) -> torch.Tensor:
        """The balanced split of each layer's ``counts [L, E]`` over the placement ``phy2log [L, R]``
        (docs/algorithm.md section 11): ``quota [L, R]`` int64. ``max_replicas`` bounds the replicas
        of any expert (``log2phy``'s width)."""
        ...

    def fill(
        self, topk_ids: torch.Tensor, quota: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
        offsets: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """One layer's routed entries to slots so that every slot gets its ``quota [R]``, the entries of
        an expert numbered from ``offsets[e]`` (:func:`eplb_triton.split.assign_slots`): ``[T, k]`` int64."""
        ...


# ----------------------------------------------------------------------------------------------
# The two CPU families: the reference and the NumPy path share how data comes in and goes out
# ----------------------------------------------------------------------------------------------


def float32_numpy(weight: torch.Tensor) -> np.ndarray:
    """The float32 NumPy copy the CPU families work on, after the value check, without torch kernels.

    The CPU path runs on one thread from here on: torch's intra-op parallel regions wait for every
    worker thread, and on a host whose other core is busy a descheduled worker made a 5 ms
    ``fill_`` of 58 layers' ``log2phy`` cost more than the whole greedy."""
    w = weight.detach().cpu()
    if w.is_floating_point() and w.dtype not in (torch.float16, torch.float32, torch.float64):
        w = w.to(torch.float32)  # bfloat16, float8: no NumPy dtype; an exact widening
    a = w.numpy().astype(np.float32)  # C-contiguous, round to nearest as torch's .to(float32)
    cpu.check_values(a)
    return a


def _float32_cpu(weight: torch.Tensor) -> torch.Tensor:
    """:func:`float32_numpy` as a CPU tensor (the reference's input)."""
    return torch.from_numpy(float32_numpy(weight))


def _tensors(arrays, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays)


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


class _HostBackend:
    """What the reference and the NumPy backends share: host data, the torch recording, the NumPy
    assignment of entries to slots (literal enough to be the reference), the exact assignment of the
    relabelling (NumPy)."""

    host_reads_are_free = True

    def greedy_with_log2phy(self, weight: torch.Tensor, cfg: Config) -> tuple[Plan, torch.Tensor]:
        plan = self.greedy(weight, cfg)
        return plan, self.log2phy(plan, int(plan.logcnt.max()))

    def record(self, topk_ids, log2phy, logcnt, counts, invalid):
        phy, bad = reference.record_dispatch(topk_ids, log2phy, logcnt, counts)
        invalid += bad.to(invalid.dtype)
        return phy

    def assign(self, overlap, skip=None):  # NumPy for both: integer arithmetic, exact
        cols = cpu.assign_max_overlap(overlap.detach().cpu().numpy().astype(np.int64), _numpy(skip))
        return torch.from_numpy(cols).to(overlap.device)

    def slot_order(self, phy2log, num_experts):
        rank, cnt = cpu.slot_order_ranks(_numpy(phy2log), num_experts)
        return Plan(phy2log, *_tensors((rank, cnt), phy2log.device))

    def count(self, topk_ids, num_experts):
        flat = _numpy(topk_ids).reshape(-1)
        valid = (flat >= 0) & (flat < num_experts)
        counts = np.bincount(flat[valid], minlength=num_experts).astype(np.int64)
        bad = np.array([flat.size - int(valid.sum())], np.int64)
        return _tensors((counts, bad), topk_ids.device)

    def fill(self, topk_ids, quota, log2phy, logcnt, offsets):
        slots = split.assign_slots(*(_numpy(t) for t in (topk_ids, quota, log2phy, logcnt, offsets)))
        return torch.from_numpy(slots).to(topk_ids.device)


class ReferenceBackend(_HostBackend):
    """docs/algorithm.md literally (:mod:`eplb_triton.reference`): per-layer Python loops."""

    name = "reference"

    def pack(self, weight, num_packs):
        w = _float32_cpu(weight)
        return tuple(t.to(weight.device) for t in reference.balanced_packing(w, num_packs))

    def replicate(self, weight, num_phy):
        w = _float32_cpu(weight)
        return tuple(t.to(weight.device) for t in reference.replicate_experts(w, num_phy))

    def greedy(self, weight, cfg, *, validate=True):
        w = _float32_cpu(weight)
        R, G, N, P = cfg.num_replicas, cfg.num_groups, cfg.num_nodes, cfg.num_gpus
        return Plan(*(t.to(weight.device) for t in reference.rebalance_experts_hierarchical(w, R, G, N, P)))

    def search(self, weight, start, num_gpus, num_nodes, *, old_phy2log=None, max_moves=None, skip=None):
        w = _float32_cpu(weight)
        args = [t.cpu() for t in start]
        old = None if old_phy2log is None else old_phy2log.cpu()
        out = reference.search(w, *args, num_gpus, num_nodes, old, max_moves, None if skip is None else skip.cpu())
        return Plan(*(t.to(weight.device) for t in out))

    def pairs(self, weight, start, *, skip=None):
        w = _float32_cpu(weight)
        out = reference.pairs(w, *(t.cpu() for t in start), None if skip is None else skip.cpu())
        return Plan(*(t.to(weight.device) for t in out))

    def repair(self, weight, start, old_phy2log, target, max_moves, *, skip=None):
        w = _float32_cpu(weight)
        args = (*(t.cpu() for t in start), old_phy2log.cpu(), target.cpu(), max_moves)
        out = reference.repair(w, *args, None if skip is None else skip.cpu())
        return Plan(*(t.to(weight.device) for t in out))

    def log2phy(self, plan, width):
        return reference.log2phy(*(t.cpu() for t in plan), width=width).to(plan.phy2log.device)

    def split(self, counts, phy2log, num_gpus, max_replicas):
        quota = split.balanced_split_reference(_numpy(counts), _numpy(phy2log), num_gpus)
        return torch.from_numpy(quota).to(phy2log.device)


class CpuBackend(_HostBackend):
    """NumPy, every greedy step over all rows at once (:mod:`eplb_triton.cpu`), on one thread."""

    name = "cpu"

    def pack(self, weight, num_packs):
        return _tensors(cpu.balanced_packing(float32_numpy(weight), num_packs), weight.device)

    def replicate(self, weight, num_phy):
        return _tensors(cpu.replicate_experts(float32_numpy(weight), num_phy)[:3], weight.device)

    def greedy(self, weight, cfg, *, validate=True):
        R, G, N, P = cfg.num_replicas, cfg.num_groups, cfg.num_nodes, cfg.num_gpus
        return Plan(*_tensors(cpu.rebalance_experts_hierarchical(float32_numpy(weight), R, G, N, P), weight.device))

    def greedy_with_log2phy(self, weight, cfg):
        R, G, N, P = cfg.num_replicas, cfg.num_groups, cfg.num_nodes, cfg.num_gpus
        arrays = cpu.rebalance_experts_hierarchical(float32_numpy(weight), R, G, N, P)
        log2phy = cpu.log2phy(arrays[0], arrays[1], cfg.num_experts, int(arrays[2].max()))
        *plan, log2phy = _tensors((*arrays, log2phy), weight.device)
        return Plan(*plan), log2phy

    def search(self, weight, start, num_gpus, num_nodes, *, old_phy2log=None, max_moves=None, skip=None):
        arrays = [_numpy(t) for t in start]
        out = cpu.search(
            float32_numpy(weight), *arrays, num_gpus, num_nodes, _numpy(old_phy2log), max_moves, _numpy(skip)
        )
        return Plan(*_tensors(out, weight.device))

    def pairs(self, weight, start, *, skip=None):
        out = cpu.pairs(float32_numpy(weight), *(_numpy(t) for t in start), _numpy(skip))
        return Plan(*_tensors(out, weight.device))

    def repair(self, weight, start, old_phy2log, target, max_moves, *, skip=None):
        arrays = (*(_numpy(t) for t in start), _numpy(old_phy2log), _numpy(target))
        out = cpu.repair(float32_numpy(weight), *arrays, max_moves, _numpy(skip))
        return Plan(*_tensors(out, weight.device))

    def log2phy(self, plan, width):
        phy2log, phyrank, logcnt = (_numpy(t) for t in plan)
        return _tensors([cpu.log2phy(phy2log, phyrank, logcnt.shape[1], width)], plan.phy2log.device)[0]

    def split(self, counts, phy2log, num_gpus, max_replicas):
        quota = split.balanced_split(_numpy(counts), _numpy(phy2log), num_gpus)
        return torch.from_numpy(quota).to(phy2log.device)


class TritonBackend:
    """The Triton kernels (:mod:`eplb_triton.launch`): all layers per launch, no host synchronisation
    except where a drop-in call must raise on bad loads or read ``X = max(logcnt)`` (and assignments
    wider than one program, which run on the host)."""

    name = "triton"
    host_reads_are_free = False

    @staticmethod
    def _raise_if_flagged(weight: torch.Tensor, invalid: torch.Tensor, *values: torch.Tensor) -> list[int]:
        """One host read of the kernel's invalid flags and of any device scalars: the CPU path's error
        when a row was flagged (NaN, inf or negative loads)."""
        flagged, *host = torch.stack([invalid.max().to(torch.int64), *(v.to(torch.int64) for v in values)]).tolist()
        if flagged:
            float32_numpy(weight)  # raises, naming the first bad entry
            raise EplbArgumentError("weight must be finite and >= 0 in float32")  # flagged in float32 on the device
        return host

    def pack(self, weight, num_packs):
        pack, rank, invalid = launch.balanced_packing(weight, num_packs)
        self._raise_if_flagged(weight, invalid)
        return pack, rank

    def replicate(self, weight, num_phy):
        phy2log, rank, cnt, invalid = launch.replicate_experts(weight, num_phy)
        self._raise_if_flagged(weight, invalid)
        return phy2log, rank, cnt

    def greedy(self, weight, cfg, *, validate=True):
        out = launch.rebalance(weight, cfg)
        if validate:
            self._raise_if_flagged(weight, out.invalid)
        return Plan(out.phy2log, out.phyrank, out.logcnt)

    def greedy_with_log2phy(self, weight, cfg):
        out = launch.rebalance(weight, cfg)
        # The one host synchronisation of the drop-in call: the value check, and X = max(logcnt).
        (width,) = self._raise_if_flagged(weight, out.invalid, out.logcnt.max())
        return Plan(out.phy2log, out.phyrank, out.logcnt), out.log2phy[:, :, :width].contiguous()

    def search(self, weight, start, num_gpus, num_nodes, *, old_phy2log=None, max_moves=None, skip=None):
        return Plan(*launch.search(weight, *start, num_gpus, num_nodes, old_phy2log, max_moves, skip))

    def pairs(self, weight, start, *, skip=None):
        return Plan(*launch.pairs(weight, *start, skip))

    def repair(self, weight, start, old_phy2log, target, max_moves, *, skip=None):
        return Plan(*launch.repair(weight, *start, old_phy2log, target, max_moves, skip))

    def assign(self, overlap, skip=None):
        if overlap.shape[1] > launch.MAX_ASSIGN:  # more GPUs than one program holds: one host round trip
            return CPU.assign(overlap, skip)
        return launch.assign_max_overlap(overlap, skip)

    def log2phy(self, plan, width):
        return log2phy_from_rank(plan.phy2log, plan.phyrank, plan.logcnt.shape[1], width)

    def record(self, topk_ids, log2phy, logcnt, counts, invalid):
        return launch.record_dispatch(topk_ids, log2phy, logcnt, counts, invalid)

    def slot_order(self, phy2log, num_experts):
        return Plan(phy2log, *slot_order_ranks(phy2log, num_experts))

    def count(self, topk_ids, num_experts):
        flat = topk_ids.reshape(-1).long()
        valid = (flat >= 0) & (flat < num_experts)
        counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, torch.where(valid, flat, num_experts), torch.ones_like(flat))  # bin E: invalid
        return counts[:num_experts], counts[num_experts:]

    def split(self, counts, phy2log, num_gpus, max_replicas):
        return launch.balanced_split(counts, phy2log, num_gpus, max_replicas)[0]

    def fill(self, topk_ids, quota, log2phy, logcnt, offsets):
        return assign_slots(topk_ids, quota, log2phy, logcnt, offsets)


REFERENCE = ReferenceBackend()
CPU = CpuBackend()
TRITON = TritonBackend()
_BY_NAME: dict[str, Backend] = {b.name: b for b in (REFERENCE, CPU, TRITON)}


# ----------------------------------------------------------------------------------------------
# The one place that chooses
# ----------------------------------------------------------------------------------------------


def interpreter_active() -> bool:
    """Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


TRITON_MIN = (3, 6)  # older releases flush subnormals in div_rn (div.rn.ftz.f32): not exact with the CPU path


@functools.cache
def triton_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the installed Triton, or ``None`` without one."""
    try:
        import triton
    except ImportError:
        return None
    found = re.match(r"(\d+)\.(\d+)", str(getattr(triton, "__version__", "")))
    return (int(found[1]), int(found[2])) if found else (0, 0)


def triton_available() -> bool:
    """Triton is installed, at least :data:`TRITON_MIN` (``"auto"`` picks it only then)."""
    version = triton_version()
    return version is not None and version >= TRITON_MIN


def _check_name(backend: object) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise EplbArgumentError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def resolve(backend: object, device: torch.device, *, experts: int = 0, replicas: int = 0, items: int = 0) -> Backend:
    """The backend that serves a call on data on ``device``.

    ``"auto"`` is Triton for CUDA data when Triton is installed and the problem fits the kernels
    (``experts <= launch.MAX_EXPERTS``, ``replicas <= launch.MAX_REPLICAS``, ``items <=
    launch.MAX_ITEMS`` per row), else the CPU path; ``"triton"`` needs CUDA data, or the
    interpreter (beyond the limits the launch raises, naming the limit).
    """
    name = _check_name(backend)
    if name == "auto":
        fits = experts <= launch.MAX_EXPERTS and replicas <= launch.MAX_REPLICAS and items <= launch.MAX_ITEMS
        name = "triton" if device.type == "cuda" and triton_available() and fits else "cpu"
    if name == "triton" and not (device.type == "cuda" or interpreter_active()):
        raise EplbArgumentError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import to run the kernels "
            f"on the CPU interpreter), got tensors on {device}"
        )
    if name == "triton" and not triton_available():
        found = triton_version()
        raise EplbArgumentError(
            f"backend='triton' needs triton >= {'.'.join(map(str, TRITON_MIN))}, found "
            + ("none" if found is None else ".".join(map(str, found)))
        )
    return _BY_NAME[name]


def device_for(backend: object) -> torch.device:
    """Where data for ``backend`` should live when the caller is free to choose (the command line):
    CUDA for ``"auto"`` and ``"triton"`` when a GPU and Triton are there, else the CPU."""
    name = _check_name(backend)
    gpu = torch.cuda.is_available() and triton_available()
    return torch.device("cuda" if name in ("auto", "triton") and gpu else "cpu")
