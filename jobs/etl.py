"""``esmm etl``: join raw logs into sequential-label Parquet shards (Spark).

Also ``spark-submit jobs/etl.py --logs LOGS --out DATA ...``: under spark-submit the
master is the submitter's unless ``--master`` is given.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# spark-submit runs this file directly: make the repo root importable.
_ROOT = str(Path(__file__).resolve().parents[1])
if sys.path[0] != _ROOT:  # before jobs/ itself, whose etl.py would shadow the etl package
    sys.path.insert(0, _ROOT)


from jobs.common import Parser, run_main  # noqa: E402


def parse_args(argv):
    p = Parser(prog="esmm etl", description=__doc__.splitlines()[0])
    p.add_argument("--logs", required=True, help="log root: impressions/, clicks/, conversions/ by dt=YYYY-MM-DD")
    p.add_argument("--out", required=True, help="output DATA folder (replaced atomically)")
    p.add_argument("--features", help="feature spec YAML (default: every impression column)")
    p.add_argument("--split-date", help="first test day YYYY-MM-DD (default: the later half of the days tests)")
    p.add_argument("--window-days", type=float, default=7.0, help="attribution window after the click (days)")
    p.add_argument("--start", help="first impression day YYYY-MM-DD")
    p.add_argument("--end", help="last impression day YYYY-MM-DD")
    p.add_argument("--shards", type=int, default=4, help="Parquet files per split and day")
    p.add_argument("--vocab-from", metavar="PREV",
                   help="data root or model bundle whose vocabularies to grow: known values keep their ids")
    p.add_argument("--click-horizon-days", type=int, default=1,
                   help="ranged runs read clicks through --end + H and conversions through --end + H + window")
    p.add_argument("--master", help="Spark master (default local[*]; under spark-submit the submitter's)")
    return p.parse_args(argv)


def _ship_code(spark) -> None:
    """On a cluster, send the etl package to the executors (the list-field Arrow UDF imports it there)."""
    master = spark.sparkContext.master or ""
    if master.startswith("local"):
        return
    import shutil
    import tempfile

    base = os.path.join(tempfile.mkdtemp(prefix="esmm-etl-"), "etl")
    spark.sparkContext.addPyFile(shutil.make_archive(base, "zip", _ROOT, "etl"))


def _main(argv) -> int:
    args = parse_args(argv)
    from etl.errors import InputError
    from etl.logs import parse_day

    for name in ("split_date", "start", "end"):
        if getattr(args, name):
            parse_day(getattr(args, name), "--" + name.replace("_", "-"))
    if args.shards < 1:
        raise InputError(f"--shards must be >= 1 (got {args.shards})")
    if args.window_days < 0:
        raise InputError(f"--window-days must be >= 0 (got {args.window_days})")
    if not os.path.isdir(args.logs) and "://" not in args.logs:
        raise InputError(f"{args.logs}: no such log folder")

    from etl.pipeline import run_etl
    from etl.spark import get_spark

    under_submit = "PYSPARK_GATEWAY_PORT" in os.environ  # spark-submit started this interpreter
    master = args.master or (None if under_submit else "local[*]")
    spark = get_spark(master, app="esmm-etl")
    _ship_code(spark)
    m = run_etl(spark, args.logs, args.out, features=args.features, split_date=args.split_date,
                window_days=args.window_days, start=args.start, end=args.end, shards=args.shards,
                vocab_from=args.vocab_from, click_horizon_days=args.click_horizon_days)
    tr, te = m["splits"]["train"], m["splits"]["test"]
    rej = sum(m["rejects"].values())
    print(f"esmm etl: {args.out}: train {tr['impressions']} impressions / {tr['clicks']} clicks / "
          f"{tr['conversions']} conversions ({len(tr['days'])} days), test {te['impressions']} / "
          f"{te['clicks']} / {te['conversions']} ({len(te['days'])} days), {rej} rejects")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
