"""Shared by every entry point: environment for loopback-only local runs, one-line errors."""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

# Local Spark and Ray stay on loopback; without these a Ray driver may bind to the
# outward address and hang reconnecting (see README, "Environment").
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def run_main(fn: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``fn(argv)``; a user error prints one line ``esmm: error: ...`` and returns 2."""
    from etl.errors import InputError as EtlInputError
    from train.errors import InputError as TrainInputError

    try:
        rc = fn(argv)
    except (EtlInputError, TrainInputError) as e:
        print(f"esmm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esmm: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
