"""Label rules as pure DataFrame transforms (DESIGN.md, "Label rules").

Inputs are the frames :func:`etl.logs.read_table` returns (raw columns + ``_ts`` parsed
timestamp, ``_bad`` malformed detail, ``_src``, ``_dt``, ``_ord``, ``_line``).
:func:`flag` gives every row read exactly one ``_reason``: null when used, else

- impressions: ``malformed``, ``duplicate`` (same impression_id again; the earliest by
  ts, then source file, then position in the file, is kept);
- clicks: ``malformed``, ``duplicate``, ``orphan`` (no valid impression),
  ``before_impression`` (click ts < impression ts), ``out_of_range``;
- conversions: ``malformed``, ``duplicate``, ``orphan`` (no valid click),
  ``before_click``, ``outside_window`` (more than ``window_s`` after the click),
  ``out_of_range``.

Checks apply in that order; duplicates are judged among well-formed rows only.
``out_of_range`` is not a reject: with ``--start/--end`` a click whose impression exists
on a day outside the range (or a conversion whose click does, or whose click is itself
out of range) belongs to another run. ``after_horizon`` (given a :class:`Horizon`) is the
part of those that the run before this one could not read (a click later than its
``end + H``, a conversion later than its ``end + H + W``): labels no run counted, so
they are counted here. Both are kept apart so that
``read = used + rejected + out_of_range + after_horizon`` holds per table.

Labels: ``click`` = 1 if any valid click refers to the impression; ``conversion`` = 1 if
any valid conversion refers to one of its valid clicks. A valid conversion needs a
valid click, so conversion = 1 implies click = 1.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

REASONS = {
    "impressions": ("malformed", "duplicate"),
    "clicks": ("malformed", "duplicate", "orphan", "before_impression"),
    "conversions": ("malformed", "duplicate", "orphan", "before_click", "outside_window"),
}
OUT_OF_RANGE = "out_of_range"
AFTER_HORIZON = "after_horizon"


@dataclass
class Horizon:
    """Where a ranged run's labels end (``--start`` and the click horizon, see :func:`flag`).

    ``start`` is the first impression day of the run (``YYYY-MM-DD``); the run before it
    is taken to end on ``start - 1`` and to have read clicks through
    ``start - 1 + click_days`` and conversions through ``start - 1 + click_days + window_days``.
    """
    start: str
    click_days: int
    window_days: int  # ceil of the attribution window, in days

    def _after(self, n: int) -> str:
        import datetime as _d
        return (_d.date.fromisoformat(self.start) + _d.timedelta(days=n)).isoformat()

    @property
    def lost_click_day(self) -> str:
        """First click day the previous run did not read."""
        return self._after(self.click_days)

    @property
    def lost_conversion_day(self) -> str:
        """First conversion day the previous run did not read."""
        return self._after(self.click_days + self.window_days)


@dataclass
class Flagged:
    impressions: DataFrame  # every impression read, + _reason
    clicks: DataFrame       # every click read, + _reason, _imp (its impression_id)
    conversions: DataFrame  # every conversion read, + _reason, _imp (its click's impression_id)


def dedup(df: DataFrame, id_col: str, unique_rows: bool = False) -> DataFrame:
    """``_reason`` = malformed / duplicate / null (kept: the earliest of each id).

    Args:
        unique_rows: ``(_src, _ord)`` tells every row apart (Parquet: ``_ord`` is the
            row's position in its file). Then the rows are not shuffled: one narrow job
            finds the ids that occur more than once and, when they are few
            (:func:`broadcast_rows`), only their rows are ranked and the kept one of each is
            broadcast to the scan. Otherwise (JSON, where two identical lines share
            ``_ord``, or many duplicated ids) one window over all rows.
    """
    if unique_rows:
        out = _dedup_few(df, id_col)
        if out is not None:
            return out
    # well-formed and malformed ranked apart; well-formed first, so its rank is its rank among them
    w = (Window.partitionBy(F.col(id_col))
         .orderBy(F.col("_bad").isNotNull().asc(), F.col("_ts").asc(), F.col("_src").asc(), F.col("_ord").asc()))
    return df.withColumn("_reason", F.when(F.col("_bad").isNotNull(), F.lit("malformed"))
                         .when(F.row_number().over(w) > 1, F.lit("duplicate")))


def broadcast_rows(spark, row_bytes: int) -> int:
    """Rows of ``row_bytes`` that fit Spark's broadcast threshold
    (``spark.sql.autoBroadcastJoinThreshold``); 0 when broadcasting is off."""
    import re

    raw = str(spark.conf.get("spark.sql.autoBroadcastJoinThreshold", "10485760b")).strip().lower()
    m = re.fullmatch(r"(-?\d+)\s*([kmgt]?)i?b?", raw)
    if not m:
        return 0
    size = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return max(0, size // row_bytes)


def on_driver(df: DataFrame) -> DataFrame:
    """``df`` computed now, once, and kept in the plan as local rows (a small frame: kept
    duplicates, flagged clicks). A broadcast is recomputed by every job that uses it, and
    these are used by several (vocabulary, shards, rejects), each a scan of the impressions."""
    return df.sparkSession.createDataFrame(df.toArrow(), schema=df.schema)


def id_hash(c):
    """The 64-bit key duplicates are first looked for by (module level: a test makes it collide)."""
    return F.xxhash64(c)


def _dedup_few(df: DataFrame, id_col: str) -> DataFrame | None:
    """:func:`dedup` by broadcasting the kept row of each duplicated id, or None when there
    are more repeated ids than fit a broadcast (two small jobs: the hashes of repeated ids,
    then the kept row of each duplicated id among them, computed once for every later job)."""
    spark = df.sparkSession
    limit = broadcast_rows(spark, 256)  # a kept row: id, ts, source path, position
    if limit <= 0:
        return None
    # candidates: 64-bit hashes of ids seen more than once on any row, malformed too (only
    # the id is read, and a long key aggregates in Spark's fast hash map); the ids are then
    # told apart exactly among the well-formed rows of those hashes, so a collision or a
    # malformed repeat costs a row in the second job, never a wrong flag
    h = id_hash(F.col(id_col))
    cand = (df.where(F.col(id_col).isNotNull()).groupBy(h.alias("_d_h")).count().where(F.col("count") > 1)
            .select("_d_h").limit(limit + 1))
    schema = cand.schema
    cand = cand.toArrow()  # Arrow in, Arrow out: a local relation, no Python worker
    if cand.num_rows > limit:
        return None
    flag_malformed = F.when(F.col("_bad").isNotNull(), F.lit("malformed"))
    if not cand.num_rows:
        return df.withColumn("_reason", flag_malformed)
    hashes = spark.createDataFrame(cand, schema=schema)
    ok = df.where(F.col("_bad").isNull())
    order = F.struct(F.col("_ts"), F.col("_src"), F.col("_ord"))  # the window's order: the smallest is kept
    keep = on_driver(ok.join(F.broadcast(hashes), h == F.col("_d_h"), "left_semi")
                     .groupBy(F.col(id_col).alias("_d_id"))
                     .agg(F.min(order).alias("_d_keep"), F.count(F.lit(1)).alias("_d_n"))
                     .where(F.col("_d_n") > 1).select("_d_id", "_d_keep"))
    out = df.join(F.broadcast(keep), df[id_col] == F.col("_d_id"), "left")
    return out.withColumn("_reason", flag_malformed.when(F.col("_d_id").isNotNull() & (order != F.col("_d_keep")),
                                                         F.lit("duplicate"))).drop("_d_id", "_d_keep")


def _ids(df: DataFrame | None, col: str, alias: str, early: str | None = None) -> DataFrame | None:
    """Distinct ids (``alias``) + ``alias_x`` = true + ``alias_e``: the id lies before ``early``
    (its ``_dt``, where the frame has one; else true)."""
    if df is None:
        return None
    if early is not None and "_dt" in df.columns:
        e = F.col("_dt") < F.lit(early)
    else:
        e = F.lit(True)
    return (df.select(F.col(col).cast("string").alias(alias), e.alias("_e")).where(F.col(alias).isNotNull())
            .groupBy(alias).agg(F.max("_e").alias(alias + "_e")).withColumn(alias + "_x", F.lit(True)))


def flag(imps: DataFrame, clicks: DataFrame, convs: DataFrame, window_s: float,
         outside_impressions: DataFrame | None = None, outside_clicks: DataFrame | None = None,
         horizon: Horizon | None = None, unique_rows: dict | None = None, few_clicks: bool = False) -> Flagged:
    """Give each row of the three tables its ``_reason`` (see module doc).

    Every row goes through left joins only (no split and union), so each table is
    scanned once and the row count cannot change (the joined keys are unique).

    Args:
        window_s: attribution window in seconds after the click.
        outside_impressions: ``impression_id`` of impressions on days outside the range
            (ranged runs): clicks on them are ``out_of_range``, not orphans.
        outside_clicks: ``click_id`` (+ ``_dt``) of clicks on days outside those read
            (ranged runs): conversions of them are ``out_of_range``, not orphans.
        horizon: with ``outside_impressions`` carrying ``_dt``: an out-of-range click on an
            impression before ``horizon.start`` that lies on or after
            ``horizon.lost_click_day`` was read by no run, so it is ``after_horizon``
            (counted apart, never silently 0); so is a conversion of such a click, and a
            conversion on or after ``horizon.lost_conversion_day`` of a click whose
            impression is before the range.
        unique_rows: per table name, whether ``(_src, _ord)`` tells its rows apart
            (Parquet input; see :func:`dedup`).
        few_clicks: the clicks and conversions read fit a broadcast (the caller counted
            them): the valid impressions the clicks refer to are picked by a broadcast of
            the clicks' ids and broadcast back, instead of shuffling every impression to
            join the clicks; and the flagged clicks and conversions are computed here, once
            (:func:`on_driver`: two jobs), for every later job that reads them.
    """
    ur = unique_rows or {}
    imps_f = dedup(imps, "impression_id", ur.get("impressions", False))
    valid_imps = imps_f.where(F.col("_reason").isNull()).select(
        F.col("impression_id").alias("_p_id"), F.col("_ts").alias("_p_ts"))
    if few_clicks:
        wanted = F.broadcast(clicks.select(F.col("impression_id").alias("_w_id")))
        valid_imps = F.broadcast(valid_imps.join(wanted, F.col("_p_id") == F.col("_w_id"), "left_semi"))

    ck = dedup(clicks, "click_id", ur.get("clicks", False))
    ck = ck.join(valid_imps, ck["impression_id"] == F.col("_p_id"), "left")
    rule = (F.when(F.col("_p_id").isNull(), F.lit("orphan"))
            .when(F.col("_ts") < F.col("_p_ts"), F.lit("before_impression")))
    oi = _ids(outside_impressions, "impression_id", "_oi", horizon.start if horizon else None)
    early = F.lit(False)  # the click's impression is before the range
    if oi is not None:
        ck = ck.join(oi, ck["impression_id"] == F.col("_oi"), "left")
        outside = F.col("_p_id").isNull() & F.col("_oi_x").isNotNull()
        oor = F.lit(OUT_OF_RANGE)
        if horizon is not None:
            early = outside & F.col("_oi_e")
            oor = F.when(early & (F.col("_dt") >= F.lit(horizon.lost_click_day)), F.lit(AFTER_HORIZON)).otherwise(oor)
        rule = F.when(outside, oor).otherwise(rule)
    ck = ck.withColumn("_reason", F.coalesce(F.col("_reason"), rule)).withColumn("_early", early)
    clicks_f = ck.withColumn("_imp", F.when(F.col("_reason").isNull(), F.col("_p_id"))) \
        .drop("_p_id", "_p_ts", "_oi", "_oi_x", "_oi_e")
    if few_clicks:
        clicks_f = on_driver(clicks_f)

    valid_clicks = clicks_f.where(F.col("_reason").isNull()).select(
        F.col("click_id").alias("_c_id"), F.col("_ts").alias("_c_ts"), F.col("_imp").alias("_c_imp"))
    cv = dedup(convs, "conversion_id", ur.get("conversions", False))
    cv = cv.join(valid_clicks, cv["click_id"] == F.col("_c_id"), "left")
    lag_us = F.unix_micros(F.col("_ts")) - F.unix_micros(F.col("_c_ts"))
    rule = (F.when(F.col("_c_id").isNull(), F.lit("orphan"))
            .when(F.col("_ts") < F.col("_c_ts"), F.lit("before_click"))
            .when(lag_us > F.lit(int(round(window_s * 1_000_000))), F.lit("outside_window")))
    if outside_impressions is not None or outside_clicks is not None:
        # a conversion on a click that is out of range here, or on a click of an earlier day;
        # _l: that click is lost itself, _e: its impression is before the range
        oc = clicks_f.where(F.col("_reason").isin(OUT_OF_RANGE, AFTER_HORIZON)).select(
            F.col("click_id").cast("string").alias("_oc"), (F.col("_reason") == AFTER_HORIZON).alias("_l"),
            F.col("_early").alias("_e"))
        if outside_clicks is not None:
            before = (F.col("_dt") < F.lit(horizon.start)) if horizon and "_dt" in outside_clicks.columns else F.lit(True)
            oc = oc.unionByName(outside_clicks.select(F.col("click_id").cast("string").alias("_oc"),
                                                      F.lit(False).alias("_l"), before.alias("_e")))
        ocx = (oc.where(F.col("_oc").isNotNull()).groupBy("_oc")
               .agg(F.max("_l").alias("_oc_l"), F.max("_e").alias("_oc_e")).withColumn("_oc_x", F.lit(True)))
        cv = cv.join(ocx, cv["click_id"] == F.col("_oc"), "left")
        oor = F.lit(OUT_OF_RANGE)
        if horizon is not None:
            lost = F.col("_oc_l") | (F.col("_oc_e") & (F.col("_dt") >= F.lit(horizon.lost_conversion_day)))
            oor = F.when(lost, F.lit(AFTER_HORIZON)).otherwise(oor)
        rule = F.when(F.col("_c_id").isNull() & F.col("_oc_x").isNotNull(), oor).otherwise(rule)
    cv = cv.withColumn("_reason", F.coalesce(F.col("_reason"), rule))
    convs_f = cv.withColumn("_imp", F.when(F.col("_reason").isNull(), F.col("_c_imp"))) \
        .drop("_c_id", "_c_ts", "_c_imp", "_oc", "_oc_x", "_oc_l", "_oc_e")
    if few_clicks:
        convs_f = on_driver(convs_f)
    return Flagged(imps_f, clicks_f.drop("_early"), convs_f)


def labels_from(fl: Flagged, broadcast: bool = False) -> DataFrame:
    """Valid impressions with ``click`` and ``conversion`` (int8).

    ``broadcast``: the clicked and converted ids are few enough to broadcast (the caller
    knows how many clicks were read): the impressions are then labelled where they are
    read, without a shuffle of their rows.
    """
    y = fl.clicks.where(F.col("_reason").isNull()).select(F.col("_imp").alias("_y_id")).distinct() \
        .withColumn("click", F.lit(1).cast("tinyint"))
    z = fl.conversions.where(F.col("_reason").isNull()).select(F.col("_imp").alias("_z_id")).distinct() \
        .withColumn("conversion", F.lit(1).cast("tinyint"))
    imps = fl.impressions.where(F.col("_reason").isNull()).drop("_reason")
    if broadcast:
        y, z = F.broadcast(y), F.broadcast(z)
    out = (imps.join(y, imps["impression_id"] == F.col("_y_id"), "left")
           .join(z, imps["impression_id"] == F.col("_z_id"), "left")
           .drop("_y_id", "_z_id"))
    return out.withColumn("click", F.coalesce(F.col("click"), F.lit(0)).cast("tinyint")) \
              .withColumn("conversion", F.coalesce(F.col("conversion"), F.lit(0)).cast("tinyint"))


def _outcomes(table: str) -> tuple[str, ...]:
    return ("used",) + REASONS[table] + ((OUT_OF_RANGE, AFTER_HORIZON) if table != "impressions" else ())


def reason_metrics(table: str) -> list:
    """Aggregates for ``DataFrame.observe`` over a flagged table: rows per outcome + all rows."""
    r = F.coalesce(F.col("_reason"), F.lit("used"))
    return [F.sum(F.when(r == F.lit(o), F.lit(1)).otherwise(F.lit(0))).alias(o) for o in _outcomes(table)] + \
        [F.count(F.lit(1)).alias("_rows")]


def _observed(o, frame: DataFrame | None, table: str) -> dict:
    """The observation's row; counted by one aggregation of ``frame`` when Spark has none.

    Spark drops the metrics of a plan the optimiser replaced (an observed branch over an
    empty relation, e.g. a ranged run with no conversions to read): ``Observation.get``
    then fails inside py4j instead of returning zeros.
    """
    try:
        return o.get
    except Exception:
        if frame is None:
            raise
        return frame.agg(*reason_metrics(table)).first().asDict()


def observed_reasons(observations: dict, frames: dict | None = None) -> dict[str, dict[str, int]]:
    """``{table: {reason or "used": n}}`` from the observations :func:`rejects_from` made
    (only outcomes with rows; a reason outside the known ones shows as ``"unknown"``).
    ``frames`` (the flagged tables by name) count a table whose observation Spark dropped."""
    out: dict[str, dict[str, int]] = {}
    for t, o in observations.items():
        got = _observed(o, (frames or {}).get(t), t)
        c = {k: int(got[k] or 0) for k in _outcomes(t) if got.get(k)}
        rest = int(got["_rows"]) - sum(c.values())
        if rest:
            c["unknown"] = rest
        out[t] = c
    return out


def rejects_from(fl: Flagged, row_json: dict, observations: dict | None = None, skip: tuple = ()) -> DataFrame:
    """``(table, reason, row, source_file, detail)`` of every rejected row.

    Args:
        row_json: per table name, the Spark expression giving the raw row as JSON.
        observations: per table name, a ``pyspark.sql.Observation`` that the write of
            the result fills with the table's rows per outcome (:func:`observed_reasons`),
            counted on every row before the rejects are filtered out.
        skip: tables known to have no rejected row (counted elsewhere): not scanned.
    """
    parts = []
    for name, df in (("impressions", fl.impressions), ("clicks", fl.clicks), ("conversions", fl.conversions)):
        if name in skip:
            continue
        if observations and name in observations:
            df = df.observe(observations[name], *reason_metrics(name))
        r = df.where(F.col("_reason").isNotNull() & ~F.col("_reason").isin(OUT_OF_RANGE, AFTER_HORIZON))
        parts.append(r.select(F.lit(name).alias("table"), F.col("_reason").alias("reason"),
                              row_json[name].alias("row"), F.col("_src").alias("source_file"),
                              F.col("_bad").alias("detail")))
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out


def reason_counts(fl: Flagged) -> dict[str, dict[str, int]]:
    """``{table: {reason or "used": n}}`` from one aggregation over the three tables."""
    parts = [df.select(F.lit(name).alias("t"), F.coalesce(F.col("_reason"), F.lit("used")).alias("r"))
             for name, df in (("impressions", fl.impressions), ("clicks", fl.clicks), ("conversions", fl.conversions))]
    u = parts[0].unionByName(parts[1]).unionByName(parts[2])
    out: dict[str, dict[str, int]] = {t: {} for t in REASONS}
    for row in u.groupBy("t", "r").count().collect():
        out[row["t"]][row["r"]] = int(row["count"])
    return out


def with_labels(imps: DataFrame, clicks: DataFrame, convs: DataFrame, window_s: float) -> DataFrame:
    """Valid impressions with their ``click`` and ``conversion`` labels (see module doc)."""
    return labels_from(flag(imps, clicks, convs, window_s))


def rejects(imps: DataFrame, clicks: DataFrame, convs: DataFrame, window_s: float, row_json: dict) -> DataFrame:
    """The rejected rows of the same inputs, with their reasons (sibling of :func:`with_labels`)."""
    return rejects_from(flag(imps, clicks, convs, window_s), row_json)
