"""The log ETL: extract (read logs), transform (flag, label, encode), load (write_dataset).

``run_etl(spark, logs, out, ...)`` is what ``esmm etl`` and ``spark-submit jobs/etl.py``
call. Days: with no ``start``/``end`` every day present; with them, impressions of
``[start, end]`` and clicks/conversions of ``[start, end + window_days]``; clicks and
conversions that belong to impressions outside that range are counted under
``out_of_range`` in the manifest (not rejects), so ``read = used + rejected +
out_of_range`` holds per table (checked; a mismatch fails the job before commit).
Split: days before ``split_date`` train, the rest test; without it, the earlier half of
the days (rounded down) train. Vocabularies count train days only.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import functions as F

from etl import fs
from etl.errors import InputError
from etl.features import load_spec, resolve_fields
from etl.labels import OUT_OF_RANGE, REASONS, Flagged, flag, labels_from, reason_counts, rejects_from
from etl.logs import TABLES, list_days, parse_day, read_table, row_json, select_days
from etl.shards import write_dataset
from etl.vocab import build_vocab, collect_vocab, encode_columns

KEEP = ["sample_id", "ts", "dt", "click", "conversion", "_user_raw", "_item_raw"]


class ConservationError(RuntimeError):
    """Rows read != rows used + rejected (+ out of range): a bug, never bad input."""


@dataclass
class Extracted:
    tables: dict  # name -> etl.logs.Table
    outside_impressions: object  # DataFrame | None
    outside_clicks: object
    days: list[str]  # impression days read


def split_days(days: list[str], split_date: str | None) -> tuple[list[str], list[str]]:
    """(train days, test days): before ``split_date`` train; default the earlier half, rounded down."""
    days = sorted(days)
    if split_date:
        cut = parse_day(split_date, "--split-date").isoformat()
        train = [d for d in days if d < cut]
    else:
        train = days[: len(days) // 2]
    test = [d for d in days if d not in train]
    if not train:
        raise InputError(f"no train days: impression days are {', '.join(days)}; "
                         + ("--split-date is on or before the first" if split_date else "need at least 2 days"))
    return train, test


def extract(spark, logs: str, start: str | None, end: str | None, window_days: float) -> Extracted:
    """Read the days needed of the three tables (+ ids outside the range for ranged runs)."""
    if start and end and parse_day(start, "--start") > parse_day(end, "--end"):
        raise InputError(f"--start {start} is after --end {end}")
    folders = {t: list_days(spark, logs, t) for t in TABLES}
    if not folders["impressions"]:
        raise InputError(f"{posixpath.join(logs, 'impressions')}: no dt=YYYY-MM-DD partitions")
    extra = int(-(-window_days // 1))  # whole days after `end` that may hold its clicks/conversions
    imp_days = select_days(list(folders["impressions"]), start, end)
    if not imp_days:
        raise InputError(f"{posixpath.join(logs, 'impressions')}: no days within --start {start} --end {end}")
    days = {"impressions": imp_days,
            "clicks": select_days(list(folders["clicks"]), start, end, extra),
            "conversions": select_days(list(folders["conversions"]), start, end, extra)}
    tables = {t: read_table(spark, logs, t, days[t], folders[t]) for t in TABLES}
    oi = oc = None
    if start or end:
        other = [d for d in folders["impressions"] if d not in imp_days]
        if other:
            oi = read_table(spark, logs, "impressions", other, folders["impressions"], columns=["impression_id"]).df
        before = [d for d in folders["clicks"] if start and d < start]
        if before:
            oc = read_table(spark, logs, "clicks", before, folders["clicks"], columns=["click_id"]).df
        if oi is None and oc is None:
            oi = spark.createDataFrame([], "impression_id string")
    return Extracted(tables, oi, oc, imp_days)


def read_counts(tables: dict) -> dict[str, int]:
    """Rows of each raw table, counted apart from the flagging (one job)."""
    parts = [tables[t].df.select(F.lit(t).alias("t")) for t in TABLES]
    u = parts[0].unionByName(parts[1]).unionByName(parts[2])
    got = {r["t"]: int(r["count"]) for r in u.groupBy("t").count().collect()}
    return {t: got.get(t, 0) for t in TABLES}


def check_conservation(counts: dict, read: dict) -> dict:
    """Per table ``read == used + rejected + out_of_range``; returns the used counts."""
    used = {}
    for t in TABLES:
        c = counts[t]
        unknown = set(c) - set(REASONS[t]) - {"used", OUT_OF_RANGE}
        if unknown:
            raise ConservationError(f"{t}: unexpected reasons {sorted(unknown)}")
        total = sum(c.values())
        if total != read[t]:
            raise ConservationError(f"{t}: read {read[t]} rows but used + rejected + out_of_range = {total} ({c})")
        used[t] = c.get("used", 0)
    return used


def run_etl(spark, logs: str, out: str, features: str | None = None, split_date: str | None = None,
            window_days: float = 7, start: str | None = None, end: str | None = None, shards: int = 4) -> dict:
    """Logs -> ``out`` (shards, rejects, vocab, manifest). Returns the manifest.

    Args:
        logs (str): log root with impressions/, clicks/, conversions/ partitioned by dt=.
        out (str): output folder; replaced atomically on success.
        features (str): feature spec YAML, or None to use every impression column.
        split_date (str): first test day ``YYYY-MM-DD``; None = earlier half trains.
        window_days (float): attribution window after the click, in days.
        start, end (str): impression days to process (inclusive); None = all.
        shards (int): Parquet files per split and day.
    """
    if window_days < 0:
        raise InputError(f"--window-days must be >= 0 (got {window_days})")
    if shards < 1:
        raise InputError(f"--shards must be >= 1 (got {shards})")
    logs_q, out_q = fs.qualify(spark, logs), fs.qualify(spark, out)
    if not fs.is_dir(spark, logs_q):
        raise InputError(f"{logs}: no such log folder")
    if out_q.rstrip("/") == logs_q.rstrip("/") or out_q.startswith(logs_q.rstrip("/") + "/"):
        raise InputError(f"--out {out} is inside the log root {logs}")
    spec = load_spec(features) if features else None
    if split_date:
        parse_day(split_date, "--split-date")

    # extract
    ex = extract(spark, logs_q, start, end, window_days)
    imps = ex.tables["impressions"]
    raw_schema = imps.df.select(*imps.columns).schema
    fields = resolve_fields(spec, raw_schema)
    train_days, test_days = split_days(ex.days, split_date)

    # transform: flag every row, check conservation against an independent count
    fl = flag(imps.df, ex.tables["clicks"].df, ex.tables["conversions"].df, window_days * 86400.0,
              ex.outside_impressions, ex.outside_clicks)
    fl = Flagged(*(df.persist(StorageLevel.DISK_ONLY) for df in (fl.impressions, fl.clicks, fl.conversions)))
    try:
        read = read_counts(ex.tables)
        counts = reason_counts(fl)
        used = check_conservation(counts, read)
        reject_counts = {f"{t}.{r}": counts[t].get(r, 0) for t in TABLES for r in REASONS[t]}
        out_of_range = {t: counts[t].get(OUT_OF_RANGE, 0) for t in ("clicks", "conversions")}

        labelled = labels_from(fl)
        feats = [f["name"] for f in fields]
        samples = labelled.select(
            F.col("impression_id").alias("sample_id"), F.col("_ts").alias("ts"), F.col("_dt").alias("dt"),
            "click", "conversion", F.col("user_id").cast("string").alias("_user_raw"),
            F.col("item_id").cast("string").alias("_item_raw"), *[F.col(n) for n in feats])
        vocab = build_vocab(samples.where(F.col("dt").isin(train_days)), fields).persist(StorageLevel.MEMORY_AND_DISK)
        values = collect_vocab(vocab, fields)
        sizes = {name: len(v) + 1 for name, v in values.items()}
        mfields = []
        for f in fields:
            m = {"name": f["name"], "kind": f["kind"],
                 "vocab_size": f["hash_buckets"] + 1 if f.get("hash_buckets") else sizes[f["name"]],
                 "group": f["group"]}
            m.update({k: f[k] for k in ("min_count", "hash_buckets") if k in f})
            mfields.append(m)
        # split first, then encode: each row goes through the Arrow lookup once
        splits = {"train": encode_columns(samples.where(F.col("dt").isin(train_days)), fields, values, keep=KEEP),
                  "test": encode_columns(samples.where(F.col("dt").isin(test_days)), fields, values, keep=KEEP)}

        def check(manifest: dict) -> None:
            written = sum(s["impressions"] for s in manifest["splits"].values())
            if written != used["impressions"]:
                raise ConservationError(f"impressions: {used['impressions']} valid but {written} samples written")
            clicked = sum(s["clicks"] for s in manifest["splits"].values())
            if clicked > used["clicks"]:
                raise ConservationError(f"{clicked} clicked samples but only {used['clicks']} valid clicks")

        truth = posixpath.join(logs_q, "truth")
        inputs = {
            "kind": "logs", "logs": logs_q, "truth": truth if fs.is_dir(spark, truth) else None,
            "start": start, "end": end,
            "window_days": int(window_days) if float(window_days).is_integer() else window_days,
            "split_date": test_days[0] if test_days else split_date,
            "features": fs.qualify(spark, features) if features else None,
            "formats": {t: ex.tables[t].format for t in TABLES},
            "days": {t: ex.tables[t].days for t in TABLES},
        }
        manifest = write_dataset(
            spark, out_q, splits, mfields, shards=shards, inputs=inputs,
            rejects=rejects_from(fl, {t: row_json(ex.tables[t]) for t in TABLES}),
            reject_counts=reject_counts, read_counts=read, created_by="esmm etl", vocab=vocab,
            user_field="_user_raw", item_field="_item_raw",
            extra={"used": used, "out_of_range": out_of_range}, check=check)
    finally:
        for df in (fl.impressions, fl.clicks, fl.conversions):
            df.unpersist()
        if "vocab" in locals():
            vocab.unpersist()
    return manifest

