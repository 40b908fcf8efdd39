"""One place that builds the SparkSession, so the CLI, spark-submit and tests agree."""
from __future__ import annotations

import os
import sys


def get_spark(master: str | None = None, app: str = "esmm-etl", conf: dict | None = None):
    """Return a SparkSession.

    Under spark-submit the master comes from the submitter (``master=None`` leaves it);
    from the CLI the default is ``local[*]`` bound to 127.0.0.1.
    """
    if (master or "").startswith("local"):  # a cluster's executors must reach the driver's real address
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    # Python workers (the list-field Arrow UDF, etl/list_encode.py) need this interpreter's pyarrow.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    b = SparkSession.builder.appName(app)
    if master:
        b = b.master(master)
    defaults = {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": "8",
        "spark.sql.adaptive.enabled": "true",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",  # no progress bars in job logs
        "spark.driver.memory": os.environ.get("ESMM_SPARK_DRIVER_MEMORY", "4g"),
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    }
    if "PYSPARK_GATEWAY_PORT" in os.environ:
        # Under spark-submit its --conf / --properties-file settings (system properties of
        # the driver JVM) win over these defaults; builder options would override them.
        from pyspark import SparkContext

        SparkContext._ensure_initialized()
        props = SparkContext._jvm.java.lang.System.getProperties()
        defaults = {k: v for k, v in defaults.items() if props.getProperty(k) is None}
    for k, v in {**defaults, **(conf or {})}.items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def arrow_frame(spark, table, schema):
    """``spark.createDataFrame(table)`` for an Arrow table that is never a LocalRelation.

    Below ``spark.sql.execution.arrow.localRelationThreshold`` (48 MB) Spark makes the
    table a LocalRelation, and then every DataFrame operation on a plan that holds it
    costs driver time in proportion to its rows: 0.4 s a join for a 300k-row vocabulary
    (against 0.02 s as an RDD of Arrow batches), and the encoder joins the vocabulary
    once per single-valued field.
    """
    key = "spark.sql.execution.arrow.localRelationThreshold"
    old = spark.conf.get(key)
    spark.conf.set(key, "0")
    try:
        return spark.createDataFrame(table, schema=schema)
    finally:
        spark.conf.set(key, old)
