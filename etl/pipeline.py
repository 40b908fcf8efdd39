"""The log ETL: extract (read logs), transform (flag, label, encode), load (write_dataset).

``run_etl(spark, logs, out, ...)`` is what ``esmm etl`` and ``spark-submit jobs/etl.py``
call. Days: with no ``start``/``end`` every day present; with them, impressions of
``[start, end]``, clicks of ``[start, end + H]`` and conversions of
``[start, end + H + ceil(window_days)]`` (H = ``click_horizon_days``), so the labels of
``end`` are final when the logs of ``end + H + ceil(W)`` are complete. Clicks and
conversions that belong to impressions outside that range are counted under
``out_of_range`` in the manifest (not rejects), those that the previous run (taken to
end on ``start - 1``) could not read under ``after_horizon``, so ``read = used +
rejected + out_of_range + after_horizon`` holds per table (checked; a mismatch fails the
job before commit).
Split: days before ``split_date`` train, the rest test; without it, the earlier half of
the days (rounded down) train. Vocabularies count train days only.
"""
from __future__ import annotations

import datetime as _dt
import posixpath
from dataclasses import dataclass

from pyspark.sql import Observation
from pyspark.sql import functions as F

from etl import fs
from etl.errors import InputError
from etl.features import load_spec, resolve_fields
from etl.labels import (AFTER_HORIZON, OUT_OF_RANGE, REASONS, Flagged, Horizon, broadcast_rows, flag, labels_from,
                        observed_reasons, reason_metrics, rejects_from)
from etl.logs import TABLES, list_days, parse_day, raw_rows, read_table, row_json, select_days
from etl.shards import write_dataset
from etl.vocab import count_vocab, encode_columns, read_prev_vocab

KEEP = ["sample_id", "ts", "dt", "click", "conversion"]


class ConservationError(RuntimeError):
    """Rows read != rows used + rejected (+ out of range): a bug, never bad input."""


@dataclass
class Extracted:
    tables: dict  # name -> etl.logs.Table
    outside_impressions: object  # DataFrame | None
    outside_clicks: object
    days: list[str]  # impression days read


@dataclass
class ParentVocab:
    """The ``--vocab-from`` parent: its vocabulary and, per vocab field, the highest id it holds."""
    path: str
    vocab: object  # DataFrame (field, value, id, count)
    sizes: dict    # field -> the parent's vocab_size (vocab fields present in both)
    top: dict      # field -> vocab_size - 1: new ids start above it

    @classmethod
    def read(cls, spark, prev: str, fields: list[dict]) -> "ParentVocab":
        vocab, pfields, path = read_prev_vocab(spark, prev)
        by_name = {f["name"]: f for f in pfields}
        sizes = {}
        for f in fields:
            p = by_name.get(f["name"])
            if p is None:
                continue  # a field the parent did not have: fresh ids from 1
            if (p.get("kind"), p.get("hash_buckets")) != (f["kind"], f.get("hash_buckets")):
                raise InputError(f"--vocab-from {prev}: field {f['name']!r} is kind {p.get('kind')!r}"
                                 f"{' with hash_buckets ' + str(p['hash_buckets']) if p.get('hash_buckets') else ''}"
                                 f" there but {f['kind']!r}"
                                 f"{' with hash_buckets ' + str(f['hash_buckets']) if f.get('hash_buckets') else ''}"
                                 f" here: its ids would not carry over")
            if not f.get("hash_buckets"):
                try:
                    sizes[f["name"]] = int(p["vocab_size"])
                except (KeyError, TypeError, ValueError):
                    raise InputError(f"--vocab-from {prev}: field {f['name']!r} has no integer vocab_size") from None
        return cls(path, vocab, sizes, {k: v - 1 for k, v in sizes.items()})

    def lineage(self, values: dict) -> dict:
        """The manifest's ``vocab`` key: the parent and the new ids per vocab field."""
        return {"parent": self.path,
                "new_ids": {f: max(0, len(v) - self.top.get(f, 0)) for f, v in values.items()}}


def manifest_fields(fields: list[dict], values: dict, parent: ParentVocab | None = None) -> list[dict]:
    """Manifest ``fields``: vocab_size = max id + 1 (never below the parent's), hashed B + 1."""
    out = []
    for f in fields:
        if f.get("hash_buckets"):
            size = f["hash_buckets"] + 1
        else:
            size = max(len(values[f["name"]]) + 1, parent.sizes.get(f["name"], 0) if parent else 0)
        m = {"name": f["name"], "kind": f["kind"], "vocab_size": size, "group": f["group"]}
        m.update({k: f[k] for k in ("min_count", "hash_buckets") if k in f})
        out.append(m)
    return out


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


def extract(spark, logs: str, start: str | None, end: str | None, window_days: float,
            click_horizon_days: int = 1) -> Extracted:
    """Read the days needed of the three tables (+ ids outside the range for ranged runs).

    A ranged run reads impressions of ``[start, end]``, clicks of ``[start, end + H]`` and
    conversions of ``[start, end + H + ceil(W)]`` (H the click horizon), so an impression
    of ``end`` clicked up to H days later and converting W days after that click is
    labelled. Ids of other days come only from the days that can matter: impressions of
    ``[start - H - ceil(W), start)`` and ``(end, end + H]``, clicks of
    ``[start - H - ceil(W), start)`` and ``(end + H, end + H + ceil(W)]``; a click or conversion whose impression or click is
    older than that is far outside any window and counted as an orphan.
    """
    if start and end and parse_day(start, "--start") > parse_day(end, "--end"):
        raise InputError(f"--start {start} is after --end {end}")
    folders = {t: list_days(spark, logs, t) for t in TABLES}
    if not folders["impressions"]:
        raise InputError(f"{posixpath.join(logs, 'impressions')}: no dt=YYYY-MM-DD partitions")
    wd = window_whole_days(window_days)
    h = int(click_horizon_days)
    imp_days = select_days(list(folders["impressions"]), start, end)
    if not imp_days:
        raise InputError(f"{posixpath.join(logs, 'impressions')}: no days within --start {start} --end {end}")
    days = {"impressions": imp_days,
            "clicks": select_days(list(folders["clicks"]), start, end, h),
            "conversions": select_days(list(folders["conversions"]), start, end, h + wd)}
    tables = {t: read_table(spark, logs, t, days[t], folders[t]) for t in TABLES}
    oi = oc = None
    if start or end:
        lo = (parse_day(start, "--start") - _dt.timedelta(days=h + wd)).isoformat() if start else None
        hi = (parse_day(end, "--end") + _dt.timedelta(days=h)).isoformat() if end else None
        other = [d for d in folders["impressions"] if d not in imp_days
                 and (lo is None or d >= lo) and (hi is None or d <= hi)]
        if other:
            oi = read_table(spark, logs, "impressions", other, folders["impressions"], columns=["impression_id"]).df
        # clicks before the range (their conversions belong to earlier runs) and clicks after
        # end + H that conversions read here may follow (they belong to later runs)
        after_hi = (parse_day(end, "--end") + _dt.timedelta(days=h + wd)).isoformat() if end else None
        oc_days = [d for d in folders["clicks"] if d not in days["clicks"]
                   and (lo is None or d >= lo) and (after_hi is None or d <= after_hi)]
        if oc_days:
            oc = read_table(spark, logs, "clicks", oc_days, folders["clicks"], columns=["click_id"]).df
        if oi is None and oc is None:
            oi = spark.range(0).select(F.lit(None).cast("string").alias("impression_id"),
                                       F.lit(None).cast("string").alias("_dt"))  # no Python worker
    return Extracted(tables, oi, oc, imp_days)


def window_whole_days(window_days: float) -> int:
    """Whole days after a click that may hold its conversions (ceil of the window)."""
    return int(-(-window_days // 1))


def check_conservation(counts: dict, read: dict) -> dict:
    """Per table ``read == used + rejected + out_of_range + after_horizon``; returns the used counts."""
    used = {}
    for t in TABLES:
        c = counts[t]
        unknown = set(c) - set(REASONS[t]) - {"used", OUT_OF_RANGE, AFTER_HORIZON}
        if unknown:
            raise ConservationError(f"{t}: unexpected reasons {sorted(unknown)}")
        total = sum(c.values())
        if total != read[t]:
            raise ConservationError(f"{t}: read {read[t]} rows but used + rejected + out_of_range + after_horizon"
                                    f" = {total} ({c})")
        used[t] = c.get("used", 0)
    return used


def run_etl(spark, logs: str, out: str, features: str | None = None, split_date: str | None = None,
            window_days: float = 7, start: str | None = None, end: str | None = None, shards: int = 4,
            vocab_from: str | None = None, click_horizon_days: int = 1) -> dict:
    """Logs -> ``out`` (shards, rejects, vocab, manifest). Returns the manifest.

    Args:
        logs (str): log root with impressions/, clicks/, conversions/ partitioned by dt=.
        out (str): output folder; replaced atomically on success.
        features (str): feature spec YAML, or None to use every impression column.
        split_date (str): first test day ``YYYY-MM-DD``; None = earlier half trains.
        window_days (float): attribution window after the click, in days.
        start, end (str): impression days to process (inclusive); None = all.
        shards (int): Parquet files per split and day.
        click_horizon_days (int): ranged runs read clicks through ``end + H`` and
            conversions through ``end + H + ceil(window_days)`` (see :func:`extract`).
        vocab_from (str): a data root or model bundle whose vocabularies this run grows
            (known values keep their ids; see :class:`ParentVocab`); None builds fresh ones.
    """
    if window_days < 0:
        raise InputError(f"--window-days must be >= 0 (got {window_days})")
    if shards < 1:
        raise InputError(f"--shards must be >= 1 (got {shards})")
    if int(click_horizon_days) != click_horizon_days or click_horizon_days < 0:
        raise InputError(f"--click-horizon-days must be an integer >= 0 (got {click_horizon_days})")
    logs_q, out_q = fs.qualify(spark, logs), fs.qualify(spark, out)
    if not fs.is_dir(spark, logs_q):
        raise InputError(f"{logs}: no such log folder")
    if out_q.rstrip("/") == logs_q.rstrip("/") or out_q.startswith(logs_q.rstrip("/") + "/"):
        raise InputError(f"--out {out} is inside the log root {logs}")
    spec = load_spec(features) if features else None
    parent = None
    if split_date:
        parse_day(split_date, "--split-date")

    # extract
    ex = extract(spark, logs_q, start, end, window_days, click_horizon_days)
    imps = ex.tables["impressions"]
    raw_schema = imps.df.select(*imps.columns).schema
    fields = resolve_fields(spec, raw_schema)
    if vocab_from:
        parent = ParentVocab.read(spark, vocab_from, fields)
    train_days, test_days = split_days(ex.days, split_date)

    # transform: flag every row (the impressions lazily: nothing is persisted; small frames, the
    # kept duplicates and few clicks and conversions, computed once); raw rows counted from the files
    horizon = Horizon(start, int(click_horizon_days), window_whole_days(window_days)) if start else None
    read = {t: raw_rows(spark, ex.tables[t]) for t in TABLES}
    fit = broadcast_rows(spark, 64)  # rows read (footer counts) that fit a broadcast
    few_clicks = max(read["clicks"], read["conversions"]) <= fit
    fl = flag(imps.df, ex.tables["clicks"].df, ex.tables["conversions"].df, window_days * 86400.0,
              ex.outside_impressions, ex.outside_clicks, horizon,
              unique_rows={t: ex.tables[t].format == "parquet" for t in TABLES}, few_clicks=few_clicks)

    # one job: vocabulary counts of the train days + distinct users/items per split
    valid = fl.impressions.where(F.col("_reason").isNull())
    vocab, values, uniques = count_vocab(valid, fields, train_days, parent)
    mfields = manifest_fields(fields, values, parent)

    # the shard write observes every impression's outcome (its scan flags them all anyway); the
    # rejects write observes the clicks' and conversions', and scans the impressions only if
    # that first write saw some rejected: on clean logs no pass reads them for nothing
    obs = {t: Observation(f"reasons_{t}") for t in TABLES}
    seen = Flagged(fl.impressions.observe(obs["impressions"], *reason_metrics("impressions")),
                   fl.clicks, fl.conversions)
    # clicked (and so converted) ids as few as the clicks read: label the impressions where they are read
    labelled = labels_from(seen, broadcast=read["clicks"] <= fit)
    samples = labelled.select(
        F.col("impression_id").alias("sample_id"), F.col("_ts").alias("ts"), F.col("_dt").alias("dt"),
        "click", "conversion", *[F.col(f["name"]) for f in fields])
    encoded = encode_columns(samples, fields, values, keep=KEEP)
    splits = encoded.withColumn("_split", F.when(F.col("dt").isin(train_days), F.lit("train")).otherwise(F.lit("test")))

    def rejects():
        imp = observed_reasons({"impressions": obs["impressions"]}, {"impressions": fl.impressions})["impressions"]
        clean = set(imp) <= {"used"}  # only outcomes with rows are listed: no reject, nothing unknown
        return rejects_from(fl, {t: row_json(ex.tables[t]) for t in TABLES},
                            observations={t: obs[t] for t in ("clicks", "conversions")},
                            skip=("impressions",) if clean else ())
    state: dict = {}

    def counts_done() -> dict:
        if not state:
            counts = observed_reasons(obs, {"impressions": fl.impressions, "clicks": fl.clicks,
                                            "conversions": fl.conversions})
            state["used"] = check_conservation(counts, read)
            state["rejects"] = {f"{t}.{r}": counts[t].get(r, 0) for t in TABLES for r in REASONS[t]}
            state["extra"] = {
                "used": state["used"],
                "out_of_range": {t: counts[t].get(OUT_OF_RANGE, 0) for t in ("clicks", "conversions")},
                "after_horizon": {t: counts[t].get(AFTER_HORIZON, 0) for t in ("clicks", "conversions")},
                **({"vocab": parent.lineage(values)} if parent else {})}
        return state

    def check(manifest: dict) -> None:
        used = counts_done()["used"]
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
        "click_horizon_days": int(click_horizon_days),
        "split_date": test_days[0] if test_days else split_date,
        "features": fs.qualify(spark, features) if features else None,
        "formats": {t: ex.tables[t].format for t in TABLES},
        "days": {t: ex.tables[t].days for t in TABLES},
    }
    manifest = write_dataset(
        spark, out_q, splits, mfields, shards=shards, inputs=inputs, rejects=rejects,
        reject_counts=lambda: counts_done()["rejects"], read_counts=read, created_by="esmm etl", vocab=vocab,
        extra=lambda: counts_done()["extra"], check=check,
        days={"train": train_days, "test": test_days}, uniques=uniques)
    return manifest
