"""Moving expert weights between ranks after a new placement, over ``torch.distributed``.

Rank ``r`` of the expert-parallel group holds slots ``r * S .. r * S + S - 1`` (``S = R / world``)
of every layer. :func:`rearrange_expert_weights` makes every rank hold the experts of the new
placement: a slot whose expert did not change is not touched; a changed slot is filled by a local
copy when the rank already held that expert, else by a point-to-point transfer from a rank that
held it (sources spread over the holders, round-robin). Every rank derives the same transfer list
from the two placements, so sends and receives match; one small all-gather first checks that the
ranks hold the same placements and weight layout (:func:`check_ranks_agree`), so that a rank with
different inputs stops every rank before any weight moves instead of silently pairing the wrong
sends and receives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ._validation import EplbArgumentError, is_integer_dtype

# A rank's local error message travels inside the agreement all-gather, so that every rank can raise
# the same error; longer messages are cut to this many bytes.
_MESSAGE_WORDS = 32
_MESSAGE_BYTES = 8 * _MESSAGE_WORDS


@dataclass
class RearrangeStats:
    """What this rank did: slots rewritten from its own old experts, slots received, experts sent,
    and the bytes of the experts sent and received (weights, and with ``optimizer=`` their state and
    pending gradients)."""

    local_copies: int = 0
    received: int = 0
    sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


_VALUE, _TYPE = 1, 2  # what a rank reports in the agreement all-gather: a bad value, a wrong type


class RanksTypeError(EplbArgumentError, TypeError):
    """A wrong argument type on some rank, raised on every rank by the agreement check: a
    ``TypeError`` like any wrong type, and an :class:`EplbArgumentError` like every error of the
    check."""


def _digest(*parts: object) -> int:
    """A 64-bit signed digest, equal in every process for equal parts (unlike the salted ``hash``).
    Tensors count by dtype, shape and bytes; anything else by its ``repr``."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(repr((str(t.dtype), tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little", signed=True)


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    # nccl has no CPU tensors; gloo, mpi and the mixed "cpu:gloo,cuda:nccl" groups take CPU ones.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(message: str) -> list[int]:
    data = message.encode()
    if len(data) > _MESSAGE_BYTES:
        data = data[: _MESSAGE_BYTES - 3].decode(errors="ignore").encode() + b"..."  # whole characters only
    data = data.ljust(_MESSAGE_BYTES, b"\x00")
    return [int.from_bytes(data[i : i + 8], "little", signed=True) for i in range(0, _MESSAGE_BYTES, 8)]


def _decode(words: list[int]) -> str:
    data = b"".join(w.to_bytes(8, "little", signed=True) for w in words)
    return data.rstrip(b"\x00").decode(errors="replace")


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}"


def _verdict(rows: list[list[int]], names: Sequence[str]) -> str | None:
    """The error every rank raises for the gathered ``[digests..., has_problem, message words...]``
    rows (one per rank), or None when all ranks are fine and agree."""
    n = len(names)
    problems: dict[str, list[int]] = {}  # message -> ranks that reported it, in rank order
    for rank, row in enumerate(rows):
        if row[n]:
            problems.setdefault(_decode(row[n + 1 :]), []).append(rank)
    if problems:
        if len(problems) == 1 and len(next(iter(problems.values()))) == len(rows):
            return next(iter(problems))  # the same inputs fail the same way on every rank
        return "; ".join(f"{_ranks(ranks)}: {message}" for message, ranks in problems.items())
    differ = []
    for i, name in enumerate(names):
        values: dict[int, list[int]] = {}
        for rank, row in enumerate(rows):
            values.setdefault(row[i], []).append(rank)
        if len(values) > 1:
            groups = list(values.values())
            detail = f"ranks {groups[0][0]} and {groups[1][0]} disagree"
            if len(rows) > 2:
                detail += "; equal on " + ", ".join(f"[{', '.join(map(str, g))}]" for g in groups)
            differ.append(f"{name} differs between ranks ({detail})")
    return "; ".join(differ) or None


def _agree(
    digests: Sequence[int], names: Sequence[str], group: dist.ProcessGroup | None, problem: Exception | None
) -> None:
    """One all-gather of ``[digests..., has_problem, message]``; every rank raises the same ValueError
    if any rank reported a problem or any digest differs between ranks. ``digests`` and ``names``
    must have the same length on every rank (it sets the size of the gathered tensor)."""
    text = "" if problem is None else str(problem)
    if problem is not None and not isinstance(problem, (ValueError, TypeError)):
        text = f"{type(problem).__name__}: {text}"
    kind = 0 if problem is None else _TYPE if isinstance(problem, TypeError) else _VALUE
    row = list(digests) + [kind] + _encode(text)
    if _single_process(group):
        rows = [row]
    else:
        mine = torch.tensor(row, dtype=torch.int64, device=_collective_device(group))
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        rows = [r.tolist() for r in gathered]
    message = _verdict(rows, names)
    if message is not None:
        kinds = {r[len(names)] for r in rows} - {0}
        raise (RanksTypeError if kinds == {_TYPE} else EplbArgumentError)(message) from problem


def check_ranks_agree(
    tensors: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """Check, with one small all-gather, that every rank of ``group`` holds equal ``tensors``.

    Each tensor counts by dtype, shape and contents (a 64-bit digest, so a few bytes per tensor
    travel whatever the tensors' size). Every rank must call this with the same number of tensors.

    Args:
        tensors: the values that must agree, on any device.
        group: the process group (default: the world). The digests travel on the device its
            backend serves: the current CUDA device for nccl, the CPU otherwise.
        names: one name per tensor for the error message (default ``tensor 0``, ``tensor 1``, ...).

    Raises:
        ValueError: on every rank, naming each tensor that differs and two ranks that disagree,
            e.g. ``new_phy2log differs between ranks (ranks 0 and 1 disagree)``.

    Example:
        >>> check_ranks_agree([plan.phy2log], names=["phy2log"])  # doctest: +SKIP
    """
    if not dist.is_available() or not dist.is_initialized():
        raise EplbArgumentError("check_ranks_agree needs an initialised torch.distributed process group")
    labels = [f"tensor {i}" for i in range(len(tensors))]
    problem = None
    try:
        if names is not None:
            if len(names) != len(tensors):
                raise EplbArgumentError(f"names has {len(names)} entries for {len(tensors)} tensors")
            labels = [str(name) for name in names]
        digests = [_digest(t) for t in tensors]
    except Exception as exc:  # reported inside the all-gather: raising alone would hang the other ranks
        problem, digests = exc, [0] * len(tensors)
    _agree(digests, labels, group, problem)


def _single_process(group: dist.ProcessGroup | None) -> bool:
    """No process group to talk to: ``group=None`` with ``torch.distributed`` not initialised.

    Raises ``ValueError`` when a ``group`` is given but ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return False
    if group is not None:
        raise EplbArgumentError("group was given, but torch.distributed is not initialised")
    return True


def _check_placements(old: list[list[int]], new: list[list[int]]) -> None:
    for name, rows in (("old_phy2log", old), ("new_phy2log", new)):
        if any(e < 0 for row in rows for e in row):
            raise EplbArgumentError(f"{name} has an expert id < 0 ({min(min(row) for row in rows)})")
    for layer, (old_row, new_row) in enumerate(zip(old, new, strict=True)):
        missing = sorted(set(new_row) - set(old_row))
        if missing:
            raise EplbArgumentError(
                f"new_phy2log[layer {layer}] needs expert {missing[0]}, which no rank holds in old_phy2log"
            )


def _transfers(old: list[int], new: list[int], world: int, S: int) -> list[tuple[int, int, int]]:
    """``(expert, src, dst)`` for every (rank, expert) that must come from another rank, in a
    deterministic order; the ``i``-th requester of an expert gets holder ``i % holders``."""
    holders: dict[int, list[int]] = {}
    for q, e in enumerate(old):
        ranks = holders.setdefault(e, [])
        if not ranks or ranks[-1] != q // S:
            ranks.append(q // S)
    needs: dict[int, list[int]] = {}
    for dst in range(world):
        held = set(old[dst * S : (dst + 1) * S])
        for q in range(dst * S, (dst + 1) * S):
            e = new[q]
            if e != old[q] and e not in held and (not needs.get(e) or needs[e][-1] != dst):
                needs.setdefault(e, []).append(dst)
    out = []
    for e in sorted(needs):
        for i, dst in enumerate(needs[e]):
            out.append((e, holders[e][i % len(holders[e])], dst))
    return out


def _post(ops: list[dist.P2POp], group: dist.ProcessGroup | None) -> None:
    if not ops:
        return
    # Always batched: batch_isend_irecv coalesces where the group's backend for the tensors' device
    # can (NCCL, also behind "cpu:gloo,cuda:nccl" or a backend left to torch's default, whose name
    # reads "undefined") and posts them one by one where it cannot. Posting a send before its receive
    # by hand, both peers at once, is the classic NCCL deadlock for large messages.
    reqs = dist.batch_isend_irecv(ops)
    for req in reqs:
        req.wait()


def _layers(expert_weights: object, name: str) -> list[list[torch.Tensor]]:
    """Per layer, the list of this rank's slot-major tensors (one tensor, or a sequence of them)."""
    if isinstance(expert_weights, torch.Tensor) or not isinstance(expert_weights, Sequence):
        got = type(expert_weights).__name__
        raise TypeError(f"{name} must be a sequence with one entry per layer, got {got}")
    layers = []
    for i, entry in enumerate(expert_weights):
        tensors = [entry] if isinstance(entry, torch.Tensor) else list(entry) if isinstance(entry, Sequence) else None
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError(f"{name}[{i}] must be a tensor or a non-empty sequence of tensors")
        layers.append(tensors)
    return layers


def _per_slot(value: object, param: torch.Tensor) -> bool:
    """An optimizer state tensor of ``param [S, ...]`` that holds one row per slot: at least 1-D with
    ``S`` rows (Adam's moments, SGD's momentum, Adafactor's row and column factors of a 3-D
    parameter). A scalar (Adam's ``step``) belongs to the whole parameter; a state with another
    first dimension spans the slots (Adafactor's column factor ``[1, d]`` of a 2-D ``[S, d]``)."""
    return torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == param.shape[0]


def _with_optimizer_state(layers: list[list[torch.Tensor]], optimizer) -> list[list[torch.Tensor]]:
    """Each parameter followed by what moves with its slots: every optimizer state tensor with one
    row per slot (:func:`_per_slot`; in key order) and its pending ``.grad``. State that is not per
    slot is the whole parameter's: it stays."""
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    out = []
    for i, tensors in enumerate(layers):
        moved = []
        for j, t in enumerate(tensors):
            if id(t) not in owned:
                raise EplbArgumentError(
                    f"expert_weights[{i}][{j}] is not among the optimizer's parameters: the optimizer must hold "
                    "every expert parameter, or none is passed"
                )
            state = optimizer.state.get(t, {})
            extra = [state[k] for k in sorted(state) if _per_slot(state[k], t)]
            moved += [t, *extra, *([t.grad] if t.grad is not None else [])]
        out.append(moved)
    return out


def _check_slot_layout(layers: list[list[torch.Tensor]], name: str, shape: tuple[int, int], world: int, of: str) -> int:
    """The rule both exchanges share: ``R`` (of the placement ``shape = [L, R]``) is a multiple of the
    group size, ``layers`` has ``L`` entries, and every tensor's first dimension holds this rank's
    ``S = R / world`` slots. Returns ``S``."""
    L, R = shape
    if R % world:
        raise EplbArgumentError(f"num_replicas ({R}) must be a multiple of the group size ({world})")
    S = R // world
    if len(layers) != L:
        raise EplbArgumentError(f"{name} has {len(layers)} layers, {of} has {L}")
    for i, tensors in enumerate(layers):
        for j, t in enumerate(tensors):
            if t.dim() < 1 or t.shape[0] != S:
                raise EplbArgumentError(
                    f"{name}[{i}][{j}] must be [slots_per_rank={S}, ...] for {of} [{L}, {R}] on {world} rank(s), "
                    f"got {tuple(t.shape)}"
                )
    return S


def rearrange_expert_weights(
    expert_weights: Sequence[torch.Tensor | Sequence[torch.Tensor]],
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    grads: str = "summed",
    max_inflight: int = 32,
) -> RearrangeStats:
    """Move expert weights in place so that this rank holds its slots of ``new_phy2log``.

    Args:
        expert_weights: per layer, this rank's expert tensor ``[S, ...]`` or a sequence of them
            (e.g. ``(w13, w2)``), slot-major; all ranks pass the same structure and shapes. They may
            be ``nn.Parameter`` objects: the move runs under ``torch.no_grad()`` and writes them in place.
        old_phy2log, new_phy2log: ``[L, R]`` integer placements, identical on every rank (any device).
        group: the expert-parallel process group (default: the world); its size must be ``R / S``.
            Without ``torch.distributed`` initialised (and ``group=None``) the call runs in this
            process alone, as a group of one: every slot is rewritten by a local copy.
        optimizer: the optimizer that holds the expert parameters (all of them). Every state tensor
            with one row per slot (first dimension ``S``: Adam's moments, SGD's momentum,
            Adafactor's factors of a 3-D parameter) and the parameter's pending ``.grad`` move with
            their slots, so training continues on each expert with its own state; scalar state
            (Adam's ``step``) and state that spans the slots (a first dimension other than ``S``)
            belong to the whole parameter and stay. Without it only the weights move (an optimizer
            with such state would then continue with another expert's).
        grads: what the pending ``.grad`` of the expert parameters hold (with ``optimizer``):
            ``"summed"`` (the default): each slot its expert's whole gradient, as after
            :func:`sync_replica_grads` (or spent by the step): they move like the state, a new
            replica gets a copy. ``"partial"``: each slot only the tokens it served, as between
            ``backward()`` and :func:`sync_replica_grads` (a replan between micro-batches of
            gradient accumulation): each expert's copies are first summed over ``old_phy2log``
            (one :func:`sync_replica_grads`), then the sum moves and stays on the expert's first
            slot in ``new_phy2log``, the other copies get zeros; so the later
            :func:`sync_replica_grads` gives every replica the expert's whole gradient, none
            counted twice or lost. Every expert parameter must then have a ``.grad``. Copying
            partial gradients as ``"summed"`` would count a share twice where an expert gains a
            copy and drop it where it loses one.
        max_inflight: experts per batch of point-to-point operations (bounds in-flight requests).

    Before any weight is touched, every rank checks its own inputs (shapes, ids >= 0, every expert
    that ``new_phy2log`` needs is held by some rank in ``old_phy2log``, the optimizer holds every
    expert parameter), then one all-gather of a few digests checks that all ranks hold the same
    placements and the same layout of what moves (layers, tensors per layer with the optimizer's
    state and pending gradients, shape and dtype of each) and the same ``grads``. If any rank's
    inputs are wrong or the ranks differ, every rank raises the same ``EplbArgumentError`` (a
    ``ValueError``; also a ``TypeError`` where every problem was a wrong type) and no weight
    changes anywhere.

    Peak extra memory is one layer's changed slots on this rank (received experts, and copies of
    local sources that are themselves overwritten). Nothing is read after it is overwritten: a
    layer's slots are written only after all of that layer's sends and receives have completed.

    Failures: if a rank dies or stops responding, the others block in the agreement all-gather or in
    a send/receive until the process group's timeout (``timeout=`` of ``init_process_group`` /
    ``new_group``), then the pending operation raises (gloo); with nccl the watchdog usually tears
    the process down instead (``TORCH_NCCL_ASYNC_ERROR_HANDLING``). A rank that raised holds the new
    placement in every layer before the one it was transferring and the old placement in that layer
    and all later ones: no slot of a layer is written until all of the layer's transfers have
    completed, and the writes are local copies, so no layer is ever half-written on a rank. Ranks
    progress layer by layer independently, though (a rank whose transfers in layer ``k`` finished may
    already have written it), so ranks can stop at different layers; the weights as a whole are then
    a mix of placements, and the caller must reload them or move each rank from what it holds.

    Returns:
        :class:`RearrangeStats` for this rank.

    Raises:
        ValueError: on every rank, before any weight changes, if the inputs are invalid on some rank
            or differ between ranks (see above).

    Example:
        >>> stats = rearrange_expert_weights([(w13, w2) for w13, w2 in layers], old, new)  # doctest: +SKIP
    """
    local = _single_process(group)
    world = 1 if local else dist.get_world_size(group)
    me = 0 if local else dist.get_rank(group)
    problem = None
    digests = [0, 0, 0, 0]
    try:
        for name, p in (("old_phy2log", old_phy2log), ("new_phy2log", new_phy2log)):
            if not isinstance(p, torch.Tensor) or not is_integer_dtype(p.dtype):
                got = getattr(p, "dtype", type(p).__name__)
                raise TypeError(f"{name} must be an integer tensor, got {got}")
        if old_phy2log.shape != new_phy2log.shape or old_phy2log.dim() != 2:
            raise EplbArgumentError(
                f"old_phy2log and new_phy2log must be 2-D of one shape, got {tuple(old_phy2log.shape)} "
                f"and {tuple(new_phy2log.shape)}"
            )
        old_all, new_all = old_phy2log.cpu().tolist(), new_phy2log.cpu().tolist()
        layers = params = _layers(expert_weights, "expert_weights")
        if grads not in ("summed", "partial"):
            raise EplbArgumentError(f"grads must be 'summed' or 'partial', got {grads!r}")
        if grads == "partial":
            if optimizer is None:
                raise EplbArgumentError("grads='partial' needs optimizer=: only then do gradients move")
            for i, tensors in enumerate(params):
                for j, t in enumerate(tensors):
                    if t.grad is None:
                        raise EplbArgumentError(f"expert_weights[{i}][{j}] has no .grad (grads='partial')")
        if optimizer is not None:
            layers = _with_optimizer_state(layers, optimizer)
        layout = [[(str(t.dtype), tuple(t.shape)) for t in tensors] for tensors in layers]
        digests = [_digest(old_all), _digest(new_all), _digest(layout), _digest(grads)]
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
            raise EplbArgumentError(f"max_inflight ({max_inflight!r}) must be a positive int")
        S = _check_slot_layout(layers, "expert_weights", tuple(old_phy2log.shape), world, "old_phy2log")
        _check_placements(old_all, new_all)
    except Exception as exc:  # reported inside the all-gather: raising alone would hang the other ranks
        problem = exc
    names = (
        "old_phy2log",
        "new_phy2log",
        "expert_weights layout" + (" (with optimizer state)" if optimizer else ""),
        "grads",
    )
    _agree(digests, names, group, problem)

    peer = [dist.get_global_rank(group, r) if group is not None else r for r in range(world)]
    with torch.no_grad():  # nn.Parameter weights: autograd must not record the in-place copies
        if grads == "partial":  # every old copy holds its expert's sum, which then moves
            _sync(params, _replica_plan(old_all, me, world, S), peer, group)
        stats = _move(layers, old_all, new_all, me, world, S, peer, group, max_inflight)
        if grads == "partial":  # the sum stays on the expert's first new slot: back to one share per copy
            for tensors, row in zip(params, new_all, strict=True):
                first: dict[int, int] = {}
                for q, e in enumerate(row):
                    first.setdefault(e, q)
                later = [q - me * S for q in range(me * S, (me + 1) * S) if first[row[q]] != q]
                if later:
                    for t in tensors:
                        t.grad[later] = 0
    return stats


def _move(
    layers: list[list[torch.Tensor]],
    old_all: list[list[int]],
    new_all: list[list[int]],
    me: int,
    world: int,
    S: int,
    peer: list[int],
    group: dist.ProcessGroup | None,
    max_inflight: int,
) -> RearrangeStats:
    stats = RearrangeStats()
    for layer, tensors in enumerate(layers):
        old, new = old_all[layer], new_all[layer]
        mine = range(me * S, (me + 1) * S)
        changed = [q for q in mine if new[q] != old[q]]
        transfers = _transfers(old, new, world, S)
        if not changed and all(src != me for _, src, _ in transfers):
            continue
        local_slot = {}  # expert -> this rank's first old slot holding it
        for q in mine:
            local_slot.setdefault(old[q], q - me * S)
        received: dict[int, list[torch.Tensor]] = {}
        expert_bytes = sum(t[0].nelement() * t.element_size() for t in tensors)
        for start in range(0, len(transfers), max_inflight):
            ops = []
            for e, src, dst in transfers[start : start + max_inflight]:
                if src == me:
                    ops += [dist.P2POp(dist.isend, t[local_slot[e]].contiguous(), peer[dst], group) for t in tensors]
                    stats.sent += 1
                    stats.bytes_sent += expert_bytes
                if dst == me:
                    received[e] = [torch.empty_like(t[0]) for t in tensors]
                    ops += [dist.P2POp(dist.irecv, buf, peer[src], group) for buf in received[e]]
                    stats.bytes_received += expert_bytes
            _post(ops, group)
        # Sources first (some local sources are slots about to be overwritten), then the writes.
        sources = {}
        for q in changed:
            e = new[q]
            if e in received:
                sources[e] = received[e]
            elif e not in sources:
                sources[e] = [t[local_slot[e]].clone() for t in tensors]
        for q in changed:
            for t, data in zip(tensors, sources[new[q]], strict=True):
                t[q - me * S].copy_(data)
            if new[q] in received:
                stats.received += 1
            else:
                stats.local_copies += 1
    return stats


# ----------------------------------------------------------------------------------------------
# Replica gradients: every copy of an expert gets the sum of all copies' gradients
# ----------------------------------------------------------------------------------------------


@dataclass
class ReplicaSyncStats:
    """What this rank exchanged: replicated experts it holds, bytes sent and received."""

    experts: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class _LayerPlan:
    """One layer's exchange: this rank's replicated experts (rows), their local slots by copy, and for
    each holder position the rows taking a contribution from that holder."""

    rows: int = 0
    copies: list[tuple[list[int], list[int]]] = field(default_factory=list)  # per copy k: (rows, local slots)
    slots: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))  # (rows, local slots) written
    send: dict[int, list[int]] = field(default_factory=dict)  # peer -> my rows, in (expert) order
    # holder position j -> (rows, source, indices): source -1 is my partial, else a peer's receive buffer
    terms: list[list[tuple[list[int], int, list[int]]]] = field(default_factory=list)


def _replica_plan(phy2log: list[list[int]], me: int, world: int, S: int) -> list[_LayerPlan]:
    """The exchange of every layer, as every rank derives it from the same placement."""
    plans = []
    for row in phy2log:
        slots_of: dict[int, list[int]] = {}
        for q, e in enumerate(row):
            slots_of.setdefault(e, []).append(q)
        plan = _LayerPlan()
        mine = sorted(e for e, qs in slots_of.items() if len(qs) > 1 and any(q // S == me for q in qs))
        index = {e: i for i, e in enumerate(mine)}
        plan.rows = len(mine)
        received: dict[int, list[int]] = {}  # peer -> experts in the order they arrive
        by_position: dict[int, list[tuple[int, int, int]]] = {}  # j -> (row, source, index in source)
        for e in mine:
            local = [q - me * S for q in slots_of[e] if q // S == me]
            for k, q in enumerate(local):
                while len(plan.copies) <= k:
                    plan.copies.append(([], []))
                plan.copies[k][0].append(index[e])
                plan.copies[k][1].append(q)
            holders = sorted({q // S for q in slots_of[e]})
            for j, h in enumerate(holders):
                if h == me:
                    by_position.setdefault(j, []).append((index[e], -1, index[e]))
                else:
                    plan.send.setdefault(h, []).append(index[e])
                    received.setdefault(h, []).append(e)
                    by_position.setdefault(j, []).append((index[e], h, len(received[h]) - 1))
            plan.slots[0].extend([index[e]] * len(local))
            plan.slots[1].extend(local)
        for j in sorted(by_position):
            terms: dict[int, tuple[list[int], list[int]]] = {}
            for r, src, i in by_position[j]:
                rows, idx = terms.setdefault(src, ([], []))
                rows.append(r)
                idx.append(i)
            plan.terms.append([(rows, src, idx) for src, (rows, idx) in sorted(terms.items())])
        plans.append(plan)
    return plans


def sync_replica_grads(
    expert_params: Sequence[torch.Tensor | Sequence[torch.Tensor]],
    phy2log: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    check: bool = True,
) -> ReplicaSyncStats:
    """Make every replica of an expert hold the same gradient: the sum over all its copies.

    After the backward pass each slot's ``.grad`` holds only the tokens that slot served. This
    sets the ``.grad`` of every slot of a replicated expert to the sum of the ``.grad`` of all
    slots, on all ranks, that hold the same expert, so that the replicas stay identical after the
    optimizer step; slots of experts with a single copy are not touched. Call it between
    ``loss.backward()`` and ``optimizer.step()``.

    Only replicated experts communicate: each holder of expert ``e`` computes its local partial
    (its own copies of ``e`` added in slot order) and sends it to the ``h_e - 1`` other ranks that
    hold ``e``, in one batched point-to-point exchange per peer for all layers. Per rank and step
    that is ``sum over the replicated experts e it holds of (h_e - 1) x (bytes of one expert's
    gradients)`` sent, and as much received (``h_e``: ranks holding ``e``); ranks that share no
    replicated expert exchange nothing. Every holder then adds the partials in rank order, the
    same additions on every rank: the replicas' gradients are bitwise identical.

    Args:
        expert_params: per layer, this rank's expert parameter ``[S, ...]`` or a sequence of them
            (e.g. ``(w13, w2)``), slot-major (slot ``rank * S + i`` is row ``i``), as for
            :func:`rearrange_expert_weights`. Every one must have a ``.grad``.
        phy2log: ``[L, R]`` the placement in service, identical on every rank; read on the host
            once per call (a CUDA tensor costs one synchronisation: keep a CPU copy, refreshed when
            the placement changes, to avoid it).
        group: the expert-parallel group (default: the world); ``R = S x`` its size. Without
            ``torch.distributed`` (and ``group=None``) only copies on this process are summed.
        check: first check with one small all-gather that every rank passes the same placement
            and layout and that every input is valid; every rank raises the same
            ``EplbArgumentError`` otherwise and no gradient changes. ``False`` skips it (a bad input
            on one rank then raises there alone, and the others wait in the exchange until the
            group's timeout).

    Returns:
        :class:`ReplicaSyncStats` of this rank.

    Example:
        >>> loss.backward()  # doctest: +SKIP
        >>> sync_replica_grads([(layer.w13, layer.w2) for layer in moe_layers], phy2log_cpu, ep_group)
        >>> optimizer.step()
    """
    local = _single_process(group)
    world = 1 if local else dist.get_world_size(group)
    me = 0 if local else dist.get_rank(group)
    problem = None
    digests = [0, 0]
    try:
        if not isinstance(phy2log, torch.Tensor) or phy2log.is_floating_point() or phy2log.dtype == torch.bool:
            raise TypeError(f"phy2log must be an integer tensor, got {getattr(phy2log, 'dtype', phy2log)}")
        if phy2log.dim() != 2:
            raise EplbArgumentError(f"phy2log must be 2-D [num_layers, num_replicas], got {tuple(phy2log.shape)}")
        table = phy2log.cpu().tolist()
        layers = _layers(expert_params, "expert_params")
        layout = [[(str(t.dtype), tuple(t.shape)) for t in tensors] for tensors in layers]
        digests = [_digest(table), _digest(layout)]
        L, R = phy2log.shape
        S = _check_slot_layout(layers, "expert_params", (L, R), world, "phy2log")
        for i, tensors in enumerate(layers):
            for j, t in enumerate(tensors):
                if t.grad is None:
                    raise EplbArgumentError(f"expert_params[{i}][{j}] has no .grad: call it after backward()")
        if any(e < 0 for row in table for e in row):
            raise EplbArgumentError("phy2log has an expert id < 0")
    except Exception as exc:
        if not check:
            raise
        problem = exc
    if check:
        _agree(digests, ("phy2log", "expert_params layout"), group, problem)
    plans = _replica_plan(table, me, world, S)
    peer = [dist.get_global_rank(group, r) if group is not None else r for r in range(world)]
    with torch.no_grad():
        return _sync(layers, plans, peer, group)


def _sync(layers: list[list[torch.Tensor]], plans: list[_LayerPlan], peer: list[int], group) -> ReplicaSyncStats:
    stats = ReplicaSyncStats()
    cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def index(values: list[int], device: torch.device) -> torch.Tensor:
        """The plan's index list as a device tensor, built once per call for all of a layer's tensors."""
        key = (id(values), device)
        if key not in cache:
            cache[key] = torch.tensor(values, device=device)
        return cache[key]

    # local partials: each replicated expert's copies on this rank, added in slot order
    partials = []
    for tensors, plan in zip(layers, plans, strict=True):
        stats.experts += plan.rows
        per_tensor = []
        for t in tensors:
            g = t.grad
            part = g.new_empty((plan.rows, *g.shape[1:]))
            for k, (rows, slots) in enumerate(plan.copies):
                r, q = index(rows, g.device), index(slots, g.device)
                if k == 0:
                    part[r] = g[q]
                else:
                    part.index_put_((r,), part[r] + g[q])
            per_tensor.append(part)
        partials.append(per_tensor)
    # one buffer per peer (and dtype), every layer's partials in order; the same order on both sides
    peers = sorted({h for plan in plans for h in plan.send})
    ops, inbox = [], {}
    for h in peers:
        out_parts: dict[torch.dtype, list[torch.Tensor]] = {}
        shapes: dict[torch.dtype, list[tuple[int, int, torch.Size]]] = {}
        for li, plan in enumerate(plans):
            rows = plan.send.get(h, [])
            if not rows:
                continue
            for ti, part in enumerate(partials[li]):
                sel = part[index(rows, part.device)]
                out_parts.setdefault(part.dtype, []).append(sel.reshape(-1))
                shapes.setdefault(part.dtype, []).append((li, ti, sel.shape))
        for dtype, chunks in out_parts.items():
            send = torch.cat(chunks)
            recv = torch.empty_like(send)
            stats.bytes_sent += send.numel() * send.element_size()
            stats.bytes_received += recv.numel() * recv.element_size()
            ops += [dist.P2POp(dist.isend, send, peer[h], group), dist.P2POp(dist.irecv, recv, peer[h], group)]
            inbox[(h, dtype)] = (recv, shapes[dtype])
    _post(ops, group)
    received: dict[tuple[int, int, int], torch.Tensor] = {}  # (peer, layer, tensor) -> rows that peer sent
    for (h, _), (recv, shapes) in inbox.items():
        offset = 0
        for li, ti, shape in shapes:
            n = shape.numel()
            received[(h, li, ti)] = recv[offset : offset + n].view(shape)
            offset += n
    # totals: the holders' partials added in rank order, then written to every local copy
    for li, (tensors, plan) in enumerate(zip(layers, plans, strict=True)):
        for ti, t in enumerate(tensors):
            mine = partials[li][ti]
            total = None
            for j, terms in enumerate(plan.terms):
                for rows, src, idx in terms:
                    source = mine if src < 0 else received[(src, li, ti)]
                    r, i = index(rows, mine.device), index(idx, mine.device)
                    if j == 0:
                        if total is None:
                            total = torch.empty_like(mine)
                        total[r] = source[i]
                    else:
                        total.index_put_((r,), total[r] + source[i])
            if total is not None:
                rows, slots = (index(v, mine.device) for v in plan.slots)
                t.grad[slots] = total[rows]
    return stats
