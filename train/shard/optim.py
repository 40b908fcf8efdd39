"""Sparse row-wise optimizers that live with the rows they update.

Each owner updates only the rows a step touched (the batch's unique ids it owns), with
state tensors aligned to its local rows, so optimizer state is sharded exactly like the
rows and a checkpoint re-shards both the same way (``train/shard/checkpoint.py``).

- ``adagrad``: row-wise Adagrad (FBGEMM's ``rowwise_adagrad``): one accumulator per row,
  ``s += mean(g^2)``, ``row -= lr * g / (sqrt(s) + eps)``. 4 bytes of state per row.
- ``adam``: lazy Adam: first and second moments of touched rows only, untouched rows
  neither decay nor move. Bias correction by ``sparse_bias_correction``:
  ``"row"`` (default) counts steps per row, so a rare row's first update is as large
  as a frequent row's first update; ``"global"`` uses the optimizer's step count, which
  is exactly ``torch.optim.SparseAdam`` (same formula, eps added to the uncorrected
  ``sqrt(v)``: ``row -= lr * sqrt(1-b2^t) / (1-b1^t) * m / (sqrt(v) + eps)``).

Config keys (``make_optimizer(cfg)``): ``sparse_optimizer`` (adam | adagrad),
``sparse_lr`` (else ``lr``, else 1e-3), ``betas``, ``eps``, ``sparse_bias_correction``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from train.errors import InputError
from train.shard.row_kernels import for_tensor
from train.shard.table_memory import table_zeros

if TYPE_CHECKING:  # pragma: no cover
    from train.shard.collection import ShardedEmbeddingCollection


class GroupedGrads(NamedTuple):
    """The touched rows' gradients before they are summed: every sample's gradient row
    (``samples``: [P, dim] in sample order, or [B, F, dim] with each sample's F rows side by
    side, samples possibly further apart: the towers' padded input gradient, as it came)
    and the positions of each unique row's samples (``order[starts[u]:starts[u + 1]]``, from
    the dedup). The fused kernels sum each group in the pass that updates its row; ``sum()``
    gives the [U, dim] sums for the torch ops."""

    samples: torch.Tensor
    order: torch.Tensor
    starts: torch.Tensor

    def sum(self) -> torch.Tensor:
        rows = self.samples.reshape(-1, self.samples.shape[-1])
        return F.embedding_bag(self.order, rows, self.starts, mode="sum")  # [U, dim]


def summed(grad: "torch.Tensor | GroupedGrads") -> torch.Tensor:
    """[U, dim] row gradients, summing the groups when they are not summed yet."""
    return grad.sum() if isinstance(grad, GroupedGrads) else grad


def kernel_grads(grad: "torch.Tensor | GroupedGrads") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad, order, starts) as the fused kernels take them: empty order and starts when the
    rows' gradients are summed already. A [B, F, dim] ``samples`` whose rows lie side by side
    within each sample goes as it is (the kernels step over the gap between samples)."""
    if isinstance(grad, GroupedGrads):
        g = grad.samples
        d = g.shape[-1]
        strided = g.dim() == 3 and g.stride(2) == 1 and g.stride(1) == d and g.stride(0) >= g.shape[1] * d
        return (g if strided else g.reshape(-1, d).contiguous()), grad.order, grad.starts
    none = torch.empty(0, dtype=torch.long)
    return grad.contiguous(), none, none


def add_rows(rows: torch.Tensor, idx: torch.Tensor, upd: torch.Tensor) -> None:
    """``rows[idx] += upd`` for unique ``idx`` (take_grads dedups): gather, add, one scatter.
    The same float adds as ``index_add_``, whose CPU kernel (a serial scatter_add_) is ~2.5x
    slower at 15k of 0.7M rows."""
    rows.index_copy_(0, idx, rows.index_select(0, idx).add_(upd))


class RowWiseOptimizer:
    """Base: collects the rows' pending gradients, sums duplicates, calls ``_update``."""

    kind = ""
    row_state_names: tuple[str, ...] = ()

    def __init__(self, emb: "ShardedEmbeddingCollection", lr: float, eps: float):
        self.emb = emb
        self.lr = float(lr)
        self.eps = float(eps)
        self.step_count = 0
        self.row_state: dict[str, torch.Tensor] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.emb.pending_grads.clear()

    @torch.no_grad()
    def step(self) -> None:
        idx, grad = self.emb.take_grads(grouped=True)
        if idx is None:  # no backward reached the table (a step of blank rows only): no step
            return
        self.step_count += 1
        if idx.numel():
            self._update(idx, grad)

    def _update(self, idx: torch.Tensor, grad: "torch.Tensor | GroupedGrads") -> None:  # pragma: no cover
        """Update rows ``idx`` (unique) with their gradients (summed, or GroupedGrads)."""
        raise NotImplementedError

    def hparams(self) -> dict:
        return {"lr": self.lr, "eps": self.eps}

    def state_dict(self) -> dict:
        """This shard's state: hyper-parameters, step count, row-aligned tensors."""
        return {
            "kind": self.kind, "hparams": self.hparams(), "step": self.step_count,
            "num_rows": self.emb.num_rows, "rows": dict(self.row_state),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"optimizer state is {state.get('kind')!r}, this optimizer is {self.kind!r}")
        self.step_count = int(state["step"])
        for name in self.row_state_names:
            src = state["rows"][name]
            dst = self.row_state[name]
            if src.shape != dst.shape:
                raise ValueError(f"optimizer state {name}: shape {tuple(src.shape)}, shard has {tuple(dst.shape)}")
            dst.copy_(src)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.row_state.values())

    def to(self, device: torch.device | str) -> "RowWiseOptimizer":
        self.row_state = {k: v.to(device) for k, v in self.row_state.items()}
        return self


class RowWiseAdagrad(RowWiseOptimizer):
    kind = "adagrad"
    row_state_names = ("sum",)

    def __init__(self, emb: "ShardedEmbeddingCollection", lr: float = 1e-2, eps: float = 1e-8):
        super().__init__(emb, lr, eps)
        self.row_state["sum"] = table_zeros((emb.rows.shape[0],), device=emb.rows.device)

    def _update(self, idx: torch.Tensor, grad: "torch.Tensor | GroupedGrads") -> None:
        s = self.row_state["sum"]
        fused = for_tensor(self.emb.rows)
        if fused is not None:  # the same update in one prefetched pass (train/shard/row_kernels.py)
            fused.rowwise_adagrad(self.emb.rows, s, idx, *kernel_grads(grad), self.lr, self.eps)
            return
        grad = summed(grad)
        si = s.index_select(0, idx).add_(grad.square().mean(1))  # [n]
        s.index_copy_(0, idx, si)
        upd = grad / si.sqrt_().add_(self.eps).mul_(-1.0 / self.lr).unsqueeze(1)  # -lr * g / (sqrt(s) + eps)
        add_rows(self.emb.rows, idx, upd)


class LazyAdam(RowWiseOptimizer):
    kind = "adam"
    row_state_names = ("exp_avg", "exp_avg_sq", "row_step")

    def __init__(
        self,
        emb: "ShardedEmbeddingCollection",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        bias_correction: str = "row",
    ):
        super().__init__(emb, lr, eps)
        if bias_correction not in ("row", "global"):
            raise InputError(f"sparse_bias_correction must be 'row' or 'global', got {bias_correction!r}")
        self.b1, self.b2 = float(betas[0]), float(betas[1])
        self.bias_correction = bias_correction
        n, d, dev = emb.rows.shape[0], emb.rows.shape[1], emb.rows.device
        self._alloc(table_zeros((n, 2, d), device=dev), table_zeros((n,), torch.int32, dev))

    def _alloc(self, mv: torch.Tensor, row_step: torch.Tensor) -> None:
        # m and v side by side ([n, 2, dim]): one gather and one scatter per step for both;
        # the state dict still names them apart (views of this one tensor)
        self.mv = mv
        self.row_state["exp_avg"], self.row_state["exp_avg_sq"] = mv[:, 0], mv[:, 1]
        # per-row update counts (used by "row" bias correction; kept in both modes so a
        # checkpoint can switch modes)
        self.row_state["row_step"] = row_step
        self._scale = None

    def to(self, device: torch.device | str) -> "LazyAdam":
        self._alloc(self.mv.to(device), self.row_state["row_step"].to(device))
        return self

    def hparams(self) -> dict:
        return {**super().hparams(), "betas": (self.b1, self.b2), "bias_correction": self.bias_correction}

    def _scale_table(self) -> torch.Tensor:
        """-lr * sqrt(1 - b2^k) / (1 - b1^k) for k = 0, 1, ..., computed once in float64 (the
        same values a per-step float64 pow gives). Past the table's end both powers are
        below float64's resolution next to 1, so its last entry is exact there."""
        key = (self.lr, self.b1, self.b2)
        if self._scale is None or self._scale_key != key:
            big = max(self.b1, self.b2)  # big^(n-1) < 2^-60: 1 - it rounds to 1 in float64
            n = 2 if big <= 0.0 else min(int(math.ceil(-60.0 * math.log(2.0) / math.log(big))) + 2, 1 << 22)
            t = torch.arange(n, dtype=torch.float64).clamp_(min=1)
            table = (1.0 - torch.pow(self.b2, t)).sqrt_().div_(1.0 - torch.pow(self.b1, t)).mul_(-self.lr)
            self._scale, self._scale_key = table.to(torch.float32).to(self.mv.device), key
        return self._scale

    def _row_scale(self, k: torch.Tensor) -> torch.Tensor:
        """The scale of each row's k-th update, looked up in ``_scale_table``."""
        table = self._scale_table()
        return table[k.clamp(max=table.numel() - 1)]

    def _update(self, idx: torch.Tensor, grad: "torch.Tensor | GroupedGrads") -> None:
        t = self.row_state["row_step"]
        fused = for_tensor(self.emb.rows)
        if fused is not None:  # the same update in one prefetched pass (train/shard/row_kernels.py)
            fused.lazy_adam(self.emb.rows, self.mv, t, idx, *kernel_grads(grad), self._scales(), self.b1, self.b2,
                            self.eps)
            return
        grad = summed(grad)
        mv = self.mv.index_select(0, idx)  # [n, 2, dim]: the touched rows' m and v, one gather
        mi, vi = mv[:, 0], mv[:, 1]
        mi.lerp_(grad, 1.0 - self.b1)  # b1*m + (1-b1)*g
        vi.mul_(self.b2).addcmul_(grad, grad, value=1.0 - self.b2)
        self.mv.index_copy_(0, idx, mv)  # one scatter
        ti = t.index_select(0, idx).add_(1)
        t.index_copy_(0, idx, ti)
        upd = torch.div(mi, vi.sqrt().add_(self.eps))  # m / (sqrt(v) + eps)
        if self.bias_correction == "global":
            upd.mul_(self._global_scale())
        else:
            upd.mul_(self._row_scale(ti).unsqueeze(1))
        add_rows(self.emb.rows, idx, upd)

    def _global_scale(self) -> float:
        k = self.step_count
        return -self.lr * math.sqrt(1.0 - self.b2**k) / (1.0 - self.b1**k)

    def _scales(self) -> torch.Tensor:
        """The fused kernel's scale table: per row update count, or one global entry."""
        if self.bias_correction == "global":
            return torch.tensor([self._global_scale()], dtype=torch.float32)
        return self._scale_table()


def make_row_optimizer(emb: "ShardedEmbeddingCollection", cfg: dict | None = None) -> RowWiseOptimizer:
    cfg = cfg or {}
    kind = cfg.get("sparse_optimizer", "adam")
    lr = cfg.get("sparse_lr", cfg.get("lr", 1e-3))
    eps = cfg.get("eps", 1e-8)
    if kind == "adagrad":
        return RowWiseAdagrad(emb, lr=lr, eps=eps)
    if kind == "adam":
        return LazyAdam(
            emb, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=eps,
            bias_correction=cfg.get("sparse_bias_correction", "row"),
        )
    raise InputError(f"sparse_optimizer must be 'adam' or 'adagrad', got {kind!r}")
