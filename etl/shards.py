"""The shard writer: split DataFrames -> ``DATA/`` (shards, rejects, vocab, manifest), committed by rename.

Public API (used by ``esmm etl`` and the Ali-CCP converter)::

    manifest = write_dataset(
        spark, out, {"train": train_df, "test": test_df}, fields,
        shards=4, inputs={...}, rejects=rejects_df, reject_counts={...}, read_counts={...},
        created_by="esmm etl", vocab=vocab_df, user_field="user_id", item_field="item_id",
        extra={"out_of_range": {...}})

- each split DataFrame has ``sample_id`` string, ``ts`` timestamp, ``dt`` day string
  (``YYYY-MM-DD``), ``click`` and ``conversion`` (0/1, cast to int8), and per field in
  ``fields`` the encoded column ``<name>``: int64 for ``kind == "single"``, else
  list<int64> (+ ``<name>__w`` list<float32> for ``kind == "weighted"``). Columns whose
  name starts with ``_`` are not written; use them for ``user_field``/``item_field`` if
  the raw ids should be counted (e.g. ``_user_raw``); a list column is counted by its
  first id.
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
- ``manifest.json`` (README's format_version 2) and ``_SUCCESS`` are written last, then the
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
import re
import uuid

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl import fs
from etl.vocab import save_vocab

FORMAT_VERSION = 2  # 2: single fields are int64 (1: one-id lists)
TABLES = ("impressions", "clicks", "conversions")
REJECT_KEYS = (
    "impressions.malformed", "impressions.duplicate",
    "clicks.malformed", "clicks.duplicate", "clicks.orphan", "clicks.before_impression",
    "conversions.malformed", "conversions.duplicate", "conversions.orphan",
    "conversions.before_click", "conversions.outside_window",
)
REJECTS_SCHEMA = "table string, reason string, row string, source_file string"
# Test hooks: die right before the commit rename; lose a shard file right after the write.
DIE_ENV = "ESMM_TEST_DIE_BEFORE_COMMIT"
LOSE_ENV = "ESMM_TEST_LOSE_SHARD_FILE"


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
        sel.append(F.col(f["name"]).cast("bigint" if f["kind"] == "single" else "array<bigint>").alias(f["name"]))
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


OWNER = "_OWNER"  # in a staging folder: host, pid and start of the run writing it
STALE_S = float(os.environ.get("ESMM_STAGING_STALE_HOURS", "48")) * 3600  # another host's staging


class WriteCheckError(RuntimeError):
    """The files written do not hold the rows the job wrote: a bug or a lost file, never bad input."""


def _owner_alive(spark, folder: str) -> bool:
    """Whether the run that owns a staging folder may still be writing it.

    Same host: its pid is alive. Another host (or no owner file): younger than
    ``ESMM_STAGING_STALE_HOURS`` (default 48). A folder without an owner file is dead.
    """
    import socket
    import time

    try:
        info = json.loads(fs.read_text(spark, posixpath.join(folder, OWNER)))
    except Exception:
        return False
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
        except (ProcessLookupError, ValueError, KeyError, TypeError):
            return False
        except PermissionError:
            return True
        return True
    return time.time() - float(info.get("started", 0)) < STALE_S


def _recover_and_clean(spark, out: str) -> None:
    """Undo a commit interrupted between its renames; drop dead runs' staging folders.

    Never deletes the staging folder of a run that may still be writing (see
    :func:`_owner_alive`), nor the only intact copy: when ``out`` is missing, the newest
    intact ``.old-`` copy (with ``_SUCCESS``) is renamed back first, and an ``.old-``
    copy is deleted only while ``out`` is intact.
    """
    parent, base = posixpath.split(out)
    entries = fs.listdir(spark, parent)
    if not fs.exists(spark, out):
        olds = []
        for n, d in entries:
            full = posixpath.join(parent, n)
            if d and n.startswith(base + ".old-") and fs.exists(spark, posixpath.join(full, "_SUCCESS")):
                try:
                    made = json.loads(fs.read_text(spark, posixpath.join(full, "manifest.json"))).get("created_at", "")
                except Exception:
                    made = ""
                olds.append((made, n))
        if olds:
            fs.rename(spark, posixpath.join(parent, max(olds)[1]), out)
    intact = fs.exists(spark, posixpath.join(out, "_SUCCESS"))
    for n, d in entries:
        full = posixpath.join(parent, n)
        if not d or not fs.exists(spark, full):
            continue
        if n.startswith(base + ".staging-") and not _owner_alive(spark, full):
            fs.delete(spark, full)
        elif n.startswith(base + ".old-") and intact:
            fs.delete(spark, full)


def _empty_template(spark, like: DataFrame, where: str) -> str:
    """Write a zero-row Parquet file with the schema of ``like``; return its path.

    ``limit(0)`` plans to an empty local relation: no scan and no Python worker.
    """
    like.limit(0).coalesce(1).write.mode("overwrite").parquet(where)
    parts = [p for p in fs.walk_files(spark, where) if p.endswith(".parquet")]
    return posixpath.join(where, parts[0])


def _partition_keys(spark, n: int) -> list[int]:
    """``n`` ints whose Spark partition under ``repartition(n, key)`` is 0, 1, ..., n - 1:
    the first candidate that hashes to each partition (Murmur3, as the shuffle computes it)."""
    import numpy as np

    got: dict[int, int] = {}
    size = 64 * n
    start = 0
    while len(got) < n:
        t = spark.range(start, start + size).select(
            F.col("id").cast("int").alias("x"), F.pmod(F.hash(F.col("id").cast("int")), F.lit(n)).alias("p")).toArrow()
        x = t.column("x").to_numpy()
        parts, first = np.unique(t.column("p").to_numpy(), return_index=True)  # rows come in id order
        for p, i in zip(parts.tolist(), first.tolist()):
            got.setdefault(p, int(x[i]))
        start += size
    return [got[p] for p in range(n)]


def _day_stats(df: DataFrame, days: dict[str, list[str]]):
    """Aggregates for ``DataFrame.observe``: rows, clicks and conversions per (split, day)."""
    aggs = []
    for split, ds in days.items():
        for i, d in enumerate(ds):
            hit = (F.col("_split") == F.lit(split)) & (F.col("dt") == F.lit(d))
            for k, c in (("n", F.lit(1)), ("y", F.col("click")), ("z", F.col("conversion"))):
                aggs.append(F.sum(F.when(hit, c.cast("long")).otherwise(F.lit(0).cast("long"))).alias(f"{k}|{split}|{d}"))
    aggs.append(F.count(F.lit(1)).alias("rows"))
    return aggs


def write_dataset(spark, out: str, splits: "dict[str, DataFrame] | DataFrame", fields: list[dict], *, shards: int,
                  inputs: dict, rejects: DataFrame | None, reject_counts, read_counts: dict[str, int],
                  created_by: str, vocab: DataFrame | None = None,
                  user_field: str | None = "user_id", item_field: str | None = "item_id",
                  extra=None, row_group_bytes: int = 16 << 20, seed: int = 0,
                  check=None, days: dict[str, list[str]] | None = None,
                  uniques: dict[str, tuple] | None = None) -> dict:
    """Write shards + rejects + vocab + manifest to staging, then commit by rename.

    See the module docstring for the column contract. ``check(manifest)``, if given, runs
    before the commit; an exception there leaves the previous output in place.

    ``splits`` may also be ONE DataFrame with a ``_split`` column (then ``days`` names the
    splits), so a plan shared by the splits runs once. One job writes every split with
    one shuffle: partition p holds exactly group p (split, day, shard) and is written as
    one file. Given ``days`` (``{split: [day]}``, every day a split may hold), the per-day
    counts come with that write
    (``DataFrame.observe``), else from one aggregation before it. ``uniques``
    (``{split: (users, items)}``) skips the distinct-count job. ``reject_counts`` and
    ``extra`` may be callables, called after the writes (so they can read observations
    made by the rejects write); so may ``rejects``, called after the shard write (so it can
    leave out a table that write observed to have no rejects). After the write, the rows
    in the written files' footers must equal the rows written, per split and day: a lost
    file fails the job before the commit (:class:`WriteCheckError`).
    Returns the manifest dict.
    """
    if shards < 1:
        raise ValueError("shards must be >= 1")
    out = fs.qualify(spark, out)
    _recover_and_clean(spark, out)
    staging = f"{out}.staging-{uuid.uuid4().hex[:12]}"
    fs.mkdirs(spark, staging)
    import socket
    import time

    fs.write_text(spark, posixpath.join(staging, OWNER),
                  json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
    try:
        manifest = _write_staging(spark, staging, splits, fields, shards=shards, inputs=inputs, rejects=rejects,
                                  reject_counts=reject_counts, read_counts=read_counts, created_by=created_by,
                                  vocab=vocab, user_field=user_field, item_field=item_field, extra=extra,
                                  row_group_bytes=row_group_bytes, seed=seed, check=check, days=days,
                                  uniques=uniques)
    except BaseException:
        fs.delete(spark, staging)
        raise
    if os.environ.get(DIE_ENV):
        os._exit(3)
    fs.delete(spark, posixpath.join(staging, OWNER))
    old = None
    if fs.exists(spark, out):
        old = f"{out}.old-{uuid.uuid4().hex[:12]}"
        fs.rename(spark, out, old)
    fs.rename(spark, staging, out)
    if old:
        fs.delete(spark, old)
    return manifest


def _write_staging(spark, staging, splits, fields, *, shards, inputs, rejects, reject_counts, read_counts,
                   created_by, vocab, user_field, item_field, extra, row_group_bytes, seed, check, days,
                   uniques) -> dict:
    from pyspark.sql import Observation

    if isinstance(splits, DataFrame):  # one frame, its split in column _split: one plan, read once
        if days is None or "_split" not in splits.columns:
            raise ValueError("a single frame needs a _split column and the days of each split")
        names = list(days)
        parts = [splits.select(F.col("_split").cast("string").alias("_split"), F.col("dt").cast("string").alias("dt"),
                               *_shard_columns(splits, fields, "all"))]
    else:
        names = list(splits)
        parts = []
        for n, df in splits.items():
            extra_cols = [F.col(c).alias(c) for c in {user_field, item_field} if c and c in df.columns
                          and c not in {"sample_id", "ts", "dt", "click", "conversion"} and c.startswith("_")]
            parts.append(df.select(F.lit(n).alias("_split"), F.col("dt").cast("string").alias("dt"),
                                   *_shard_columns(df, fields, n), *([] if uniques is not None else extra_cols)))
    allrows = parts[0]
    for p in parts[1:]:
        allrows = allrows.unionByName(p, allowMissingColumns=True)

    if days is None:  # no day list: one aggregation first
        days = {n: [] for n in names}
        for r in allrows.groupBy("_split", "dt").count().collect():
            if r["dt"] is None:
                raise ValueError(f"split {r['_split']!r} has rows with a null dt")
            days[r["_split"]].append(r["dt"])
        days = {n: sorted(v) for n, v in days.items()}
    if uniques is None:
        uniques = {r["_split"]: (r["u"], r["i"]) for r in allrows.groupBy("_split").agg(
            _distinct_expr(allrows, user_field).alias("u"), _distinct_expr(allrows, item_field).alias("i")).collect()}

    raw = posixpath.join(staging, "_raw")
    order = F.xxhash64(F.col("sample_id"), F.lit(seed))
    cols = [c for c in parts[0].columns if not c.startswith("_") and c != "dt"]  # the shard columns
    groups = [(split, day, k) for split in names for day in days[split] for k in range(shards)]
    keys = _partition_keys(spark, len(groups))
    import pyarrow as pa

    table = spark.createDataFrame(pa.table({  # Arrow: a local relation, no Python worker
        "_g_split": pa.array([g[0] for g in groups], pa.string()), "_g_dt": pa.array([g[1] for g in groups], pa.string()),
        "_g_shard": pa.array([g[2] for g in groups], pa.int32()), "_x": pa.array(keys, pa.int32())}),
        schema="_g_split string, _g_dt string, _g_shard int, _x int")
    obs = Observation("shards")
    observed = allrows.observe(obs, *_day_stats(allrows, days))
    shard_of = F.pmod(F.xxhash64(F.col("sample_id")), F.lit(shards)).cast("int")
    x = observed.select("_split", "dt", shard_of.alias("_shard"), order.alias("_order"), *cols)
    x = x.join(F.broadcast(table), (F.col("_split") == F.col("_g_split")) & (F.col("dt") == F.col("_g_dt"))
               & (F.col("_shard") == F.col("_g_shard")), "left")
    # partition p holds exactly group p (its key hashes to p), so each task writes one
    # shard file, sorted by one long (a prefix sort), without a partitioned writer
    (x.repartition(max(1, len(groups)), "_x").sortWithinPartitions("_order", "sample_id")
     .select(*cols).write.mode("overwrite").option("parquet.block.size", int(row_group_bytes)).parquet(raw))
    stats = obs.get

    unknown_days = stats["rows"] - sum(stats[f"n|{s}|{d}"] for s in days for d in days[s])
    if unknown_days:
        raise ValueError(f"{unknown_days} rows have a day outside the splits' days {days} (or a null dt)")
    if os.environ.get(LOSE_ENV):  # test hook: a shard file lost between the write and the check
        victim = sorted(p for p in fs.walk_files(spark, raw) if p.endswith(".parquet"))[0]
        fs.delete(spark, posixpath.join(raw, victim))

    part_of = {g: p for p, g in enumerate(groups)}
    by_part: dict[int, list[str]] = {}
    for f in fs.walk_files(spark, raw):
        m = re.match(r"part-(\d+)-", posixpath.basename(f))
        if f.endswith(".parquet") and m:
            by_part.setdefault(int(m.group(1)), []).append(posixpath.join(raw, f))
    manifest_splits: dict[str, dict] = {}
    template = None
    moves = []
    for split in names:
        ds = [d for d in days[split] if stats[f"n|{split}|{d}"] > 0]
        files = []
        for day in ds:
            for k in range(shards):
                found = by_part.get(part_of[(split, day, k)], [])
                if len(found) > 1:
                    raise WriteCheckError(f"{split} {day} shard {k}: {len(found)} files written, expected one")
                rel = f"{split}/dt={day}/part-{k:05d}.parquet"
                moves.append((found[0] if found else None, rel))
                files.append(rel)
        manifest_splits[split] = {"days": ds, "files": files}
    # the footers of what was written must hold exactly the rows observed, per split and day
    written = fs.parquet_rows(spark, [m[0] for m in moves if m[0]])
    for split in names:
        for day in manifest_splits[split]["days"]:
            got = sum(written.get(src, 0) for src, rel in moves if src and rel.startswith(f"{split}/dt={day}/"))
            want = stats[f"n|{split}|{day}"]
            if got != want:
                raise WriteCheckError(f"{split} {day}: {want} rows written but the files hold {got} "
                                      f"(a shard file is missing or short)")
    for src, rel in moves:
        dst = posixpath.join(staging, rel)
        if src:
            fs.rename(spark, src, dst)
        else:  # no row of that day hashed to this shard
            if template is None:
                template = _empty_template(spark, allrows.select(*cols), posixpath.join(staging, "_empty"))
            fs.copy(spark, template, dst)
    for split in names:
        ds = manifest_splits[split]["days"]
        u = uniques.get(split)
        per = {d: {"impressions": int(stats[f"n|{split}|{d}"]), "clicks": int(stats[f"y|{split}|{d}"]),
                   "conversions": int(stats[f"z|{split}|{d}"])} for d in ds}
        manifest_splits[split] = {
            "days": ds,
            "impressions": sum(v["impressions"] for v in per.values()),
            "clicks": sum(v["clicks"] for v in per.values()),
            "conversions": sum(v["conversions"] for v in per.values()),
            "users": None if u is None or u[0] is None else int(u[0]),
            "items": None if u is None or u[1] is None else int(u[1]),
            "files": manifest_splits[split]["files"],
            "per_day": per,
        }
    fs.delete(spark, posixpath.join(staging, "_empty"))
    fs.delete(spark, posixpath.join(staging, "_raw"))

    rejects = rejects() if callable(rejects) else rejects
    rej = rejects if rejects is not None else spark.createDataFrame([], REJECTS_SCHEMA)
    detail = F.col("detail").cast("string") if "detail" in rej.columns else F.lit(None).cast("string")
    (rej.select(F.col("table").cast("string"), F.col("reason").cast("string"),
                F.col("row").cast("string"), F.col("source_file").cast("string"), detail.alias("detail"))
     .repartition(1).sortWithinPartitions("table", "reason", "source_file", "row")
     .write.mode("overwrite").parquet(posixpath.join(staging, "rejects")))
    if vocab is not None:
        save_vocab(vocab, posixpath.join(staging, "vocab"))

    reject_counts = reject_counts() if callable(reject_counts) else reject_counts
    extra = extra() if callable(extra) else extra
    unknown = set(reject_counts) - set(REJECT_KEYS)
    if unknown:
        raise ValueError(f"unknown reject keys {sorted(unknown)}")
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
        check(manifest)
    fs.write_text(spark, posixpath.join(staging, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    fs.write_text(spark, posixpath.join(staging, "_SUCCESS"), "")
    return manifest


def read_manifest(spark, data: str) -> dict:
    """The committed manifest of ``data`` (raises FileNotFoundError without ``_SUCCESS``)."""
    data = fs.qualify(spark, data)
    if not fs.exists(spark, posixpath.join(data, "_SUCCESS")):
        raise FileNotFoundError(f"{data}: no committed dataset (_SUCCESS missing)")
    return json.loads(fs.read_text(spark, posixpath.join(data, "manifest.json")))
