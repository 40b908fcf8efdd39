"""Row-wise sharded embedding collection: parameter-server style, on all-to-all.

Every field's table lives in one global id space (``gid = field_offset[f] + id``) and
each global row has exactly one owner::

    owner(gid) = gid % W          local row at the owner = gid // W

    W = 2, fields user_id (vocab 4) and item (vocab 3): gids 0..6
        rank 0 owns gids 0 2 4 6  -> local rows 0 1 2 3
        rank 1 owns gids 1 3 5    -> local rows 0 1 2

(torchrec's row-wise sharding gives each rank a contiguous block instead; modulo
spreads hot low ids, e.g. every field's id 0, over all ranks.)

One step on rank r, for its own part of the global batch::

    input_dist   dedup the batch's gids (torch.unique, inverse kept), bucket them by
                 owner, send the split sizes, then the ids (all_to_all_single, uneven)
                 rank 0 batch gids [4 1 4 3] -> unique [4 | 1 3] -> to rank 0: [4],  to rank 1: [1 3]
                 rank 1 batch gids [2 3]     -> unique [2 | 3]   -> to rank 0: [2],  to rank 1: [3]
    lookup       each owner gathers the rows it was asked for, once per requester
                 rank 0 serves [4 | 2], rank 1 serves [1 3 | 3]
    output_dist  the rows travel back (the reverse all-to-all) and are pooled per
                 field (sum or mean, with weights) through the inverse index
    backward     row gradients travel to the owners (the same all-to-all reversed),
                 are summed per row, and wait there for ``opt.step()``, which applies
                 a sparse row-wise optimizer (train/shard/optim.py) to those rows only.

Rows and optimizer state are plain tensors, not ``nn.Parameter`` or buffers, so DDP
neither all-reduces nor broadcasts them; only the dense layers are data-parallel.
Row gradients are averaged over ranks exactly as DDP averages dense gradients, so a
per-rank mean loss trains like the mean over the global batch.

World size 1 (``group=None``) is the same code with the exchanges skipped; it is the
production single-process path, so it is kept lean (the dedup and one gather into sample
order, in one pass of the fused ``dedup_gather`` kernel, else F small sorts and an
index_select; each unique row's gradient summed from its samples' rows by the fused
optimizer kernel as it updates the row, else by one embedding_bag; an update of the unique
rows only). The tables and their optimizer state sit in 2 MB pages (table_memory.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train.embedding import FieldConfig
from train.jagged import KeyedJagged, has_unit_offsets
from train.shard.comm import exchange, exchange_counts, world_of
from train.shard.optim import GroupedGrads, RowWiseOptimizer, make_row_optimizer, summed
from train.shard.row_kernels import for_tensor
from train.shard.table_memory import table_empty, table_full

INIT_CHUNK = 1 << 16  # rows drawn per generator seed: the init is the same for every world size


def local_row_count(num_rows: int, rank: int, world: int) -> int:
    """Rows owned by ``rank``: gids rank, rank+W, rank+2W, ... below num_rows."""
    return max(0, (num_rows - rank + world - 1) // world)


def owned_gids(num_rows: int, rank: int, world: int, device=None) -> torch.Tensor:
    """Global ids of ``rank``'s local rows, in local-row order."""
    return torch.arange(rank, num_rows, world, device=device)


def init_rows(num_rows: int, dim: int, rank: int, world: int, std: float, seed: int) -> torch.Tensor:
    """This rank's rows of an N(0, std) table that does not depend on the world size.

    The table is drawn in fixed chunks, each from its own seed, and every rank keeps its
    rows of each chunk: peak memory is one chunk, not the table.
    """
    out = table_empty((local_row_count(num_rows, rank, world), dim))
    for c0 in range(0, num_rows, INIT_CHUNK):
        g = torch.Generator().manual_seed(seed * 1_000_003 + c0 // INIT_CHUNK)
        block = torch.randn(min(INIT_CHUNK, num_rows - c0), dim, generator=g).mul_(std)
        first = c0 + (rank - c0) % world  # first gid >= c0 owned by rank
        mine = block[first - c0 :: world]
        out[first // world : first // world + mine.shape[0]] = mine
    return out


def dedup_field_major(field_major: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uniq, order, starts) of the ids ``field_major.t().reshape(-1)`` (sample order), for an
    [F, B] grid whose rows hold disjoint, ascending id ranges (field f's global ids): uniq
    ascending (what torch.unique gives), ``order`` what a stable sort of the sample-order ids
    gives, so unique id u sits at positions order[starts[u]:starts[u+1]], ascending.

    F sorts of B ids (~2x faster than one sort of B*F here): the rows concatenated are the
    global order, and a stable sort keeps equal ids in ascending b, i.e. in ascending
    sample-order position b*F + f."""
    nF = field_major.shape[0]
    ids, b = field_major.sort(dim=1, stable=True)
    ids = ids.view(-1)
    order = b.mul_(nF).add_(torch.arange(nF, device=b.device).unsqueeze(1)).view(-1)
    first = torch.ones_like(ids, dtype=torch.bool)
    torch.ne(ids[1:], ids[:-1], out=first[1:])
    starts = first.nonzero().squeeze(1)
    return ids.index_select(0, starts), order, starts


@dataclass
class ShardPlan:
    """What input_dist decided for one batch (kept for output_dist and backward)."""

    inverse: torch.Tensor  # [N] position of each value's row among the rows coming back
    send_splits: list[int]  # unique ids this rank asks of each owner
    recv_splits: list[int]  # ids each requester asks of this rank
    local: torch.Tensor  # [R] local rows this rank serves, requester-major
    unique_local: bool = field(default=False)  # ``local`` has no repeats (world 1)


class _FetchRows(torch.autograd.Function):
    """lookup + output_dist forward; gradients back to the owners on backward."""

    @staticmethod
    def forward(ctx, dummy, emb: "ShardedEmbeddingCollection", plan: ShardPlan):
        ctx.emb, ctx.plan = emb, plan
        return emb.output_dist(plan, emb.lookup(plan))

    @staticmethod
    def backward(ctx, grad_rows):
        emb, plan = ctx.emb, ctx.plan
        emb.pending_grads.append((plan.local, emb.grad_dist(plan, grad_rows), plan.unique_local))
        return None, None, None


class _GatherSingle(torch.autograd.Function):
    """World size 1, every bag one value: the dedup and one gather from the table straight
    into sample order (no [U, dim] intermediate). With the fused kernels both are one pass
    (``dedup_gather``); else F small sorts (``dedup_field_major``) and an index_select.
    Backward leaves each unique row's gradient unsummed: the sample-order gradient rows and
    the dedup's groups (``order``, ``starts``) wait as ``GroupedGrads``; the fused optimizer
    kernels sum each group in the pass that updates its row, the torch ops with an
    embedding_bag. Either way the same sums, in the same order, as index_select's backward
    (an index_add_)."""

    @staticmethod
    def forward(ctx, dummy, emb: "ShardedEmbeddingCollection", field_major):
        fused = for_tensor(emb.rows)
        if fused is not None:  # one pass with a marker per row, no sort (train/shard/row_kernels.py)
            out, uniq, order, starts = fused.dedup_gather(field_major, emb.field_offset, emb.dedup_marker(), emb.rows)
        else:
            gid_grid = field_major + emb.field_offset.unsqueeze(1)  # [F, B] global ids
            uniq, order, starts = dedup_field_major(gid_grid)
            out = emb.rows.index_select(0, gid_grid.t().reshape(-1))  # sample order [B, F]: the output rows
        if emb.serve_log is not None:
            emb.serve_log.append(([uniq.numel()], uniq))
        ctx.emb, ctx.uniq, ctx.order, ctx.starts = emb, uniq, order, starts
        return out.view(field_major.shape[1], field_major.shape[0], -1)  # [B, F, dim]

    @staticmethod
    def backward(ctx, grad):
        # [B, F, dim] as it came: the towers' input gradient may be a view of a wider matmul
        # output (train.fused_towers pads it); the kernels read it in place, no copy
        ctx.emb.pending_grads.append((ctx.uniq, GroupedGrads(grad, ctx.order, ctx.starts), True))
        return None, None, None


class _PoolBags(torch.autograd.Function):
    """Weighted sum per bag over the unique rows; backward without embedding_bag's sort.

    ``F.embedding_bag``'s CPU backward sorts the indices to build the weight gradient;
    here the gradient of each unique row is one ``index_add_`` of its values' bag
    gradients (about 10x faster at batch 2048 x 23 fields).
    """

    @staticmethod
    def forward(ctx, rows, inverse, offsets, weights, lengths):
        ctx.save_for_backward(inverse, weights, lengths)
        ctx.num_rows = rows.shape[0]
        return F.embedding_bag(inverse, rows, offsets, mode="sum", per_sample_weights=weights,
                               include_last_offset=True)  # [bags, dim]

    @staticmethod
    def backward(ctx, grad_bags):
        inverse, weights, lengths = ctx.saved_tensors
        bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths,
                                      output_size=inverse.numel())
        grad_values = grad_bags.index_select(0, bag)
        if weights is not None:  # None = every weight 1
            grad_values.mul_(weights.unsqueeze(1))
        grad_rows = grad_bags.new_zeros(ctx.num_rows, grad_bags.shape[1]).index_add_(0, inverse, grad_values)
        return grad_rows, None, None, None, None


class ShardedEmbeddingCollection(nn.Module):
    """Row-wise sharded twin of ``train.embedding.EmbeddingCollection`` (same interface).

    Args:
        fields (list[FieldConfig]): tables, in the KeyedJagged's key order.
        dim (int): embedding dimension.
        init_std (float): rows start as N(0, init_std), identical for every world size.
        group (ProcessGroup | None): the shard's process group
            (``train.shard.comm.shard_group()``); None = one process, no communication.
        seed (int): seed of the row init.

    Example::

        emb = ShardedEmbeddingCollection(fields, dim=18, group=shard_group())
        opt = emb.make_optimizer({"sparse_optimizer": "adam", "sparse_lr": 1e-3})
        pooled = emb(batch.features)          # [B_local, F, 18]
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        fields: list[FieldConfig],
        dim: int = 18,
        init_std: float = 0.01,
        group: dist.ProcessGroup | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.fields = list(fields)
        self.dim = dim
        self.group = group
        self.rank, self.world = world_of(group)
        sizes = torch.tensor([f.vocab_size for f in self.fields], dtype=torch.long)
        self.num_rows = int(sizes.sum())
        self.register_buffer("field_offset", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.mean_mask = torch.tensor([f.pooling == "mean" for f in self.fields])
        self.any_mean = bool(self.mean_mask.any())
        # keys owner-major: unique() on them buckets ids by owner and yields local rows
        self.rows_per_rank = local_row_count(self.num_rows, 0, self.world)
        self.rows = init_rows(self.num_rows, dim, self.rank, self.world, init_std, seed)  # [n_local, dim]
        self._dummy = torch.zeros(1, requires_grad=True)  # gives _FetchRows an input that needs grad
        self._marker: torch.Tensor | None = None  # dedup_gather's per-row scratch (all -1 between calls)
        # (rows, their gradients: summed, or GroupedGrads, rows unique?) of each backward
        self.pending_grads: list[tuple[torch.Tensor, torch.Tensor | GroupedGrads, bool]] = []
        self.serve_log: list[tuple[list[int], torch.Tensor]] | None = None  # tests: (recv_splits, gids)

    # -- the three steps -------------------------------------------------------
    def all_single(self, kjt: KeyedJagged) -> bool:
        """Every bag holds exactly one value of weight 1 (Ali-CCP's 23 fields): then
        pooling is a plain gather, sum and mean agree, and the values are an [F, B] grid."""
        nF, B = len(self.fields), kjt.batch_size
        if kjt.values.numel() != nF * B or nF * B == 0:
            return False
        # F*B values in F*B bags of length >= 1 means every bag has length 1 (known without
        # a pass over the offsets when they are the shared arange the data loader gives)
        if not has_unit_offsets(kjt.offsets) and int(kjt.lengths().min()) < 1:
            return False
        return kjt.weights is None or bool((kjt.weights == 1).all())

    def global_ids(self, kjt: KeyedJagged, single: bool = False) -> torch.Tensor:
        B, nF = kjt.batch_size, len(self.fields)
        if single:  # no per-value field index to build: value (f, b) sits at f*B + b
            return (kjt.values.view(nF, B) + self.field_offset.unsqueeze(1)).view(-1)
        field_of_value = torch.repeat_interleave(
            torch.arange(nF, device=kjt.values.device).repeat_interleave(B), kjt.lengths(),
            output_size=kjt.values.numel(),
        )
        return kjt.values + self.field_offset[field_of_value]

    def input_dist(self, kjt: KeyedJagged, single: bool = False) -> ShardPlan:
        gids = self.global_ids(kjt, single)
        W = self.world
        if W == 1:
            uniq, inverse = torch.unique(gids, return_inverse=True)
            n = [uniq.numel()]
            return ShardPlan(inverse, n, n, uniq, unique_local=True)
        key = (gids % W) * self.rows_per_rank + gids // W  # owner-major, then local row
        uniq, inverse = torch.unique(key, return_inverse=True)
        send_counts = torch.bincount(uniq // self.rows_per_rank, minlength=W)
        recv_counts = exchange_counts(send_counts, self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        local = exchange(uniq % self.rows_per_rank, send_splits, recv_splits, self.group)
        return ShardPlan(inverse, send_splits, recv_splits, local)

    def lookup(self, plan: ShardPlan) -> torch.Tensor:
        if self.serve_log is not None:
            self.serve_log.append((list(plan.recv_splits), plan.local * self.world + self.rank))
        return self.rows.index_select(0, plan.local)  # [R, dim]

    def output_dist(self, plan: ShardPlan, served: torch.Tensor) -> torch.Tensor:
        return exchange(served, plan.recv_splits, plan.send_splits, self.group)  # [U, dim]

    def grad_dist(self, plan: ShardPlan, grad_rows: torch.Tensor) -> torch.Tensor:
        """Reverse of output_dist: each unique row's gradient to its owner, averaged like DDP."""
        if self.world == 1:
            return grad_rows
        return exchange(grad_rows.contiguous().div(self.world), plan.send_splits, plan.recv_splits, self.group)

    def forward(self, kjt: KeyedJagged) -> torch.Tensor:
        B, nF = kjt.batch_size, len(self.fields)
        single = self.all_single(kjt)
        if single and self.world == 1:
            return self._forward_single_local(kjt)
        plan = self.input_dist(kjt, single)
        rows = _FetchRows.apply(self._dummy, self, plan)  # [U, dim], one per unique id
        if single:
            # gather straight into the [B, F, dim] layout the towers read (no transpose copy);
            # index_select's backward is the same index_add_ as _PoolBags'
            sample_major = plan.inverse.view(nF, B).t().reshape(-1)
            return rows.index_select(0, sample_major).view(B, nF, self.dim)
        lengths = kjt.lengths()
        pooled = _PoolBags.apply(rows, plan.inverse, kjt.offsets, kjt.weights, lengths).view(nF, B, self.dim)
        if self.any_mean:
            n = lengths.view(nF, B).clamp(min=1).to(pooled.dtype).unsqueeze(-1)
            pooled = torch.where(self.mean_mask.to(pooled.device).view(nF, 1, 1), pooled / n, pooled)
        return pooled.transpose(0, 1)  # [B, F, dim]

    def _forward_single_local(self, kjt: KeyedJagged) -> torch.Tensor:
        B, nF = kjt.batch_size, len(self.fields)
        field_major = kjt.values.view(nF, B).long().contiguous()
        return _GatherSingle.apply(self._dummy, self, field_major)  # [B, F, dim]

    # -- optimizer side --------------------------------------------------------
    def take_grads(self, grouped: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | GroupedGrads | None]:
        """(unique local rows, summed gradients) of every backward since the last step; with
        ``grouped``, a single backward's ``GroupedGrads`` come as they are (unsummed)."""
        pending, self.pending_grads = self.pending_grads, []
        if not pending:
            return None, None
        if len(pending) == 1 and pending[0][2]:
            return pending[0][0], pending[0][1] if grouped else summed(pending[0][1])
        idx = torch.cat([p[0] for p in pending])
        grad = torch.cat([summed(p[1]) for p in pending])
        uniq, inv = torch.unique(idx, return_inverse=True)
        return uniq, grad.new_zeros(uniq.numel(), self.dim).index_add_(0, inv, grad)

    def make_optimizer(self, cfg: dict | None = None) -> RowWiseOptimizer:
        """Sparse row-wise optimizer for this shard's rows (``sparse_optimizer``: adam | adagrad).
        At world size 1 with the fused kernels the dedup's marker is made here too, with the
        rest of the training state: made lazily, it took ~57 ms of the first step at the
        9.18M rows of Ali-CCP's sizes."""
        if self.world == 1 and for_tensor(self.rows) is not None:
            self.dedup_marker()
        return make_row_optimizer(self, cfg)

    def dedup_marker(self) -> torch.Tensor:
        """``dedup_gather``'s int32 scratch, one per row, all -1 between calls (made once)."""
        if self._marker is None:
            self._marker = table_full((self.rows.shape[0],), -1, torch.int32)
        return self._marker

    # -- devices and state -----------------------------------------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = fn(torch.zeros(0)).device  # rows follow the module's device, stay fp32
        self.rows = self.rows.to(device)
        self._dummy = torch.zeros(1, device=device, requires_grad=True)
        self._marker = None
        self.mean_mask = self.mean_mask.to(device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # ``weight``: this rank's rows. At world 1 that is the whole table, with the same
        # key and layout as the reference collection's; train/shard/checkpoint.py saves
        # a sharded run's rows per rank and re-shards them on load.
        destination[prefix + "weight"] = self.rows if keep_vars else self.rows.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        key = prefix + "weight"
        if key in unexpected:
            unexpected.remove(key)
        if key not in state_dict:
            if strict:
                missing.append(key)
            return
        src = state_dict[key]
        if tuple(src.shape) == tuple(self.rows.shape):  # this rank's rows (or the table, world 1)
            src_rows = src
        elif tuple(src.shape) == (self.num_rows, self.dim):  # a whole table: keep this rank's rows
            src_rows = src[self.rank :: self.world]
        else:
            errors.append(f"{key}: shape {tuple(src.shape)}, expected this rank's {tuple(self.rows.shape)} "
                          f"or the table's {(self.num_rows, self.dim)}")
            return
        with torch.no_grad():
            self.rows.copy_(src_rows.to(self.rows.device))

    def memory_bytes(self) -> int:
        """Bytes of this rank's rows (optimizer state: ``opt.memory_bytes()``)."""
        return self.rows.numel() * self.rows.element_size()
