"""Every benchmarked process under the same malloc settings: this checkout's
``train/malloc.py`` (``keep_step_memory``), loaded by its path, so a run of another
checkout's ``train/`` (``--ours-from``, ``BENCH_CODE_ROOT``) and the reference loops get
them too; none with ``ESMM_MALLOC=default`` (glibc's own, ``--malloc default``)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

MALLOC_PY = Path(__file__).resolve().parents[1] / "train" / "malloc.py"


def apply() -> bool:
    spec = importlib.util.spec_from_file_location("esmm_bench_malloc", MALLOC_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.keep_step_memory()
