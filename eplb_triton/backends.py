"""Which implementation serves a call: the one dispatch point of the package.

* one backend vocabulary, :data:`BACKENDS`, for every public function and for the online layer;
* one rule for ``"auto"`` and for the Triton interpreter (:func:`resolve`);
* one import of the Triton kernels (:func:`kernels`);
* one table from ``(operation, backend)`` to implementation (:data:`TABLE`, filled by
  :func:`implements`), driven by :func:`run`.

Every implementation of an operation takes the same arguments (the validated, unmodified input
tensor first) and returns ``int64`` tensors on the input's device. The three families:

* ``"reference"``: :mod:`eplb_triton.reference`, docs/algorithm.md literally (the oracle);
* ``"cpu"``: :mod:`eplb_triton.cpu`, NumPy vectorised over rows (torch for recording);
* ``"triton"``: :mod:`eplb_triton.kernels`, on CUDA tensors (or the interpreter).

Adding an operation or a method means one entry per backend here and one call in the API.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch

from . import cpu, launch, recording, reference
from ._validation import BACKENDS, Config, EplbArgumentError, check_values

TABLE: dict[tuple[str, str], Callable] = {}


def interpreter_active() -> bool:
    """Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def kernels() -> ModuleType:
    """The Triton kernels package, imported once (``eplb_triton.kernels``, with its launchers)."""
    from . import kernels as package
    from .kernels import dispatch, rebalance  # noqa: F401  (submodules become attributes)

    return package


def resolve(backend: object, device: torch.device, *, experts: int = 0, replicas: int = 0, items: int = 0) -> str:
    """The concrete backend (``"cpu"``, ``"reference"`` or ``"triton"``) for data on ``device``.

    ``"auto"`` is ``"triton"`` for CUDA data when Triton is installed and the problem fits the
    kernels (``experts <= launch.MAX_EXPERTS``, ``replicas <= launch.MAX_REPLICAS``, ``items <=
    launch.MAX_ITEMS`` per row), else ``"cpu"``; ``"triton"`` needs CUDA data, or the interpreter
    (beyond the limits it raises, naming the limit).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise EplbArgumentError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "auto":
        fits = experts <= launch.MAX_EXPERTS and replicas <= launch.MAX_REPLICAS and items <= launch.MAX_ITEMS
        return "triton" if device.type == "cuda" and triton_available() and fits else "cpu"
    if backend == "triton" and not (device.type == "cuda" or interpreter_active()):
        raise EplbArgumentError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import to run the kernels "
            f"on the CPU interpreter), got tensors on {device}"
        )
    return backend


def implements(op: str, *backends: str) -> Callable[[Callable], Callable]:
    """Register the decorated function as ``op`` for each of ``backends``."""

    def register(fn: Callable) -> Callable:
        for b in backends:
            TABLE[(op, b)] = fn
        return fn

    return register


def run(op: str, backend: str, *args, **kwargs):
    """Call the implementation of ``op`` for an already :func:`resolve`-d ``backend``."""
    return TABLE[(op, backend)](*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Family adapters: what every member of a family does around its algorithm
# ----------------------------------------------------------------------------------------------


def _float32_cpu(weight: torch.Tensor) -> torch.Tensor:
    """The float32 CPU copy the CPU families work on, after the value check (docs/algorithm.md: float32 first)."""
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    check_values(w)
    return w


def _float32_numpy(weight: torch.Tensor) -> np.ndarray:
    """The float32 NumPy copy the CPU path works on, after the value check, without torch kernels.

    The CPU path runs on one thread from here on: torch's intra-op parallel regions wait for every
    worker thread, and on a host whose other core is busy a descheduled worker made a 5 ms
    ``fill_`` of 58 layers' ``log2phy`` cost more than the whole greedy."""
    w = weight.detach().cpu()
    if w.dtype == torch.bfloat16:  # no NumPy dtype; a small exact widening
        w = w.to(torch.float32)
    a = w.numpy().astype(np.float32)  # C-contiguous, round to nearest as torch's .to(float32)
    cpu.check_values(a)
    return a


def _tensors(arrays, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays)


def _sync_flags(weight: torch.Tensor, invalid: torch.Tensor, *values: torch.Tensor) -> list[int]:
    """One host read of the kernel's invalid flags and any device scalars.

    The kernels skip and flag rows with NaN, inf or negative loads: raise the CPU path's error then.
    """
    flagged, *host = torch.stack([invalid.max().to(torch.int64), *(v.to(torch.int64) for v in values)]).tolist()
    if flagged:
        check_values(weight.detach().to(device="cpu", dtype=torch.float32))
        raise EplbArgumentError("weight must be finite and >= 0 in float32")  # flagged in float32 on the device
    return host


# ----------------------------------------------------------------------------------------------
# balanced_packing(weight [X, n], num_packs) -> (pack, rank)
# ----------------------------------------------------------------------------------------------


@implements("balanced_packing", "reference")
def _packing_reference(weight: torch.Tensor, num_packs: int):
    return tuple(t.to(weight.device) for t in reference.balanced_packing(_float32_cpu(weight), num_packs))


@implements("balanced_packing", "cpu")
def _packing_cpu(weight: torch.Tensor, num_packs: int):
    return _tensors(cpu.balanced_packing(_float32_numpy(weight), num_packs), weight.device)


@implements("balanced_packing", "triton")
def _packing_triton(weight: torch.Tensor, num_packs: int):
    pack, rank, invalid = launch.balanced_packing(weight, num_packs)
    _sync_flags(weight, invalid)
    return pack, rank


# ----------------------------------------------------------------------------------------------
# replicate_experts(weight [X, E], num_phy) -> (phy2log, rank, logcnt)
# ----------------------------------------------------------------------------------------------


@implements("replicate_experts", "reference")
def _replicate_reference(weight: torch.Tensor, num_phy: int):
    return tuple(t.to(weight.device) for t in reference.replicate_experts(_float32_cpu(weight), num_phy))


@implements("replicate_experts", "cpu")
def _replicate_cpu(weight: torch.Tensor, num_phy: int):
    return _tensors(cpu.replicate_experts(_float32_numpy(weight), num_phy)[:3], weight.device)


@implements("replicate_experts", "triton")
def _replicate_triton(weight: torch.Tensor, num_phy: int):
    phy2log, rank, cnt, invalid = launch.replicate_experts(weight, num_phy)
    _sync_flags(weight, invalid)
    return phy2log, rank, cnt


# ----------------------------------------------------------------------------------------------
# rebalance(weight [L, E], cfg, with_log2phy) -> (phy2log, phyrank, logcnt, log2phy | None)
# ``cfg`` is the effective configuration (the global policy is G = N = 1); log2phy is trimmed to
# X = max(logcnt) columns.
# ----------------------------------------------------------------------------------------------


@implements("rebalance", "reference")
def _rebalance_reference(weight: torch.Tensor, cfg: Config, with_log2phy: bool):
    w = _float32_cpu(weight)
    R, G, N, P = cfg.num_replicas, cfg.num_groups, cfg.num_nodes, cfg.num_gpus
    phy2log, phyrank, logcnt = reference.rebalance_experts_hierarchical(w, R, G, N, P)
    log2phy = reference.log2phy(phy2log, phyrank, logcnt) if with_log2phy else None
    return tuple(None if t is None else t.to(weight.device) for t in (phy2log, phyrank, logcnt, log2phy))


@implements("rebalance", "cpu")
def _rebalance_cpu(weight: torch.Tensor, cfg: Config, with_log2phy: bool):
    w = _float32_numpy(weight)
    R, G, N, P = cfg.num_replicas, cfg.num_groups, cfg.num_nodes, cfg.num_gpus
    phy2log, phyrank, logcnt = cpu.rebalance_experts_hierarchical(w, R, G, N, P)
    arrays = [phy2log, phyrank, logcnt]
    if with_log2phy:
        arrays.append(cpu.log2phy(phy2log, phyrank, cfg.num_experts, int(logcnt.max())))
    out = _tensors(arrays, weight.device)
    return out if with_log2phy else (*out, None)


@implements("rebalance", "triton")
def _rebalance_triton(weight: torch.Tensor, cfg: Config, with_log2phy: bool):
    out = launch.rebalance(weight, cfg)
    # The one host synchronisation of the drop-in API: the value check, and X = max(logcnt).
    (width,) = _sync_flags(weight, out.invalid, out.logcnt.max())
    log2phy = out.log2phy[:, :, :width].contiguous() if with_log2phy else None
    return out.phy2log, out.phyrank, out.logcnt, log2phy


# ----------------------------------------------------------------------------------------------
# record_dispatch(topk_ids, log2phy, logcnt, counts, invalid) -> slots; counts, invalid accumulated
# ----------------------------------------------------------------------------------------------


@implements("record_dispatch", "reference", "cpu")
def _record_torch(topk_ids, log2phy, logcnt, counts, invalid):
    phy, bad = recording.record_dispatch_reference(topk_ids, log2phy, logcnt, counts)
    invalid += bad.to(invalid.dtype)
    return phy


@implements("record_dispatch", "triton")
def _record_triton(topk_ids, log2phy, logcnt, counts, invalid):
    return launch.record_dispatch(topk_ids, log2phy, logcnt, counts, invalid)


# ----------------------------------------------------------------------------------------------
# search(weight [L, E], phy2log, phyrank, logcnt, P, N, old_phy2log=None, max_moves=None)
#   -> (phy2log, phyrank, logcnt): the local search of docs/algorithm.md section 10.2 from the
# given placement; N is the effective number of nodes (1 for the global policy).
# ----------------------------------------------------------------------------------------------


@implements("search", "reference")
def _search_reference(weight, phy2log, phyrank, logcnt, P, N, old_phy2log=None, max_moves=None):
    cpu_args = [None if t is None else t.cpu() for t in (phy2log, phyrank, logcnt, old_phy2log)]
    out = reference.search(_float32_cpu(weight), *cpu_args[:3], P, N, cpu_args[3], max_moves)
    return tuple(t.to(weight.device) for t in out)


@implements("search", "cpu")
def _search_cpu(weight, phy2log, phyrank, logcnt, P, N, old_phy2log=None, max_moves=None):
    arrays = [None if t is None else t.cpu().numpy() for t in (phy2log, phyrank, logcnt, old_phy2log)]
    out = cpu.search(_float32_numpy(weight), *arrays[:3], P, N, arrays[3], max_moves)
    return _tensors(out, weight.device)


@implements("search", "triton")
def _search_triton(weight, phy2log, phyrank, logcnt, P, N, old_phy2log=None, max_moves=None):
    return launch.search(weight, phy2log, phyrank, logcnt, P, N, old_phy2log, max_moves)
