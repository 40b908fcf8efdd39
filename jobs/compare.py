"""``esmm compare --models A,B --data DATA [--split test] --out CMP.json``.

Scores both models on the same rows of DATA's split and writes, per metric (CVR AUC on
the clicked rows, CTCVR AUC on all, log loss, calibration), each model's figure and the
difference B - A with a paired bootstrap 95% interval (train/compare.py).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script: python jobs/compare.py
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

from jobs.common import Parser, run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="esmm compare",
               description="Two models on the same rows: figures and paired bootstrap 95%% intervals of B - A.")
    p.add_argument("--models", required=True, help="A,B: two MODEL dirs (or one, for its figures alone)")
    p.add_argument("--data", required=True, help="DATA dir (manifest.json + shards)")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--out", required=True, help="comparison JSON file to write")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return p


def _main(argv) -> int:
    from train import compare as cmp

    a = build_parser().parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    result = cmp.compare(models, a.data, a.split, a.resamples, a.seed)
    out = cmp.write(result, a.out)
    for name, m in result["metrics"].items():
        figs = " vs ".join(f"{v:.4f}" for v in m["values"])
        ci = f", B - A {m['diff']:+.4f} (95% CI {m['ci95'][0]:+.4f} .. {m['ci95'][1]:+.4f})" if "ci95" in m else ""
        print(f"{name}: {figs}{ci}")
    print(f"esmm compare: {len(models)} model(s) on {result['rows']} {a.split} rows -> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
