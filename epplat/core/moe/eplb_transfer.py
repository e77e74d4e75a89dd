"""Moving expert weights to a new placement: a plan (pure), point-to-point exchange, commit.

Only slots whose logical expert changes get new weights. Each comes from a slot that
held that expert before: one on the same rank when there is one (a local copy), else
one of its holders chosen round robin (spreading the sends). Every rank derives the same
plan from the old and new placements, so senders and receivers agree without talking.
A rank's payload for one peer is packed into one buffer and the exchange is one
``batch_isend_irecv`` over the EP group; received weights are staged and copied into
the slots only at commit, so forward steps may keep reading the old ones meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Move:
    layer: int      # index among the MoE layers
    src: int        # slot (global) in the old placement that holds the expert
    dst: int        # slot (global) that gets it in the new placement


def keep_in_place(old: torch.Tensor, new: torch.Tensor, num_local: int) -> torch.Tensor:
    """``new`` [L, P] with each rank's slots reordered so that experts a slot already holds stay
    there (the order of slots within a rank changes nothing else), so fewer weights move."""
    out = new.clone()
    for layer in range(new.shape[0]):
        for start in range(0, new.shape[1], num_local):
            o = old[layer, start:start + num_local].tolist()
            want = new[layer, start:start + num_local].tolist()
            slots: list = [None] * num_local
            for i, expert in enumerate(o):
                if expert in want:
                    want.remove(expert)
                    slots[i] = expert
            rest = iter(want)
            out[layer, start:start + num_local] = torch.tensor([e if e is not None else next(rest) for e in slots])
    return out


def plan_moves(old: torch.Tensor, new: torch.Tensor, num_local: int) -> list[Move]:
    """The copies that turn placement ``old`` [L, P] into ``new`` [L, P] (slot -> logical expert; -1 in
    ``new``: nothing needed there)."""
    moves = []
    for layer, (o, n) in enumerate(zip(old.tolist(), new.tolist())):
        holders: dict[int, list[int]] = {}
        for slot, expert in enumerate(o):
            holders.setdefault(expert, []).append(slot)
        for dst, expert in enumerate(n):
            if expert < 0 or o[dst] == expert:      # -1: the slot is left empty (a departing rank's)
                continue
            srcs = holders[expert]
            local = [s for s in srcs if s // num_local == dst // num_local]
            moves.append(Move(layer, local[0] if local else srcs[dst % len(srcs)], dst))
    return moves


def _payload(layer, slot: int) -> torch.Tensor:
    return torch.cat([layer.w13.data[slot].reshape(-1), layer.w2.data[slot].reshape(-1)])


def exchange(moves: list[Move], layers: list, rank: int, num_local: int, group=None) -> list[tuple]:
    """Run this rank's part of the plan; returns staged (layer, local slot, payload) for commit.

    ``layers`` are the MoE layers (each with w13 [slots, H, 2I] and w2 [slots, I, H]);
    ``rank`` is this rank's index in ``group`` (None: a single process, local copies only).
    """
    sends: dict[int, list[torch.Tensor]] = {}
    recvs: dict[int, list[Move]] = {}
    staged = []
    for m in moves:
        src_rank, dst_rank = m.src // num_local, m.dst // num_local
        if src_rank == rank and dst_rank == rank:
            staged.append((m.layer, m.dst - rank * num_local, _payload(layers[m.layer], m.src - rank * num_local)))
        elif src_rank == rank:
            sends.setdefault(dst_rank, []).append(_payload(layers[m.layer], m.src - rank * num_local))
        elif dst_rank == rank:
            recvs.setdefault(src_rank, []).append(m)
    if not sends and not recvs:
        return staged
    ref = layers[0]
    size = ref.w13[0].numel() + ref.w2[0].numel()
    ops, inbox = [], {}
    for peer, parts in sends.items():
        ops.append(dist.P2POp(dist.isend, torch.cat(parts), dist.get_global_rank(group, peer), group))
    for peer, ms in recvs.items():
        inbox[peer] = torch.empty(len(ms) * size, dtype=ref.w13.dtype, device=ref.w13.device)
        ops.append(dist.P2POp(dist.irecv, inbox[peer], dist.get_global_rank(group, peer), group))
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    for peer, ms in recvs.items():
        for m, chunk in zip(ms, inbox[peer].split(size)):
            staged.append((m.layer, m.dst - rank * num_local, chunk))
    return staged


def commit(staged: list[tuple], layers: list, new: torch.Tensor) -> None:
    """Copy staged payloads into their slots and adopt the new placement [L, P] in every layer."""
    for layer_idx, slot, payload in staged:
        layer = layers[layer_idx]
        n13 = layer.w13[slot].numel()
        layer.w13.data[slot].copy_(payload[:n13].view_as(layer.w13[slot]))
        layer.w2.data[slot].copy_(payload[n13:].view_as(layer.w2[slot]))
    for layer, phy2log in zip(layers, new):
        layer.set_placement(phy2log)
