"""Shared by every entry point: environment for loopback-only local runs, one-line errors."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

# Local Ray stays on loopback; without this a Ray driver may bind to the outward address
# and hang reconnecting (see README, "Environment"). Spark binds to loopback only for a
# local master (etl/spark.py): a cluster's executors must reach the driver.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Idle OpenMP threads (torch's libgomp) spin ~50 us, then sleep. A training step opens ~100
# parallel regions; threads that sleep at once (OMP_WAIT_POLICY=PASSIVE) are woken for each
# (18.5 -> 14.2 ms per step here, with less CPU time), while libgomp's own default spins ~3
# ms, which starves whatever shares the cores (measured >10x slower beside Ray Data tasks).
# A user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins; Ray workers sleep at once (ray_trainer).
OMP_SPIN = "5000"  # libgomp counts ~100k spins per ms
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", OMP_SPIN)


class UsageError(Exception):
    """A bad command line; reported like an InputError."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line ``esmm: error: JOB: ...`` (exit 2
    through run_main) instead of a usage dump."""

    def error(self, message):
        raise UsageError(f"{self.prog.removeprefix('esmm ')}: {message}")


def run_main(fn: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``fn(argv)``; a user error prints one line ``esmm: error: ...`` and returns 2."""
    from etl.errors import InputError as EtlInputError
    from train.errors import InputError as TrainInputError

    try:
        rc = fn(argv)
    except (EtlInputError, TrainInputError, UsageError) as e:
        print(f"esmm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esmm: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
