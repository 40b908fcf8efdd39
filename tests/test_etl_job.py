"""``esmm etl`` as a user runs it: CLI errors, spark-submit, a job killed before commit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import etl_crafted as C
from jobs import etl as job

REPO = Path(__file__).resolve().parents[1]
SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"


def one_line_error(capsys, argv, *needles):
    rc = job.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("esmm: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in err


def test_cli_errors_exit_2_with_one_line(spark, tmp_path, capsys):
    logs = C.write_parquet(tmp_path / "logs")
    out = str(tmp_path / "out")
    one_line_error(capsys, ["--logs", str(tmp_path / "nope"), "--out", out], "nope")
    one_line_error(capsys, ["--logs", str(logs), "--out", out, "--split-date", "2026-13-01"], "--split-date", "2026-13-01")
    one_line_error(capsys, ["--logs", str(logs), "--out", out, "--start", "2026-01-03", "--end", "2026-01-01"], "--start")
    one_line_error(capsys, ["--logs", str(logs), "--out", out, "--shards", "0"], "--shards")
    one_line_error(capsys, ["--logs", str(logs)], "--out")
    one_line_error(capsys, ["--logs", str(logs), "--out", out, "--bogus"], "--bogus")
    one_line_error(capsys, ["--logs", str(logs), "--out", out, "--features", str(tmp_path / "none.yaml")], "none.yaml")
    spec = tmp_path / "spec.yaml"
    spec.write_text("fields:\n  - {name: no_such_column}\n")
    one_line_error(capsys, ["--logs", str(logs), "--out", out, "--features", str(spec)], "no_such_column")
    spec.write_text("fields:\n  - {name: user_id, kind: sparse}\n")
    one_line_error(capsys, ["--logs", str(logs), "--out", out, "--features", str(spec)], "sparse")

    nolog = tmp_path / "noimp"
    (nolog / "clicks").mkdir(parents=True)
    one_line_error(capsys, ["--logs", str(nolog), "--out", out], str(nolog / "impressions"))

    import pyarrow as pa

    bad = tmp_path / "nocol"
    (bad / "impressions" / "dt=2026-01-01").mkdir(parents=True)
    pq.write_table(pa.table({"impression_id": ["i1"], "ts": ["2026-01-01T00:00:00Z"], "item_id": ["a"]}),
                   bad / "impressions" / "dt=2026-01-01" / "part-0.parquet")
    for t in ("clicks", "conversions"):
        (bad / t).mkdir()
    one_line_error(capsys, ["--logs", str(bad), "--out", out], "user_id", "impressions")
    (bad / "impressions" / "2026-01-02").mkdir()
    one_line_error(capsys, ["--logs", str(bad), "--out", out], "2026-01-02", "dt=YYYY-MM-DD")
    assert not Path(out).exists()


def _submit(logs, out, env_extra=None, timeout=600):
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1", **(env_extra or {})}
    env.pop("PYTHONPATH", None)  # jobs/etl.py must find the repo by itself
    cmd = [str(SPARK_SUBMIT), "--master", "local[2]", "--driver-memory", "1g",
           "--conf", "spark.ui.showConsoleProgress=false", "--conf", "spark.sql.shuffle.partitions=4",
           str(REPO / "jobs" / "etl.py"), "--logs", str(logs), "--out", str(out), "--shards", "1"]
    return subprocess.run(cmd, cwd="/", env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("submit")
    logs = C.write_parquet(root / "logs")
    out = root / "data"
    r = _submit(logs, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "logs": logs, "out": out, "stdout": r.stdout}


def test_spark_submit_runs_the_job(submitted):
    m = json.loads((submitted["out"] / "manifest.json").read_text())
    assert m["rejects"] == C.REJECTS and m["read"] == C.READ
    assert "esmm etl:" in submitted["stdout"]
    assert (submitted["out"] / "_SUCCESS").exists()


def test_job_killed_before_commit_leaves_old_output(spark, submitted):
    """A rerun on the same inputs dies right before its commit rename (test hook)."""
    from etl.shards import _recover_and_clean

    out = submitted["out"]
    old_manifest = (out / "manifest.json").read_text()
    old_files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    m1 = json.loads(old_manifest)
    rows = {f: pq.read_table(out / f).to_pylist() for s in ("train", "test") for f in m1["splits"][s]["files"]}
    r = _submit(submitted["logs"], out, {"ESMM_TEST_DIE_BEFORE_COMMIT": "1"})
    assert r.returncode == 3, r.stderr[-3000:]
    # the old output is untouched and readable; nothing of the new one is inside it
    assert (out / "manifest.json").read_text() == old_manifest
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == old_files
    assert {f: pq.read_table(out / f).to_pylist() for f in rows} == rows
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".staging-")]
    assert len(leftovers) == 1  # the dead job's staging: beside the output, never inside it
    staged = leftovers[0]

    # the dead rerun got as far as the commit: same inputs gave the same rows in the same files
    m2 = json.loads((staged / "manifest.json").read_text())
    for k in ("splits", "read", "rejects", "used", "fields", "out_of_range"):
        assert m2[k] == m1[k], k
    assert {f: pq.read_table(staged / f).to_pylist() for f in rows} == rows

    # the next run's writer removes the leftover; a commit cut between its two renames is undone
    _recover_and_clean(spark, str(out))
    assert not staged.exists() and (out / "_SUCCESS").exists()
    aside = out.parent / (out.name + ".old-0123456789ab")
    out.rename(aside)
    _recover_and_clean(spark, str(out))
    assert (out / "manifest.json").read_text() == old_manifest and not aside.exists()
