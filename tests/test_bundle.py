"""The model bundle and the Scorer: raw values score like the shard rows, from the bundle alone.

- the Scorer's encoding equals the ETL's (etl/vocab.py encode_columns) on crafted raw
  columns: ints, booleans, nulls, lists with null elements, unsorted maps, null weights,
  hashed fields (Spark's xxhash64);
- a bundle exported from `esmm train`, loaded in a fresh process with no data folder and
  neither Spark nor Ray imported, scores the test split's raw impressions like the trained
  model scores its shard rows (1e-6).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "dim=4", "--set", "hidden=16,8", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="session")
def served(spark, tmp_path_factory):
    """Synth logs (2 days) -> ETL -> `esmm train` MODEL (also a bundle) -> `esmm export` BUNDLE."""
    from etl.pipeline import run_etl
    from jobs.export import main as export_main
    from jobs.synth import main as synth_main
    from jobs.train import main as train_main

    root = tmp_path_factory.mktemp("served")
    logs, data, model, bundle = (str(root / n) for n in ("logs", "data", "model", "bundle"))
    assert synth_main(["--out", logs, "--impressions", "1500", "--days", "2", "--seed", "4", "--quiet"]) == 0
    run_etl(spark, logs, data, shards=1)
    assert train_main(["--data", data, "--out", model, *TINY]) == 0
    assert export_main(["--model", model, "--out", bundle]) == 0
    return {"root": root, "logs": logs, "data": data, "model": model, "bundle": bundle}


def raw_test_rows(served) -> pa.Table:
    """The raw impressions of the test split, in the order of the test shards' rows."""
    from train.data import load_manifest

    m = load_manifest(served["data"])
    days = m["splits"]["test"]["days"]
    raw = pa.concat_tables([pq.read_table(f) for d in days
                            for f in sorted(Path(served["logs"], "impressions", f"dt={d}").glob("*.parquet"))])
    return raw


def test_scorer_encodes_raw_values_like_the_etl(spark, tmp_path):
    """encode_columns (Spark, what the shards hold) == FieldEncoder (the Scorer), value by value."""
    from pyspark.sql import types as T

    from etl.vocab import build_vocab, encode_columns, save_vocab
    from train.bundle import Bundle
    from train.scorer import FieldEncoder

    schema = T.StructType([
        T.StructField("k", T.IntegerType()),
        T.StructField("s", T.StringType()), T.StructField("n", T.IntegerType()), T.StructField("b", T.BooleanType()),
        T.StructField("m", T.ArrayType(T.StringType())), T.StructField("w", T.MapType(T.StringType(), T.FloatType())),
        T.StructField("hs", T.StringType()), T.StructField("hm", T.ArrayType(T.StringType())),
        T.StructField("hn", T.LongType()),
    ])
    rows = [
        (0, "a", 7, True, ["x", "y", "x"], {"q": 0.5, "p": 2.0}, "héllo", ["", "z"], 123456789012),
        (1, "b", -3, False, ["y", None], {"r": None, "p": 1.0}, "", None, -1),
        (2, None, None, None, None, None, None, ["a", None], None),
        (3, "a", 7, True, [], {}, "ünï©ødé 字", [], 0),
        (4, "zz-new", 99, False, ["new"], {"new": 3.0, "q": 1.5}, "x" * 40, ["y" * 33], 2**62),
    ]
    df = spark.createDataFrame(rows, schema)
    fields = [{"name": "s", "kind": "single", "min_count": 1}, {"name": "n", "kind": "single", "min_count": 1},
              {"name": "b", "kind": "single", "min_count": 1}, {"name": "m", "kind": "multi", "min_count": 1},
              {"name": "w", "kind": "weighted", "min_count": 1},
              {"name": "hs", "kind": "single", "hash_buckets": 97},
              {"name": "hm", "kind": "multi", "hash_buckets": 1_000_003},
              {"name": "hn", "kind": "single", "hash_buckets": 13}]
    train_part = df.where("k < 4")  # row 4's values are unseen: id 0
    vocab = build_vocab(train_part, fields)
    save_vocab(vocab, str(tmp_path / "vocab"))
    sizes = {r["field"]: r["n"] + 1 for r in vocab.groupBy("field").max("id").withColumnRenamed("max(id)", "n").collect()}
    want = {r["k"]: r for r in encode_columns(df, fields, vocab, keep=["k"]).collect()}
    table = pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows],
                                 schema=pa.schema([("k", pa.int32()), ("s", pa.string()), ("n", pa.int32()),
                                                   ("b", pa.bool_()), ("m", pa.list_(pa.string())),
                                                   ("w", pa.map_(pa.string(), pa.float32())), ("hs", pa.string()),
                                                   ("hm", pa.list_(pa.string())), ("hn", pa.int64())]))
    bundle = Bundle(tmp_path, {})
    for f in fields:
        spec = {**f, "vocab_size": f.get("hash_buckets", 0) + 1 if f.get("hash_buckets") else sizes[f["name"]]}
        col = FieldEncoder(spec, bundle).encode(table.column(f["name"]), table.num_rows)
        for k in range(len(rows)):
            lo, hi = int(col.offsets[k]), int(col.offsets[k + 1])
            ids = want[k][f["name"]]  # a single field's id is an int64 column (shard format 2)
            assert col.values[lo:hi].tolist() == ([ids] if f["kind"] == "single" else list(ids)), (f["name"], k)
            if f["kind"] == "weighted":
                assert col.weights[lo:hi].tolist() == pytest.approx(list(want[k][f["name"] + "__w"])), (f["name"], k)


def test_bundle_alone_scores_the_test_split_like_the_model(served, tmp_path):
    from train.data import load_manifest
    from train.evaluate import predict
    from train.local import load_model, load_split_for

    model, _ = load_model(served["model"])
    cols = load_split_for(model, served["data"], "test", load_manifest(served["data"]))
    ref = predict(model, cols)
    raw = raw_test_rows(served)
    pos = {k: i for i, k in enumerate(raw.column("impression_id").to_pylist())}
    raw = raw.take(pa.array([pos[s] for s in cols.sample_id]))
    assert raw.num_rows == len(cols) > 500
    pq.write_table(raw, tmp_path / "raw.parquet")

    # the bundle alone: copied away, the data folder and the MODEL dir moved out of sight
    bundle = tmp_path / "bundle"
    shutil.copytree(served["bundle"], bundle)
    hidden = [Path(served["data"]), Path(served["model"])]
    for p in hidden:
        os.rename(p, str(p) + ".hidden")
    try:
        script = (
            "import sys, numpy as np, pyarrow.parquet as pq\n"
            "from train.scorer import Scorer\n"
            f"s = Scorer({str(bundle)!r})\n"
            f"p = s.score(pq.read_table({str(tmp_path / 'raw.parquet')!r}))\n"
            "assert 'pyspark' not in sys.modules and 'ray' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('pyspark', 'ray')))\n"
            f"np.savez({str(tmp_path / 'p.npz')!r}, **p)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        for p in hidden:
            os.rename(str(p) + ".hidden", p)
    got = np.load(tmp_path / "p.npz")
    for k in ("p_ctr", "p_cvr", "p_ctcvr"):
        np.testing.assert_allclose(got[k], np.asarray(ref[k]), rtol=0, atol=1e-6, err_msg=k)
    # what the bundle says about itself
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["lineage"]["manifest"] == str(Path(served["data"]).resolve() / "manifest.json")
    assert [f["name"] for f in meta["fields"]] == [f.name for f in model.fields]
    assert sorted(meta["vocab_fields"]) == sorted(f.name for f in model.fields)
    assert meta["metrics"]["ctr_auc"] == json.loads(Path(served["model"], "metrics.json").read_text())["ctr_auc"]


def test_train_writes_a_bundle_equal_to_its_model_pt(served):
    """MODEL/ is a bundle too; its safetensors hold exactly model.pt's tensors (weights_only loads)."""
    from train.bundle import load_bundle

    a, b = load_bundle(served["model"])
    sd = torch.load(Path(served["model"], "model.pt"), weights_only=True)
    got = a.state_dict()
    assert sorted(got) == sorted(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k]), k
    assert b.model_version == load_bundle(served["bundle"])[1].model_version  # same weights, same version


def test_export_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "export", "--model", str(tmp_path), "--out",
                        str(tmp_path / "b")], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and r.stderr.startswith("esmm: error: ") and "Traceback" not in r.stderr
    assert "not a model dir" in r.stderr
