"""Ali-CCP raw converter: generated raw files at a chosen size -> rows/s of the Spark job (local[2]).

    .venv/bin/python bench/aliccp.py --impressions 50000 200000 [--common-entries 500] [--before /work/main]

What it generates (shape of the real release, see shared/data/aliccp/FORMAT.md): one
common row per ~58 impressions (42.3M / 0.73M), each with ``--common-entries`` entries
(default 500: the real common file is ~11 KB a row, ~22 bytes an entry) split over
109_14/110_14/127_14/150_14 in the PaddleRec demo user's proportions plus the 9 profile
fields; ~25 skeleton entries a row (5 single item/context fields, 210 x8, the four
crosses x3); Zipf-like ids; skeleton rows of one key consecutive, as in the release.

What it prints per size, side by side:
- the Spark converter (``etl.aliccp.convert_raw`` + ``write``, the same calls as
  ``esmm aliccp``) wall time and impressions/s, with its phases, and the number of Spark
  jobs (``SparkListenerJobStart`` events in the event log), each run in a fresh process;
- the same for ``--before`` (another checkout, default /work/main) at the first size;
- a pure-Python single-process reference doing LESS (parse + dict join into per-field
  lists; no vocabulary, no Parquet), what a user's own script would do;
- measured memory figures from Spark's event log (peak execution memory per task,
  shuffle bytes, spill) and the cached size of the parsed inputs, per impression and per
  common row, which the README extrapolates to the full dataset.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

# --code DIR (the child runs of "before"): import etl/ from another checkout, e.g. /work/main
_CODE = sys.argv[sys.argv.index("--code") + 1] if "--code" in sys.argv else str(Path(__file__).resolve().parents[1])
sys.path.insert(0, _CODE)

import numpy as np  # noqa: E402

IMP_PER_COMMON = 58
USER_LISTS = {"109_14": 117, "110_14": 342, "127_14": 209, "150_14": 191}  # demo user's list lengths
USER_SINGLE = ["101", "121", "122", "124", "125", "126", "127", "128", "129"]
ITEM_SINGLE = {"205": 4_300_000, "206": 10_000, "207": 400_000, "216": 200_000, "301": 5}


def zipf_ids(rng, n, space, a=1.2):
    return np.minimum(rng.zipf(a, n), space).astype(np.int64)


def generate(out: Path, impressions: int, common_entries: int, seed: int = 0) -> dict:
    """Write the four raw files for a train split of ``impressions`` and a test split of half that."""
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, n in (("train", impressions), ("test", impressions // 2)):
        rng = np.random.default_rng(seed + (split == "test"))
        n_users = max(1, n // IMP_PER_COMMON)
        keys = [hashlib.md5(f"{split}-{u}".encode()).hexdigest() for u in range(n_users)]
        scale = common_entries / sum(USER_LISTS.values())
        with open(out / f"common_features_{split}.csv", "w") as f:
            for u in range(n_users):
                ents = [f"{fld}\x02{u * 7 + i}\x031.0" for i, fld in enumerate(USER_SINGLE)]
                for fld, k in USER_LISTS.items():
                    m = max(1, int(round(k * scale)))
                    ids = zipf_ids(rng, m, 500_000)
                    vals = np.log1p(rng.integers(1, 20, m))
                    ents += [f"{fld}\x02{i}\x03{v:.6f}" for i, v in zip(ids, vals)]
                f.write(f"{keys[u]},{len(ents)},{chr(1).join(ents)}\n")
        user_of = np.sort(rng.integers(0, n_users, n))  # one key's impressions are consecutive
        click = rng.random(n) < 0.04
        conv = click & (rng.random(n) < 0.02)
        conv |= (~click) & (rng.random(n) < 0.0002)  # the release's click=0/conversion=1 rows
        cols = {k: zipf_ids(rng, n, space) for k, space in ITEM_SINGLE.items()}
        with open(out / f"sample_skeleton_{split}.csv", "w") as f:
            for r in range(n):
                ents = [f"{k}\x02{cols[k][r]}\x031.0" for k in ITEM_SINGLE]
                ents += [f"210\x02{i}\x031.0" for i in zipf_ids(rng, 8, 100_000)]
                for k in ("508", "509", "702", "853"):
                    ents += [f"{k}\x02{i}\x03{v:.4f}" for i, v in zip(zipf_ids(rng, 3, 1_000_000), rng.random(3))]
                f.write(f"{r},{int(click[r])},{int(conv[r])},{keys[user_of[r]]},{len(ents)},{chr(1).join(ents)}\n")
        stats[split] = {"impressions": n, "common_rows": n_users,
                        "skeleton_bytes": os.path.getsize(out / f"sample_skeleton_{split}.csv"),
                        "common_bytes": os.path.getsize(out / f"common_features_{split}.csv")}
    return stats


def python_reference(raw: Path) -> float:
    """Plain Python: parse both files, join by dict, per-field lists (no vocab, no output). Seconds."""
    t = time.perf_counter()
    for split in ("train", "test"):
        common = {}
        with open(raw / f"common_features_{split}.csv") as f:
            for line in f:
                key, _, fl = line.rstrip("\n").split(",", 2)
                d: dict = {}
                for e in fl.split("\x01"):
                    fld, rest = e.split("\x02")
                    fid, val = rest.split("\x03")
                    d.setdefault(fld, []).append((int(fid), float(val)))
                common[key] = d
        n = 0
        with open(raw / f"sample_skeleton_{split}.csv") as f:
            for line in f:
                sid, y, z, key, num, fl = line.rstrip("\n").split(",", 5)
                d = {}
                for e in fl.split("\x01"):
                    fld, rest = e.split("\x02")
                    fid, val = rest.split("\x03")
                    d.setdefault(fld, []).append((int(fid), float(val)))
                row = {**common.get(key, {}), **d}
                n += len(row)
    return time.perf_counter() - t


def event_metrics(evdir: str) -> dict:
    """Task metrics summed / maxed over an application's Spark event log."""
    logs = sorted(glob.glob(os.path.join(evdir, "*")), key=os.path.getmtime)
    out = {"peak_exec_mem_max": 0, "shuffle_write": 0, "spill_mem": 0, "spill_disk": 0, "tasks": 0, "jobs": 0,
           "output_bytes": 0, "input_bytes": 0}
    if not logs:
        return out
    last = logs[-1]  # Spark 4 writes a folder of rolling event files per application
    files = sorted(glob.glob(os.path.join(last, "*"))) if os.path.isdir(last) else [last]
    for line in (ln for fn in files for ln in open(fn, errors="replace")):
        if '"SparkListenerJobStart"' in line:
            out["jobs"] += 1
        if True:
            if '"SparkListenerTaskEnd"' not in line:
                continue
            ev = json.loads(line)
            m = ev.get("Task Metrics") or {}
            out["tasks"] += 1
            out["peak_exec_mem_max"] = max(out["peak_exec_mem_max"], m.get("Peak Execution Memory", 0))
            out["shuffle_write"] += (m.get("Shuffle Write Metrics") or {}).get("Shuffle Bytes Written", 0)
            out["spill_mem"] += m.get("Memory Bytes Spilled", 0)
            out["spill_disk"] += m.get("Disk Bytes Spilled", 0)
            out["output_bytes"] += (m.get("Output Metrics") or {}).get("Bytes Written", 0)
            out["input_bytes"] += (m.get("Input Metrics") or {}).get("Bytes Read", 0)
    return out


def cached_sizes(spark) -> dict:
    """memSize + diskSize of every cached RDD (the persisted parsed skeleton / common frames)."""
    infos = spark.sparkContext._jsc.sc().getRDDStorageInfo()
    return {str(i.name())[:60]: int(i.memSize()) + int(i.diskSize()) for i in infos}


def run_spark(raw: Path, out: Path, master: str, shards: int) -> dict:
    from etl import aliccp
    from etl.spark import get_spark

    evdir = str(out.parent / "events")
    shutil.rmtree(evdir, ignore_errors=True)
    os.makedirs(evdir)
    spark = get_spark(master, app="bench-aliccp", conf={
        "spark.eventLog.enabled": "true", "spark.eventLog.dir": evdir, "spark.eventLog.compress": "false",
        "spark.sql.shuffle.partitions": "8"})
    try:
        t0 = time.perf_counter()
        conv = aliccp.convert_raw(spark, str(raw))  # parse + counters + vocab (runs jobs)
        t1 = time.perf_counter()
        cached = cached_sizes(spark)
        m = aliccp.write(spark, str(out), conv, shards=shards)
        t2 = time.perf_counter()
    finally:
        spark.catalog.clearCache()
        spark.stop()
    ev = event_metrics(evdir)
    return {"jobs": ev["jobs"], "parse_count_vocab_s": t1 - t0, "encode_join_write_s": t2 - t1, "total_s": t2 - t0,
            "cached_bytes": sum(cached.values()), "events": ev, "manifest_splits": {
                s: {k: v[k] for k in ("impressions", "clicks", "conversions", "users", "items")}
                for s, v in m["splits"].items()}}


def run_child(code: str, raw: Path, out: Path, master: str, shards: int) -> dict:
    """``run_spark`` in a fresh process importing etl/ from ``code`` (a checkout: before vs after)."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=code)
    r = subprocess.run([sys.executable, __file__, "--code", code, "--child", str(raw), str(out),
                        "--master", master, "--shards", str(shards)], env=env, capture_output=True, text=True,
                       cwd=code)  # Python workers import etl/ from their working directory first
    if r.returncode != 0:
        raise RuntimeError(f"child run of {code} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*.parquet"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impressions", type=int, nargs="+", default=[50_000, 200_000], help="train impressions")
    ap.add_argument("--common-entries", type=int, default=500)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "out" / "aliccp"))
    ap.add_argument("--before", default="/work/main",
                    help="checkout whose converter is the 'before' (run at the first size only; '' to skip)")
    ap.add_argument("--code", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("ESMM_SPARK_DRIVER_MEMORY", "2g")
    if args.child:
        print(json.dumps(run_spark(Path(args.child[0]), Path(args.child[1]), args.master, args.shards)))
        return 0
    here = str(Path(__file__).resolve().parents[1])
    work = Path(args.work)
    results = []
    for n in args.impressions:
        base = work / f"n{n}"
        shutil.rmtree(base, ignore_errors=True)
        t = time.perf_counter()
        st = generate(base / "raw", n, args.common_entries)
        gen_s = time.perf_counter() - t
        py_s = python_reference(base / "raw")
        sp = run_child(here, base / "raw", base / "data", args.master, args.shards)
        before = (run_child(args.before, base / "raw", base / "data_before", args.master, args.shards)
                  if args.before and n == args.impressions[0] else None)
        total_imp = sum(s["impressions"] for s in st.values())
        total_com = sum(s["common_rows"] for s in st.values())
        raw_bytes = sum(s["skeleton_bytes"] + s["common_bytes"] for s in st.values())
        ev = sp["events"]
        r = {
            "impressions": total_imp, "common_rows": total_com, "raw_mb": round(raw_bytes / 2**20, 1),
            "generate_s": round(gen_s, 1),
            "spark_total_s": round(sp["total_s"], 1), "spark_parse_count_vocab_s": round(sp["parse_count_vocab_s"], 1),
            "spark_encode_join_write_s": round(sp["encode_join_write_s"], 1),
            "spark_rows_per_s": round(total_imp / sp["total_s"]),
            "python_ref_s": round(py_s, 1), "python_ref_rows_per_s": round(total_imp / py_s),
            "spark_over_python": round(py_s / sp["total_s"], 2),
            "peak_exec_mem_per_task_mb": round(ev["peak_exec_mem_max"] / 2**20, 1),
            "shuffle_write_mb": round(ev["shuffle_write"] / 2**20, 1),
            "spill_mem_mb": round(ev["spill_mem"] / 2**20, 1), "spill_disk_mb": round(ev["spill_disk"] / 2**20, 1),
            "cached_mb": round(sp["cached_bytes"] / 2**20, 1),
            "output_parquet_mb": round(dir_bytes(base / "data") / 2**20, 1),
            "shuffle_bytes_per_impression": round(ev["shuffle_write"] / total_imp),
            "output_bytes_per_impression": round(dir_bytes(base / "data") / total_imp),
            "raw_bytes_per_impression": round(raw_bytes / total_imp),
            "splits": sp["manifest_splits"], "spark_jobs": sp["jobs"],
            "load_avg": [round(x, 1) for x in os.getloadavg()],
        }
        if before is not None:
            r.update({"before_spark_total_s": round(before["total_s"], 1), "before_spark_jobs": before["jobs"],
                      "before_same_counts": before["manifest_splits"] == sp["manifest_splits"]})
        results.append(r)
        print(json.dumps(r), flush=True)
    print("\nimpressions  raw MB  spark s  python s  spark/python  spark jobs  before s  before jobs  "
          "peak task MB  shuffle MB  load")
    for r in results:
        print(f"{r['impressions']:>11}  {r['raw_mb']:>6}  {r['spark_total_s']:>7}  {r['python_ref_s']:>8}  "
              f"{r['spark_total_s'] / max(r['python_ref_s'], 1e-9):>12.2f}  {r['spark_jobs']:>10}  "
              f"{r.get('before_spark_total_s', '-'):>8}  {r.get('before_spark_jobs', '-'):>11}  "
              f"{r['peak_exec_mem_per_task_mb']:>12}  {r['shuffle_write_mb']:>10}  {r['load_avg'][0]:>4}")
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"growth {a['impressions']} -> {b['impressions']} impressions: x{b['impressions'] / a['impressions']:.2f} "
              f"rows, x{b['spark_total_s'] / a['spark_total_s']:.2f} Spark time, "
              f"marginal {(b['impressions'] - a['impressions']) / max(b['spark_total_s'] - a['spark_total_s'], 1e-9):.0f}"
              f" impressions/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
