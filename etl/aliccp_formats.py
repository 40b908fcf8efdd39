"""Importers for Ali-CCP samples already processed by public projects (same shards as raw).

Both formats are already joined (user fields sit in the impression's row), so they skip
the common-feature join and go through the same validation, label rule, vocabulary and
writer as the raw files (``etl.aliccp_parse.flag_split`` / ``etl.aliccp.convert_flagged``).

- ``rechub-csv`` (datawhalechina/torch-rechub ``preprocess_ali_ccp.py``): files
  ``ali_ccp_{train,val,test}[_sample].csv`` with a header ``click,purchase,<23 field
  columns>,D109_14,...,D853``. Ids are the source's per-field vocabulary indices (0 =
  its out-of-vocabulary/missing), one id per field per row; a ``D<field>`` column is that
  entry's min-max scaled value and becomes its weight. Index 0 is treated as missing (a
  single field gets id 0, a multi/weighted field an empty list); the other indices are
  raw values for our own train vocabulary. ``val`` comes from the raw test file (the
  script splits the processed test set 50/50 into val and test), so by default it is
  merged into ``test``; ``val="split"`` writes it as a third split ``val``.
- ``paddlerec-txt`` (PaddleRec ``models/multitask/esmm``, from PaddlePaddle/models'
  ``reader.py``): ``DIR/train/*`` and ``DIR/test/*`` text files, one impression a line,
  ``sample_id,click,conversion,field:feat,...``; ids were re-numbered globally and values
  dropped, so weighted fields become ``multi``. Every token from column 3 on is a feature:
  PaddleRec's ``esmm_reader.py`` parses ``features[4:]`` and loses the first one; we do not.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from etl.aliccp import _keep, convert_flagged, read_lines, read_numbered_lines
from etl.aliccp_lines import parse
from etl.aliccp_parse import _at, flag_split
from etl.aliccp_spec import FieldSpec, check_min_count, default_fields
from etl.errors import InputError

RECHUB_LABELS = ("click", "purchase")


def _first_line(spark, path: str) -> str:
    rows = spark.read.text(path).limit(1).collect()
    if not rows:
        raise InputError(f"{path}: empty file")
    return rows[0][0].rstrip("\r")


# --------------------------------------------------------------------------- torch-rechub


def find_rechub_files(root: str | os.PathLike) -> dict[str, str]:
    """``{"train"|"val"|"test": path}``; train and test are required, val optional."""
    d = Path(root)
    if not d.is_dir():
        raise InputError(f"{d}: not a directory (expected torch-rechub's ali_ccp_*.csv files)")
    out = {}
    for split in ("train", "val", "test"):
        hit = [p for p in (d / f"ali_ccp_{split}.csv", d / f"ali_ccp_{split}_sample.csv") if p.is_file()]
        if hit:
            out[split] = str(hit[0].resolve())
        elif split != "val":
            raise InputError(f"{d}: missing ali_ccp_{split}.csv (or ali_ccp_{split}_sample.csv)")
    return out


def parse_rechub(lines, header: list[str], fields: list[FieldSpec], path: str):
    """Lines of one rechub CSV -> the parsed layout ``flag_split`` takes (header lines dropped)."""
    from pyspark.sql import functions as F

    col = {name: i + 1 for i, name in enumerate(header)}  # 1-based for try_element_at
    for need in RECHUB_LABELS + tuple(f.name for f in fields):
        if need not in col:
            raise InputError(f"{path}: header has no column {need!r} (have {','.join(header)})")
    p = F.split("line", ",")
    df = lines.where(F.col("line") != ",".join(header)).withColumn("p", p)

    # index 0 is the source's "rare or missing": no entry (a single field null, a list empty)
    cols, oks = [], []
    for f in fields:
        idn = _at("p", col[f.name]).try_cast("bigint")
        dcol = col.get("D" + f.name)
        val = _at("p", dcol).try_cast("float") if dcol and f.kind == "weighted" else F.lit(1.0).cast("float")
        oks.append(F.coalesce(idn.isNotNull() & (idn >= 0) & val.isNotNull() & ~F.isnan(val), F.lit(False)))
        some = idn != 0
        if f.kind == "single":
            cols.append(F.when(some, idn.cast("string")).alias(f.name))
            continue
        cols.append(F.when(some, F.array(idn.cast("string"))).otherwise(F.array().cast("array<string>"))
                    .alias(f.name))
        if f.kind == "weighted":
            cols.append(F.when(some, F.array(val)).otherwise(F.array().cast("array<float>")).alias(f.name + "__w"))
    all_ok = oks[0]
    for ok in oks[1:]:
        all_ok = all_ok & ok
    bad = (
        F.when(F.size("p") != len(header), F.concat(F.lit(f"expected {len(header)} columns, got "),
                                                     F.size("p").cast("string")))
        .when(~_at("p", col["click"]).isin("0", "1"), F.lit("click is not 0/1"))
        .when(~_at("p", col["purchase"]).isin("0", "1"), F.lit("purchase is not 0/1"))
        .when(~all_ok, F.lit("a field id is not a non-negative integer or its D column not a number"))
    )
    click = F.when(_at("p", col["click"]) == "1", 1).otherwise(0).cast("tinyint")
    conv = F.when(_at("p", col["purchase"]) == "1", 1).otherwise(0).cast("tinyint")
    # file + line: the same id whatever the core count or the file splits
    name = F.regexp_extract("source", r"([^/]+)$", 1)
    kind = F.regexp_extract(name, r"ali_ccp_(train|val|test)", 1)
    return df.select(
        F.concat(kind, F.lit("-"), name, F.lit(":"), F.col("lineno").cast("string")).alias("sample_id"),
        click.alias("click"), conv.alias("conversion"), F.lit(None).cast("string").alias("cfi"),
        bad.alias("bad"), F.lit(0).alias("unlisted"),
        # only a line that can be rejected keeps its text (what is persisted stays small)
        F.when(bad.isNotNull() | ((click == 0) & (conv == 1)), F.col("line")).alias("line"),
        "source", "pos", *cols,
    )


def convert_rechub(spark, root: str, fields: list[FieldSpec] | None = None, *, min_count: int = 1,
                   recode_conversion_without_click: bool = False, val: str = "merge",
                   features_path: str | None = None, vocab_from: dict | None = None):
    """torch-rechub CSVs -> ``Converted`` (splits train, test [+ val])."""
    check_min_count(min_count)
    if val not in ("merge", "split"):
        raise InputError(f"--val must be merge or split, got {val!r}")
    fields = fields or default_fields()
    files = find_rechub_files(root)
    groups = {"train": ["train"], "test": ["test"] + (["val"] if val == "merge" and "val" in files else [])}
    if val == "split" and "val" in files:
        groups["val"] = ["val"]
    preps, cached = {}, []
    for split, kinds in groups.items():
        paths = [files[k] for k in kinds]
        header = _first_line(spark, paths[0]).split(",")
        for other in paths[1:]:
            if _first_line(spark, other).split(",") != header:
                raise InputError(f"{other}: header differs from {paths[0]}'s")
        parsed = _keep(parse_rechub(read_numbered_lines(spark, paths), header, fields, paths[0]), cached)
        preps[split] = flag_split(split, parsed, None, f"rechub_{split}", None,
                                  recode_conversion_without_click=recode_conversion_without_click)
    inputs = {
        "kind": "aliccp", "format": "rechub-csv", "raw": str(Path(root).resolve()), "truth": None,
        "files": {s: [files[k] for k in kinds] for s, kinds in groups.items()},
        "features": str(Path(features_path).resolve()) if features_path else None, "min_count": min_count,
        "val": val,
    }
    return convert_flagged(spark, preps, fields, min_count=min_count, inputs=inputs, fmt="rechub-csv",
                           recode=recode_conversion_without_click, prefixed=True, vocab_from=vocab_from,
                           cached=cached)


# --------------------------------------------------------------------------- PaddleRec


def find_paddlerec_files(root: str | os.PathLike) -> dict[str, list[str]]:
    """``{"train": [...], "test": [...]}``: every plain file under ``root/train`` and ``root/test``."""
    d = Path(root)
    out = {}
    for split in ("train", "test"):
        sub = d / split
        files = sorted(str(p.resolve()) for p in sub.iterdir() if p.is_file() and not p.name.startswith(".")) \
            if sub.is_dir() else []
        if not files:
            raise InputError(f"{sub}: expected PaddleRec ESMM text files (DIR/train/*.txt and DIR/test/*.txt)")
        out[split] = files
    return out


def paddlerec_fields(fields: list[FieldSpec]) -> list[FieldSpec]:
    """The format dropped the values: weighted fields become multi."""
    return [dataclasses.replace(f, kind="multi") if f.kind == "weighted" else f for f in fields]


def convert_paddlerec(spark, root: str, fields: list[FieldSpec] | None = None, *, min_count: int = 1,
                      recode_conversion_without_click: bool = False, features_path: str | None = None,
                      vocab_from: dict | None = None):
    """PaddleRec ESMM text files -> ``Converted`` (splits train, test)."""
    check_min_count(min_count)
    fields = paddlerec_fields(fields or default_fields())
    files = find_paddlerec_files(root)
    preps, cached = {}, []
    for split, paths in files.items():
        parsed = _keep(parse(read_lines(spark, paths), "paddlerec", fields), cached)
        preps[split] = flag_split(split, parsed, None, f"paddlerec_{split}", None,
                                  recode_conversion_without_click=recode_conversion_without_click)
    inputs = {
        "kind": "aliccp", "format": "paddlerec-txt", "raw": str(Path(root).resolve()), "truth": None,
        "files": files, "features": str(Path(features_path).resolve()) if features_path else None,
        "min_count": min_count,
    }
    return convert_flagged(spark, preps, fields, min_count=min_count, inputs=inputs, fmt="paddlerec-txt",
                           recode=recode_conversion_without_click, prefixed=False, vocab_from=vocab_from,
                           cached=cached)
