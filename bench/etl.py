"""Benchmark: impressions/s of the Spark log ETL vs the same label join in DuckDB.

    .venv/bin/python bench/etl.py [--sizes 1000000,4000000] [--days 14] [--master local[2]]

For each size, simulated logs (``esmm synth``, seed 0) are written once under
``bench/out/etl/logs-N`` and reused. Then, side by side on the same files:

- Spark: ``run_etl`` (dedup, label rules, rejects, train-only vocab, encoding, shards,
  manifest, commit) with ``--master`` (default ``local[2]``), one session for all sizes
  (its start-up time is printed apart);
- DuckDB (threads = Spark's cores): the same dedup + label join (valid clicks after
  their impression, conversions within the window after a valid click) written to one
  Parquet file: what a user would try instead, without rejects, vocab or sharding.

Prints seconds, impressions/s and the ratio; both label sums must agree.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DUCK_SQL = """
CREATE OR REPLACE TEMP TABLE labelled AS
WITH imp AS (
  SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (PARTITION BY impression_id ORDER BY ts) AS rn
    FROM read_parquet('{logs}/impressions/*/*.parquet', hive_partitioning = true))
  WHERE rn = 1),
clk AS (
  SELECT click_id, impression_id, ts FROM (
    SELECT *, row_number() OVER (PARTITION BY click_id ORDER BY ts) AS rn
    FROM read_parquet('{logs}/clicks/*/*.parquet'))
  WHERE rn = 1),
vclk AS (
  SELECT c.click_id, c.impression_id, c.ts FROM clk c JOIN imp i USING (impression_id) WHERE c.ts >= i.ts),
cnv AS (
  SELECT conversion_id, click_id, ts FROM (
    SELECT *, row_number() OVER (PARTITION BY conversion_id ORDER BY ts) AS rn
    FROM read_parquet('{logs}/conversions/*/*.parquet'))
  WHERE rn = 1),
y AS (SELECT DISTINCT impression_id FROM vclk),
z AS (
  SELECT DISTINCT k.impression_id FROM cnv v JOIN vclk k USING (click_id)
  WHERE v.ts >= k.ts AND v.ts <= k.ts + INTERVAL {window} DAY)
SELECT imp.*, CAST(y.impression_id IS NOT NULL AS TINYINT) AS click,
       CAST(z.impression_id IS NOT NULL AS TINYINT) AS conversion
FROM imp LEFT JOIN y USING (impression_id) LEFT JOIN z USING (impression_id);
"""


def cores(master: str) -> int:
    m = re.fullmatch(r"local\[(\d+|\*)\]", master)
    if m and m.group(1) != "*":
        return int(m.group(1))
    return os.cpu_count() or 1


def ensure_logs(out: Path, n: int, days: int) -> tuple[Path, float | None]:
    from etl.synth import simulate

    logs = out / f"logs-{n}"
    stamp = logs / "_synth.json"
    if stamp.exists():  # logs-N holds N impressions (seed 0), written by an earlier run
        return logs, None
    t = time.perf_counter()
    simulate(logs, impressions=n, days=days, seed=0)
    return logs, time.perf_counter() - t


def run_duckdb(logs: Path, dest: Path, threads: int, window: int) -> tuple[float, tuple[int, int, int]]:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    t = time.perf_counter()
    con.execute(DUCK_SQL.format(logs=logs, window=window))
    con.execute(f"COPY labelled TO '{dest}' (FORMAT parquet)")
    dt = time.perf_counter() - t
    n, y, z = con.execute("SELECT count(*), sum(click), sum(conversion) FROM labelled").fetchone()
    con.close()
    return dt, (int(n), int(y), int(z))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000000,4000000")
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "etl"))
    p.add_argument("--shards", type=int, default=4)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ESMM_SPARK_DRIVER_MEMORY", "3g")
    sizes = [int(s) for s in args.sizes.split(",") if s]

    from etl.pipeline import run_etl
    from etl.spark import get_spark

    t = time.perf_counter()
    spark = get_spark(args.master, app="esmm-bench-etl", conf={"spark.ui.showConsoleProgress": "false"})
    print(f"spark session ({args.master}, driver memory {os.environ['ESMM_SPARK_DRIVER_MEMORY']}): "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    results = []
    for n in sizes:
        logs, synth_s = ensure_logs(out, n, args.days)
        if synth_s is not None:
            print(f"synth {n:,} impressions: {synth_s:.1f} s", flush=True)
        data = out / f"data-{n}"
        t = time.perf_counter()
        m = run_etl(spark, str(logs), str(data), shards=args.shards)
        spark_s = time.perf_counter() - t
        s_n = m["used"]["impressions"]
        s_yz = (sum(m["splits"][k]["clicks"] for k in m["splits"]), sum(m["splits"][k]["conversions"] for k in m["splits"]))
        duck_s, (d_n, d_y, d_z) = run_duckdb(logs, out / f"duck-{n}.parquet", cores(args.master), 7)
        agree = (s_n, *s_yz) == (d_n, d_y, d_z)
        r = {"impressions": n, "spark_s": round(spark_s, 2), "spark_imps_per_s": round(s_n / spark_s),
             "duckdb_s": round(duck_s, 2), "duckdb_imps_per_s": round(d_n / duck_s),
             "duckdb_over_spark": round(spark_s / duck_s, 2), "labels_agree": agree,
             "clicks": s_yz[0], "conversions": s_yz[1]}
        results.append(r)
        print(f"{n:>10,} impressions: spark {spark_s:7.1f} s ({r['spark_imps_per_s']:>9,}/s) | "
              f"duckdb {duck_s:6.1f} s ({r['duckdb_imps_per_s']:>9,}/s) | duckdb {r['duckdb_over_spark']:.1f}x faster | "
              f"labels agree: {agree} (clicks {s_yz[0]}, conversions {s_yz[1]})", flush=True)
        shutil.rmtree(data, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    spark.stop()
    return 0 if all(r["labels_agree"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
