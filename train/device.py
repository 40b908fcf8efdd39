"""Devices and tower precision: pinned host batches, bf16 towers, fp32 embedding rows.

- ``to_device(batch, device)``: pins the host tensors, then copies them with
  ``non_blocking=True`` (the copy overlaps the previous step's kernels).
- ``bf16_towers(dense)``: in training mode the dense towers run under
  ``torch.autocast(bfloat16)``; their outputs come back as fp32, so losses (log-space
  products of sigmoids) stay in fp32. In eval mode they run fp32: a model's predictions are
  the same whether it was just trained or loaded from disk, on any CPU or GPU.
  The embedding rows and their optimizer state stay fp32: only ``model.dense`` is cast.
- ``resolve_tower_precision("auto"|"fp32"|"bf16", device_type)``: ``auto`` is bf16 on GPU
  and on CPUs with avx512_bf16 or AMX (bf16 matmuls in hardware), fp32 elsewhere.
- ``prepare_towers(model, precision, device_type)``: what a trainer calls once after
  building the model: fuses shared towers (``train.fused_towers.fuse_shared_towers``),
  resolves the precision, prints it, applies bf16 autocast when it resolves to bf16.
"""
from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from train.errors import InputError
from train.fused_towers import fuse_shared_towers  # noqa: F401  (re-exported)
from train.jagged import Batch, KeyedJagged

TOWER_PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matmuls


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
    """Run ``dense.forward`` under bf16 autocast while training, fp32 outputs; parameters
    stay fp32. Eval mode (validation, test, scoring) runs fp32.

    Replaces the instance's ``forward`` (state-dict keys unchanged, DDP can wrap it).
    """
    inner = dense.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not dense.training:
            return inner(*args, **kwargs)
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            out = inner(*args, **kwargs)
        return _to_fp32(out)

    dense.forward = forward
    return dense


def cpu_bf16_flag() -> str | None:
    """The first of BF16_CPU_FLAGS this CPU has (Linux /proc/cpuinfo), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return next((fl for fl in BF16_CPU_FLAGS if fl in have), None)
    except OSError:
        pass
    return None


def resolve_tower_precision(precision: str | None, device_type: str = "cpu") -> tuple[str, str]:
    """(``fp32`` | ``bf16``, why) for EsmmConfig.tower_precision on ``device_type``."""
    precision = precision or "auto"
    if precision not in TOWER_PRECISIONS:
        raise InputError(f"tower_precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision, "as set"
    if device_type == "cuda":
        return "bf16", "auto: GPU"
    flag = cpu_bf16_flag()
    if flag:
        return "bf16", f"auto: this CPU has {flag}"
    return "fp32", "auto: this CPU has no avx512_bf16 or AMX"


def prepare_towers(model: nn.Module, precision: str | None = "auto", device_type: str = "cpu",
                   announce: bool = True) -> str:
    """Fuse shared towers, resolve ``precision`` (auto | fp32 | bf16) for ``device_type``,
    print it (stderr, one line) and run ``model.dense`` under bf16 autocast when it is bf16.
    Returns the resolved precision."""
    resolved, why = resolve_tower_precision(precision, device_type)
    fuse_shared_towers(model.dense)
    if resolved == "bf16":
        bf16_towers(model.dense, device_type)
    if announce:
        print(f"esmm: tower precision {resolved} ({why})", file=sys.stderr, flush=True)
    return resolved
