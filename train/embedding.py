"""Embedding collections: one id space for all fields, pooled per field.

Interface every embedding collection here follows (the model depends on nothing else)::

    emb = EmbeddingCollection(fields, dim=18)
    pooled = emb(kjt)                 # [B, F, dim]: field f of row b pools its bag (sum, or mean)
    opt = emb.make_optimizer(cfg)     # .zero_grad(), .step(), .state_dict(), .load_state_dict()

Field f's local id i lives at global row ``field_offset[f] + i``. This is the plain,
single-process reference: rows are one ``nn.Parameter`` with sparse gradients. Its
row-wise sharded twin, ``ShardedEmbeddingCollection`` (train/shard/), has the same
interface and is also the fast single-process path (world size 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.jagged import KeyedJagged


@dataclass
class FieldConfig:
    name: str
    kind: str  # single | multi | weighted
    vocab_size: int  # rows, id 0 included
    pooling: str = "sum"  # sum | mean


class EmbeddingCollection(nn.Module):
    def __init__(self, fields: list[FieldConfig], dim: int = 18, init_std: float = 0.01):
        super().__init__()
        self.fields = list(fields)
        self.dim = dim
        sizes = torch.tensor([f.vocab_size for f in self.fields], dtype=torch.long)
        self.register_buffer("field_offset", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.weight = nn.Parameter(torch.randn(int(sizes.sum()), dim) * init_std)
        self.mean_mask = torch.tensor([f.pooling == "mean" for f in self.fields])

    def forward(self, kjt: KeyedJagged) -> torch.Tensor:
        B, nF = kjt.batch_size, len(self.fields)
        lengths = kjt.lengths()
        field_of_value = torch.repeat_interleave(
            torch.arange(nF).repeat_interleave(B), lengths, output_size=kjt.values.numel()
        )
        ids = kjt.values + self.field_offset[field_of_value]
        pooled = F.embedding_bag(
            ids, self.weight, kjt.offsets[:-1], mode="sum",
            per_sample_weights=kjt.weights, include_last_offset=False, sparse=True,
        )  # [F*B, dim]
        pooled = pooled.view(nF, B, self.dim)
        if self.mean_mask.any():
            n = lengths.view(nF, B).clamp(min=1).to(pooled.dtype).unsqueeze(-1)
            pooled = torch.where(self.mean_mask.view(nF, 1, 1), pooled / n, pooled)
        return pooled.transpose(0, 1)  # [B, F, dim]

    def make_optimizer(self, cfg: dict | None = None):
        cfg = cfg or {}
        lr = cfg.get("sparse_lr", cfg.get("lr", 1e-3))
        if cfg.get("sparse_optimizer", "adam") == "adagrad":
            return torch.optim.Adagrad([self.weight], lr=lr)
        return torch.optim.SparseAdam([self.weight], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def __getattr__(name: str):
    # The sharded twin lives in train/shard/ (which imports this module); exposed here
    # so ``from train.embedding import ShardedEmbeddingCollection`` works too.
    if name == "ShardedEmbeddingCollection":
        from train.shard.collection import ShardedEmbeddingCollection

        return ShardedEmbeddingCollection
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
