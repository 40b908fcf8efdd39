"""Flagged Ali-CCP rows -> vocabulary counts, encoded sides, the common join (DataFrames only).

- ``train_counts``: every (field, value) occurrence of the TRAIN impressions, in one
  aggregation. A common row's entries count once per impression that references it:
  the common rows (0.7M at full size) are exploded and weighted by their impression
  count instead of exploding the 42M joined rows with hundreds of user entries each.
- ``to_columns``: ``entries`` -> one raw column per field (``string`` for single, ``array<string>``
  otherwise, in file order, every entry kept) + ``<field>__w`` for weighted ones; the
  common side is done BEFORE the join, on one row per user.
- ``encode_side``: the shared encoder ``etl.vocab.encode_columns`` (Arrow batches
  against a broadcast vocabulary: no explode, no join back); weights pass through.
- ``join_common``: skeleton LEFT JOIN common on the index, the one wide shuffle (a
  sort-merge join; the common side buffers one row per key, never collected or
  broadcast). A missing index keeps the impression with empty user fields.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.aliccp_parse import _at, _field_is
from etl.aliccp_spec import ITEM_FIELD, PSEUDO_DAYS, USER_FIELD, FieldSpec

EMPTY_IDS = "cast(array() as array<bigint>)"


def train_counts(impressions: DataFrame, commons: DataFrame | None, fields: list[FieldSpec]) -> DataFrame:
    """``(field, value, count)`` over the train impressions (+ their common rows); hashed fields skipped."""
    names = [f.name for f in fields if not f.hash_buckets]
    keep = (lambda e: e["field"].isin(names)) if names else (lambda e: F.lit(False))
    sk = (impressions.select(F.explode(F.filter("entries", keep)).alias("e"))
          .select(F.col("e.field").alias("field"), F.col("e.id").alias("value"), F.lit(1).cast("long").alias("n")))
    if commons is not None:
        n_imp = impressions.groupBy("cfi").agg(F.count(F.lit(1)).alias("_n"))
        com = (commons.join(n_imp, "cfi").select(F.explode(F.filter("entries", keep)).alias("e"), "_n")
               .select(F.col("e.field").alias("field"), F.col("e.id").alias("value"), F.col("_n").alias("n")))
        sk = sk.unionByName(com)
    return sk.groupBy("field", "value").agg(F.sum("n").alias("count"))


def to_columns(df: DataFrame, fields: list[FieldSpec], keep: list[str]) -> DataFrame:
    """``keep`` + per field its raw values (single: first id or null) and ``__w`` weights."""
    cols = [F.col(k) for k in keep]
    for f in fields:
        sel = F.filter("entries", _field_is(f.name))
        ids = F.transform(sel, lambda e: e["id"])
        cols.append((_at(ids, 1) if f.kind == "single" else ids).alias(f.name))
        if f.kind == "weighted":
            cols.append(F.transform(sel, lambda e: e["value"]).alias(f.name + "__w"))
    return df.select(*cols)


def first_raw(name: str):
    """The raw id of ``name``'s first entry (null if none): what users/items are counted by."""
    return _at(F.transform(F.filter("entries", _field_is(name)), lambda e: e["id"]), 1)


def encode_side(df: DataFrame, fields: list[FieldSpec], vocab: dict, keep: list[str], min_count: int) -> DataFrame:
    """Raw field columns -> ids with the shared encoder; weights (``__w``) pass through with ``keep``."""
    from etl.vocab import encode_columns

    # weights are the file's floats, not the encoder's 1.0: encode the ids as a multi field
    specs = [{**f.as_dict(min_count), "kind": "multi" if f.kind == "weighted" else f.kind} for f in fields]
    wcols = [f.name + "__w" for f in fields if f.kind == "weighted"]
    names = {f.name for f in fields}
    return encode_columns(df, specs, {k: v for k, v in vocab.items() if k in names}, keep=keep + wcols)


def join_common(imp: DataFrame, com: DataFrame, common_fields: list[FieldSpec]) -> DataFrame:
    """Encoded impressions LEFT JOIN encoded common rows by index; missing -> [0] / []."""
    right = com.withColumnRenamed("cfi", "_cfi").withColumnRenamed("_user_raw", "_user_raw_c")
    df = imp.join(right.hint("shuffle_merge"), F.col("cfi") == F.col("_cfi"), "left")
    cols = [c for c in imp.columns if c != "_user_raw"]
    for f in common_fields:
        empty = "array(cast(0 as bigint))" if f.kind == "single" else EMPTY_IDS
        cols.append(F.coalesce(F.col(f.name), F.expr(empty)).alias(f.name))
        if f.kind == "weighted":
            cols.append(F.coalesce(F.col(f.name + "__w"), F.expr("cast(array() as array<float>)"))
                        .alias(f.name + "__w"))
    return df.select(*cols, F.col("_user_raw_c").alias("_user_raw"))


def encode_split(split: str, impressions: DataFrame, commons: DataFrame | None, fields: list[FieldSpec],
                 vocab: dict, min_count: int, prefixed: bool) -> DataFrame:
    """One split's kept rows -> the shard writer's layout (sample_id, ts, dt, labels, fields, _user_raw, _item_raw).

    ``sample_id`` becomes ``<split>-<sample_id>`` unless ``prefixed`` (already unique).
    """
    sid = F.col("sample_id") if prefixed else F.concat(F.lit(split + "-"), F.col("sample_id"))
    imp = impressions.select(sid.alias("sample_id"), "click", "conversion", "cfi", "entries",
                             first_raw(ITEM_FIELD).alias("_item_raw"),
                             first_raw(USER_FIELD).alias("_user_raw"))
    base = ["sample_id", "click", "conversion", "cfi", "_item_raw", "_user_raw"]
    sk_fields = fields if commons is None else [f for f in fields if f.side == "skeleton"]
    df = encode_side(to_columns(imp, sk_fields, base), sk_fields, vocab, base, min_count)
    if commons is not None:
        com_fields = [f for f in fields if f.side == "common"]
        com = commons.select("cfi", "entries", first_raw(USER_FIELD).alias("_user_raw"))
        com = encode_side(to_columns(com, com_fields, ["cfi", "_user_raw"]), com_fields, vocab,
                          ["cfi", "_user_raw"], min_count)
        df = join_common(df, com, com_fields)
    day = PSEUDO_DAYS[split]
    return df.select(F.col("sample_id"), F.lit(day).cast("date").cast("timestamp").alias("ts"),
                     F.lit(day).alias("dt"), "click", "conversion",
                     *[c for f in fields for c in ([f.name] + ([f.name + "__w"] if f.kind == "weighted" else []))],
                     "_user_raw", "_item_raw")
