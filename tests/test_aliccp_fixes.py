"""Ali-CCP converter bugs, one crafted case each (real Spark, tiny raw files).

- a malformed FIRST copy of a common row must not make the valid copy a duplicate;
- torch-rechub rows get ``sample_id`` from file + line, the same whatever the file splits;
- a user field given another embedding group in a spec still reads the common file.
"""
from __future__ import annotations

import gzip
import json
import shutil

from conftest import ALICCP_SAMPLES
from etl import aliccp as A
from etl import aliccp_formats as AF
from test_aliccp import E, com_line, read_split, sk_line

RECHUB = ALICCP_SAMPLES / "torch-rechub" / "examples" / "ranking" / "data" / "ali-ccp"


def _write(d, common_train, skeleton_train):
    d.mkdir(parents=True)
    (d / "common_features_train.csv").write_text(common_train)
    (d / "sample_skeleton_train.csv").write_text(skeleton_train)
    with gzip.open(d / "common_features_test.csv.gz", "wt") as f:
        f.write(com_line("t1", [E(101, 2001), E(121, 7)]))
    with gzip.open(d / "sample_skeleton_test.csv.gz", "wt") as f:
        f.write(sk_line(1, 0, 0, "t1", [E(205, 11)]))
    return d


def test_malformed_first_copy_of_a_common_row_keeps_the_valid_copy(spark, tmp_path):
    raw = _write(tmp_path / "raw",
                 com_line("u1", [E(101, 1001), E(121, 5)], num=7)          # malformed first copy
                 + com_line("u1", [E(101, 1001), E(121, 5), E("109_14", 30, 0.5)])  # the valid copy
                 + com_line("u2", [E(101, 1002), E(121, 5)]),
                 sk_line(1, 1, 0, "u1", [E(205, 11)]) + sk_line(2, 0, 0, "u2", [E(205, 12)])
                 + sk_line(3, 0, 0, "u1", [E(205, 11)]))
    out = tmp_path / "data"
    m = A.write(spark, str(out), A.convert_raw(spark, str(raw)), shards=1)
    rows = {r["sample_id"]: r for r in read_split(out, "train")}
    # 1001 is seen by two impressions, 1002 by one: ids by count
    assert {s: (r["101"], r["121"], r["109_14"], r["109_14__w"]) for s, r in rows.items()} == {
        "train-1": ([1], [1], [1], [0.5]), "train-2": ([2], [1], [], []), "train-3": ([1], [1], [1], [0.5])}
    s = m["aliccp"]["splits"]["train"]
    assert (s["common_read"], s["common_malformed"], s["common_duplicate"], s["missing_common"]) == (3, 1, 0, 0)
    assert m["aliccp"]["counts"]["aliccp.duplicate"] == 0 and m["aliccp"]["counts"]["aliccp.missing_common"] == 0


def test_user_field_in_another_group_still_reads_the_common_file(spark, tmp_path):
    raw = _write(tmp_path / "raw",
                 com_line("u1", [E(101, 1001), E("109_14", 30, 0.5)]),
                 sk_line(1, 1, 0, "u1", [E(205, 11), E(301, 2)]))
    spec = tmp_path / "spec.yaml"
    spec.write_text("fields:\n  - {name: '101', group: item}\n  - {name: '109_14', group: context}\n"
                    "  - {name: '205', group: user}\n  - {name: '301'}\n")
    out = tmp_path / "data"
    m = A.write(spark, str(out), A.convert_raw(spark, str(raw), A.load_field_spec(spec)), shards=1)
    [r] = read_split(out, "train")
    assert (r["101"], r["109_14"], r["109_14__w"], r["205"], r["301"]) == ([1], [1], [0.5], [1], [1])
    assert [(f["name"], f["group"], f["vocab_size"]) for f in m["fields"]] == [
        ("101", "item", 2), ("109_14", "context", 2), ("205", "user", 2), ("301", "context", 2)]


def _rechub_ids(spark, root, max_partition_bytes):
    old = spark.conf.get("spark.sql.files.maxPartitionBytes")
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(max_partition_bytes))
    try:
        conv = AF.convert_rechub(spark, str(root))
        return {s: sorted((r["sample_id"], r["click"], r["205"]) for r in
                          df.select("sample_id", "click", "205").collect())
                for s, df in conv.splits.items()}
    finally:
        spark.conf.set("spark.sql.files.maxPartitionBytes", old)


def test_rechub_sample_id_is_file_and_line(spark, tmp_path):
    root = tmp_path / "rechub"
    shutil.copytree(RECHUB, root)
    whole = _rechub_ids(spark, root, 128 << 20)
    split = _rechub_ids(spark, root, 1000)  # the 10 KB train file in ~11 splits
    assert whole == split
    lines = (root / "ali_ccp_train_sample.csv").read_text().splitlines()
    assert [(sid, y) for sid, y, _ in whole["train"]] == sorted(
        (f"train-ali_ccp_train_sample.csv:{i}", int(ln.split(",")[0])) for i, ln in enumerate(lines[1:], start=2))
    assert {sid.split(":")[0] for sid, _, _ in whole["test"]} == {
        "test-ali_ccp_test_sample.csv", "val-ali_ccp_val_sample.csv"}
    assert len(whole["test"]) == 100


def _vocab(data):
    import pyarrow.parquet as pq

    out = {}
    for d in (data / "vocab").iterdir():
        if d.name.startswith("field="):
            out[d.name[6:]] = {r["value"]: r["id"] for r in pq.read_table(d).to_pylist()}
    return out


def test_vocab_from_keeps_every_shared_id(spark, tmp_path):
    from jobs import aliccp as job

    day1 = _write(tmp_path / "raw1",
                  com_line("u1", [E(101, 1001), E("109_14", 30, 0.5), E("109_14", 31, 1.0)])
                  + com_line("u2", [E(101, 1002), E("109_14", 30, 0.25)]),
                  sk_line(1, 1, 0, "u1", [E(205, 11), E(210, 7)]) + sk_line(2, 0, 0, "u2", [E(205, 12)])
                  + sk_line(3, 0, 0, "u1", [E(205, 12)]))
    day2 = _write(tmp_path / "raw2",  # 1002, 30, 12 are shared; 1003, 32, 13, 8 are new; 1001, 31, 11, 7 gone
                  com_line("v1", [E(101, 1003), E("109_14", 32, 2.0), E("109_14", 30, 1.0)])
                  + com_line("v2", [E(101, 1002)]),
                  sk_line(1, 0, 0, "v1", [E(205, 13), E(210, 8)]) + sk_line(2, 1, 1, "v2", [E(205, 12)])
                  + sk_line(3, 0, 0, "v1", [E(205, 13)]))
    d1, d2 = tmp_path / "data1", tmp_path / "data2"
    assert job.main(["--raw", str(day1), "--out", str(d1), "--shards", "1"]) == 0
    assert job.main(["--raw", str(day2), "--out", str(d2), "--shards", "1", "--vocab-from", str(d1)]) == 0
    v1, v2 = _vocab(d1), _vocab(d2)
    for f, vals in v1.items():  # value by value, every field
        assert {v: v2[f][v] for v in vals} == vals, f
    assert v1["101"] == {"1001": 1, "1002": 2} and v2["101"] == {"1001": 1, "1002": 2, "1003": 3}
    assert v2["109_14"] == {"30": 1, "31": 2, "32": 3} and v2["205"] == {"12": 1, "11": 2, "13": 3}
    assert v2["210"] == {"7": 1, "8": 2}
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (d1, d2))
    assert m2["vocab"]["parent"] == str(d1.resolve())
    assert {k: v for k, v in m2["vocab"]["new_ids"].items() if v} == {"101": 1, "109_14": 1, "205": 1, "210": 1}
    s1, s2 = ({f["name"]: f["vocab_size"] for f in m["fields"]} for m in (m1, m2))
    assert all(s2[f] >= s1[f] for f in s1) and (s2["101"], s2["205"], s2["126"]) == (4, 4, 1)
    rows = {r["sample_id"]: r for r in read_split(d2, "train")}
    assert (rows["train-2"]["101"], rows["train-2"]["205"]) == ([2], [1])
    assert (rows["train-1"]["101"], rows["train-1"]["109_14"], rows["train-1"]["109_14__w"], rows["train-1"]["210"]) \
        == ([3], [3, 1], [2.0, 1.0], [2])
