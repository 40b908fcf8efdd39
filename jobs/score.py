"""``esmm score --model BUNDLE --logs LOGS --day D --out SCORES [--workers W] [--address A]``.

Scores EVERY valid impression of day D from the raw logs (no labels needed) with a
model bundle: SCORES/ gets Parquet ``impression_id, p_ctr, p_cvr, p_ctcvr,
model_version``, one row per valid impression, ``_score.json`` (counts: read, valid,
rejects by reason; the model and its version) and ``_SUCCESS``, committed by rename.

Two halves, wired here: etl/score_input.py (Spark: the day's impressions, the ETL's
impression reject rules, the valid rows with all raw columns) and train/score.py
(torch: one process, or Ray Data ``map_batches`` over actors that each load the bundle once).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import uuid
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: python jobs/score.py
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

from jobs.common import Parser, run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="esmm score", description="Score every impression of one day from the raw logs with a model bundle.")
    p.add_argument("--model", required=True, help="model BUNDLE (an `esmm train` MODEL or `esmm export` output)")
    p.add_argument("--logs", required=True, help="log root with impressions/dt=YYYY-MM-DD/")
    p.add_argument("--day", required=True, help="impression day YYYY-MM-DD to score")
    p.add_argument("--out", required=True, help="SCORES dir to write (replaced once complete)")
    p.add_argument("--workers", type=int, default=0, help="Ray Data scoring actors (0 = score in this process)")
    p.add_argument("--address", help="Ray cluster address (default: start a local one)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per scoring actor")
    p.add_argument("--master", help="Spark master (default local[*])")
    return p


def score_day(spark, model: str, logs: str, day: str, out: str, workers: int = 0, address: str | None = None,
              gpus_per_worker: float = 0.0) -> dict:
    """Spark writes the day's valid impressions to a temp folder beside ``out``; torch scores them."""
    from etl.score_input import write_valid_impressions
    from train.bundle import read_bundle
    from train.errors import InputError
    from train.score import score_impressions

    if workers < 0:
        raise InputError(f"--workers must be >= 0 (got {workers})")
    read_bundle(model)  # a bad bundle fails before Spark starts work
    out_p = Path(out).resolve()
    tmp = out_p.with_name(f".{out_p.name}.input-{uuid.uuid4().hex[:8]}")
    try:
        counts = write_valid_impressions(spark, logs, day, str(tmp))
        summary = {"day": day, "logs": logs if "://" in logs else str(Path(logs).resolve()), "impressions": counts}
        return score_impressions(model, str(tmp), str(out_p), workers, address, gpus_per_worker, summary)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from etl.logs import parse_day
    from etl.spark import get_spark

    parse_day(args.day, "--day")
    spark = get_spark(args.master or "local[*]", app="esmm-score")
    m = score_day(spark, args.model, args.logs, args.day, args.out, args.workers, args.address, args.gpus_per_worker)
    c = m["impressions"]
    print(f"esmm score: {args.day} -> {args.out}: {m['scored']} impressions scored by {m['model_version']} "
          f"({c['read']} read, rejected: " + ", ".join(f"{k} {v}" for k, v in c["rejects"].items()) + ")")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
