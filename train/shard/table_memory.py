"""Memory for the embedding tables and their row-wise optimizer state (and a split's id
grid, ``train.data``, whose rows a shuffled batch reads at random): 2 MB pages.

A step reads and writes ~15-20k random rows of tables of 0.1-1 GB (rows, Adam's m and v,
the step counts, the dedup's markers). On 4 KB pages nearly every row is a TLB miss with
a page walk of its own; on 2 MB pages the page walks all but vanish. Linux gives a mapping
2 MB pages only where it is advised to (``transparent_hugepage`` = madvise, the common
default), so each large table is its own anonymous mapping advised MADV_HUGEPAGE before
its first touch. Measured on Ali-CCP's vocabulary sizes (4.7M rows, bench/train.py
--vocab real): see the README's profile table. Where the advice is not available the
mapping keeps 4 KB pages: the same memory, the same values.
"""
from __future__ import annotations

import math
import mmap

import torch

MIN_BYTES = 4 << 20  # below two pages the advice buys nothing: torch's own allocation


def table_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """An uninitialised CPU tensor for a table of rows, in 2 MB pages where the kernel
    grants them (elsewhere than the CPU: ``torch.empty``). The tensor owns its mapping: it
    is unmapped when the last tensor using it is freed."""
    if device is not None and torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < MIN_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(shape, dtype=dtype)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no THP in this kernel or Python: 4 KB pages
        pass
    return torch.frombuffer(m, dtype=dtype, count=numel).view(shape)


def table_zeros(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    return table_empty(shape, dtype, device).zero_()


def table_full(shape: tuple[int, ...], value, dtype: torch.dtype) -> torch.Tensor:
    return table_empty(shape, dtype).fill_(value)

