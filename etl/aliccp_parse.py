"""Parsed Ali-CCP rows -> validated and flagged rows (DataFrame in, DataFrame out; no paths).

Raw layout (see shared/data/aliccp/FORMAT.md)::

    sample_skeleton_{split}.csv   sample_id,click,conversion,common_feature_index,feature_num,feature_list
    common_features_{split}.csv   common_feature_index,feature_num,feature_list
    feature_list = entry (\\x01 entry)*,  entry = field \\x02 feature_id \\x03 value

``etl.aliccp_lines.parse`` turns each line into one column per field and a ``bad``
reason (null when good); ``flag_split`` gives every line a ``_status`` (null = kept, else
its reject reason) and splits off the rejects.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.aliccp_spec import CONV_WITHOUT_CLICK, DUPLICATE, MALFORMED

# the parse's bookkeeping: what is left is the row's values (labels, index, field columns)
_BOOKKEEPING = ["bad", "unlisted", "line", "source", "_first", "_status", "_why"]


def _at(arr, i: int):
    """``arr[i]`` (1-based, negative from the end) or null: ANSI ``element_at`` would raise."""
    return F.try_element_at(F.col(arr) if isinstance(arr, str) else arr, F.lit(i))


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

    ``impressions``: pos, sample_id, click, conversion, cfi, _cwc, one column per field of its side.
    ``commons``: cfi and the common side's field columns, one row per index; None without a common file.
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


def _with_first_copy(df: DataFrame, key: str) -> DataFrame:
    """``df`` + ``_first``: for a key on more than one VALID line, the first valid line's pos.

    Only the keys seen twice travel (a small aggregate of two columns, broadcast back), so
    the wide rows are never shuffled for the dedup; a malformed line is never a first copy.
    """
    ok = df.where(F.col("bad").isNull())
    dup = (ok.groupBy(key).agg(F.count(F.lit(1)).alias("_n"), F.min("pos").alias("_first"))
           .where(F.col("_n") > 1).select(key, "_first"))
    return df.join(F.broadcast(dup), key, "left")


def _is_later_copy():
    return F.col("bad").isNull() & F.col("_first").isNotNull() & (F.col("pos") != F.col("_first"))


def flag_split(split: str, sk: DataFrame, com: DataFrame | None, sk_table: str, com_table: str | None, *,
               recode_conversion_without_click: bool = False) -> Flagged:
    """Checked parse -> Flagged: rejects split off, duplicates and the label rule applied.

    ``sk``: sample_id, click, conversion, cfi (null without a common side), bad, unlisted,
    line, source, pos, field columns. ``com``: cfi, bad, unlisted, line, source, pos, field columns,
    or None (the processed formats are already joined).

    Duplicates (same sample_id, or same common index, twice in one split) keep the first
    VALID line and reject the others (``aliccp.duplicate``): a second copy would repeat an
    impression or fan the join out. A malformed line is never counted as a first copy.
    """
    cwc = (F.col("click") == 0) & (F.col("conversion") == 1)
    st = _with_first_copy(sk, "sample_id")
    is_dup = _is_later_copy()
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
        cst = _with_first_copy(com, "cfi")
        cst = cst.withColumn("_status", F.when(F.col("bad").isNotNull(), F.lit(MALFORMED))
                             .when(_is_later_copy(), F.lit(DUPLICATE)))
        cst = cst.withColumn("_why", F.coalesce(F.col("bad"), F.concat(
            F.lit("common_feature_index "), F.col("cfi"), F.lit(" seen before in this split"))))
        rejects = rejects.unionByName(_rejects(cst.where(F.col("_status").isNotNull()), com_table,
                                               F.col("_status"), F.col("_why")))
        commons = cst.where(F.col("_status").isNull()).drop("pos", *_BOOKKEEPING)
    return Flagged(split=split,
                   impressions=kept.drop(*_BOOKKEEPING),
                   commons=commons, rejects=rejects, skeleton=st, common=cst, skeleton_lines=sk, common_lines=com)
