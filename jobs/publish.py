"""``esmm publish``: gate a candidate against production on the same rows, swap the pointer.

    esmm publish --candidate MODEL_ROOT/candidates/X --root MODEL_ROOT --data DATA [--tolerance T]

Both models are scored on DATA's test split (or the comparison ``esmm compare`` already
wrote is read with ``--comparison``: then no torch is needed, as on an Airflow worker).
Exit 0: published (or, with --check, the gate passed); 1: the gate failed (both figures
and the interval printed, nothing changed); 2: bad input.
"""
from __future__ import annotations

import argparse
import sys

from jobs.common import Parser, run_main


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="esmm publish",
        description="Compare a candidate with production on the same rows (paired bootstrap 95%% interval); "
                    "unless it is worse by more than the tolerance, swap MODEL_ROOT/production to it atomically.")
    p.add_argument("--candidate", required=True, help="model dir to publish")
    p.add_argument("--root", required=True, help="model root holding the `production` pointer")
    p.add_argument("--data", required=True, help="DATA dir whose split both models are scored on")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="allowed drop in CTCVR AUC and CVR AUC: refused only when the 95%% interval of "
                        "candidate - production lies below -T (default 0)")
    p.add_argument("--comparison", help="CMP.json from `esmm compare --models PRODUCTION,CANDIDATE` "
                                        "on the same data (skips scoring)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples when scoring (default 1000)")
    p.add_argument("--check", action="store_true", help="only run the gate; change nothing")
    p.add_argument("--force", action="store_true", help="publish even if the gate fails (logged as forced)")
    return p


def _main(argv=None) -> int:
    from train import publish as pub

    a = build_parser().parse_args(argv)
    if a.check:
        result, _ = pub.check(a.candidate, a.root, a.data, a.tolerance, a.split, a.comparison,
                              resamples=a.resamples)
        print(result.message())
        return 0 if result.passed else 1
    result = pub.publish(a.candidate, a.root, a.data, a.tolerance, a.split, a.comparison, a.force,
                         resamples=a.resamples)
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
