"""Ali-CCP ingestion: crafted raw files (exact rows), the real processed samples, and training on them.

The crafted pair is written here; every case of the raw format's rules has one line:
weighted multi-valued user lists, a missing common index, a common row that is itself
malformed, a bad feature_num, a single field given twice, a duplicate sample_id, an
unlisted field, click=0/conversion=1 (dropped, then recoded), and the train/test
pairing (the same index means different users in the two splits). The test split is
gzipped, so .gz input is read too.
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import ALICCP_SAMPLES, REPO
from etl import aliccp as A
from etl import aliccp_formats as AF
from etl.shards import REJECT_KEYS

RECHUB = ALICCP_SAMPLES / "torch-rechub" / "examples" / "ranking" / "data" / "ali-ccp"
PADDLE = ALICCP_SAMPLES / "PaddleRec" / "models" / "multitask" / "esmm" / "data"

USER_SINGLE = ["101", "121", "122", "124", "125", "126", "127", "128", "129"]
USER_WEIGHTED = ["109_14", "110_14", "127_14", "150_14"]
ITEM_SINGLE = ["205", "206", "207", "216", "301"]
COMBO = ["508", "509", "702", "853"]


def E(field, fid, value=1.0):
    return f"{field}\x02{fid}\x03{value}"


def sk_line(sid, click, conv, key, entries, num=None):
    return f"{sid},{click},{conv},{key},{len(entries) if num is None else num},{chr(1).join(entries)}\n"


def com_line(key, entries, num=None):
    return f"{key},{len(entries) if num is None else num},{chr(1).join(entries)}\n"


def write_raw(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "common_features_train.csv").write_text(
        com_line("u1", [E(101, 1001), E(121, 5), E("109_14", 30, 0.5), E("109_14", 31, 1.5),
                        E("110_14", 40, 2.0), E("150_14", 60, 0.25)])
        + com_line("u2", [E(101, 1002), E(121, 5), E("109_14", 30, 0.75)])
        + com_line("ubad", [E(101, 1003), E(121, 6)], num=9))  # malformed: its impressions lose the user side
    (d / "sample_skeleton_train.csv").write_text(
        sk_line(1, 1, 1, "u1", [E(205, 11), E(210, 7), E(210, 8), E(508, 3, 0.5)])
        + sk_line(2, 0, 1, "u1", [E(205, 12)])                  # click=0, conversion=1
        + sk_line(3, 0, 0, "u2", [E(205, 11), E(999, 5)])       # 999: not an Ali-CCP field, skipped + counted
        + sk_line(4, 1, 0, "nokey", [E(205, 13)])               # missing common index
        + sk_line(5, 0, 0, "u2", [E(205, 11)], num=9)           # feature_num disagrees
        + sk_line(6, 0, 0, "u1", [E(205, 11), E(205, 12)])      # single field twice
        + sk_line(3, 1, 0, "u2", [E(205, 14)])                  # duplicate sample_id: first line wins
        + sk_line(7, 0, 0, "ubad", [E(205, 12)]))               # its common row was rejected
    with gzip.open(d / "common_features_test.csv.gz", "wt") as f:  # same key u1, another user
        f.write(com_line("u1", [E(101, 1002), E("109_14", 31, 3.0), E("109_14", 99, 1.0)]))
    with gzip.open(d / "sample_skeleton_test.csv.gz", "wt") as f:
        f.write(sk_line(1, 1, 0, "u1", [E(205, 11), E(210, 9)])   # 210:9 unseen in train -> 0
                + sk_line(2, 0, 0, "u2", [E(205, 15)]))           # u2 exists only in the train file
    return d


def row(sid, click, conv, **fields):
    """An expected shard row: unset single fields [0], unset multi/weighted []."""
    r = {"sample_id": sid, "click": click, "conversion": conv}
    for f in USER_SINGLE + ITEM_SINGLE:
        r[f] = [0]
    for f in USER_WEIGHTED + COMBO:
        r[f], r[f + "__w"] = [], []
    r["210"] = []
    for k, v in fields.items():
        k = k.lstrip("f")
        if isinstance(v, tuple):
            r[k], r[k + "__w"] = v
        else:
            r[k] = v
    return r


def read_split(data, split):
    """A split's rows by sample_id; a single field's id (int64 in the files: format 2, checked
    here) shown as a one-id list, as the expected rows below are written."""
    m = json.loads((data / "manifest.json").read_text())
    singles = [f["name"] for f in m["fields"] if f["kind"] == "single"]
    rows = []
    for f in m["splits"][split]["files"]:
        t = pq.read_table(data / f)
        assert all(str(t.schema.field(n).type) == "int64" for n in singles if n in t.column_names)
        rows += [{k: [v] if k in singles else v for k, v in r.items()} for r in t.to_pylist()]
    return sorted(rows, key=lambda r: r["sample_id"])


def project(rows, cols):
    return [{c: r[c] for c in cols} for r in rows]


COLS = (["sample_id", "click", "conversion"] + USER_SINGLE + ITEM_SINGLE + ["210"]
        + [c for f in USER_WEIGHTED + COMBO for c in (f, f + "__w")])


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    return write_raw(tmp_path_factory.mktemp("aliccp") / "raw")


@pytest.fixture(scope="module")
def raw_default(spark, raw_dir):
    out = raw_dir.parent / "data"
    conv = A.convert_raw(spark, str(raw_dir))
    return out, A.write(spark, str(out), conv, shards=2)


def test_raw_rows_exact(raw_default):
    out, m = raw_default
    # vocab on train: count desc, then value asc; user fields counted once per impression
    assert read_split(out, "train") and project(read_split(out, "train"), COLS) == [
        row("train-1", 1, 1, f101=[1], f121=[1], f205=[1], f210=[1, 2],
            f109_14=([1, 2], [0.5, 1.5]), f110_14=([1], [2.0]), f150_14=([1], [0.25]), f508=([1], [0.5])),
        row("train-3", 0, 0, f101=[2], f121=[1], f205=[1], f109_14=([1], [0.75])),
        row("train-4", 1, 0, f205=[3]),   # missing common: user fields empty
        row("train-7", 0, 0, f205=[2]),   # its common row was malformed
    ]
    assert project(read_split(out, "test"), COLS) == [
        row("test-1", 1, 0, f101=[2], f205=[1], f210=[0], f109_14=([2, 0], [3.0, 1.0])),
        row("test-2", 0, 0, f205=[0]),
    ]
    for r in read_split(out, "train"):
        assert r["ts"].isoformat() == "1970-01-01T00:00:00+00:00"


def test_raw_manifest_counts_and_rejects(raw_default):
    out, m = raw_default
    tr, te = m["splits"]["train"], m["splits"]["test"]
    assert (tr["days"], tr["impressions"], tr["clicks"], tr["conversions"], tr["users"], tr["items"]) == \
        (["1970-01-01"], 4, 2, 1, 2, 3)
    assert (te["days"], te["impressions"], te["clicks"], te["conversions"], te["users"], te["items"]) == \
        (["1970-01-02"], 2, 1, 0, 1, 2)
    assert m["read"] == {"impressions": 10, "clicks": 4, "conversions": 2}
    assert set(REJECT_KEYS) <= set(m["rejects"]) and all(m["rejects"][k] == 0 for k in REJECT_KEYS)
    assert {k: v for k, v in m["rejects"].items() if k.startswith("aliccp.")} == {
        "aliccp.malformed": 3, "aliccp.duplicate": 1, "aliccp.conversion_without_click": 1}
    assert m["aliccp"]["counts"] == {"aliccp.conversion_without_click": 1, "aliccp.malformed": 3,
                                     "aliccp.missing_common": 3, "aliccp.duplicate": 1}
    s = m["aliccp"]["splits"]["train"]
    assert (s["read"], s["kept"], s["malformed"], s["duplicate"], s["conversion_without_click"],
            s["missing_common"], s["unlisted_entries"], s["common_read"], s["common_malformed"]) == \
        (8, 4, 2, 1, 1, 2, 1, 3, 1)
    sizes = {f["name"]: (f["kind"], f["vocab_size"]) for f in m["fields"]}
    assert len(sizes) == 23
    assert sizes["101"] == ("single", 3) and sizes["109_14"] == ("weighted", 3)
    assert sizes["210"] == ("multi", 3) and sizes["205"] == ("single", 4) and sizes["126"] == ("single", 1)
    rej = sorted((r["table"], r["reason"], json.loads(r["row"]).get("line"), r["detail"])
                 for r in pq.read_table(out / "rejects").to_pylist())
    assert [(t, reason) for t, reason, _, _ in rej] == [
        ("common_features_train", "aliccp.malformed"),
        ("sample_skeleton_train", "aliccp.conversion_without_click"),
        ("sample_skeleton_train", "aliccp.duplicate"),
        ("sample_skeleton_train", "aliccp.malformed"),
        ("sample_skeleton_train", "aliccp.malformed"),
    ]
    lines = {line for _, _, line, _ in rej}
    assert sk_line(5, 0, 0, "u2", [E(205, 11)], num=9).rstrip("\n") in lines
    assert sk_line(2, 0, 1, "u1", [E(205, 12)]).rstrip("\n") in lines
    assert {d for *_, d in rej} >= {"feature_num 9 but 1 entries", "field 205 is single but has 2 entries",
                                    "feature_num 9 but 2 entries"}


def test_raw_recode_and_min_count_via_cli(spark, raw_dir, tmp_path):
    from jobs import aliccp as job

    out = tmp_path / "data"
    rc = job.main(["--raw", str(raw_dir), "--out", str(out), "--shards", "1", "--min-count", "2",
                   "--recode-conversion-without-click", "--master", "local[2]"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    # min count 2: 205 keeps 11 and 12 (2 impressions each with train-2 kept), 101 keeps 1001 only
    cols = ["sample_id", "click", "conversion", "101", "205", "109_14", "109_14__w"]
    assert project(read_split(out, "train"), cols) == [
        {"sample_id": "train-1", "click": 1, "conversion": 1, "101": [1], "205": [1], "109_14": [1, 2],
         "109_14__w": [0.5, 1.5]},
        {"sample_id": "train-2", "click": 0, "conversion": 0, "101": [1], "205": [2], "109_14": [1, 2],
         "109_14__w": [0.5, 1.5]},
        {"sample_id": "train-3", "click": 0, "conversion": 0, "101": [0], "205": [1], "109_14": [1],
         "109_14__w": [0.75]},
        {"sample_id": "train-4", "click": 1, "conversion": 0, "101": [0], "205": [0], "109_14": [],
         "109_14__w": []},
        {"sample_id": "train-7", "click": 0, "conversion": 0, "101": [0], "205": [2], "109_14": [],
         "109_14__w": []},
    ]
    assert m["splits"]["train"]["impressions"] == 5 and m["splits"]["train"]["conversions"] == 1
    assert m["rejects"]["aliccp.conversion_without_click"] == 0
    assert m["aliccp"]["counts"]["aliccp.conversion_without_click"] == 1
    assert m["aliccp"]["conversion_without_click"] == "recode"
    assert {f["name"]: f["vocab_size"] for f in m["fields"]}["205"] == 3


def test_packed_archive_and_missing_file_are_one_line_errors(tmp_path, capsys):
    from jobs import aliccp as job

    (tmp_path / "sample_train.tar.gz").write_bytes(b"")
    assert job.main(["--raw", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tar -xzf" in err and "sample_train.tar.gz" in err
    empty = tmp_path / "e"
    empty.mkdir()
    assert job.main(["--raw", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "missing sample_skeleton_train.csv" in capsys.readouterr().err


# --------------------------------------------------------------------------- real samples


def _rechub_expect(name):
    import csv

    rows = list(csv.DictReader(open(RECHUB / name)))
    return (len(rows), sum(r["click"] == "1" for r in rows), sum(r["purchase"] == "1" for r in rows),
            {r["205"] for r in rows if r["205"] != "0"}, {r["101"] for r in rows if r["101"] != "0"})


@pytest.fixture(scope="module")
def rechub(spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("rechub") / "data"
    return out, A.write(spark, str(out), AF.convert_rechub(spark, str(RECHUB)), shards=2)


def test_rechub_import_counts(rechub):
    out, m = rechub
    n, y, z, items, users = _rechub_expect("ali_ccp_train_sample.csv")
    assert (n, y, z) == (100, 7, 1)  # SOURCES.md
    tr = m["splits"]["train"]
    assert (tr["impressions"], tr["clicks"], tr["conversions"], tr["items"], tr["users"]) == \
        (n, y, z, len(items), len(users))
    vn, vy, vz, vitems, vusers = _rechub_expect("ali_ccp_val_sample.csv")
    tn, ty, tz, titems, tusers = _rechub_expect("ali_ccp_test_sample.csv")
    te = m["splits"]["test"]  # val merged into test: both halves of the raw test file
    assert (te["impressions"], te["clicks"], te["conversions"], te["items"], te["users"]) == \
        (100, 5, 2, len(vitems | titems), len(vusers | tusers))
    assert m["read"] == {"impressions": 200, "clicks": 12, "conversions": 3}
    assert sum(v for k, v in m["rejects"].items()) == 0
    kinds = {f["name"]: f["kind"] for f in m["fields"]}
    assert kinds["109_14"] == "weighted" and kinds["210"] == "multi" and kinds["205"] == "single"
    rows = read_split(out, "train")
    assert len(rows) == 100 and all(len(r["205"]) == 1 for r in rows)
    # the D columns became the weights of their (single) entry; index 0 (missing) gives an empty list
    assert all(r["109_14__w"] == [pytest.approx(0.4734)] for r in rows)
    assert sum(r["508"] == [] for r in rows) == sum(
        1 for line in open(RECHUB / "ali_ccp_train_sample.csv").read().splitlines()[1:] if line.split(",")[16] == "0")


@pytest.fixture(scope="module")
def paddle(spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("paddle") / "data"
    return out, A.write(spark, str(out), AF.convert_paddlerec(spark, str(PADDLE)), shards=2)


def test_paddlerec_import_counts_and_every_token(paddle):
    out, m = paddle
    tr, te = m["splits"]["train"], m["splits"]["test"]
    assert (tr["impressions"], tr["clicks"], tr["conversions"], tr["users"], tr["items"]) == (10, 2, 1, 1, 10)
    assert (te["impressions"], te["clicks"], te["conversions"], te["users"], te["items"]) == (10, 1, 0, 1, 10)
    assert sum(m["rejects"].values()) == 0
    kinds = {f["name"]: f["kind"] for f in m["fields"]}
    assert kinds["150_14"] == "multi" and "150_14__w" not in pq.read_table(out / tr["files"][0]).column_names
    lines = {"train-" + ln.split(",")[0]: ln.rstrip("\n").split(",")[3:]
             for ln in open(PADDLE / "train" / "small.txt")}
    names = [f["name"] for f in m["fields"]]
    for r in read_split(out, "train"):
        toks = lines[r["sample_id"]]
        absent = sum(1 for f in names if kinds[f] == "single" and not any(t.split(":")[0] == f for t in toks))
        # every field:feat token is one id (PaddleRec's reader drops the first: we do not)
        assert sum(len(r[f]) for f in names) == len(toks) + absent
        assert len(r["150_14"]) == 191 and len(r["110_14"]) == 342
    first = read_split(out, "train")[0]  # train-1's first token is 210:1
    vocab210 = {v["value"]: v["id"] for v in pq.read_table(out / "vocab" / "field=210").to_pylist()}
    assert vocab210["1"] in first["210"]


def test_esmm_train_on_imported_samples(paddle, tmp_path):
    from jobs import train as job

    out, m = paddle
    model = tmp_path / "model"
    rc = job.main(["--data", str(out), "--out", str(model), "--epochs", "1", "--batch-size", "4", "--no-progress"])
    assert rc == 0
    metrics = json.loads((model / "metrics.json").read_text())
    assert "ctr_auc" in metrics


def test_job_file_runs_as_a_script(tmp_path):
    # spark-submit runs jobs/aliccp.py as a plain file: it must import etl/ from the repo root.
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "aliccp.py"), "--raw", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o"), "--format", "paddlerec-txt"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"esmm: error: {tmp_path / 'nope'}: no such input folder"


def test_feature_spec(tmp_path):
    from etl.errors import InputError

    p = tmp_path / "spec.yaml"
    p.write_text("fields:\n  - {name: '101'}\n  - {name: '210', kind: weighted}\n  - {name: '999', kind: multi, "
                 "group: item, min_count: 3}\n")
    got = A.load_field_spec(p)
    assert got == [A.FieldSpec("101", "single", "user"), A.FieldSpec("210", "weighted", "item"),
                   A.FieldSpec("999", "multi", "item", 3)]
    assert [f.side for f in got] == ["common", "skeleton", "skeleton"]
    p.write_text("fields:\n  - {name: '998'}\n")
    with pytest.raises(InputError, match="998.*group"):
        A.load_field_spec(p)
    p.write_text("fields:\n  - {name: '101', kind: dense}\n")
    with pytest.raises(InputError, match="kind 'dense' is not one of"):
        A.load_field_spec(p)
