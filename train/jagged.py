"""Jagged batches: per feature field, ids (values), offsets and weights, torch-side.

Layout (field-major, like TorchRec's KeyedJaggedTensor)::

    keys     = ["user_id", "hist"]            F = 2 fields, B = 3 rows
    values   = [u0 u1 u2 | h0 h1 h2 h3]       ids, local to each field's table
    offsets  = [0 1 2 3 5 5 7]                len F*B+1: bag (f, b) is values[offsets[f*B+b]:offsets[f*B+b+1]]
    weights  = [1 1 1 | .5 2 1 1]             1.0 for unweighted fields; None when no field
                                              is weighted (every weight 1)

Row 1 has no "hist" ids (an empty bag pools to zeros).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


_UNIT_OFFSETS: dict[int, torch.Tensor] = {}


def unit_offsets(n: int) -> torch.Tensor:
    """``arange(n + 1)``: the offsets of n bags of one value each, one shared tensor per n
    (never written to), so ``has_unit_offsets`` knows them without reading them."""
    t = _UNIT_OFFSETS.get(n)
    if t is None:
        if len(_UNIT_OFFSETS) >= 8:  # batch sizes x field counts of a run: a handful
            _UNIT_OFFSETS.clear()
        t = _UNIT_OFFSETS[n] = torch.arange(n + 1)
    return t


def has_unit_offsets(offsets: torch.Tensor) -> bool:
    """Whether ``offsets`` is the shared ``unit_offsets`` tensor (False says nothing)."""
    return _UNIT_OFFSETS.get(offsets.numel() - 1) is offsets


@dataclass
class KeyedJagged:
    keys: list[str]
    values: torch.Tensor  # int64 [N]
    offsets: torch.Tensor  # int64 [F*B + 1]
    weights: torch.Tensor | None  # float32 [N]; None = every weight 1
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


def take_bags(values: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor,
              weights: torch.Tensor | None = None):
    """Gather bags ``rows`` of one jagged array (values, offsets) without a Python loop.

    Returns (values, offsets, weights) of the gathered bags, offsets starting at 0.
    ``rows`` may repeat and be in any order (used for shuffling and oversampling).
    """
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new_offsets = torch.zeros(rows.numel() + 1, dtype=offsets.dtype)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    n = int(new_offsets[-1])
    # value j of gathered bag k sits at starts[k] + (j - new_offsets[k])
    src = torch.repeat_interleave(starts - new_offsets[:-1], lengths, output_size=n)
    src += torch.arange(n, dtype=src.dtype)
    return values[src], new_offsets, (None if weights is None else weights[src])


def take_rows(kjt: KeyedJagged, rows: torch.Tensor) -> KeyedJagged:
    """The rows ``rows`` (int64 indices, repeats allowed) of every field of ``kjt``."""
    B, nF, k = kjt.batch_size, len(kjt.keys), rows.numel()
    # bag (f, rows[i]) of the input is bag f*B + rows[i]; gather all fields in one call
    bag = (torch.arange(nF).unsqueeze(1) * B + rows.unsqueeze(0)).reshape(-1)
    values, offsets, weights = take_bags(kjt.values, kjt.offsets, bag, kjt.weights)
    return KeyedJagged(kjt.keys, values, offsets, weights, k)


def take_batch(batch: Batch, rows: torch.Tensor, weight: torch.Tensor | None = None) -> Batch:
    """Rows ``rows`` of ``batch``; ``weight`` (per selected row) replaces the sample weights."""
    if weight is None and batch.weight is not None:
        weight = batch.weight[rows]
    return Batch(take_rows(batch.features, rows), batch.click[rows], batch.conversion[rows], weight)
