"""The flag and label transforms on hand-made frames, compared whole (assertDataFrameEqual),
and the writer's check: a shard file lost between the write and the check fails the job."""
from __future__ import annotations

import datetime as dt
import json

import pytest
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

import etl_crafted as C
from etl import labels
from etl.labels import Horizon, dedup, flag, labels_from
from etl.pipeline import run_etl
from etl.shards import LOSE_ENV, WriteCheckError

UTC = dt.timezone.utc
W = 7 * 86400.0


def t(day, h, m=0):
    return dt.datetime(2026, 1, day, h, m, tzinfo=UTC)


def frame(spark, rows, id_cols):
    """A frame shaped like etl.logs.read_table's: ids, _ts, _bad, _src, _ord, _dt."""
    schema = ", ".join(f"{c} string" for c in id_cols) + ", _ts timestamp, _bad string, _src string, _ord string, _dt string"
    full = [(*r[:len(id_cols)], r[len(id_cols)], r[len(id_cols) + 1] if len(r) > len(id_cols) + 1 else None,
             "f", f"{i:05d}", r[len(id_cols)].date().isoformat() if r[len(id_cols)] else None)
            for i, r in enumerate(rows)]
    return spark.createDataFrame(full, schema)


@pytest.fixture(scope="module")
def tables(spark):
    imps = frame(spark, [("i1", t(1, 10)), ("i2", t(1, 10)), ("i2", t(1, 11)), ("i3", t(1, 10), "user_id missing"),
                         ("i4", t(2, 10))], ["impression_id"])
    clicks = frame(spark, [("c1", "i1", t(1, 10, 5)), ("c1", "i1", t(1, 10, 6)), ("c2", "i9", t(1, 10)),
                           ("c3", "i2", t(1, 9)), ("c4", "i4", t(2, 11)), ("c5", None, t(1, 10), "impression_id missing"),
                           ("c6", "i0", t(2, 1)), ("c7", "i0", t(3, 1))], ["click_id", "impression_id"])
    convs = frame(spark, [("v1", "c1", t(1, 11)), ("v2", "c1", t(9, 11)), ("v3", "c3", t(1, 12)),
                          ("v4", "c1", t(1, 10)), ("v5", "c4", t(2, 12)), ("v5", "c4", t(2, 13)),
                          ("v6", "c7", t(3, 2)), ("v7", "c6", t(2, 2))], ["conversion_id", "click_id"])
    return imps, clicks, convs


def reasons(df, id_col):
    return df.select(id_col, "_ts", "_reason")


@pytest.fixture(params=["window", "broadcast", "broadcast_colliding", "broadcast_off"])
def dedup_path(request, spark, monkeypatch):
    """The ways duplicates are judged (etl.labels.dedup): one window over all rows;
    rows that (_src, _ord) tell apart, with the kept row of each duplicated id broadcast;
    the same with every id's hash colliding (the repeated-id candidates are then every
    row: the second job alone must tell the ids apart); the same when broadcasting is off
    (back to the window)."""
    old = spark.conf.get("spark.sql.autoBroadcastJoinThreshold")
    if request.param == "broadcast_off":
        spark.conf.set("spark.sql.autoBroadcastJoinThreshold", "-1")
    if request.param == "broadcast_colliding":
        monkeypatch.setattr(labels, "id_hash", lambda c: F.lit(7).cast("bigint"))
    try:
        yield {t: request.param != "window" for t in ("impressions", "clicks", "conversions")}
    finally:
        spark.conf.set("spark.sql.autoBroadcastJoinThreshold", old)


@pytest.mark.parametrize("few_clicks", [False, True])
def test_flag_gives_every_row_its_reason(spark, tables, dedup_path, few_clicks):
    """Every path gives the same reasons: the three dedup paths, and the clicks' parents
    joined by a shuffle or picked by a broadcast of the clicks' ids (``few_clicks``)."""
    imps, clicks, convs = tables
    fl = flag(imps, clicks, convs, W, unique_rows=dedup_path, few_clicks=few_clicks)
    assertDataFrameEqual(reasons(fl.impressions, "impression_id"), spark.createDataFrame(
        [("i1", t(1, 10), None), ("i2", t(1, 10), None), ("i2", t(1, 11), "duplicate"),
         ("i3", t(1, 10), "malformed"), ("i4", t(2, 10), None)], "impression_id string, _ts timestamp, _reason string"))
    assertDataFrameEqual(fl.clicks.select("click_id", "_ts", "_reason", "_imp"), spark.createDataFrame(
        [("c1", t(1, 10, 5), None, "i1"), ("c1", t(1, 10, 6), "duplicate", None), ("c2", t(1, 10), "orphan", None),
         ("c3", t(1, 9), "before_impression", None), ("c4", t(2, 11), None, "i4"),
         ("c5", t(1, 10), "malformed", None), ("c6", t(2, 1), "orphan", None), ("c7", t(3, 1), "orphan", None)],
        "click_id string, _ts timestamp, _reason string, _imp string"))
    assertDataFrameEqual(fl.conversions.select("conversion_id", "_ts", "_reason", "_imp"), spark.createDataFrame(
        [("v1", t(1, 11), None, "i1"), ("v2", t(9, 11), "outside_window", None), ("v3", t(1, 12), "orphan", None),
         ("v4", t(1, 10), "before_click", None), ("v5", t(2, 12), None, "i4"), ("v5", t(2, 13), "duplicate", None),
         ("v6", t(3, 2), "orphan", None), ("v7", t(2, 2), "orphan", None)],
        "conversion_id string, _ts timestamp, _reason string, _imp string"))


@pytest.mark.parametrize("broadcast", [False, True])
def test_labels_from_flags(spark, tables, broadcast):
    got = labels_from(flag(*tables, W), broadcast=broadcast).select("impression_id", "click", "conversion")
    assertDataFrameEqual(got, spark.createDataFrame(
        [("i1", 1, 1), ("i2", 0, 0), ("i4", 1, 1)], "impression_id string, click tinyint, conversion tinyint"))


def test_flag_out_of_range_and_after_horizon(spark, tables):
    """Range starts on day 2 (H = 1, W = 7): i0 is a day-1 impression outside the range.
    c6 (day 2) was read by the day-1 run: out of range; c7 (day 3) was not: after_horizon,
    and so is its conversion v6; v7 follows c6: out of range."""
    imps, clicks, convs = tables
    outside = spark.createDataFrame([("i0", "2026-01-01")], "impression_id string, _dt string")
    fl = flag(imps, clicks, convs, W, outside_impressions=outside, horizon=Horizon("2026-01-02", 1, 7))
    got = fl.clicks.where(F.col("click_id").isin("c6", "c7")).select("click_id", "_reason")
    assertDataFrameEqual(got, spark.createDataFrame([("c6", "out_of_range"), ("c7", "after_horizon")],
                                                    "click_id string, _reason string"))
    got = fl.conversions.where(F.col("conversion_id").isin("v6", "v7")).select("conversion_id", "_reason")
    assertDataFrameEqual(got, spark.createDataFrame([("v6", "after_horizon"), ("v7", "out_of_range")],
                                                    "conversion_id string, _reason string"))


def test_duplicates_tied_on_ts_keep_the_first_row_read(spark, dedup_path):
    """Same id, same ts: the row earlier in its file (smaller _ord) is kept, on every path."""
    rows = [("i1", t(1, 10)), ("i1", t(1, 10)), ("i1", t(1, 9), "user_id missing"), ("i2", t(1, 10))]
    imps = frame(spark, rows, ["impression_id"])
    got = dedup(imps, "impression_id", dedup_path["impressions"]).select("_ord", "_reason")
    assertDataFrameEqual(got, spark.createDataFrame(
        [("00000", None), ("00001", "duplicate"), ("00002", "malformed"), ("00003", None)],
        "_ord string, _reason string"))


def test_lost_shard_file_fails_without_commit(spark, tmp_path, monkeypatch):
    logs = C.write_parquet(tmp_path / "logs")
    out = tmp_path / "data"
    run_etl(spark, str(logs), str(out), shards=2)
    before = (out / "manifest.json").read_text()
    monkeypatch.setenv(LOSE_ENV, "1")
    with pytest.raises(WriteCheckError, match="missing or short"):
        run_etl(spark, str(logs), str(out), shards=2)
    assert (out / "manifest.json").read_text() == before and (out / "_SUCCESS").exists()
    m = json.loads(before)
    assert all((out / f).is_file() for s in m["splits"].values() for f in s["files"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("data.")] == []  # no staging left
