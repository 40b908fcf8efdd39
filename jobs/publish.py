"""``esmm publish``: gate a candidate model against production and swap the pointer.

    esmm publish --candidate MODEL_ROOT/candidates/X --root MODEL_ROOT --tolerance 0.005

Exit 0: published (or, with --check, the gate passed); 1: the gate failed (both
figures printed, nothing changed); 2: bad input. The Airflow DAG runs the same
functions (train/publish.py).
"""
from __future__ import annotations

import argparse
import sys

from jobs.common import Parser, run_main


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="esmm publish",
        description="Gate a candidate model against production (CTCVR and CVR AUC within a tolerance); "
                    "if it passes, swap MODEL_ROOT/production to it atomically.")
    p.add_argument("--candidate", required=True, help="model dir to publish (holds the metrics file)")
    p.add_argument("--root", required=True, help="model root holding the `production` pointer")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="allowed drop in CTCVR AUC and CVR AUC versus production (default 0)")
    p.add_argument("--metrics", default="evaluation.json",
                   help="metrics file name inside each model dir (written by `esmm evaluate --out`)")
    p.add_argument("--check", action="store_true", help="only run the gate; change nothing")
    p.add_argument("--force", action="store_true", help="publish even if the gate fails (logged as forced)")
    return p


def _main(argv=None) -> int:
    from train import publish as pub

    a = build_parser().parse_args(argv)
    if a.check:
        result = pub.check(a.candidate, a.root, a.tolerance, a.metrics)
        print(result.message())
        return 0 if result.passed else 1
    result = pub.publish(a.candidate, a.root, a.tolerance, a.metrics, force=a.force)
    print(result.message())
    if result.passed or a.force:
        print(f"published: {a.root}/{pub.POINTER} -> {pub.production_dir(a.root)}")
        return 0
    print("not published: production unchanged", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
