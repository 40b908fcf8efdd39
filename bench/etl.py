"""Benchmark: the whole ``esmm etl`` process vs the same label join in DuckDB, same files.

    .venv/bin/python bench/etl.py [--sizes 1000000,4000000] [--days 14] [--master local[2]] \
        [--before /work/main] [--floor]   # also time another checkout ("before"); Spark's floor

For each size, simulated logs (``esmm synth``, seed 0) are written once under
``bench/out/etl/logs-N`` and reused. Then, side by side on the same files:

- Spark: ``esmm etl --master local[2]`` as its own process (session start, dedup, label
  rules, rejects, train-only vocabulary, encoding, shards, manifest, commit); the wall
  time of the whole process, the session start apart, and the number of Spark jobs it
  ran (the status tracker's job ids at the end of the run). With ``--before DIR`` the
  same command runs with ``PYTHONPATH=DIR`` first (the code before a change);
- DuckDB (threads = Spark's cores): the same dedup + label join (valid clicks after
  their impression, conversions within the window after a valid click) written to one
  Parquet file: what a user would try instead, without rejects, vocab or sharding.

Prints seconds, impressions/s, jobs and the ratio; the label sums must agree.

``--floor`` also times what no ETL on these files can beat, side by side: Spark copying
the impressions (read every column, write Parquet; nothing else), the same copy through
one shuffle into the job's number of files (its shard layout), and DuckDB's plain copy.
Spark's copy + shuffle against DuckDB's label join is the lowest ratio any Spark job that
writes the shard layout reaches here.
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


# Runs inside the timed child process: the CLI's own entry point, then the job count.
CHILD = """
import json, sys, time
t0 = time.perf_counter()
from etl.spark import get_spark
spark = get_spark(sys.argv[1], app="esmm-etl")
t1 = time.perf_counter()
from jobs.etl import main
rc = main(sys.argv[2:])
t2 = time.perf_counter()
jobs = spark.sparkContext.statusTracker().getJobIdsForGroup(None)
print("BENCH " + json.dumps({"rc": rc, "session_s": t1 - t0, "etl_s": t2 - t1, "jobs": len(jobs)}))
"""


# Spark's floor on the same files, in its own process with esmm's session settings.
FLOOR = """
import json, sys, time
from etl.spark import get_spark
spark = get_spark(sys.argv[1], app="esmm-etl-floor")
from pyspark.sql import functions as F
src, dst, files = sys.argv[2], sys.argv[3], int(sys.argv[4])
t = time.perf_counter()
spark.read.parquet(src).write.mode("overwrite").parquet(dst + "/copy")
t1 = time.perf_counter()
(spark.read.parquet(src).repartition(files, F.xxhash64("impression_id"))
 .write.mode("overwrite").parquet(dst + "/shuffled"))
t2 = time.perf_counter()
print("BENCH " + json.dumps({"copy_s": t1 - t, "shuffled_s": t2 - t1}))
"""


def run_floor(logs: Path, dest: Path, master: str, files: int, threads: int) -> dict:
    """Spark's copy and copy + shuffle of the impressions, and DuckDB's copy (seconds)."""
    import subprocess

    import duckdb

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYSPARK_PYTHON": sys.executable}
    r = subprocess.run([sys.executable, "-c", FLOOR, master, str(logs / "impressions"), str(dest), str(files)],
                       env=env, capture_output=True, text=True, cwd=str(ROOT))
    line = [x for x in r.stdout.splitlines() if x.startswith("BENCH ")]
    if r.returncode != 0 or not line:
        raise RuntimeError(f"Spark floor failed: {r.stderr[-2000:]}")
    out = json.loads(line[-1][6:])
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    t = time.perf_counter()
    con.execute(f"COPY (SELECT * FROM read_parquet('{logs}/impressions/*/*.parquet')) TO '{dest}/duck-copy.parquet' "
                "(FORMAT parquet)")
    out["duckdb_copy_s"] = time.perf_counter() - t
    con.close()
    shutil.rmtree(dest, ignore_errors=True)
    return out


def run_spark(code: Path, logs: Path, data: Path, master: str, shards: int) -> dict:
    """``esmm etl`` in its own process with ``code`` first on PYTHONPATH; wall time + inner figures."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(code), "PYSPARK_PYTHON": sys.executable}
    cmd = [sys.executable, "-c", CHILD, master, "--logs", str(logs), "--out", str(data),
           "--shards", str(shards), "--master", master]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(code))
    wall = time.perf_counter() - t
    line = [x for x in r.stdout.splitlines() if x.startswith("BENCH ")]
    if r.returncode != 0 or not line:
        raise RuntimeError(f"esmm etl ({code}) failed: {r.stderr[-2000:]}")
    out = json.loads(line[-1][6:])
    m = json.loads((data / "manifest.json").read_text())
    out.update(wall_s=wall, used=m["used"]["impressions"],
               clicks=sum(s["clicks"] for s in m["splits"].values()),
               conversions=sum(s["conversions"] for s in m["splits"].values()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000000,4000000")
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "etl"))
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--before", help="another checkout (e.g. /work/main) to time first on the same files")
    p.add_argument("--floor", action="store_true",
                   help="also time Spark's plain copy (and copy + shuffle) of the impressions and DuckDB's copy")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ESMM_SPARK_DRIVER_MEMORY", "3g")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    codes = ([("before", Path(args.before).resolve())] if args.before else []) + [("after", ROOT)]
    print(f"load average {os.getloadavg()[0]:.1f}; spark {args.master}, driver memory "
          f"{os.environ['ESMM_SPARK_DRIVER_MEMORY']}", flush=True)
    results = []
    for n in sizes:
        logs, synth_s = ensure_logs(out, n, args.days)
        if synth_s is not None:
            print(f"synth {n:,} impressions: {synth_s:.1f} s", flush=True)
        duck_s, (d_n, d_y, d_z) = run_duckdb(logs, out / f"duck-{n}.parquet", cores(args.master), 7)
        if args.floor:
            files = args.shards * len([d for d in (logs / "impressions").iterdir() if d.name.startswith("dt=")])
            fl = run_floor(logs, out / f"floor-{n}", args.master, files, cores(args.master))
            results.append({"impressions": n, "code": "floor", **{k: round(v, 2) for k, v in fl.items()},
                            "duckdb_s": round(duck_s, 2), "load": round(os.getloadavg()[0], 1)})
            print(f"{n:>10,} impressions [floor]: Spark copy {fl['copy_s']:6.1f} s ({fl['copy_s'] / duck_s:.1f}x), "
                  f"copy + shuffle into {files} files {fl['shuffled_s']:6.1f} s ({fl['shuffled_s'] / duck_s:.1f}x) | "
                  f"duckdb copy {fl['duckdb_copy_s']:.1f} s, label join {duck_s:.1f} s | "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
        for name, code in codes:
            data = out / f"data-{n}-{name}"
            s = run_spark(code, logs, data, args.master, args.shards)
            agree = (s["used"], s["clicks"], s["conversions"]) == (d_n, d_y, d_z)
            r = {"impressions": n, "code": name, "process_s": round(s["wall_s"], 2),
                 "session_s": round(s["session_s"], 2), "etl_s": round(s["etl_s"], 2), "spark_jobs": s["jobs"],
                 "spark_imps_per_s": round(s["used"] / s["wall_s"]), "duckdb_s": round(duck_s, 2),
                 "duckdb_imps_per_s": round(d_n / duck_s), "ratio": round(s["wall_s"] / duck_s, 2),
                 "labels_agree": agree, "clicks": s["clicks"], "conversions": s["conversions"],
                 "load": round(os.getloadavg()[0], 1)}
            results.append(r)
            print(f"{n:>10,} impressions [{name}]: esmm etl process {s['wall_s']:7.1f} s (session "
                  f"{s['session_s']:.1f} s, run {s['etl_s']:.1f} s, {s['jobs']} Spark jobs, "
                  f"{r['spark_imps_per_s']:,}/s) | duckdb {duck_s:6.1f} s | ratio {r['ratio']:.1f}x | "
                  f"labels agree: {agree} (clicks {s['clicks']}, conversions {s['conversions']}) | "
                  f"load {r['load']}", flush=True)
            shutil.rmtree(data, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r.get("labels_agree", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
