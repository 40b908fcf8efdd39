"""The two collectives the row-wise shard needs, and its process group.

``all_to_all_single`` is used in both forms torchrec's ``KJTAllToAll`` uses: first the
split sizes (one int per peer), then the payload with uneven splits. On gloo the list
form ``all_to_all`` rejects unequal sizes, so only the single-tensor form is used.
World size 1 (``group=None``) never calls into ``torch.distributed``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def shard_group() -> dist.ProcessGroup | None:
    """A process group for the embedding's all-to-alls, or None for one process.

    A group of its own (same ranks as WORLD) keeps the shard's collectives from
    interleaving with DDP's gradient all-reduces, which run asynchronously on WORLD
    during the same backward pass. Collective: every rank must call it, in the same order.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(ranks=list(range(dist.get_world_size())))


def world_of(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) for None."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Split sizes: ``send_counts[p]`` items go to peer p; returns what each peer sends here."""
    if group is None:
        return send_counts.clone()
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv


def exchange(
    payload: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Uneven all-to-all along dim 0: ``send_splits[p]`` rows go to peer p, ``recv_splits[p]`` come back."""
    if group is None:
        return payload
    out = payload.new_empty((sum(recv_splits), *payload.shape[1:]))
    dist.all_to_all_single(
        out, payload.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group
    )
    return out
