"""glibc malloc settings for a training process: keep each step's tensors in the heap.

A step allocates and frees the same tensors of a few MB every step (activations and their
gradients: [2048, 400] floats is 3.3 MB). glibc serves a block above its mmap threshold
(128 KB at start) with mmap and unmaps it on free; the threshold then rises with the
blocks freed, so whether a step's tensors are reused from the heap or fault their pages
in anew every step depends on the sizes the process happened to free before. Measured
here (``bench/profile_train.py --rows 200000 --steps 150``, six runs each way, alternating;
``ESMM_MALLOC=default`` for glibc's): three of six runs under glibc's defaults faulted
625-925 pages and spent 5.1-7.0 ms of system CPU per step (median steps 18.1-19.9 ms), the
other three 0-65 pages; with the settings below every run faulted 0-6 pages (0.3-0.6 ms
of system CPU), median steps 17.6-17.9 ms. The mean median went 18.36 -> 17.74 ms; the
best steps did not improve (mean minimum 16.20 -> 16.42 ms): what it buys is that no run
falls into the faulting mode.

``keep_step_memory()`` fixes the mmap threshold at 32 MB (blocks below it come from the
heap and are reused) and the trim threshold at 256 MB (freed memory at the heap's top
is kept up to that much). Blocks of 32 MB and more (data, tables) still go back to the
system on free. It changes nothing where the user set glibc's own knobs (``MALLOC_*``
or ``GLIBC_TUNABLES`` in the environment), with ``ESMM_MALLOC=default``, or off glibc.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 256 << 20
_done: dict = {}


def tunes_malloc(name: str) -> bool:
    """``name`` is an environment variable of glibc's own by which malloc is tuned."""
    return name.startswith("MALLOC_") or name == "GLIBC_TUNABLES"


def user_tuned() -> str | None:
    """The environment variable by which the user chose malloc's settings, if any."""
    if os.environ.get("ESMM_MALLOC", "").lower() == "default":
        return "ESMM_MALLOC"
    return next((k for k in os.environ if tunes_malloc(k)), None)


def keep_step_memory() -> bool:
    """Set the two thresholds once per process; True when they are set (now or before)."""
    if "ok" not in _done:
        ok = False
        if sys.platform.startswith("linux") and user_tuned() is None:
            try:
                libc = ctypes.CDLL("libc.so.6")
                ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            except (OSError, AttributeError):  # not glibc
                ok = False
        _done["ok"] = ok
    return _done["ok"]
