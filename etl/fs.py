"""File operations through Hadoop's FileSystem, so the same code commits to a local
folder, HDFS or an object store (whatever scheme the Spark cluster can write).

Paths without a scheme are made absolute when the default filesystem is local, so a
relative ``--out`` means the same folder to the driver and to Spark.
"""
from __future__ import annotations

import os


def qualify(spark, path: str) -> str:
    """Absolute path string for ``path`` (scheme kept; local paths made absolute)."""
    if "://" in path or path.startswith("file:"):
        return path.rstrip("/") or "/"
    default = spark.sparkContext._jsc.hadoopConfiguration().get("fs.defaultFS") or "file:///"
    if default.startswith("file:"):
        return os.path.abspath(path)
    return path.rstrip("/")


def _fs(spark, path: str):
    jvm = spark.sparkContext._jvm
    p = jvm.org.apache.hadoop.fs.Path(path)
    return p.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), p


def exists(spark, path: str) -> bool:
    fs, p = _fs(spark, path)
    return bool(fs.exists(p))


def is_dir(spark, path: str) -> bool:
    fs, p = _fs(spark, path)
    return bool(fs.exists(p) and fs.getFileStatus(p).isDirectory())


def listdir(spark, path: str) -> list[tuple[str, bool]]:
    """(name, is_dir) of the entries directly under ``path``, sorted by name; [] if missing."""
    fs, p = _fs(spark, path)
    if not fs.exists(p):
        return []
    out = [(st.getPath().getName(), bool(st.isDirectory())) for st in fs.listStatus(p)]
    return sorted(out)


def walk_files(spark, path: str) -> list[str]:
    """Every file under ``path`` (recursive), as paths relative to ``path``, sorted."""
    fs, p = _fs(spark, path)
    if fs.getUri().getScheme() == "file":  # local: os.walk, not three JVM calls per file
        top = p.toUri().getPath()
        return sorted(os.path.relpath(os.path.join(d, f), top) for d, _, files in os.walk(top) for f in files)
    if not fs.exists(p):
        return []
    root = fs.getFileStatus(p).getPath().toString().rstrip("/") + "/"
    it = fs.listFiles(p, True)
    out = []
    while it.hasNext():
        full = it.next().getPath().toString()
        out.append(full[len(root):] if full.startswith(root) else full)
    return sorted(out)


def mkdirs(spark, path: str) -> None:
    fs, p = _fs(spark, path)
    fs.mkdirs(p)


def rename(spark, src: str, dst: str) -> None:
    fs, s = _fs(spark, src)
    _, d = _fs(spark, dst)
    parent = d.getParent()
    if parent is not None and not fs.exists(parent):
        fs.mkdirs(parent)
    if not fs.rename(s, d):
        raise OSError(f"rename {src} -> {dst} failed")


def delete(spark, path: str) -> None:
    fs, p = _fs(spark, path)
    if fs.exists(p):
        fs.delete(p, True)


def copy(spark, src: str, dst: str) -> None:
    jvm = spark.sparkContext._jvm
    fs, s = _fs(spark, src)
    _, d = _fs(spark, dst)
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    if not jvm.org.apache.hadoop.fs.FileUtil.copy(fs, s, fs, d, False, True, conf):
        raise OSError(f"copy {src} -> {dst} failed")


def write_text(spark, path: str, text: str) -> None:
    fs, p = _fs(spark, path)
    stream = fs.create(p, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()


def read_text(spark, path: str) -> str:
    jvm = spark.sparkContext._jvm
    fs, p = _fs(spark, path)
    stream = fs.open(p)
    try:
        data = jvm.org.apache.commons.io.IOUtils.toByteArray(stream)
    finally:
        stream.close()
    return bytes(data).decode("utf-8")


def _local(path: str) -> str | None:
    """The local filesystem path of ``path``, or None if it lives elsewhere."""
    if path.startswith("file:"):
        return "/" + path[len("file:"):].lstrip("/")
    return None if "://" in path else path


def parquet_rows(spark, paths: list[str]) -> dict[str, int]:
    """Rows per Parquet file, read from the footers (no scan of the data).

    Local files are read with pyarrow on the driver; others through one Spark job that
    counts rows per file (Parquet answers a count from its footers too).
    """
    if not paths:
        return {}
    local = [_local(p) for p in paths]
    if all(p is not None for p in local):
        import pyarrow.parquet as pq

        return {p: int(pq.read_metadata(lp).num_rows) for p, lp in zip(paths, local)}
    from pyspark.sql import functions as F

    got = {r["f"]: int(r["n"]) for r in spark.read.parquet(*paths).select(F.col("_metadata.file_path").alias("f"))
           .groupBy("f").count().withColumnRenamed("count", "n").collect()}
    return {p: got.get(qualify(spark, p) if "://" in p else "file:" + p, got.get(p, 0)) for p in paths}


def text_lines(spark, paths: list[str]) -> int:
    """Non-blank lines of text files (JSON Lines, .gz decompressed), as Spark's JSON reader sees records."""
    local = [_local(p) for p in paths]
    if all(p is not None for p in local):
        import gzip

        n = 0
        for lp in local:
            opener = gzip.open if lp.endswith(".gz") else open
            with opener(lp, "rb") as fh:
                n += sum(1 for line in fh if line.strip())
        return n
    from pyspark.sql import functions as F

    return spark.read.text(paths).where(F.trim(F.col("value")) != "").count()
