"""``esmm aliccp``: convert Ali-CCP (raw release or processed samples) into shards (Spark).

Also ``spark-submit jobs/aliccp.py --raw DIR --out DATA ...``: under spark-submit the
master is the submitter's unless ``--master`` is given. Formats: ``raw`` (the Tianchi
``sample_skeleton_*.csv`` + ``common_features_*.csv``, plain or .gz), ``rechub-csv``
(torch-rechub's ``ali_ccp_*.csv``), ``paddlerec-txt`` (PaddleRec ESMM ``DIR/{train,test}/*``).
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

FORMATS = ("raw", "rechub-csv", "paddlerec-txt")


def parse_args(argv):
    p = Parser(prog="esmm aliccp", description=__doc__.splitlines()[0])
    p.add_argument("--raw", required=True, help="input folder (the unpacked release, or the processed samples)")
    p.add_argument("--out", required=True, help="output DATA folder (replaced atomically)")
    p.add_argument("--format", choices=FORMATS, default="raw", help="input layout (default raw)")
    p.add_argument("--features", help="feature spec YAML: fields: [{name, kind, group, min_count}] "
                                      "(default: the 23 Ali-CCP fields)")
    p.add_argument("--min-count", type=int, default=1,
                   help="vocabulary threshold: a value seen fewer times in train maps to 0 (default 1)")
    p.add_argument("--shards", type=int, default=4, help="Parquet files per split and day")
    p.add_argument("--master", help="Spark master (default local[*]; under spark-submit the submitter's)")
    p.add_argument("--recode-conversion-without-click", action="store_true",
                   help="keep click=0/conversion=1 rows as conversion=0 (default: drop them as rejects)")
    p.add_argument("--val", choices=("merge", "split"), default="merge",
                   help="rechub-csv only: merge ali_ccp_val into test (default) or write a 'val' split")
    p.add_argument("--vocab-from", metavar="PREV",
                   help="a previous data root or model bundle: its values keep their ids, new train values "
                        "get ids after them, vocab_size only grows")
    return p.parse_args(argv)


def _main(argv) -> int:
    args = parse_args(argv)
    from etl.errors import InputError

    if args.shards < 1:
        raise InputError(f"--shards must be >= 1 (got {args.shards})")
    if args.min_count < 1:
        raise InputError(f"--min-count must be >= 1 (got {args.min_count})")
    from etl import aliccp
    from etl import aliccp_formats as formats
    from etl.spark import get_spark

    if args.format == "raw":  # a missing file or a packed archive fails before Spark starts
        aliccp.find_raw_files(args.raw)
    elif not os.path.isdir(args.raw):
        raise InputError(f"{args.raw}: no such input folder")

    fields = aliccp.load_field_spec(args.features) if args.features else None
    under_submit = "PYSPARK_GATEWAY_PORT" in os.environ  # spark-submit started this interpreter
    master = args.master or (None if under_submit else "local[*]")
    spark = get_spark(master, app="esmm-aliccp")
    opts = dict(min_count=args.min_count, recode_conversion_without_click=args.recode_conversion_without_click,
                features_path=args.features,
                vocab_from=aliccp.read_prev_vocab(spark, args.vocab_from) if args.vocab_from else None)
    if args.format == "raw":
        conv = aliccp.convert_raw(spark, args.raw, fields, **opts)
    elif args.format == "rechub-csv":
        conv = formats.convert_rechub(spark, args.raw, fields, val=args.val, **opts)
    else:
        conv = formats.convert_paddlerec(spark, args.raw, fields, **opts)
    m = aliccp.write(spark, args.out, conv, shards=args.shards)
    parts = [f"{s} {v['impressions']} impressions / {v['clicks']} clicks / {v['conversions']} conversions / "
             f"{v['users']} users / {v['items']} items" for s, v in m["splits"].items()]
    c = m["aliccp"]["counts"]
    print(f"esmm aliccp: {args.out}: " + ", ".join(parts) + "; "
          + ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in c.items()))
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
