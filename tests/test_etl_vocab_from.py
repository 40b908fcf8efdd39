"""``--vocab-from``: two consecutive days of the crafted logs, day 2 grows day 1's vocabularies.

Day 1 = impressions of D1 (train) and D2 (test); day 2 = D2 (train) and D3 (test), with
``--vocab-from`` day 1's data root, then a model bundle holding day 1's vocabularies
(``bundle.json`` + ``vocab/`` without counts). Spec: item_id needs 2 occurrences, hist is
hashed.
"""
from __future__ import annotations

import json
import shutil

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import etl_crafted as C
from etl.errors import InputError
from etl.pipeline import run_etl

SPEC = """
fields:
  - {name: user_id}
  - {name: item_id, min_count: 2}
  - {name: pos}
  - {name: hist, hash_buckets: 8}
  - {name: shop, kind: weighted}
"""
VOCAB_FIELDS = ("user_id", "item_id", "pos", "shop")


def vocab(data, field):
    t = pads.dataset(data / "vocab" / f"field={field}", format="parquet").to_table().to_pylist()
    return {r["value"]: r["id"] for r in t}


def rows(data):
    m = json.loads((data / "manifest.json").read_text())
    out = {}
    for s in ("train", "test"):
        for f in m["splits"][s]["files"]:
            for r in pq.read_table(data / f).to_pylist():
                out[r["sample_id"]] = r
    return out


@pytest.fixture(scope="module")
def days(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_from")
    logs = C.write_parquet(root / "logs")
    spec = root / "spec.yaml"
    spec.write_text(SPEC)
    kw = dict(features=str(spec), window_days=7, shards=1)
    d1 = root / "day1"
    m1 = run_etl(spark, str(logs), str(d1), start=C.day(1), end=C.day(2), split_date=C.day(2), **kw)
    d2 = root / "day2"
    m2 = run_etl(spark, str(logs), str(d2), start=C.day(2), end=C.day(3), split_date=C.day(3),
                 vocab_from=str(d1), **kw)
    # a model bundle with day 1's vocabularies: bundle.json + vocab/ (value, id; no count)
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({"format_version": 1, "fields": m1["fields"]}))
    for f in VOCAB_FIELDS:
        t = pads.dataset(d1 / "vocab" / f"field={f}", format="parquet").to_table().select(["value", "id"])
        (bundle / "vocab" / f"field={f}").mkdir(parents=True)
        pq.write_table(t, bundle / "vocab" / f"field={f}" / "part-0.parquet")
    d2b = root / "day2_bundle"
    m2b = run_etl(spark, str(logs), str(d2b), start=C.day(2), end=C.day(3), split_date=C.day(3),
                  vocab_from=str(bundle), **kw)
    return dict(root=root, logs=logs, spec=spec, d1=d1, m1=m1, d2=d2, m2=m2, bundle=bundle, d2b=d2b, m2b=m2b)


def test_day1_vocabularies_as_without_the_flag(days):
    assert vocab(days["d1"], "user_id") == {"u1": 1, "u2": 2, "u3": 3}
    assert vocab(days["d1"], "item_id") == {"a": 1, "b": 2}
    assert vocab(days["d1"], "pos") == {"1": 1, "2": 2, "3": 3}
    assert vocab(days["d1"], "shop") == {"s1": 1, "s2": 2}
    assert "vocab" not in days["m1"]


def test_every_shared_value_keeps_its_id_and_new_ones_follow(days):
    for f in VOCAB_FIELDS:
        old, new = vocab(days["d1"], f), vocab(days["d2"], f)
        for value, i in old.items():  # value by value, every field
            assert new[value] == i, (f, value)
        added = sorted(i for v, i in new.items() if v not in old)
        assert added == list(range(max(old.values()) + 1, max(old.values()) + 1 + len(added))), f
    # D2 train rows: i10 (u1, a), i11 (u4, c, shop s3), i12 (u1, a, shop s1)
    assert vocab(days["d2"], "user_id") == {"u1": 1, "u2": 2, "u3": 3, "u4": 4}
    assert vocab(days["d2"], "item_id") == {"a": 1, "b": 2}  # c seen once on day 2: below min_count
    assert vocab(days["d2"], "shop") == {"s1": 1, "s2": 2, "s3": 3}
    assert days["m2"]["vocab"] == {"parent": str(days["d1"]),
                                   "new_ids": {"user_id": 1, "item_id": 0, "pos": 0, "shop": 1}}
    sizes = {f["name"]: f["vocab_size"] for f in days["m2"]["fields"]}
    assert sizes == {"user_id": 5, "item_id": 3, "pos": 4, "hist": 9, "shop": 4}
    for f in days["m1"]["fields"]:
        assert sizes[f["name"]] >= f["vocab_size"]


def test_shards_encoded_with_the_grown_ids(days):
    r1, r2 = rows(days["d1"]), rows(days["d2"])
    assert r2["i11"]["user_id"] == 4 and r2["i11"]["item_id"] == 0 and r2["i11"]["shop"] == [3]
    assert r2["i14"]["user_id"] == 1 and r2["i14"]["pos"] == 2  # D3 test row: day 1's ids
    assert r2["i13"]["user_id"] == 0  # u9 is seen on test days only
    # hashed fields are unaffected: the same value hashes to the same bucket on both days
    assert r1["i2"]["hist"] == r2["i10"]["hist"] and 1 <= r2["i10"]["hist"][0] <= 8
    assert r1["i10"]["user_id"] == 1 and r1["i11"]["user_id"] == 0  # day 1 did not know u4


def test_bundle_parent_gives_the_same_ids(days):
    for f in VOCAB_FIELDS:
        assert vocab(days["d2b"], f) == vocab(days["d2"], f), f
    assert days["m2b"]["vocab"] == {"parent": str(days["bundle"]), "new_ids": days["m2"]["vocab"]["new_ids"]}
    assert [f["vocab_size"] for f in days["m2b"]["fields"]] == [f["vocab_size"] for f in days["m2"]["fields"]]
    assert rows(days["d2b"]) == rows(days["d2"])


def test_parent_size_above_its_ids_is_kept(spark, days):
    """A bundle whose table is larger than its vocabulary (ids reserved): new ids start above it."""
    b = days["root"] / "bundle_big"
    shutil.copytree(days["bundle"], b)
    doc = json.loads((b / "bundle.json").read_text())
    for f in doc["fields"]:
        if f["name"] == "user_id":
            f["vocab_size"] = 10
    (b / "bundle.json").write_text(json.dumps(doc))
    out = days["root"] / "day2_big"
    m = run_etl(spark, str(days["logs"]), str(out), start=C.day(2), end=C.day(3), split_date=C.day(3),
                features=str(days["spec"]), shards=1, vocab_from=str(b))
    assert vocab(out, "user_id") == {"u1": 1, "u2": 2, "u3": 3, "u4": 10}
    assert {f["name"]: f["vocab_size"] for f in m["fields"]}["user_id"] == 11
    assert m["vocab"]["new_ids"]["user_id"] == 1
    assert rows(out)["i11"]["user_id"] == 10 and rows(out)["i10"]["user_id"] == 1


def test_parent_errors_name_the_problem(spark, days, tmp_path):
    with pytest.raises(InputError, match="neither manifest.json nor bundle.json"):
        run_etl(spark, str(days["logs"]), str(tmp_path / "o"), vocab_from=str(tmp_path))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("{name: hist, hash_buckets: 8}", "{name: hist}"))
    with pytest.raises(InputError, match="'hist'.*hash_buckets 8"):
        run_etl(spark, str(days["logs"]), str(tmp_path / "o"), features=str(spec), vocab_from=str(days["d1"]))
    assert not (tmp_path / "o").exists()
