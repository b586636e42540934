"""Moving expert weights between ranks after a new placement, over ``torch.distributed``.

Rank ``r`` of the expert-parallel group holds slots ``r * S .. r * S + S - 1`` (``S = R / world``)
of every layer. :func:`rearrange_expert_weights` makes every rank hold the experts of the new
placement: a slot whose expert did not change is not touched; a changed slot is filled by a local
copy when the rank already held that expert, else by a point-to-point transfer from a rank that
held it (sources spread over the holders, round-robin). Every rank derives the same transfer list
from the two placements, so sends and receives match without any extra communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class RearrangeStats:
    """What this rank did: slots rewritten from its own old experts, slots received, experts sent."""

    local_copies: int = 0
    received: int = 0
    sent: int = 0


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
    backend = dist.get_backend(group)
    if backend in ("nccl", "gloo", "ucc"):  # the backends batch_isend_irecv supports
        reqs = dist.batch_isend_irecv(ops)
    else:
        reqs = [op.op(op.tensor, op.peer, op.group) for op in ops]
    for req in reqs:
        req.wait()


def rearrange_expert_weights(
    expert_weights: Sequence[torch.Tensor | Sequence[torch.Tensor]],
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    max_inflight: int = 32,
) -> RearrangeStats:
    """Move expert weights in place so that this rank holds its slots of ``new_phy2log``.

    Args:
        expert_weights: per layer, this rank's expert tensor ``[S, ...]`` or a sequence of them
            (e.g. ``(w13, w2)``), slot-major; all ranks pass the same structure and shapes.
        old_phy2log, new_phy2log: ``[L, R]`` placements, identical on every rank (any device).
        group: the expert-parallel process group (default: the world); its size must be ``R / S``.
        max_inflight: experts per batch of point-to-point operations (bounds in-flight requests).

    Peak extra memory is one layer's changed slots on this rank (received experts, and copies of
    local sources that are themselves overwritten). Nothing is read after it is overwritten: a
    layer's slots are written only after all of that layer's sends and receives have completed.

    Returns:
        :class:`RearrangeStats` for this rank.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("rearrange_expert_weights needs an initialised torch.distributed process group")
    if old_phy2log.shape != new_phy2log.shape or old_phy2log.dim() != 2:
        raise ValueError(
            f"old_phy2log and new_phy2log must be 2-D of one shape, got {tuple(old_phy2log.shape)} "
            f"and {tuple(new_phy2log.shape)}"
        )
    if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
        raise ValueError(f"max_inflight ({max_inflight!r}) must be a positive int")
    L, R = old_phy2log.shape
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    if R % world:
        raise ValueError(f"num_replicas ({R}) must be a multiple of the group size ({world})")
    S = R // world
    if len(expert_weights) != L:
        raise ValueError(f"expert_weights has {len(expert_weights)} layers, the placements have {L}")
    layers = [[w] if isinstance(w, torch.Tensor) else list(w) for w in expert_weights]
    for i, tensors in enumerate(layers):
        for t in tensors:
            if t.dim() < 1 or t.shape[0] != S:
                raise ValueError(f"expert_weights[{i}] tensors must be [slots_per_rank={S}, ...], got {tuple(t.shape)}")
    peer = [dist.get_global_rank(group, r) if group is not None else r for r in range(world)]
    old_all, new_all = old_phy2log.cpu().tolist(), new_phy2log.cpu().tolist()

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
        for start in range(0, len(transfers), max_inflight):
            ops = []
            for e, src, dst in transfers[start : start + max_inflight]:
                if src == me:
                    ops += [dist.P2POp(dist.isend, t[local_slot[e]].contiguous(), peer[dst], group) for t in tensors]
                    stats.sent += 1
                if dst == me:
                    received[e] = [torch.empty_like(t[0]) for t in tensors]
                    ops += [dist.P2POp(dist.irecv, buf, peer[src], group) for buf in received[e]]
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
