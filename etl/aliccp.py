"""Ali-CCP (Tianchi dataId=408) raw release -> the shard contract: the read and write edges.

Plan (the transforms live in ``aliccp_lines``, ``aliccp_parse`` and ``aliccp_encode``;
only this module touches paths)::

    read    text lines of the four files (gzip decoded by Hadoop), parsed ONCE into one
            column per field (Arrow kernels on the Python workers, ``aliccp_lines``) and
            kept (MEMORY_AND_DISK) for the two actions below
    flag    per line a status: kept, malformed, duplicate, click=0/conversion=1
    action  1: one collect of the vocabulary (one aggregation over the train impressions
            and their common rows, ids assigned in Spark) TOGETHER with every counter
            (lines per file, rows per status, missing common rows, users and items per
            split): no separate count jobs, and none in the write
    encode  per side with the shared Arrow encoder (``etl.vocab.encode_columns``), the
            common side before the join; one sort-merge join by common index
    write   ``etl.shards.write_dataset``; lines read = written + rejected is checked
            per file before the commit (the line counts come from the files, not from
            the statuses)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from etl.aliccp_spec import (  # noqa: F401  (re-exported: the job and the tests use etl.aliccp.*)
    CONV_WITHOUT_CLICK, DUPLICATE, FIELD_TABLE, MALFORMED, MISSING_COMMON, PSEUDO_DAYS, SPLITS, FieldSpec,
    check_min_count, default_fields, load_field_spec,
)
from etl.errors import InputError

# --------------------------------------------------------------------------- read edge


def find_raw_files(raw: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Locate ``sample_skeleton_{split}.csv[.gz]`` and ``common_features_{split}.csv[.gz]``.

    Returns ``{split: {"skeleton": path, "common": path}}``. Archives that were not
    unpacked, or a missing file, raise an InputError that says what to do.
    """
    root = Path(raw)
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        raise InputError(f"{root}: an archive; unpack it first: mkdir -p DIR && tar -xzf {root} -C DIR "
                         f"(both sample_train.tar.gz and sample_test.tar.gz), then pass --raw DIR")
    if not root.is_dir():
        raise InputError(f"{root}: not a directory (expected the unpacked Ali-CCP files)")
    out: dict[str, dict[str, str]] = {}
    for split in SPLITS:
        got = {}
        for kind, stem in (("skeleton", "sample_skeleton"), ("common", "common_features")):
            cands = [root / f"{stem}_{split}.csv", root / f"{stem}_{split}.csv.gz"]
            hit = [c for c in cands if c.is_file()]
            if not hit:
                tar = root / f"sample_{split}.tar.gz"
                if tar.is_file():
                    raise InputError(
                        f"{tar}: unpack the archive first: tar -xzf {tar} -C {root} "
                        f"(it holds {stem}_{split}.csv; .csv.gz copies are read as they are)"
                    )
                raise InputError(f"{root}: missing {stem}_{split}.csv (or .csv.gz)")
            out_path = hit[0]
            if out_path.stat().st_size == 0:
                raise InputError(f"{out_path}: empty file")
            got[kind] = str(out_path.resolve())
        out[split] = got
    return out


def read_numbered_lines(spark, path: str | list[str]):
    """One row per line: ``line``, ``source`` (its file), ``lineno`` (1-based line in that file), ``pos``.

    The line number does not depend on how Spark splits the files: each split (file,
    start byte) counts its lines in one small aggregate, and a line's number is the lines
    of the earlier splits of its file plus its place in its own split (ids are consecutive
    within a split).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    paths = [path] if isinstance(path, str) else list(path)
    raw = spark.read.text(paths).select(
        F.regexp_replace("value", "\r$", "").alias("line"), F.input_file_name().alias("source"),
        F.input_file_block_start().alias("_blk"), F.monotonically_increasing_id().alias("_mid"))
    w = Window.partitionBy("source").orderBy("_blk").rowsBetween(Window.unboundedPreceding, -1)
    blocks = (raw.groupBy("source", "_blk").agg(F.count(F.lit(1)).alias("_n"), F.min("_mid").alias("_mid0"))
              .withColumn("_before", F.coalesce(F.sum("_n").over(w), F.lit(0))))
    return (raw.join(F.broadcast(blocks), ["source", "_blk"])
            .select("line", "source", (F.col("_before") + F.col("_mid") - F.col("_mid0") + 1).alias("lineno"),
                    F.col("_mid").alias("pos")))


def read_lines(spark, path: str | list[str]):
    """One row per line: ``line``, ``source`` (its file) and ``pos`` (unique, stable within a run).

    ``pos`` (monotonically_increasing_id) orders lines as the files do; a gzip file is one
    partition, a plain file is split by Spark and the ids stay ordered across splits.
    """
    from pyspark.sql import functions as F

    paths = [path] if isinstance(path, str) else list(path)
    return (
        spark.read.text(paths)
        .select(F.regexp_replace("value", "\r$", "").alias("line"), F.input_file_name().alias("source"))
        .withColumn("pos", F.monotonically_increasing_id())
    )




# --------------------------------------------------------------------------- one run


@dataclass
class Converted:
    """Everything ``write`` needs: lazy split frames in the writer's layout plus what action 1 counted."""
    splits: dict  # split -> DataFrame
    fields: list[dict]  # manifest fields: name, kind, vocab_size, group, min_count | hash_buckets
    vocab: object  # DataFrame (field, value, id, count)
    rejects: object  # DataFrame (table, reason, row, source_file, detail)
    read_counts: dict
    counters: dict  # split -> counters
    inputs: dict
    recode: bool = False
    format: str = "raw"
    vocab_parent: dict | None = None  # {"parent": PREV, "new_ids": {field: n}} with --vocab-from
    cached: list = field(default_factory=list)  # persisted parses, released after the write
    uniques: dict | None = None  # split -> (users, items) of the rows to write


def convert_raw(spark, raw: str, fields: list[FieldSpec] | None = None, *, min_count: int = 1,
                recode_conversion_without_click: bool = False, features_path: str | None = None,
                vocab_from: dict | None = None) -> Converted:
    """Raw Ali-CCP directory -> a ``Converted`` (train from the train files, test from the test files)."""
    from etl.aliccp_lines import parse
    from etl.aliccp_parse import flag_split

    check_min_count(min_count)
    fields = fields or default_fields()
    files = find_raw_files(raw)
    flagged, cached = {}, []
    for s in SPLITS:
        sk = parse(read_lines(spark, files[s]["skeleton"]), "skeleton", [f for f in fields if f.side == "skeleton"])
        com = parse(read_lines(spark, files[s]["common"]), "common", [f for f in fields if f.side == "common"])
        sk, com = _keep(sk, cached), _keep(com, cached)
        flagged[s] = flag_split(s, sk, com, f"sample_skeleton_{s}", f"common_features_{s}",
                                recode_conversion_without_click=recode_conversion_without_click)
    inputs = {
        "kind": "aliccp", "format": "raw", "raw": str(Path(raw).resolve()), "truth": None,
        "files": {s: [files[s]["skeleton"], files[s]["common"]] for s in SPLITS},
        "features": str(Path(features_path).resolve()) if features_path else None, "min_count": min_count,
    }
    return convert_flagged(spark, flagged, fields, min_count=min_count, inputs=inputs, fmt="raw",
                           recode=recode_conversion_without_click, prefixed=False, vocab_from=vocab_from,
                           cached=cached)


def _keep(df, cached: list):
    """Persist a parsed file: action 1 and the write read it instead of parsing the text twice."""
    from pyspark import StorageLevel

    df = df.persist(StorageLevel.MEMORY_AND_DISK)
    cached.append(df)
    return df


def convert_flagged(spark, flagged: dict, fields: list[FieldSpec], *, min_count: int, inputs: dict, fmt: str,
                    recode: bool, prefixed: bool, vocab_from: dict | None = None, cached: list | None = None
                    ) -> Converted:
    """Flagged splits (any input format) -> vocabulary + counters (one action), lazy encoded splits."""
    from etl.aliccp_counts import vocab_and_counters
    from etl.aliccp_encode import encode_split

    vocab, values, counters, parent = vocab_and_counters(spark, flagged, fields, min_count, vocab_from)
    tr = counters["train"]
    if tr["kept"] == 0:
        raise InputError(f"{inputs['files']['train'][0]}: no usable impression in the train split "
                         f"(read {tr['read']}, every line rejected)")
    # counted with the vocabulary, so the write needs no job of its own for them
    uniques = {s: (c.pop("users"), c.pop("items")) for s, c in counters.items()}
    splits = {s: encode_split(s, p.impressions, p.commons, fields, values, min_count, prefixed)
              for s, p in flagged.items()}
    rejects = None
    for p in flagged.values():
        r = p.rejects.withColumnRenamed("source", "source_file")
        rejects = r if rejects is None else rejects.unionByName(r)
    read = {
        "impressions": sum(c["read"] for c in counters.values()),
        "clicks": sum(c["read_clicks"] for c in counters.values()),
        "conversions": sum(c["read_conversions"] for c in counters.values()),
    }
    prev_sizes = (parent or {}).get("vocab_sizes", {})
    mfields = []
    for f in fields:
        d = f.as_dict(min_count)
        size = int(f.hash_buckets) + 1 if f.hash_buckets else max(len(values[f.name]) + 1,
                                                                  int(prev_sizes.get(f.name, 0)))
        mfields.append({"name": f.name, "kind": f.kind, "vocab_size": size, "group": f.group,
                        **{k: d[k] for k in ("min_count", "hash_buckets") if k in d}})
    vparent = None if parent is None else {"parent": parent["parent"], "new_ids": parent["new_ids"]}
    return Converted(splits=splits, fields=mfields, vocab=vocab, rejects=rejects, read_counts=read,
                     counters=counters, inputs=inputs, recode=recode, format=fmt, vocab_parent=vparent,
                     cached=cached or [], uniques=uniques)


def manifest_extra(conv: Converted) -> dict:
    """The manifest's additions: the eleven log reject keys (zeros) plus the Ali-CCP reasons,
    and an ``aliccp`` section with every counter per split."""
    from etl.shards import REJECT_KEYS

    c = conv.counters
    tot = lambda k: int(sum(v.get(k, 0) for v in c.values()))  # noqa: E731
    cwc_rejected = 0 if conv.recode else tot("conversion_without_click")
    rejects = {k: 0 for k in REJECT_KEYS}
    rejects.update({
        MALFORMED: tot("malformed") + tot("common_malformed"),
        DUPLICATE: tot("duplicate") + tot("common_duplicate"),
        CONV_WITHOUT_CLICK: cwc_rejected,
    })
    out = {
        "rejects": rejects,
        "aliccp": {
            "format": conv.format,
            "counts": {
                CONV_WITHOUT_CLICK: tot("conversion_without_click"),
                MALFORMED: tot("malformed") + tot("common_malformed"),
                MISSING_COMMON: tot("missing_common"),
                DUPLICATE: tot("duplicate") + tot("common_duplicate"),
            },
            "conversion_without_click": "recode" if conv.recode else "drop",
            "pseudo_days": {s: PSEUDO_DAYS[s] for s in conv.splits},
            "ts": "constant per split: 00:00 UTC of the split's pseudo-day (the release has no time)",
            "splits": c,
        },
    }
    if conv.vocab_parent is not None:
        out["vocab"] = conv.vocab_parent
    return out


def write(spark, out: str, conv: Converted, *, shards: int = 4, created_by: str = "esmm aliccp") -> dict:
    """Write ``conv`` with the shared shard writer; conservation is checked before the commit.

    Per split: lines read = rows written + malformed + duplicate (+ click=0/conversion=1
    rows when they are dropped); a mismatch fails the job and leaves the old output.
    """
    from etl.shards import write_dataset

    def check(manifest):
        for s, c in conv.counters.items():
            written = manifest["splits"][s]["impressions"]
            dropped = 0 if conv.recode else c["conversion_without_click"]
            if written != c["kept"] or c["read"] != written + c["malformed"] + c["duplicate"] + dropped:
                raise AssertionError(
                    f"split {s}: read {c['read']} lines != written {written} (kept {c['kept']}) + malformed "
                    f"{c['malformed']} + duplicate {c['duplicate']} + dropped click=0/conversion=1 {dropped}")
            if c["common_read"] != c["common_kept"] + c["common_malformed"] + c["common_duplicate"]:
                raise AssertionError(
                    f"split {s}: read {c['common_read']} common lines != kept {c['common_kept']} + malformed "
                    f"{c['common_malformed']} + duplicate {c['common_duplicate']}")

    try:
        return write_dataset(
            spark, out, conv.splits, conv.fields, shards=shards, inputs=conv.inputs, rejects=conv.rejects,
            reject_counts={}, read_counts=conv.read_counts, created_by=created_by, vocab=conv.vocab,
            user_field="_user_raw", item_field="_item_raw", extra=manifest_extra(conv), check=check,
            days={s: [PSEUDO_DAYS[s]] for s in conv.splits}, uniques=conv.uniques)
    finally:
        for df in conv.cached:
            df.unpersist()


def read_prev_vocab(spark, prev: str) -> dict:
    """``--vocab-from PREV`` (a data root or a model bundle), read as the log ETL reads it.

    Returns ``{"parent": abs PREV, "vocab": DataFrame (field, value, id, count), "vocab_sizes": {field: n}}``.
    """
    from etl.vocab import read_prev_vocab as read

    vocab, fields, _ = read(spark, prev)
    sizes = {f["name"]: int(f["vocab_size"]) for f in fields if "vocab_size" in f}
    return {"parent": prev if "://" in prev else str(Path(prev).resolve()), "vocab": vocab, "vocab_sizes": sizes}
