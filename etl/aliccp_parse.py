"""Ali-CCP lines -> parsed, validated and flagged rows (DataFrame in, DataFrame out; no paths).

Raw layout (see shared/data/aliccp/FORMAT.md)::

    sample_skeleton_{split}.csv   sample_id,click,conversion,common_feature_index,feature_num,feature_list
    common_features_{split}.csv   common_feature_index,feature_num,feature_list
    feature_list = entry (\\x01 entry)*,  entry = field \\x02 feature_id \\x03 value

``parse_skeleton`` / ``parse_common`` turn a line into ``entries:
array<struct<field, id, value, ok>>`` and a ``bad`` reason (null when good) with Spark
built-ins only; ``check_fields`` keeps the spec's fields; ``flag_split`` gives every line
a ``_status`` (null = kept, else its reject reason) and splits off the rejects.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from etl.aliccp_spec import CONV_WITHOUT_CLICK, DUPLICATE, MALFORMED, FieldSpec

SOH, STX, ETX = "\x01", "\x02", "\x03"


def _at(arr, i: int):
    """``arr[i]`` (1-based, negative from the end) or null: ANSI ``element_at`` would raise."""
    return F.try_element_at(F.col(arr) if isinstance(arr, str) else arr, F.lit(i))


def _entries(feature_list):
    """Column expr: feature_list -> array<struct<field, id: string, value: float, ok: bool>>.

    One pass each, no per-entry splitting: the list is split once on all three
    separators into field/id/value triples, and its shape is checked by comparing the
    separators alone (non-separator characters removed) with ``(\\x02\\x03\\x01)*\\x02\\x03``
    built by ``repeat`` (a string equality, no backtracking regex on long lists).
    """
    toks = F.when(feature_list == "", F.array().cast("array<string>")).otherwise(
        F.split(feature_list, "[\x01\x02\x03]"))
    third = lambda r: F.filter(toks, lambda x, i: i % 3 == r)  # noqa: E731
    zipped = F.arrays_zip(third(0).alias("field"), third(1).alias("id"), third(2).alias("value"))

    def one(e):
        idn = e["id"].try_cast("bigint")
        val = e["value"].try_cast("float")
        # nothing from outside the lambda in here: it would be evaluated once per entry
        ok = (F.length(e["field"]) > 0) & idn.isNotNull() & val.isNotNull() & ~F.isnan(val)
        return F.struct(e["field"].alias("field"), idn.cast("string").alias("id"), val.alias("value"),
                        F.coalesce(ok, F.lit(False)).alias("ok"))

    return F.transform(zipped, one)


def _shape_ok(feature_list):
    """The separators alone, in order, are (\\x02 \\x03 \\x01)* \\x02 \\x03 (or the list is empty)."""
    seps = F.regexp_replace(feature_list, "[^\x01\x02\x03]", "")
    n = F.length(F.regexp_replace(seps, "[\x02\x03]", "")) + 1  # entries = SOH count + 1
    return (feature_list == "") | (seps == F.concat(F.repeat(F.lit(STX + ETX + SOH), n - 1), F.lit(STX + ETX)))


def _bad_list(num_col, entries_col, shape_ok):
    """Reason (string) the list part is malformed, or null."""
    n = num_col.try_cast("int")
    return (
        F.when(n.isNull(), F.lit("feature_num is not an integer"))
        .when(~shape_ok | ~F.forall(entries_col, lambda e: e["ok"]), F.lit("a feature entry is not field\\x02id\\x03value"))
        .when(F.size(entries_col) != n, F.concat(
            F.lit("feature_num "), n.cast("string"), F.lit(" but "), F.size(entries_col).cast("string"),
            F.lit(" entries")))
    )


def parse_skeleton(lines):
    """Lines of sample_skeleton_*.csv -> sample_id, click, conversion, cfi, entries, bad, line, source, pos."""
    p = F.split("line", ",", 6)
    df = lines.select(
        "line", "source", "pos", p.alias("p"),
    ).select(
        "line", "source", "pos",
        F.size("p").alias("ncols"),
        _at("p", 1).alias("sample_id"),
        _at("p", 2).alias("click_s"),
        _at("p", 3).alias("conv_s"),
        _at("p", 4).alias("cfi"),
        _at("p", 5).alias("num_s"),
        _at("p", -1).alias("fl"),
    ).withColumn("entries", _entries(F.col("fl")))
    bad = (
        F.when(F.col("ncols") != 6, F.concat(F.lit("expected 6 comma-separated columns, got "),
                                               F.col("ncols").cast("string")))
        .when(F.length("sample_id") == 0, F.lit("empty sample_id"))
        .when(~F.col("click_s").isin("0", "1"), F.lit("click is not 0/1"))
        .when(~F.col("conv_s").isin("0", "1"), F.lit("conversion is not 0/1"))
        .when(F.length("cfi") == 0, F.lit("empty common_feature_index"))
        .otherwise(_bad_list(F.col("num_s"), F.col("entries"), _shape_ok(F.col("fl"))))
    )
    return df.select(
        "sample_id",
        F.when(F.col("click_s") == "1", 1).otherwise(0).cast("tinyint").alias("click"),
        F.when(F.col("conv_s") == "1", 1).otherwise(0).cast("tinyint").alias("conversion"),
        "cfi", "entries", bad.alias("bad"), "line", "source", "pos",
    )


def parse_common(lines):
    """Lines of common_features_*.csv -> cfi, entries, bad, line, source, pos."""
    p = F.split("line", ",", 3)
    df = lines.select("line", "source", "pos", p.alias("p")).select(
        "line", "source", "pos",
        F.size("p").alias("ncols"),
        _at("p", 1).alias("cfi"),
        _at("p", 2).alias("num_s"),
        _at("p", -1).alias("fl"),
    ).withColumn("entries", _entries(F.col("fl")))
    bad = (
        F.when(F.col("ncols") != 3, F.concat(F.lit("expected 3 comma-separated columns, got "),
                                               F.col("ncols").cast("string")))
        .when(F.length("cfi") == 0, F.lit("empty common_feature_index"))
        .otherwise(_bad_list(F.col("num_s"), F.col("entries"), _shape_ok(F.col("fl"))))
    )
    return df.select("cfi", "entries", bad.alias("bad"), "line", "source", "pos")




def check_fields(df, fields: list[FieldSpec]):
    """Keep only the entries of ``fields`` (file order) and flag spec violations.

    Adds ``unlisted`` (entries of fields not in the spec: skipped, like every public
    reader does, but counted). A ``single`` field with more than one entry makes the row
    malformed: the spec says one id, the data says more, and keeping one would truncate.
    """
    names = [f.name for f in fields]
    listed = (lambda e: e["field"].isin(names)) if names else (lambda e: F.lit(False))
    bad = F.col("bad")
    for f in fields:
        if f.kind == "single":
            n = F.size(F.filter("entries", _field_is(f.name)))
            bad = F.coalesce(bad, F.when(n > 1, F.concat(
                F.lit(f"field {f.name} is single but has "), n.cast("string"), F.lit(" entries"))))
    df = (df.withColumn("unlisted", F.size(F.filter("entries", lambda e: ~listed(e))))
          .withColumn("entries", F.filter("entries", listed))
          .withColumn("bad", bad))
    # Only lines that can be rejected keep their text (what is persisted stays small).
    keep = F.col("bad").isNotNull()
    if "click" in df.columns:
        keep = keep | ((F.col("click") == 0) & (F.col("conversion") == 1))
    return df.withColumn("line", F.when(keep, F.col("line")))


def _field_is(name: str):
    # F.filter passes (element, index) to a 2-argument lambda, so bind the name by closure.
    return lambda e: e["field"] == F.lit(name)


def _rejects(df, table: str, reason, why):
    return df.select(
        F.lit(table).alias("table"),
        reason.alias("reason"),
        F.to_json(F.struct(F.col("line"), F.col("pos"))).alias("row"),
        F.col("source"),
        why.cast("string").alias("detail"),
    )


@dataclass
class Flagged:
    """One split after validation, dedup and the label rule (lazy DataFrames).

    ``impressions``: pos, sample_id, click, conversion, cfi, entries (listed fields only).
    ``commons``: cfi, entries (user fields only), one row per index; None without a common file.
    ``rejects``: table, reason, row (JSON: the raw line and its position), source, detail.
    ``skeleton`` / ``common``: every line with its ``_status``, for the counters.
    """
    split: str
    impressions: DataFrame
    commons: DataFrame | None
    rejects: DataFrame
    skeleton: DataFrame
    common: DataFrame | None
    skeleton_lines: DataFrame  # the parsed lines before flagging: what was read
    common_lines: DataFrame | None


def flag_split(split: str, sk: DataFrame, com: DataFrame | None, sk_table: str, com_table: str | None, *,
               recode_conversion_without_click: bool = False) -> Flagged:
    """Checked parse -> Flagged: rejects split off, duplicates and the label rule applied.

    ``sk``: sample_id, click, conversion, cfi (null without a common side), entries, bad,
    unlisted, line, source, pos. ``com``: cfi, entries, bad, unlisted, line, source, pos,
    or None (the processed formats are already joined).

    Duplicates (same sample_id, or same common index, twice in one split) keep the first
    VALID line and reject the others (``aliccp.duplicate``): a second copy would repeat an
    impression or fan the join out. A malformed line is never counted as a first copy.
    """
    cwc = (F.col("click") == 0) & (F.col("conversion") == 1)
    # Only ids seen twice travel (a small aggregate); AQE broadcasts that tiny side back.
    ok = sk.where(F.col("bad").isNull())
    dup_ids = (ok.groupBy("sample_id").agg(F.count(F.lit(1)).alias("_n"), F.min("pos").alias("_first"))
               .where(F.col("_n") > 1).select("sample_id", "_first"))
    st = sk.join(F.broadcast(dup_ids), "sample_id", "left")
    is_dup = F.col("bad").isNull() & F.col("_first").isNotNull() & (F.col("pos") != F.col("_first"))
    status = (F.when(F.col("bad").isNotNull(), F.lit(MALFORMED)).when(is_dup, F.lit(DUPLICATE))
              .when(cwc & F.lit(not recode_conversion_without_click), F.lit(CONV_WITHOUT_CLICK)))
    why = (F.when(F.col("bad").isNotNull(), F.col("bad"))
           .when(is_dup, F.concat(F.lit("sample_id "), F.col("sample_id"), F.lit(" seen before in this split")))
           .otherwise(F.lit("click=0 with conversion=1")))
    st = st.withColumn("_status", status).withColumn("_why", why).withColumn("_cwc", cwc)
    kept = st.where(F.col("_status").isNull())
    if recode_conversion_without_click:
        kept = kept.withColumn("conversion", F.when(cwc, F.lit(0)).otherwise(F.col("conversion")).cast("tinyint"))
    rejects = _rejects(st.where(F.col("_status").isNotNull()), sk_table, F.col("_status"), F.col("_why"))

    commons = cst = None
    if com is not None:
        # number the valid copies only: a malformed first copy must not push the valid one to rank 2
        w = Window.partitionBy("cfi", F.col("bad").isNull()).orderBy("pos")
        cst = com.withColumn("_rank", F.when(F.col("bad").isNull(), F.row_number().over(w)))
        cst = cst.withColumn("_status", F.when(F.col("bad").isNotNull(), F.lit(MALFORMED))
                             .when(F.col("_rank") > 1, F.lit(DUPLICATE)))
        cst = cst.withColumn("_why", F.coalesce(F.col("bad"), F.concat(
            F.lit("common_feature_index "), F.col("cfi"), F.lit(" seen before in this split"))))
        rejects = rejects.unionByName(_rejects(cst.where(F.col("_status").isNotNull()), com_table,
                                               F.col("_status"), F.col("_why")))
        commons = cst.where(F.col("_status").isNull()).select("cfi", "entries")
    return Flagged(split=split,
                   impressions=kept.select("pos", "sample_id", "click", "conversion", "cfi", "entries", "_cwc"),
                   commons=commons, rejects=rejects, skeleton=st, common=cst, skeleton_lines=sk, common_lines=com)
