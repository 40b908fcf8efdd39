"""Read the raw log tables (DESIGN.md, "Raw log contract") and flag malformed rows.

A log root holds ``impressions/``, ``clicks/`` and ``conversions/``, each partitioned by
``dt=YYYY-MM-DD/``, as Parquet or JSON Lines (one format per table). :func:`read_table`
returns every row read with its raw columns plus

- ``_src``  the source file, ``_dt`` the partition day,
- ``_ts``   the parsed timestamp (UTC): a timestamp column as is, an integer as epoch
  ms within [2000-01-01, 2100-01-01), a string as ISO-8601 (date, optional time with
  fraction, optional ``Z``/offset) or as an all-digits epoch ms,
- ``_bad``  why the row is malformed (a required field missing/empty, an unparseable
  ``ts``, an unparseable JSON line), null if well formed,
- ``_ord``  a deterministic tie-break between duplicates, ``_line`` an unparseable JSON line.

:func:`row_json` gives the row as JSON for the rejects table.

Structural problems (a missing table folder, a required column absent from a table, a
partition folder that is not ``dt=YYYY-MM-DD``, unreadable files) raise
:class:`etl.errors.InputError` naming the path or column.
"""
from __future__ import annotations

import datetime as _dt
import posixpath
import re
from dataclasses import dataclass, field

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl import fs
from etl.errors import InputError

TABLES = ("impressions", "clicks", "conversions")
ID_COLUMN = {"impressions": "impression_id", "clicks": "click_id", "conversions": "conversion_id"}
REQUIRED = {
    "impressions": ("impression_id", "ts", "user_id", "item_id"),
    "clicks": ("click_id", "impression_id", "ts"),
    "conversions": ("conversion_id", "click_id", "ts"),
}
MIN_EPOCH_MS = 946_684_800_000   # 2000-01-01: below this an integer is not an epoch in ms (e.g. seconds)
MAX_EPOCH_MS = 4_102_444_800_000  # 2100-01-01
ISO_RE = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?(Z|[+-]\d{2}(:?\d{2})?)?$"
DAY_RE = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")
PARQUET_EXT = (".parquet", ".parq")
JSON_EXT = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz")
CORRUPT = "_corrupt_record"


def parse_day(s: str, what: str) -> _dt.date:
    """``YYYY-MM-DD`` -> date, else InputError naming ``what``."""
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
            raise ValueError
        return _dt.date.fromisoformat(s)
    except ValueError:
        raise InputError(f"{what}: {s!r} is not a date YYYY-MM-DD") from None


@dataclass
class Table:
    name: str
    df: DataFrame          # raw columns + _src, _dt, _ts, _bad, _row
    columns: list[str]     # the raw columns, in file order
    format: str            # "parquet" | "json"
    days: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # the data files read


def list_days(spark, logs: str, table: str, required: bool = True) -> dict[str, str]:
    """``{day: folder}`` of a table's ``dt=`` partitions; InputError on a bad layout."""
    root = posixpath.join(logs, table)
    if not fs.is_dir(spark, root):
        if required:
            raise InputError(f"{root}: no such folder (expected {table}/dt=YYYY-MM-DD/ under the log root)")
        return {}
    days = {}
    for name, is_dir in fs.listdir(spark, root):
        if name.startswith(("_", ".")):
            continue
        m = DAY_RE.match(name)
        if not is_dir or not m:
            raise InputError(f"{posixpath.join(root, name)}: expected partition folders dt=YYYY-MM-DD")
        parse_day(m.group(1), posixpath.join(root, name))
        days[m.group(1)] = posixpath.join(root, name)
    return days


def _detect_format(spark, table: str, folders: list[str]) -> tuple[str, list[str]]:
    """(format, data files) of a table's day folders."""
    kinds, files = set(), []
    for d in folders:
        for rel in fs.walk_files(spark, d):
            base = posixpath.basename(rel)
            if base.startswith(("_", ".")) or base.endswith(".crc") or any(
                    p.startswith(("_", ".")) for p in rel.split("/")[:-1]):
                continue
            low = base.lower()
            if low.endswith(PARQUET_EXT):
                kinds.add("parquet")
            elif low.endswith(JSON_EXT):
                kinds.add("json")
            else:
                raise InputError(f"{posixpath.join(d, rel)}: not a .parquet or .json/.jsonl file")
            files.append(posixpath.join(d, rel))
    if len(kinds) > 1:
        raise InputError(f"{table}: mixes Parquet and JSON Lines files; use one format per table")
    return (kinds.pop() if kinds else "parquet"), files


def raw_rows(spark, table: "Table") -> int:
    """Rows of a table counted from the files, apart from the flagging: Parquet footers,
    or the non-blank lines of JSON Lines."""
    if table.format == "parquet":
        return sum(fs.parquet_rows(spark, table.files).values())
    return fs.text_lines(spark, table.files)


def _numeric(t: T.DataType) -> bool:
    return isinstance(t, (T.IntegralType, T.FractionalType, T.DecimalType))


def _json_schema(inferred: T.StructType, table: str) -> T.StructType:
    """Ids and ts as strings (parsed here), objects of numbers as map<string,double>."""
    out = []
    for f in inferred.fields:
        if f.name == CORRUPT:
            continue
        t = f.dataType
        if f.name in REQUIRED[table]:
            t = T.StringType()
        elif isinstance(t, T.StructType) and t.fields and all(_numeric(x.dataType) for x in t.fields):
            t = T.MapType(T.StringType(), T.DoubleType())
        out.append(T.StructField(f.name, t, True))
    out.append(T.StructField(CORRUPT, T.StringType(), True))
    return T.StructType(out)


def _epoch_ms(c):
    ok = (c >= F.lit(MIN_EPOCH_MS)) & (c < F.lit(MAX_EPOCH_MS))
    return F.when(ok, F.timestamp_micros((c * F.lit(1000)).cast("long")))


def parse_ts(c, dtype: T.DataType):
    """Spark expression: the parsed UTC timestamp of ``c`` or null (see module doc)."""
    if isinstance(dtype, T.TimestampType):
        return c
    if isinstance(dtype, T.TimestampNTZType):
        return c.cast("timestamp")
    if isinstance(dtype, T.DateType):
        return c.cast("timestamp")
    if _numeric(dtype):
        return _epoch_ms(c.cast("double"))
    if isinstance(dtype, T.StringType):
        s = F.trim(c)
        return (F.when(s.rlike(r"^\d{1,19}$"), _epoch_ms(s.cast("double")))
                .when(s.rlike(ISO_RE), s.try_cast("timestamp")))
    return F.lit(None).cast("timestamp")


def read_table(spark, logs: str, table: str, days: list[str], folders: dict[str, str],
               columns: list[str] | None = None) -> Table:
    """Read ``days`` of one table and flag malformed rows.

    Args:
        columns: read only these raw columns (id lookups); None reads all.
    """
    paths = [folders[d] for d in days]
    fmt, files = _detect_format(spark, table, paths) if paths else ("parquet", [])
    req = REQUIRED[table]
    if not paths:
        schema = T.StructType([T.StructField(c, T.StringType()) for c in req])
        raw = spark.createDataFrame([], schema)
        src = F.lit(None).cast("string")
        has_corrupt = False
    else:
        try:
            if fmt == "parquet":
                # the schema of one footer (the newest file), not a merge over every file
                schema = spark.read.parquet(files[-1]).schema if files else None
                rd = spark.read.schema(schema) if schema is not None else spark.read
                raw = rd.parquet(*paths)
                has_corrupt = False
            else:
                inferred = spark.read.option("mode", "PERMISSIVE").json(paths).schema
                schema = _json_schema(inferred, table)
                raw = (spark.read.schema(schema).option("mode", "PERMISSIVE")
                       .option("columnNameOfCorruptRecord", CORRUPT).json(paths))
                has_corrupt = True
        except InputError:
            raise
        except Exception as e:  # unreadable file, incompatible schemas across days
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{posixpath.join(logs, table)}: cannot read {fmt} input: {msg[:300]}") from None
        src = F.col("_metadata.file_path")
    names = [c for c in raw.columns if c != CORRUPT]
    missing = [c for c in req if c not in names]
    if missing:
        raise InputError(f"{posixpath.join(logs, table)}: required column {missing[0]!r} missing "
                         f"(columns: {', '.join(names)})")
    if columns is not None:  # an id lookup: no parsing, no flags; + its partition day
        return Table(table, raw.select(*[F.col(c).cast("string") for c in columns], day_of(src).alias("_dt")),
                     list(columns), fmt, list(days), files)
    ts_type = raw.schema["ts"].dataType if "ts" in raw.columns else T.StringType()
    bad = F.lit(None).cast("string")
    # the first problem found names the row's reason (checked in reverse, so the first wins)
    checks = [(f"{c} missing", F.col(c).isNull() | (F.trim(F.col(c).cast("string")) == ""))
              for c in req if c != "ts"]
    for msg, cond in reversed([("ts missing", F.col("ts").isNull()),
                               ("ts unparseable (not ISO-8601 or epoch ms)", F.col("_ts").isNull())] + checks):
        bad = F.when(cond, F.lit(msg)).otherwise(bad)
    sel = [F.col(c) for c in names]
    ri = F.col("_metadata.row_index") if (paths and fmt == "parquet") else F.lit(0)
    df = raw.select(*sel, *([F.col(CORRUPT)] if has_corrupt else []), src.alias("_src"),
                    *([] if has_corrupt else [ri.alias("_ri")]))
    df = df.withColumn("_dt", day_of(F.col("_src")))
    df = df.withColumn("_ts", parse_ts(F.col("ts"), ts_type))
    if has_corrupt:
        bad = F.when(F.col(CORRUPT).isNotNull(), F.lit("unparseable JSON line")).otherwise(bad)
    df = df.withColumn("_bad", bad)
    # _ord breaks ties between duplicates deterministically: the row's position in its
    # Parquet file, or the JSON line itself.
    if has_corrupt:
        df = (df.withColumn("_line", F.col(CORRUPT))
              .withColumn("_ord", F.coalesce(F.col(CORRUPT), F.to_json(F.struct(*[F.col(c) for c in names]))))
              .drop(CORRUPT))
    else:
        df = df.withColumn("_line", F.lit(None).cast("string")).withColumnRenamed("_ri", "_ord")
    return Table(table, df, names, fmt, list(days), files)


def day_of(path):
    """Spark expression: the day of the last ``/dt=YYYY-MM-DD/`` folder in a file path
    (string search, not a regex: it runs once per row)."""
    return F.substring_index(F.substring_index(path, "/dt=", -1), "/", 1)


def row_json(table: Table):
    """Spark expression: the raw row as JSON (the JSON line itself if it did not parse)."""
    return F.coalesce(F.col("_line"), F.to_json(F.struct(*[F.col(c) for c in table.columns])))


def select_days(days: list[str], start: str | None, end: str | None, extra_days: int = 0) -> list[str]:
    """Days within ``[start, end + extra_days]`` (all when no range)."""
    if start is None and end is None:
        return sorted(days)
    lo = parse_day(start, "--start") if start else _dt.date.min
    hi = parse_day(end, "--end") if end else _dt.date.max
    if hi != _dt.date.max:
        hi = hi + _dt.timedelta(days=extra_days)
    return sorted(d for d in days if lo <= _dt.date.fromisoformat(d) <= hi)
