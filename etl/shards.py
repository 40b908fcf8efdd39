"""The shard writer: split DataFrames -> ``DATA/`` (shards, rejects, vocab, manifest), committed by rename.

Public API (used by ``esmm etl`` and the Ali-CCP converter)::

    manifest = write_dataset(
        spark, out, {"train": train_df, "test": test_df}, fields,
        shards=4, inputs={...}, rejects=rejects_df, reject_counts={...}, read_counts={...},
        created_by="esmm etl", vocab=vocab_df, user_field="user_id", item_field="item_id",
        extra={"out_of_range": {...}})

- each split DataFrame has ``sample_id`` string, ``ts`` timestamp, ``dt`` day string
  (``YYYY-MM-DD``), ``click`` and ``conversion`` (0/1, cast to int8), and per field in
  ``fields`` the encoded column ``<name>`` list<int64> (+ ``<name>__w`` list<float32> for
  ``kind == "weighted"``). Columns whose name starts with ``_`` are not written; use them
  for ``user_field``/``item_field`` if the raw ids should be counted (e.g. ``_user_raw``);
  a list column is counted by its first id.
- ``fields``: one dict per field, at least ``name``, ``kind`` (single|multi|weighted),
  ``vocab_size``, ``group``; copied into the manifest (``weights`` added for weighted).
- ``rejects``: DataFrame ``(table, reason, row, source_file[, detail])`` or None; ``reject_counts``
  any subset of the eleven keys in :data:`REJECT_KEYS` (missing ones are 0, unknown ones
  fail); ``read_counts`` ``{"impressions", "clicks", "conversions"}``.
- ``vocab``: long DataFrame ``(field, value, id, count)`` (see ``etl.vocab``) or None.
- ``extra``: top-level manifest keys added as given (e.g. ``out_of_range``, ``used``).

What it guarantees:

- everything is written to ``<out>.staging-<uuid>`` next to ``out``; exactly ``shards``
  files ``<split>/dt=<day>/part-NNNNN.parquet`` per day (a shard that got no rows is an
  empty file with the schema), row groups bounded by bytes (``row_group_bytes``);
- row ``r`` goes to shard ``xxhash64(sample_id) mod shards`` and rows are ordered within a
  file by ``xxhash64(sample_id, seed)``: shuffled within the day, and a rerun on the same
  rows gives the same rows in the same files in the same order;
- ``manifest.json`` (README's format_version 1) and ``_SUCCESS`` are written last, then the
  commit: old ``out`` renamed aside, staging renamed to ``out``, old deleted. A job that
  dies before the commit leaves the previous output untouched (its staging folder is
  removed by the next run); if it dies between the two renames, the next run renames the
  old output back before starting.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath
import uuid

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl import fs
from etl.vocab import save_vocab

FORMAT_VERSION = 1
TABLES = ("impressions", "clicks", "conversions")
REJECT_KEYS = (
    "impressions.malformed", "impressions.duplicate",
    "clicks.malformed", "clicks.duplicate", "clicks.orphan", "clicks.before_impression",
    "conversions.malformed", "conversions.duplicate", "conversions.orphan",
    "conversions.before_click", "conversions.outside_window",
)
REJECTS_SCHEMA = "table string, reason string, row string, source_file string"
# Test hook: die right before the commit rename (tests/test_etl_commit.py).
DIE_ENV = "ESMM_TEST_DIE_BEFORE_COMMIT"


def _shard_columns(df: DataFrame, fields: list[dict], split: str) -> list:
    cols = set(df.columns)
    need = ["sample_id", "ts", "dt", "click", "conversion"]
    for f in fields:
        need.append(f["name"])
        if f["kind"] == "weighted":
            need.append(f["name"] + "__w")
    missing = [c for c in need if c not in cols]
    if missing:
        raise ValueError(f"split {split!r} lacks columns {missing}")
    sel = [F.col("sample_id").cast("string").alias("sample_id"),
           F.col("ts").cast("timestamp").alias("ts"),
           F.col("click").cast("tinyint").alias("click"),
           F.col("conversion").cast("tinyint").alias("conversion")]
    for f in fields:
        sel.append(F.col(f["name"]).cast("array<bigint>").alias(f["name"]))
        if f["kind"] == "weighted":
            sel.append(F.col(f["name"] + "__w").cast("array<float>").alias(f["name"] + "__w"))
    return sel


def _distinct_expr(df: DataFrame, name: str | None):
    if not name or name not in df.columns:
        return F.lit(None).cast("bigint")
    c = F.col(name)
    if isinstance(df.schema[name].dataType, T.ArrayType):
        c = F.element_at(c, 1)
    return F.countDistinct(c)


def _recover_and_clean(spark, out: str) -> None:
    """Undo a commit interrupted between its renames; drop stale staging folders."""
    parent, base = posixpath.split(out)
    entries = fs.listdir(spark, parent)
    if not fs.exists(spark, out):
        olds = [n for n, d in entries if d and n.startswith(base + ".old-")
                and fs.exists(spark, posixpath.join(parent, n, "_SUCCESS"))]
        if olds:
            fs.rename(spark, posixpath.join(parent, olds[-1]), out)
    for n, d in entries:
        if d and (n.startswith(base + ".staging-") or n.startswith(base + ".old-")):
            if fs.exists(spark, posixpath.join(parent, n)):
                fs.delete(spark, posixpath.join(parent, n))


def _empty_template(spark, schema: T.StructType, where: str) -> str:
    """Write a zero-row Parquet file with ``schema``; return its path."""
    spark.createDataFrame([], schema).coalesce(1).write.mode("overwrite").parquet(where)
    parts = [p for p in fs.walk_files(spark, where) if p.endswith(".parquet")]
    return posixpath.join(where, parts[0])


def write_dataset(spark, out: str, splits: dict[str, DataFrame], fields: list[dict], *, shards: int,
                  inputs: dict, rejects: DataFrame | None, reject_counts: dict[str, int],
                  read_counts: dict[str, int], created_by: str, vocab: DataFrame | None = None,
                  user_field: str | None = "user_id", item_field: str | None = "item_id",
                  extra: dict | None = None, row_group_bytes: int = 16 << 20, seed: int = 0,
                  check=None) -> dict:
    """Write shards + rejects + vocab + manifest to staging, then commit by rename.

    See the module docstring for the column contract. ``check(manifest)``, if given, runs
    before the commit; an exception there leaves the previous output in place.
    Returns the manifest dict.
    """
    if shards < 1:
        raise ValueError("shards must be >= 1")
    unknown = set(reject_counts) - set(REJECT_KEYS)
    if unknown:
        raise ValueError(f"unknown reject keys {sorted(unknown)}")
    out = fs.qualify(spark, out)
    _recover_and_clean(spark, out)
    staging = f"{out}.staging-{uuid.uuid4().hex[:12]}"
    fs.mkdirs(spark, staging)

    # All splits in one frame, persisted once: one stats pass, one distinct pass, one write.
    names = list(splits)
    sel = {n: _shard_columns(df, fields, n) for n, df in splits.items()}
    parts = []
    for n, df in splits.items():
        extra_cols = [F.col(c).alias(c) for c in {user_field, item_field} if c and c in df.columns
                      and c not in {"sample_id", "ts", "dt", "click", "conversion"} and c.startswith("_")]
        parts.append(df.select(F.lit(n).alias("_split"), F.col("dt").cast("string").alias("dt"), *sel[n],
                               *extra_cols))
    allrows = parts[0]
    for p in parts[1:]:
        allrows = allrows.unionByName(p, allowMissingColumns=True)
    allrows = allrows.persist(StorageLevel.DISK_ONLY)  # wide list columns: keep them off the heap
    try:
        per_day: dict[str, dict] = {n: {} for n in names}
        for r in allrows.groupBy("_split", "dt").agg(
                F.count(F.lit(1)).alias("n"), F.sum(F.col("click").cast("long")).alias("y"),
                F.sum(F.col("conversion").cast("long")).alias("z")).collect():
            if r["dt"] is None:
                raise ValueError(f"split {r['_split']!r} has rows with a null dt")
            per_day[r["_split"]][r["dt"]] = r
        uniq = {r["_split"]: r for r in allrows.groupBy("_split").agg(
            _distinct_expr(allrows, user_field).alias("u"), _distinct_expr(allrows, item_field).alias("i")).collect()}
        n_groups = sum(len(v) for v in per_day.values()) * shards
        raw = posixpath.join(staging, "_raw")
        shard_of = F.pmod(F.xxhash64(F.col("sample_id")), F.lit(shards)).cast("int")
        order = F.xxhash64(F.col("sample_id"), F.lit(seed))
        cols = [c for c in parts[0].columns if not c.startswith("_") and c != "dt"]  # the shard columns
        (allrows.select("_split", "dt", shard_of.alias("_shard"), order.alias("_order"), *cols)
         .repartition(max(1, n_groups), "_split", "dt", "_shard")
         .sortWithinPartitions("_split", "dt", "_shard", "_order", "sample_id")
         .drop("_order")
         .write.mode("overwrite").option("parquet.block.size", int(row_group_bytes))
         .partitionBy("_split", "dt", "_shard").parquet(raw))
        schema = allrows.select(*cols).schema
    finally:
        allrows.unpersist()

    manifest_splits: dict[str, dict] = {}
    template = None
    for split in names:
        days = sorted(per_day[split])
        files = []
        for day in days:
            for k in range(shards):
                src_dir = posixpath.join(raw, f"_split={split}", f"dt={day}", f"_shard={k}")
                parts_ = [p for p in fs.walk_files(spark, src_dir) if p.endswith(".parquet")]
                rel = f"{split}/dt={day}/part-{k:05d}.parquet"
                dst = posixpath.join(staging, rel)
                if len(parts_) > 1:
                    raise AssertionError(f"{src_dir} holds {len(parts_)} files, expected one")
                if parts_:
                    fs.rename(spark, posixpath.join(src_dir, parts_[0]), dst)
                else:
                    if template is None:
                        template = _empty_template(spark, schema, posixpath.join(staging, "_empty"))
                    fs.copy(spark, template, dst)
                files.append(rel)
        pdays, u = per_day[split], uniq.get(split)
        manifest_splits[split] = {
            "days": days,
            "impressions": int(sum(pdays[d]["n"] for d in days)),
            "clicks": int(sum(pdays[d]["y"] or 0 for d in days)),
            "conversions": int(sum(pdays[d]["z"] or 0 for d in days)),
            "users": None if u is None or u["u"] is None else int(u["u"]),
            "items": None if u is None or u["i"] is None else int(u["i"]),
            "files": files,
            "per_day": {d: {"impressions": int(pdays[d]["n"]), "clicks": int(pdays[d]["y"] or 0),
                            "conversions": int(pdays[d]["z"] or 0)} for d in days},
        }
    fs.delete(spark, posixpath.join(staging, "_empty"))
    fs.delete(spark, posixpath.join(staging, "_raw"))

    rej = rejects if rejects is not None else spark.createDataFrame([], REJECTS_SCHEMA)
    detail = F.col("detail").cast("string") if "detail" in rej.columns else F.lit(None).cast("string")
    (rej.select(F.col("table").cast("string"), F.col("reason").cast("string"),
                F.col("row").cast("string"), F.col("source_file").cast("string"), detail.alias("detail"))
     .repartition(1).sortWithinPartitions("table", "reason", "source_file", "row")
     .write.mode("overwrite").parquet(posixpath.join(staging, "rejects")))
    if vocab is not None:
        save_vocab(vocab, posixpath.join(staging, "vocab"))

    mfields = []
    for f in fields:
        m = dict(f)
        if m["kind"] == "weighted":
            m.setdefault("weights", m["name"] + "__w")
        mfields.append(m)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": created_by,
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "inputs": inputs,
        "fields": mfields,
        "splits": manifest_splits,
        "read": {t: int(read_counts.get(t, 0)) for t in TABLES},
        "rejects": {k: int(reject_counts.get(k, 0)) for k in REJECT_KEYS},
        **(extra or {}),
    }
    if check is not None:
        try:
            check(manifest)
        except BaseException:
            fs.delete(spark, staging)
            raise
    fs.write_text(spark, posixpath.join(staging, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    fs.write_text(spark, posixpath.join(staging, "_SUCCESS"), "")

    if os.environ.get(DIE_ENV):
        os._exit(3)
    old = None
    if fs.exists(spark, out):
        old = f"{out}.old-{uuid.uuid4().hex[:12]}"
        fs.rename(spark, out, old)
    fs.rename(spark, staging, out)
    if old:
        fs.delete(spark, old)
    return manifest


def read_manifest(spark, data: str) -> dict:
    """The committed manifest of ``data`` (raises FileNotFoundError without ``_SUCCESS``)."""
    data = fs.qualify(spark, data)
    if not fs.exists(spark, posixpath.join(data, "_SUCCESS")):
        raise FileNotFoundError(f"{data}: no committed dataset (_SUCCESS missing)")
    return json.loads(fs.read_text(spark, posixpath.join(data, "manifest.json")))
