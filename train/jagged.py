"""Jagged batches: per feature field, ids (values), offsets and weights, torch-side.

Layout (field-major, like TorchRec's KeyedJaggedTensor)::

    keys     = ["user_id", "hist"]            F = 2 fields, B = 3 rows
    values   = [u0 u1 u2 | h0 h1 h2 h3]       ids, local to each field's table
    offsets  = [0 1 2 3 5 5 7]                len F*B+1: bag (f, b) is values[offsets[f*B+b]:offsets[f*B+b+1]]
    weights  = [1 1 1 | .5 2 1 1]             1.0 for unweighted fields

Row 1 has no "hist" ids (an empty bag pools to zeros).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KeyedJagged:
    keys: list[str]
    values: torch.Tensor  # int64 [N]
    offsets: torch.Tensor  # int64 [F*B + 1]
    weights: torch.Tensor  # float32 [N]
    batch_size: int

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


@dataclass
class Batch:
    features: KeyedJagged
    click: torch.Tensor  # float32 [B], y
    conversion: torch.Tensor  # float32 [B], z (z=1 implies y=1)
    weight: torch.Tensor | None = None  # float32 [B] per-sample loss weight (baselines), None = 1

    @property
    def size(self) -> int:
        return self.features.batch_size
