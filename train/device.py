"""The GPU path's three habits: pinned host batches, bf16 towers, fp32 embedding rows.

- ``to_device(batch, device)``: pins the host tensors, then copies them with
  ``non_blocking=True`` (the copy overlaps the previous step's kernels).
- ``bf16_towers(dense)``: the dense towers run under ``torch.autocast(bfloat16)``; their
  outputs come back as fp32, so losses (log-space products of sigmoids) stay in fp32.
  The embedding rows and their optimizer state stay fp32: only ``model.dense`` is cast.
Both are no-ops on CPU unless asked (``bf16_towers(m, "cpu")`` is how tests reach it).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from train.jagged import Batch, KeyedJagged


def _move(t: torch.Tensor | None, device: torch.device, pin: bool) -> torch.Tensor | None:
    if t is None:
        return None
    if pin and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=pin)


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    device = torch.device(device)
    if device.type == "cpu":
        return batch
    pin = device.type == "cuda"
    k = batch.features
    kjt = KeyedJagged(k.keys, _move(k.values, device, pin), _move(k.offsets, device, pin),
                      _move(k.weights, device, pin), k.batch_size)
    return Batch(kjt, _move(batch.click, device, pin), _move(batch.conversion, device, pin),
                 _move(batch.weight, device, pin))


def _to_fp32(x):
    if torch.is_tensor(x) and x.is_floating_point():
        return x.float()
    if isinstance(x, (tuple, list)):
        return type(x)(_to_fp32(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    return x


def bf16_towers(dense: nn.Module, device_type: str = "cuda") -> nn.Module:
    """Run ``dense.forward`` under bf16 autocast, fp32 outputs; parameters stay fp32.

    Replaces the instance's ``forward`` (state-dict keys unchanged, DDP can wrap it).
    """
    inner = dense.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            out = inner(*args, **kwargs)
        return _to_fp32(out)

    dense.forward = forward
    return dense
