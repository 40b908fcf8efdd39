"""Synthetic Ali-CCP-shaped batches for the embedding benches (no data files needed).

23 fields like Ali-CCP's: 15 single-valued (vocabularies from 5 to 300k ids) and 8
multi-valued behaviour fields (mean length ``multi_len``), ids skewed (a few hot ids,
a long tail) as in click logs. The same (seed, step) gives the same batch everywhere,
so every variant of a bench, in any process or venv, sees the same batches.
"""
from __future__ import annotations

import torch

from train.embedding import FieldConfig
from train.jagged import KeyedJagged

SINGLE_VOCABS = [300_000, 200_000, 100_000, 50_000, 20_000, 10_000, 5_000, 2_000, 1_000, 500, 100, 50, 20, 10, 5]
MULTI_VOCABS = [100_000, 50_000, 20_000, 10_000, 5_000, 1_000, 500, 100]


def bench_fields(scale: float = 1.0) -> list[FieldConfig]:
    """The 23 fields; ``scale`` multiplies every vocabulary (for the memory figures)."""
    out = [FieldConfig(f"s{i}", "single", max(2, int(v * scale))) for i, v in enumerate(SINGLE_VOCABS)]
    out += [FieldConfig(f"m{i}", "multi", max(2, int(v * scale))) for i, v in enumerate(MULTI_VOCABS)]
    return out


def bench_batch(fields: list[FieldConfig], batch_size: int, step: int, seed: int = 0,
                multi_len: int = 3) -> KeyedJagged:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    vals, lens = [], []
    for f in fields:
        if f.kind == "single":
            L = torch.ones(batch_size, dtype=torch.long)
        else:
            L = torch.randint(0, 2 * multi_len + 1, (batch_size,), generator=g)
        n = int(L.sum())
        u = torch.rand(n, generator=g)
        vals.append((u.pow(3) * f.vocab_size).long().clamp_(max=f.vocab_size - 1))  # skewed to low ids
        lens.append(L)
    lens = torch.cat(lens)
    offsets = torch.zeros(lens.numel() + 1, dtype=torch.long)
    offsets[1:] = lens.cumsum(0)
    values = torch.cat(vals)
    return KeyedJagged([f.name for f in fields], values, offsets, torch.ones(values.numel()), batch_size)
