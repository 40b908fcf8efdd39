"""Flagged Ali-CCP rows -> vocabulary counts, encoded sides, the common join (DataFrames only).

- ``train_counts``: every (field, value) occurrence of the TRAIN impressions, in one
  aggregation (one ``posexplode`` per side, no lambdas). A common row's entries count once
  per impression that references it: the common rows (0.7M at full size) are exploded
  and weighted by their impression count instead of exploding the 42M joined rows with
  hundreds of user entries each.
- ``encode_side``: the parse's field columns (``etl.aliccp_lines``: ``string`` for single,
  ``array<string>`` otherwise, in file order, + ``<field>__w``) -> ids with the shared
  encoder ``etl.vocab.encode_columns`` (Arrow batches against a broadcast vocabulary: no
  explode, no join back); weights pass through. The common side is encoded BEFORE the
  join, on one row per user.
- ``join_common``: skeleton LEFT JOIN common on the index, the one wide shuffle (a
  sort-merge join; the common side buffers one row per key, never collected or
  broadcast). A missing index keeps the impression with empty user fields.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl.aliccp_lines import field_columns
from etl.aliccp_parse import _at
from etl.aliccp_spec import ITEM_FIELD, PSEUDO_DAYS, USER_FIELD, FieldSpec

EMPTY_IDS = "cast(array() as array<bigint>)"


def field_names(fields: list[FieldSpec]) -> list[str]:
    """The parse's columns of ``fields``: each field, plus ``<name>__w`` for weighted ones."""
    return [name for name, _ in field_columns(fields)]


def _counted(df: DataFrame, fields: list[FieldSpec], weight) -> DataFrame:
    """``(field, value, n)``: one row per value of ``fields`` in ``df`` (one posexplode)."""
    from etl.vocab import _name_of, _vocab_columns, keyed_values

    names, singles, lists = _vocab_columns(df, [{"name": f.name, "kind": f.kind} for f in fields])
    kv = keyed_values(df, singles, lists, extra=[weight.cast("long").alias("n")])
    return kv.select(_name_of(names).alias("field"), F.col("v").alias("value"), "n")


def train_counts(impressions: DataFrame, commons: DataFrame | None, fields: list[FieldSpec]) -> DataFrame:
    """``(field, value, count)`` over the train impressions (+ their common rows); hashed fields skipped."""
    vf = [f for f in fields if not f.hash_buckets]
    sk = _counted(impressions, [f for f in vf if f.name in impressions.columns], F.lit(1))
    if commons is not None:
        n_imp = impressions.groupBy("cfi").agg(F.count(F.lit(1)).alias("_n"))
        sk = sk.unionByName(_counted(commons.join(n_imp, "cfi"), [f for f in vf if f.name in commons.columns],
                                     F.col("_n")))
    return sk.groupBy("field", "value").agg(F.sum("n").alias("count"))


def first_raw(df: DataFrame, name: str):
    """The raw id of ``name``'s first entry (null if none or not a field): what users/items are counted by."""
    if name not in df.columns:
        return F.lit(None).cast("string")
    return F.col(name) if df.schema[name].dataType == T.StringType() else _at(name, 1)


def encode_side(df: DataFrame, fields: list[FieldSpec], vocab: dict, keep: list[str], min_count: int) -> DataFrame:
    """Raw field columns -> ids with the shared encoder; weights (``__w``) pass through with ``keep``."""
    from etl.vocab import encode_columns

    # weights are the file's floats, not the encoder's 1.0: encode the ids as a multi field
    specs = [{**f.as_dict(min_count), "kind": "multi" if f.kind == "weighted" else f.kind} for f in fields]
    wcols = [f.name + "__w" for f in fields if f.kind == "weighted"]
    names = {f.name for f in fields}
    return encode_columns(df, specs, {k: v for k, v in vocab.items() if k in names}, keep=keep + wcols)


def join_common(imp: DataFrame, com: DataFrame, common_fields: list[FieldSpec]) -> DataFrame:
    """Encoded impressions LEFT JOIN encoded common rows by index; missing -> 0 / []."""
    right = com.withColumnRenamed("cfi", "_cfi").withColumnRenamed("_user_raw", "_user_raw_c")
    df = imp.join(right.hint("shuffle_merge"), F.col("cfi") == F.col("_cfi"), "left")
    cols = [c for c in imp.columns if c != "_user_raw"]
    for f in common_fields:
        empty = "cast(0 as bigint)" if f.kind == "single" else EMPTY_IDS
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
    sk_fields = fields if commons is None else [f for f in fields if f.side == "skeleton"]
    imp = impressions.select(sid.alias("sample_id"), "click", "conversion", "cfi", *field_names(sk_fields),
                             first_raw(impressions, ITEM_FIELD).alias("_item_raw"),
                             first_raw(impressions, USER_FIELD).alias("_user_raw"))
    base = ["sample_id", "click", "conversion", "cfi", "_item_raw", "_user_raw"]
    df = encode_side(imp, sk_fields, vocab, base, min_count)
    if commons is not None:
        com_fields = [f for f in fields if f.side == "common"]
        com = commons.select("cfi", *field_names(com_fields), first_raw(commons, USER_FIELD).alias("_user_raw"))
        com = encode_side(com, com_fields, vocab, ["cfi", "_user_raw"], min_count)
        df = join_common(df, com, com_fields)
    day = PSEUDO_DAYS[split]
    return df.select(F.col("sample_id"), F.lit(day).cast("date").cast("timestamp").alias("ts"),
                     F.lit(day).alias("dt"), "click", "conversion", *field_names(fields), "_user_raw", "_item_raw")
