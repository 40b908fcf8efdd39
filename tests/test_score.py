"""`esmm score`: one row per valid impression of the day, rejects counted; Ray == one process."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_bundle import served  # noqa: F401  (the session fixture: synth -> ETL -> train -> bundle)

DAY = "2026-01-02"


@pytest.fixture(scope="module")
def crafted(served, tmp_path_factory):  # noqa: F811
    """Day DAY of the synth logs cut to 12 impressions: one made malformed (no user_id),
    one a later duplicate of another's impression_id (the later copy is rejected)."""
    src = sorted(Path(served["logs"], "impressions", f"dt={DAY}").glob("*.parquet"))[0]
    t = pq.read_table(src).slice(0, 12).to_pylist()
    t[3]["user_id"] = None  # malformed
    t[7]["impression_id"] = t[2]["impression_id"]  # duplicate: t[7] is later in the day than t[2]
    assert t[7]["ts"] > t[2]["ts"]
    logs = tmp_path_factory.mktemp("crafted") / "logs"
    out = logs / "impressions" / f"dt={DAY}"
    out.mkdir(parents=True)
    schema = pq.read_schema(src)
    pq.write_table(pa.Table.from_pylist(t, schema=schema), out / "part-00000.parquet")
    valid = pa.Table.from_pylist([r for i, r in enumerate(t) if i not in (3, 7)], schema=schema)
    return {"logs": str(logs), "valid": valid}


def read_scores(out) -> pa.Table:
    files = sorted(Path(out).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("impression_id")


def test_score_one_row_per_valid_impression_and_rejects_counted(spark, served, crafted, tmp_path):  # noqa: F811
    from jobs.score import score_day
    from train.scorer import Scorer

    out = tmp_path / "scores"
    meta = score_day(spark, served["bundle"], crafted["logs"], DAY, str(out))
    assert (out / "_SUCCESS").is_file()
    assert meta["impressions"] == {"read": 12, "valid": 10, "rejects": {"malformed": 1, "duplicate": 1}}
    assert json.loads((out / "_score.json").read_text())["scored"] == 10
    got = read_scores(out)
    assert got.column_names == ["impression_id", "p_ctr", "p_cvr", "p_ctcvr", "model_version"]
    valid = crafted["valid"].sort_by("impression_id")
    assert got.column("impression_id").to_pylist() == valid.column("impression_id").to_pylist()
    s = Scorer(served["bundle"])
    assert set(got.column("model_version").to_pylist()) == {s.model_version}
    want = s.score(valid)
    for k in ("p_ctr", "p_cvr", "p_ctcvr"):
        np.testing.assert_allclose(got.column(k).to_numpy(), want[k], rtol=0, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(got.column("p_ctcvr").to_numpy(),
                               got.column("p_ctr").to_numpy() * got.column("p_cvr").to_numpy(), rtol=1e-6)


def test_score_on_two_ray_workers_equals_one_process(spark, served, crafted, ray_start_2_cpus, tmp_path):  # noqa: F811
    from jobs.score import score_day

    one, two = tmp_path / "one", tmp_path / "two"
    score_day(spark, served["bundle"], served["logs"], DAY, str(one))
    meta = score_day(spark, served["bundle"], served["logs"], DAY, str(two), workers=2,
                     address=ray_start_2_cpus["address"])
    assert meta["workers"] == 2 and (two / "_SUCCESS").is_file()
    a, b = read_scores(one), read_scores(two)
    assert a.num_rows == b.num_rows == meta["impressions"]["valid"] > 500
    assert a.column("impression_id").to_pylist() == b.column("impression_id").to_pylist()
    for k in ("p_ctr", "p_cvr", "p_ctcvr"):
        np.testing.assert_allclose(a.column(k).to_numpy(), b.column(k).to_numpy(), rtol=0, atol=1e-7, err_msg=k)
