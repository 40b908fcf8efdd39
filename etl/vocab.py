"""Vocabularies: raw feature value -> id, counted on the training days only.

A vocabulary is a long DataFrame ``(field string, value string, id bigint, count bigint)``:
for each field, the values seen at least ``min_count`` times in the TRAIN split get ids
``1..n`` by count descending, then value ascending (deterministic for the same data);
id 0 is out of vocabulary / missing, so the field's table has ``n + 1`` rows
(``vocab_size``). Hashed fields have no vocabulary: ``id = 1 + xxhash64(value) mod B``.

Two ways to encode, same ids:

- long data ``(..., field, value)`` (e.g. Ali-CCP's exploded feature lists):
  :func:`count_values` -> :func:`assign_ids` -> :func:`encode_long` (a Spark join);
- wide data, one column per field (the log ETL): :func:`build_vocab` on the train
  frame, then :func:`encode_columns`, which looks values up in Arrow batches against a
  broadcast copy of the vocabulary (no shuffle, list order and weights kept).

Example (long)::

    counts = count_values(train_long)                     # field, value, count
    vocab = assign_ids(counts, {"101": 1, "205": 5})      # + id; default min_count 1
    encoded = encode_long(all_long, vocab)                # + id (0 where unseen)
"""
from __future__ import annotations

import uuid
from typing import Iterable, Mapping

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

VOCAB_SCHEMA = "field string, value string, id bigint, count bigint"


def count_values(df: DataFrame, field_col: str = "field", value_col: str = "value") -> DataFrame:
    """Occurrences per ``(field, value)``; null values are missing and not counted."""
    return (df.where(F.col(value_col).isNotNull())
            .groupBy(F.col(field_col).cast("string").alias("field"),
                     F.col(value_col).cast("string").alias("value"))
            .agg(F.count(F.lit(1)).alias("count")))


def assign_ids(counts: DataFrame, min_count: int | Mapping[str, int] = 1, default_min_count: int = 1) -> DataFrame:
    """Keep values with ``count >= min_count`` (per field if a mapping) and number them.

    Ids are ``1..n`` per field, by count descending then value ascending.
    """
    if isinstance(min_count, Mapping):
        thr = F.lit(default_min_count)
        for f, m in sorted(min_count.items()):
            thr = F.when(F.col("field") == f, F.lit(int(m))).otherwise(thr)
    else:
        thr = F.lit(int(min_count))
    w = Window.partitionBy("field").orderBy(F.col("count").desc(), F.col("value").asc())
    return (counts.where(F.col("count") >= thr)
            .withColumn("id", F.row_number().over(w).cast("bigint"))
            .select("field", "value", "id", F.col("count").cast("bigint").alias("count")))


def encode_long(df: DataFrame, vocab: DataFrame, field_col: str = "field", value_col: str = "value",
                id_col: str = "id") -> DataFrame:
    """Add ``id_col``: the value's id in ``vocab``, 0 where the value is unseen or null."""
    v = vocab.select(F.col("field").alias("_vf"), F.col("value").alias("_vv"), F.col("id").alias("_vid"))
    cond = (F.col(field_col).cast("string") == F.col("_vf")) & (F.col(value_col).cast("string") == F.col("_vv"))
    return (df.join(v, cond, "left")
            .withColumn(id_col, F.coalesce(F.col("_vid"), F.lit(0)).cast("bigint"))
            .drop("_vf", "_vv", "_vid"))


def hash_ids(values, buckets: int):
    """Spark expression: ``1 + xxhash64(value) mod buckets`` (0 stays for null)."""
    return F.when(values.isNull(), F.lit(0).cast("bigint")).otherwise(
        (F.pmod(F.xxhash64(values.cast("string")), F.lit(int(buckets))) + 1).cast("bigint"))


def vocab_sizes(vocab: DataFrame, fields: Iterable[str]) -> dict[str, int]:
    """``max id + 1`` per field (1 for a field with no vocabulary rows)."""
    got = {r["field"]: int(r["n"]) for r in vocab.groupBy("field").agg(F.max("id").alias("n")).collect()}
    return {f: got.get(f, 0) + 1 for f in fields}


def save_vocab(vocab: DataFrame, path: str) -> None:
    """Parquet per field under ``path/field=<name>/`` with columns value, id, count."""
    (vocab.repartition("field").sortWithinPartitions("field", "id")
     .write.mode("overwrite").partitionBy("field").parquet(path))


# --- wide frames: one column per field ------------------------------------------------

def _value_structs(df: DataFrame, name: str, kind: str):
    """array<struct<field,value>> of a column's raw values (as strings)."""
    c = F.col(name)
    dtype = df.schema[name].dataType
    if kind == "single":
        return F.when(c.isNull(), F.array()).otherwise(
            F.array(F.struct(F.lit(name).alias("field"), c.cast("string").alias("value"))))
    if kind == "weighted" and isinstance(dtype, T.MapType):
        c = F.map_keys(c)
    return F.transform(F.coalesce(c, F.array()),
                       lambda x: F.struct(F.lit(name).alias("field"), x.cast("string").alias("value")))


def build_vocab(train: DataFrame, fields: list[dict]) -> DataFrame:
    """Vocabulary of the vocab-kind fields of a wide frame (hash-bucket fields skipped).

    Args:
        train (DataFrame): the TRAIN rows only; one column per field named ``field["name"]``
            (string/int for single, array for multi, array or map<string,float> keys for weighted).
        fields (list[dict]): ``{"name", "kind", "min_count" | "hash_buckets"}`` per field.
    """
    vf = [f for f in fields if not f.get("hash_buckets")]
    spark = train.sparkSession
    if not vf:
        return spark.createDataFrame([], VOCAB_SCHEMA)
    arr = F.concat(*[_value_structs(train, f["name"], f["kind"]) for f in vf])
    long = train.select(F.explode(arr).alias("fv")).select("fv.field", "fv.value")
    return assign_ids(count_values(long), {f["name"]: int(f.get("min_count") or 1) for f in vf})


_LOOKUP_CACHE: dict = {}


def _lookup_tables(bc, key: str):
    """Per Python worker, build the pandas hash index of each field once per broadcast."""
    import pandas as pd

    if key not in _LOOKUP_CACHE:
        _LOOKUP_CACHE.clear()
        _LOOKUP_CACHE[key] = {f: pd.Index(vals, dtype=object) for f, vals in bc.value.items()}
    return _LOOKUP_CACHE[key]


def collect_vocab(vocab: DataFrame, fields: list[dict]) -> dict[str, list[str]]:
    """``{field: [value of id 1, value of id 2, ...]}`` for the vocab-kind fields (one job).

    ``len(values[f]) + 1`` is the field's vocab_size.
    """
    vf = [f["name"] for f in fields if not f.get("hash_buckets")]
    values: dict[str, list] = {f: [] for f in vf}
    if vf:
        tab = vocab.where(F.col("field").isin(vf)).orderBy("field", "id").toArrow()
        for fld, val, i in zip(tab.column("field").to_pylist(), tab.column("value").to_pylist(),
                               tab.column("id").to_pylist()):
            lst = values[fld]
            if i != len(lst) + 1:
                raise AssertionError(f"vocab ids of field {fld!r} are not 1..n")
            lst.append(val)
    return values


def encode_columns(df: DataFrame, fields: list[dict], vocab, keep: list[str]) -> DataFrame:
    """Replace each field column by its ids (list<int64>) and weights (list<float32>).

    Args:
        df (DataFrame): wide frame with the ``keep`` columns and one column per field.
        fields (list[dict]): ``{"name", "kind", "min_count" | "hash_buckets"}``.
        vocab (DataFrame | dict): from :func:`build_vocab` (collected to the driver) or
            :func:`collect_vocab`'s dict; broadcast to the workers.
        keep (list[str]): columns passed through unchanged.

    Returns:
        DataFrame: ``keep`` + ``<name>`` list<bigint> per field (+ ``<name>__w``
        list<float> for weighted). A null single value gives ``[0]``, a null list ``[]``.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    spark = df.sparkSession
    values = vocab if isinstance(vocab, dict) else collect_vocab(vocab, fields)
    bc = spark.sparkContext.broadcast(values)
    token = uuid.uuid4().hex  # names this broadcast in the workers' lookup cache

    # Spark side: raw values as strings (maps -> sorted keys + weights); hashed fields done here.
    sel = [F.col(k) for k in keep]
    out_fields = [T.StructField(k, df.schema[k].dataType, df.schema[k].nullable) for k in keep]
    specs = []  # (name, kind, hashed)
    for f in fields:
        name, kind = f["name"], f["kind"]
        c, dtype = F.col(name), df.schema[name].dataType
        hashed = bool(f.get("hash_buckets"))
        if kind == "weighted" and isinstance(dtype, T.MapType):
            entries = F.array_sort(F.map_entries(c))  # sorted by key: deterministic order
            vals = F.transform(entries, lambda e: e["key"])
            w = F.transform(entries, lambda e: e["value"].cast("double"))
        else:  # an array column of a weighted field gets weight 1.0 per value
            vals, w = c, None
        if kind == "single":
            v = vals.cast("string")
            ids = F.array(hash_ids(v, f["hash_buckets"])) if hashed else v
        else:
            v = F.transform(F.coalesce(vals, F.array()), lambda x: x.cast("string"))
            ids = F.transform(v, lambda x: hash_ids(x, f["hash_buckets"])) if hashed else v
        sel.append(ids.alias(name))
        out_fields.append(T.StructField(name, T.ArrayType(T.LongType(), False), False))
        if kind == "weighted":
            wc = F.coalesce(w, F.array()) if w is not None else F.transform(v, lambda x: F.lit(1.0))
            sel.append(wc.alias(name + "__w"))
            out_fields.append(T.StructField(name + "__w", T.ArrayType(T.FloatType(), False), False))
        specs.append((name, kind, hashed))
    prepared = df.select(*sel)
    schema = T.StructType(out_fields)
    arrow_types = {}
    for fl in out_fields:
        if fl.name.endswith("__w"):
            arrow_types[fl.name] = pa.list_(pa.field("element", pa.float32(), nullable=False))
        elif any(fl.name == s[0] for s in specs):
            arrow_types[fl.name] = pa.list_(pa.field("element", pa.int64(), nullable=False))

    def lookup(batches):
        tables = _lookup_tables(bc, token)
        for b in batches:
            cols = {n: b.column(n) for n in b.schema.names}
            for name, kind, hashed in specs:
                col = cols[name]
                if kind == "single":
                    if hashed:
                        continue
                    idx = tables[name].get_indexer(col.to_numpy(zero_copy_only=False))
                    offsets = np.arange(len(col) + 1, dtype=np.int32)
                    flat = pa.array(idx.astype(np.int64) + 1)
                else:
                    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
                    offsets = np.zeros(len(col) + 1, dtype=np.int32)
                    np.cumsum(lengths, out=offsets[1:])
                    flat_vals = col.flatten()
                    if hashed:
                        flat = pc.fill_null(flat_vals, 0).cast(pa.int64())
                    else:
                        idx = tables[name].get_indexer(flat_vals.to_numpy(zero_copy_only=False))
                        flat = pa.array(idx.astype(np.int64) + 1)
                    if kind == "weighted":
                        wcol = cols[name + "__w"]
                        wflat = pc.fill_null(wcol.flatten(), 1.0).cast(pa.float32())
                        cols[name + "__w"] = pa.ListArray.from_arrays(pa.array(offsets), wflat).cast(
                            arrow_types[name + "__w"])
                cols[name] = pa.ListArray.from_arrays(pa.array(offsets), flat).cast(arrow_types[name])
            for name, kind, hashed in specs:
                if kind == "single" and hashed:
                    cols[name] = cols[name].cast(arrow_types[name])
            yield pa.RecordBatch.from_arrays([cols[n] for n in schema.names], names=schema.names)

    return prepared.mapInArrow(lookup, schema)
