"""The Spark half of ``esmm score``: day D's valid impressions with all their raw columns.

Scoring needs no labels, only the impression rules of the ETL (etl/labels.py): a
malformed impression (a required field missing, an unparseable ts) or a duplicate
impression_id (the earliest is kept) is not scored; each is counted by reason, and
``read = valid + malformed + duplicate`` is checked before anything is returned.

    counts = write_valid_impressions(spark, LOGS, "2026-01-05", OUT)   # OUT: Parquet, raw columns
"""
from __future__ import annotations

import posixpath

from pyspark.sql import functions as F

from etl import fs
from etl.errors import InputError
from etl.labels import REASONS, dedup
from etl.logs import list_days, parse_day, read_table


def valid_impressions(spark, logs: str, day: str):
    """(DataFrame of day ``day``'s valid impressions with their raw columns (+ ``_reason``
    null), DataFrame of every impression read with ``_reason``, raw column names)."""
    parse_day(day, "--day")
    logs_q = fs.qualify(spark, logs)
    if not fs.is_dir(spark, logs_q):
        raise InputError(f"{logs}: no such log folder")
    folders = list_days(spark, logs_q, "impressions")
    if day not in folders:
        raise InputError(f"{posixpath.join(logs, 'impressions')}: no partition dt={day} "
                         f"(days: {', '.join(sorted(folders)) or 'none'})")
    table = read_table(spark, logs_q, "impressions", [day], folders)
    flagged = dedup(table.df, "impression_id", unique_rows=table.format == "parquet")
    valid = flagged.where(F.col("_reason").isNull()).select(*table.columns)
    return valid, flagged, table.columns


def write_valid_impressions(spark, logs: str, day: str, out: str) -> dict:
    """Write day ``day``'s valid impressions (raw columns) as Parquet to ``out``.

    Returns:
        dict: ``{"read": n, "valid": n, "rejects": {"malformed": n, "duplicate": n}}``.
    """
    valid, flagged, _ = valid_impressions(spark, logs, day)
    got = {r["r"]: int(r["count"]) for r in
           flagged.select(F.coalesce(F.col("_reason"), F.lit("valid")).alias("r")).groupBy("r").count().collect()}
    unknown = set(got) - {"valid", *REASONS["impressions"]}
    if unknown:
        raise RuntimeError(f"impressions: unexpected reasons {sorted(unknown)}")
    counts = {"read": sum(got.values()), "valid": got.get("valid", 0),
              "rejects": {r: got.get(r, 0) for r in REASONS["impressions"]}}
    valid.write.mode("overwrite").parquet(out)
    written = spark.read.parquet(out).count()
    if written != counts["valid"]:
        raise RuntimeError(f"impressions: {counts['valid']} valid but {written} written to {out}")
    return counts
