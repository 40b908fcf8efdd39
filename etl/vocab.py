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
  frame (given ``prev``, it grows an earlier vocabulary: :func:`extend_vocab`), then :func:`encode_columns`, which looks values up in Arrow batches against a
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

from etl.list_encode import list_udf
from etl.spark import arrow_frame

VOCAB_SCHEMA = "field string, value string, id bigint, count bigint"


def count_values(df: DataFrame, field_col: str = "field", value_col: str = "value") -> DataFrame:
    """Occurrences per ``(field, value)``; null values are missing and not counted."""
    return (df.where(F.col(value_col).isNotNull())
            .groupBy(F.col(field_col).cast("string").alias("field"),
                     F.col(value_col).cast("string").alias("value"))
            .agg(F.count(F.lit(1)).alias("count")))


def number_values(counts, min_count: Mapping[str, int]):
    """:func:`assign_ids` on an Arrow table ``(field, value, count)`` (one row per value),
    on the driver: ids ``1..n`` per field by count descending then value ascending (both
    byte order), values below the field's ``min_count`` dropped."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    thr = pc.fill_null(pc.index_in(counts.column("field"), value_set=pa.array(list(min_count), pa.string())), -1)
    limits = np.append(np.array(list(min_count.values()), dtype=np.int64), 1)  # -1 (not listed): 1
    keep = counts.column("count").to_numpy() >= limits[thr.to_numpy()]
    t = counts.filter(pa.array(keep))
    t = t.take(pc.sort_indices(t, sort_keys=[("field", "ascending"), ("count", "descending"), ("value", "ascending")]))
    f = t.column("field").to_numpy(zero_copy_only=False)
    first = np.r_[True, f[1:] != f[:-1]] if len(f) else np.zeros(0, dtype=bool)
    pos = np.arange(len(f), dtype=np.int64)
    ids = pos - np.maximum.accumulate(np.where(first, pos, 0)) + 1
    return pa.table({"field": t.column("field"), "value": t.column("value"), "id": pa.array(ids, pa.int64()),
                     "count": t.column("count")})


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

def _values_list(df: DataFrame, name: str):
    """A list field's raw values as ``array<string>`` (a map's keys; a null list is empty)."""
    c = F.col(name)
    if isinstance(df.schema[name].dataType, T.MapType):  # a map's values are its keys (weighted or not)
        c = F.map_keys(c)
    return F.coalesce(c.cast("array<string>"), F.array().cast("array<string>"))


def keyed_values(df: DataFrame, singles: list, lists: list, extra: list = ()) -> DataFrame:
    """``(k int, v string, *extra)``: one row per non-null value of the given columns, ``k``
    the value's column (``singles`` first: string columns; then ``lists``: array<string>);
    ``extra`` (named columns of ``df``) is repeated on each of the row's values.

    One ``posexplode`` of the concatenated values, ``k`` from the position and the lists'
    sizes: Spark runs higher-order functions (``transform``) and per-value structs
    interpreted, which made counting ~4x slower than the scan it follows.
    """
    ns = len(singles)
    arr = F.concat(F.array(*singles) if singles else F.array().cast("array<string>"), *lists)
    x = df.select(arr.alias("_a"), *[F.size(c).alias(f"_n{j}") for j, c in enumerate(lists)], *extra)
    names = x.columns[1 + len(lists):]
    # outer: Spark guards a plain explode with an inferred filter (size(_a) > 0) that builds
    # the concatenated array a second time; an empty array's one null row is dropped below
    x = x.select(F.posexplode_outer("_a").alias("_p", "v"), *[f"_n{j}" for j in range(len(lists))], *names)
    k, edge = F.when(F.col("_p") < ns, F.col("_p")), F.lit(ns)
    for j in range(len(lists)):
        edge = edge + F.col(f"_n{j}")
        k = k.when(F.col("_p") < edge, F.lit(ns + j))
    return x.select(k.cast("int").alias("k"), "v", *names).where(F.col("v").isNotNull())


def _vocab_columns(df: DataFrame, vf: list[dict], when=None) -> tuple[list[str], list, list]:
    """(field names in key order, single columns, list columns) of the vocab fields,
    each value null (so not counted) where ``when`` is false."""
    singles = [f for f in vf if f["kind"] == "single"]
    lists = [f for f in vf if f["kind"] != "single"]
    gate = (lambda c: c) if when is None else (lambda c: F.when(when, c))
    empty = F.array().cast("array<string>")
    return ([f["name"] for f in singles + lists], [gate(F.col(f["name"]).cast("string")) for f in singles],
            [_values_list(df, f["name"]) if when is None else F.when(when, _values_list(df, f["name"])).otherwise(empty)
             for f in lists])


def _name_of(names: list[str]):
    return F.element_at(F.array(*[F.lit(n) for n in names]), F.col("k") + 1)


def extend_vocab(prev: DataFrame, counts: DataFrame, min_count: int | Mapping[str, int] = 1,
                 default_min_count: int = 1, base: Mapping[str, int] | None = None,
                 flag_new: bool = False) -> DataFrame:
    """Grow an earlier vocabulary with this run's counts (``--vocab-from``).

    Every ``(field, value)`` of ``prev`` keeps its id (its ``count`` becomes this run's
    count, 0 if unseen). Values new here with ``count >= min_count`` get ids after the
    field's old maximum (``max(prev ids, base[field])``, so ids a bundle reserved are never
    reused), by count descending then value ascending, as :func:`assign_ids` numbers them.
    With ``prev`` empty this is exactly :func:`assign_ids`.

    Args:
        prev (DataFrame): ``(field, value, id[, count])``, e.g. from :func:`read_prev_vocab`.
        counts (DataFrame): ``(field, value, count)`` of this run's train rows (:func:`count_values`).
        base (Mapping[str, int]): per field, the highest id taken in the parent
            (``vocab_size - 1``); fields missing here start from prev's max id.
        flag_new (bool): add a boolean ``new`` column (False for prev's rows).

    Returns:
        DataFrame: :data:`VOCAB_SCHEMA` rows, old ones first.
    """
    p = prev.select(F.col("field").cast("string").alias("field"), F.col("value").cast("string").alias("value"),
                    F.col("id").cast("bigint").alias("id"))
    old = (p.join(counts.select("field", "value", F.col("count").alias("_n")), ["field", "value"], "left")
           .select("field", "value", "id", F.coalesce(F.col("_n"), F.lit(0)).cast("bigint").alias("count")))
    top = p.groupBy("field").agg(F.max("id").alias("_top"))
    if base:
        b = counts.sparkSession.createDataFrame([(k, int(v)) for k, v in base.items()], "field string, _b bigint")
        top = (top.join(b, "field", "full")
               .select("field", F.greatest(F.coalesce("_top", F.lit(0)), F.coalesce("_b", F.lit(0))).alias("_top")))
    fresh = assign_ids(counts.join(p.select("field", "value"), ["field", "value"], "left_anti"),
                       min_count, default_min_count)
    new = (fresh.join(top, "field", "left")
           .select("field", "value", (F.col("id") + F.coalesce(F.col("_top"), F.lit(0))).cast("bigint").alias("id"),
                   "count"))
    if flag_new:
        old, new = old.withColumn("new", F.lit(False)), new.withColumn("new", F.lit(True))
    return old.unionByName(new)


def read_prev_vocab(spark, prev: str) -> tuple[DataFrame, list[dict], str]:
    """The vocabulary, field list and absolute path of a ``--vocab-from`` parent.

    ``prev`` is a data root (``manifest.json``) or a model bundle (``bundle.json``); both
    keep ``vocab/field=<name>/*.parquet`` with ``value``, ``id`` and maybe ``count``
    (contract 1 of the shared notes). Raises :class:`etl.errors.InputError` naming the path.
    """
    import json
    import posixpath

    from etl import fs
    from etl.errors import InputError

    root = fs.qualify(spark, prev)
    doc = None
    for name in ("manifest.json", "bundle.json"):
        path = posixpath.join(root, name)
        if fs.exists(spark, path):
            try:
                doc = json.loads(fs.read_text(spark, path))
            except ValueError as e:
                raise InputError(f"{path}: not valid JSON ({e})") from None
            break
    if doc is None:
        raise InputError(f"--vocab-from {prev}: neither manifest.json nor bundle.json there")
    fields = doc.get("fields") if isinstance(doc, dict) else None
    if not isinstance(fields, list) or not all(isinstance(f, dict) and "name" in f for f in fields):
        raise InputError(f"--vocab-from {prev}: its {name} has no 'fields' list")
    vdir = posixpath.join(root, "vocab")
    if not fs.is_dir(spark, vdir) or not any(d for _, d in fs.listdir(spark, vdir)):
        if any(not f.get("hash_buckets") for f in fields):
            raise InputError(f"{vdir}: no vocabularies (expected vocab/field=<name>/*.parquet)")
        return spark.createDataFrame([], VOCAB_SCHEMA), fields, root
    df = spark.read.parquet(vdir)
    missing = [c for c in ("field", "value", "id") if c not in df.columns]
    if missing:
        raise InputError(f"{vdir}: column {missing[0]!r} missing (columns: {', '.join(df.columns)})")
    cnt = F.col("count").cast("bigint") if "count" in df.columns else F.lit(None).cast("bigint")
    return (df.select(F.col("field").cast("string"), F.col("value").cast("string"), F.col("id").cast("bigint"),
                      cnt.alias("count")), fields, root)


def field_values(train: DataFrame, fields: list[dict]) -> DataFrame:
    """``(field, value)`` of every vocab-kind value in a wide frame (one row per occurrence)."""
    vf = [f for f in fields if not f.get("hash_buckets")]
    if not vf:
        return train.sparkSession.createDataFrame([], "field string, value string")
    names, singles, lists = _vocab_columns(train, vf)
    return keyed_values(train, singles, lists).select(_name_of(names).alias("field"), F.col("v").alias("value"))


def build_vocab(train: DataFrame, fields: list[dict], prev: DataFrame | None = None,
                base: Mapping[str, int] | None = None) -> DataFrame:
    """Vocabulary of the vocab-kind fields of a wide frame (hash-bucket fields skipped).

    Args:
        train (DataFrame): the TRAIN rows only; one column per field named ``field["name"]``
            (string/int for single, array for multi, array or map<string,float> keys for weighted).
        fields (list[dict]): ``{"name", "kind", "min_count" | "hash_buckets"}`` per field.
        prev (DataFrame): an earlier vocabulary to grow (:func:`extend_vocab`), or None.
        base (Mapping[str, int]): highest id taken per field in the parent (with ``prev``).
    """
    vf = [f for f in fields if not f.get("hash_buckets")]
    spark = train.sparkSession
    if not vf:
        return spark.createDataFrame([], VOCAB_SCHEMA)
    return _numbered(count_values(field_values(train, fields)), vf, prev, base)


def _numbered(counts: DataFrame, vf: list[dict], prev: DataFrame | None, base: Mapping[str, int] | None) -> DataFrame:
    """Ids for ``(field, value, count)``: fresh (:func:`assign_ids`) or grown from ``prev``."""
    thresholds = {f["name"]: int(f.get("min_count") or 1) for f in vf}
    if prev is None:
        return assign_ids(counts, thresholds)
    names = [f["name"] for f in vf]
    return extend_vocab(prev.where(F.col("field").isin(names)), counts, thresholds,
                        base={k: v for k, v in (base or {}).items() if k in names})


def count_vocab(valid: DataFrame, fields: list[dict], train_days: list[str], parent=None,
                user_col: str = "user_id", item_col: str = "item_id"):
    """One job: the vocabulary of the train days and the distinct users/items per split.

    Args:
        valid (DataFrame): valid impressions (wide, one column per field, ``_dt`` the day).
        train_days (list[str]): the train days; every other day is test.
        parent: an ``etl.pipeline.ParentVocab`` to grow (``--vocab-from``), or None.

    Returns:
        (vocab DataFrame built on the driver, ``{field: [value of id 1, ...]}``,
        ``{"train"|"test": (users, items)}``).
    """
    import pyarrow as pa

    spark = valid.sparkSession
    is_train = F.col("_dt").isin(list(train_days))
    vf = [f for f in fields if not f.get("hash_buckets")]
    names, singles, lists = _vocab_columns(valid, vf, when=is_train)
    ns = len(singles)
    # one counting pass: the vocab fields on train rows, and the user and item columns
    # per split (train's from their field's counts where it is a vocabulary field)
    extras = [((split, what), F.when(gate, F.col(col).cast("string")))
              for split, gate in (("train", is_train), ("test", ~is_train))
              for what, col in (("users", user_col), ("items", item_col))
              if not (split == "train" and col in names[:ns])]
    keys = names[:ns] + [e[0] for e in extras] + names[ns:]  # k -> field name or (split, what)
    only_distinct = [i for i, x in enumerate(keys) if isinstance(x, tuple)]
    # per (k, value) its count; then the keys counted for their distinct values only are
    # rolled up to one row each (n = distinct values), in the same job
    counts = (keyed_values(valid, singles + [e[1] for e in extras], lists)
              .groupBy("k", "v").agg(F.count(F.lit(1)).alias("c")))
    tab = (counts.groupBy("k", F.when(~F.col("k").isin(only_distinct), F.col("v")).alias("v"))
           .agg(F.sum("c").alias("count"), F.count(F.lit(1)).alias("n")).toArrow())
    import numpy as np

    k = tab.column("k").to_numpy(zero_copy_only=False)
    rolled = np.isin(k, only_distinct)
    n_of = dict(zip(k[rolled].tolist(), tab.column("n").to_numpy(zero_copy_only=False)[rolled].tolist()))
    for i, x in enumerate(keys):
        if isinstance(x, str):
            n_of[i] = int((k == i).sum())  # a field's distinct train values: its rows
    uk = {x: i for i, x in enumerate(keys) if isinstance(x, tuple)}
    for what, col in (("users", user_col), ("items", item_col)):
        if ("train", what) not in uk:  # not an extra: counted as a field
            uk[("train", what)] = keys.index(col)
    uniques = {split: (n_of.get(uk[(split, "users")]), n_of.get(uk[(split, "items")])) for split in ("train", "test")
               if n_of.get(uk[(split, "users")]) or n_of.get(uk[(split, "items")])}
    is_field = pa.array(np.array([isinstance(x, str) for x in keys], dtype=bool)[k])
    names_by_k = pa.array([x if isinstance(x, str) else None for x in keys], pa.string())
    fc = tab.filter(is_field)
    fc = pa.table({"field": names_by_k.take(fc.column("k")), "value": fc.column("v"),
                   "count": fc.column("count").cast(pa.int64())})
    thresholds = {f["name"]: int(f.get("min_count") or 1) for f in vf}
    if parent is None:
        vt = number_values(fc, thresholds)
    else:  # ids carried over from the parent: Spark joins, on the counted values only
        vt = _numbered(spark.createDataFrame(fc, schema="field string, value string, count bigint"), vf,
                       parent.vocab, parent.top).toArrow()
    vt = vt.cast(pa.schema([("field", pa.string()), ("value", pa.string()), ("id", pa.int64()), ("count", pa.int64())]))
    values = _values_of(vt, fields)
    return arrow_frame(spark, vt, VOCAB_SCHEMA), values, uniques


def _values_of(tab, fields: list[dict]) -> dict[str, list]:
    """``{field: [value of id 1, ...]}`` from an Arrow vocabulary (holes as None)."""
    vf = [f["name"] for f in fields if not f.get("hash_buckets")]
    values: dict[str, list] = {f: [] for f in vf}
    import pyarrow.compute as pc

    tab = tab.take(pc.sort_indices(tab, sort_keys=[("field", "ascending"), ("id", "ascending")]))
    for fld, val, i in zip(tab.column("field").to_pylist(), tab.column("value").to_pylist(),
                           tab.column("id").to_pylist()):
        if fld not in values:
            continue
        lst = values[fld]
        if i <= len(lst):
            raise AssertionError(f"vocab ids of field {fld!r} repeat id {i}")
        while len(lst) + 1 < i:  # an id a parent vocabulary left unused: no value maps to it
            lst.append(None)
        lst.append(val)
    return values


def collect_vocab(vocab: DataFrame, fields: list[dict]) -> dict[str, list[str]]:
    """``{field: [value of id 1, value of id 2, ...]}`` for the vocab-kind fields (one job).

    ``len(values[f]) + 1`` is the field's vocab_size.
    """
    vf = [f["name"] for f in fields if not f.get("hash_buckets")]
    if not vf:
        return {}
    return _values_of(vocab.where(F.col("field").isin(vf)).toArrow(), fields)


def _single_table(spark, name: str, values: list) -> DataFrame:
    """``(_vk_<name> value, _vi_<name> id)`` of one field, built on the driver (a hole, None,
    is an id a parent left unused: no row). One small frame per field, so each broadcast
    reads only its own field's values."""
    import numpy as np
    import pyarrow as pa

    vals = pa.array(values, pa.string())
    keep = vals.is_valid()
    tab = pa.table({f"_vk_{name}": vals.filter(keep),
                    f"_vi_{name}": pa.array(np.arange(1, len(values) + 1, dtype=np.int64)).filter(keep)})
    return arrow_frame(spark, tab, f"`_vk_{name}` string, `_vi_{name}` bigint")


def encode_columns(df: DataFrame, fields: list[dict], vocab, keep: list[str]) -> DataFrame:
    """Replace each field column by its ids (int64 for a single field, else list<int64>) and
    weights (list<float32>).

    Single-valued vocabulary fields are looked up on the JVM (a broadcast hash join on the
    value), hashed fields are computed there too; only list-valued vocabulary fields go
    through Python, as a scalar Arrow UDF that receives that one column.

    Args:
        df (DataFrame): wide frame with the ``keep`` columns and one column per field.
        fields (list[dict]): ``{"name", "kind", "min_count" | "hash_buckets"}``.
        vocab (DataFrame | dict): from :func:`build_vocab` (collected to the driver) or
            :func:`collect_vocab`'s dict.
        keep (list[str]): columns passed through unchanged.

    Returns:
        DataFrame: ``keep`` + ``<name>`` per field, bigint for a single field, else
        list<bigint> (+ ``<name>__w`` list<float> for weighted). A null single value
        gives 0, a null list ``[]``.
    """
    spark = df.sparkSession
    values = vocab if isinstance(vocab, dict) else collect_vocab(vocab, fields)
    lists = [f for f in fields if f["kind"] != "single" and not f.get("hash_buckets")]
    bc = spark.sparkContext.broadcast({f["name"]: values[f["name"]] for f in lists}) if lists else None
    token = uuid.uuid4().hex  # names this broadcast in the workers' lookup cache
    out = df
    sel = [F.col(k) for k in keep]
    for f in fields:
        name, kind = f["name"], f["kind"]
        c, dtype = F.col(name), df.schema[name].dataType
        is_map = isinstance(dtype, T.MapType)
        if kind == "single":
            v = c.cast("string")
            if f.get("hash_buckets"):
                ids = hash_ids(v, f["hash_buckets"])
            else:
                key, idc = f"_vk_{name}", f"_vi_{name}"
                out = out.join(F.broadcast(_single_table(spark, name, values[name])), v == F.col(key), "left")
                ids = F.coalesce(F.col(idc), F.lit(0).cast("bigint"))
            sel.append(ids.cast("bigint").alias(name))
        elif not f.get("hash_buckets"):  # Python, this column only (etl/list_encode.py)
            arg = c if is_map else c.cast("array<string>")
            res = list_udf(bc, token, name, kind == "weighted", is_map)(arg)
            if kind == "weighted":
                w = F.coalesce(res["w"], F.array().cast("array<float>"))  # never null, as before
                sel += [res["ids"].alias(name), w.alias(name + "__w")]
            else:
                sel.append(res.alias(name))
        else:
            sel += _hashed_list(c, is_map, kind == "weighted", f["hash_buckets"], name)
    return out.select(*sel)


def _hashed_list(c, is_map: bool, weighted: bool, buckets: int, name: str) -> list:
    """A hash-bucket list field, on the JVM: ids (+ weights), a map's entries sorted by key."""
    w = None
    if is_map:
        entries = F.array_sort(F.map_entries(c))  # sorted by key: deterministic order
        v = F.coalesce(F.transform(entries, lambda e: e["key"].cast("string")), F.array().cast("array<string>"))
        w = F.coalesce(F.transform(entries, lambda e: F.coalesce(e["value"].cast("double"), F.lit(1.0))),
                       F.array().cast("array<double>"))
    else:
        v = F.coalesce(c.cast("array<string>"), F.array().cast("array<string>"))
    out = [F.transform(v, lambda x: hash_ids(x, buckets)).cast("array<bigint>").alias(name)]
    if weighted:
        w = w if w is not None else F.transform(v, lambda x: F.lit(1.0))
        out.append(w.cast("array<float>").alias(name + "__w"))
    return out
