"""The log ETL on crafted logs: exact labels, reject counts, conservation, vocabulary.

One ETL run on the Parquet logs of tests/etl_crafted.py is shared by the tests here;
the JSON Lines variant and the ranged run are one more run each.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import etl_crafted as C
from etl.pipeline import run_etl
from etl.shards import REJECT_KEYS


def read_split(data, split):
    m = json.loads((data / "manifest.json").read_text())
    tabs = [pq.read_table(data / f) for f in m["splits"][split]["files"]]
    rows = []
    for t in tabs:
        rows += t.to_pylist()
    return rows


def vocab(data, field):
    t = pads.dataset(data / "vocab" / f"field={field}", format="parquet").to_table().to_pylist()
    return {r["value"]: r["id"] for r in t}


@pytest.fixture(scope="module")
def crafted(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("etl")
    logs = C.write_parquet(root / "logs")
    out = root / "data"
    manifest = run_etl(spark, str(logs), str(out), shards=2)
    return {"logs": logs, "out": out, "manifest": manifest, "root": root}


def test_reject_counts_exact_with_all_eleven_keys(crafted):
    m = crafted["manifest"]
    assert list(m["rejects"]) == list(REJECT_KEYS)
    assert m["rejects"] == C.REJECTS
    assert m["read"] == C.READ
    assert m["used"] == C.USED
    assert m["out_of_range"] == {"clicks": 0, "conversions": 0}


def test_conservation_per_table(crafted):
    m = crafted["manifest"]
    for t in ("impressions", "clicks", "conversions"):
        rejected = sum(v for k, v in m["rejects"].items() if k.startswith(t + "."))
        assert m["read"][t] == m["used"][t] + rejected + m["out_of_range"].get(t, 0)
    written = m["splits"]["train"]["impressions"] + m["splits"]["test"]["impressions"]
    assert written == m["used"]["impressions"]


def test_labels_exact(crafted):
    rows = read_split(crafted["out"], "train") + read_split(crafted["out"], "test")
    got = {r["sample_id"]: (r["click"], r["conversion"]) for r in rows}
    assert got == C.LABELS
    assert all(c == 1 for c, z in got.values() if z == 1)  # z=1 implies y=1


def test_splits_by_time_and_table1_counts(crafted):
    s = crafted["manifest"]["splits"]
    assert s["train"]["days"] == [C.day(1), C.day(2)] and s["test"]["days"] == [C.day(3), C.day(4)]
    assert (s["train"]["impressions"], s["train"]["clicks"], s["train"]["conversions"]) == (9, 7, 4)
    assert (s["test"]["impressions"], s["test"]["clicks"], s["test"]["conversions"]) == (3, 1, 0)
    assert (s["train"]["users"], s["train"]["items"]) == (4, 3)
    assert (s["test"]["users"], s["test"]["items"]) == (3, 2)
    # a fixed number of shards per day, every file listed exists
    assert len(s["train"]["files"]) == 2 * 2 and len(s["test"]["files"]) == 2 * 2
    for f in s["train"]["files"] + s["test"]["files"]:
        assert (crafted["out"] / f).is_file()
    assert (crafted["out"] / "_SUCCESS").is_file()


def test_rejects_table_rows_and_reasons(crafted):
    rows = pads.dataset(crafted["out"] / "rejects", format="parquet").to_table().to_pylist()
    counts: dict = {}
    for r in rows:
        counts[f"{r['table']}.{r['reason']}"] = counts.get(f"{r['table']}.{r['reason']}", 0) + 1
        assert r["source_file"] and "/dt=" in r["source_file"]
        json.loads(r["row"])  # the row, as JSON
    assert {k: counts.get(k, 0) for k in REJECT_KEYS} == C.REJECTS
    dup = [json.loads(r["row"]) for r in rows if r["reason"] == "duplicate" and r["table"] == "impressions"]
    assert dup == [{"impression_id": "i6", "ts": C.iso(C.at(1, 10)), "user_id": "u3", "item_id": "a",
                    "pos": 2, "hist": ["h1"], "shop": {"s1": 1.0}}]  # the later copy is the reject
    window = [json.loads(r["row"])["conversion_id"] for r in rows if r["reason"] == "outside_window"]
    assert window == ["v4"]
    mal = sorted(r["detail"] for r in rows if r["table"] == "clicks" and r["reason"] == "malformed")
    assert mal == ["impression_id missing", "ts unparseable (not ISO-8601 or epoch ms)"]


def test_vocabulary_counted_on_train_only(crafted):
    out = crafted["out"]
    users = vocab(out, "user_id")
    assert users == {"u1": 1, "u2": 2, "u3": 3, "u4": 4}  # count desc, then value; u9 (test only) absent
    items = vocab(out, "item_id")
    assert items == {"a": 1, "b": 2, "c": 3}
    fields = {f["name"]: f for f in crafted["manifest"]["fields"]}
    assert [f["name"] for f in crafted["manifest"]["fields"]] == ["user_id", "item_id", "pos", "hist", "shop"]
    assert (fields["user_id"]["kind"], fields["hist"]["kind"], fields["shop"]["kind"]) == ("single", "multi", "weighted")
    assert fields["user_id"]["vocab_size"] == 5 and fields["shop"]["weights"] == "shop__w"
    rows = {r["sample_id"]: r for r in read_split(out, "test")}
    assert rows["i13"]["user_id"] == 0 and rows["i13"]["item_id"] == 0 and rows["i13"]["hist"] == [0]
    assert rows["i14"]["user_id"] == users["u1"]
    train = {r["sample_id"]: r for r in read_split(out, "train")}
    hist, shop = vocab(out, "hist"), vocab(out, "shop")
    assert train["i1"]["hist"] == [hist["h1"], hist["h2"]]
    assert train["i1"]["shop"] == [shop["s1"], shop["s2"]] and train["i1"]["shop__w"] == [0.5, 2.0]
    assert train["i5"]["hist"] == [] and train["i5"]["shop"] == [] and train["i5"]["shop__w"] == []
    assert train["i1"]["pos"] == vocab(out, "pos")["1"]


def test_shard_schema_matches_contract(crafted):
    f = crafted["manifest"]["splits"]["train"]["files"][0]
    s = pq.read_schema(crafted["out"] / f)
    assert str(s.field("sample_id").type) == "string"
    assert str(s.field("ts").type) == "timestamp[us, tz=UTC]"
    assert str(s.field("click").type) == "int8" and str(s.field("conversion").type) == "int8"
    assert str(s.field("user_id").type) == "int64" and str(s.field("pos").type) == "int64"  # single: format 2
    assert str(s.field("hist").type).startswith("list<") and "int64" in str(s.field("hist").type)
    assert str(s.field("shop").type).startswith("list<") and "float" in str(s.field("shop__w").type)
    assert crafted["manifest"]["format_version"] == 2
    assert not any(n.startswith("_") or n == "dt" for n in s.names)


SPEC = """
fields:
  - {name: user_id, kind: single, group: user}
  - {name: item_id, min_count: 2}
  - {name: hist, kind: multi, hash_buckets: 8, group: history}
  - {name: shop, kind: weighted}
"""


def test_json_lines_input_same_labels_and_feature_spec(spark, crafted):
    """JSON Lines (ts as epoch ms and ISO strings, a corrupt line) and a feature spec."""
    logs = C.write_jsonl(crafted["root"] / "logs_json")
    out = crafted["root"] / "data_json"
    spec = crafted["root"] / "spec.yaml"
    spec.write_text(SPEC)
    m = run_etl(spark, str(logs), str(out), features=str(spec), shards=1)
    assert m["inputs"]["formats"] == {"impressions": "json", "clicks": "json", "conversions": "json"}
    fields = {f["name"]: f for f in m["fields"]}
    assert list(fields) == ["user_id", "item_id", "hist", "shop"]
    assert (fields["item_id"]["min_count"], fields["item_id"]["vocab_size"], fields["item_id"]["group"]) == (2, 3, "item")
    assert (fields["hist"]["hash_buckets"], fields["hist"]["vocab_size"], fields["hist"]["group"]) == (8, 9, "history")
    assert vocab(out, "item_id") == {"a": 1, "b": 2}  # c is seen once in train: below min_count
    assert not (out / "vocab" / "field=hist").exists()
    want = dict(C.REJECTS, **{"impressions.malformed": C.REJECTS["impressions.malformed"] + 1})  # + corrupt line
    assert m["rejects"] == want
    rows = read_split(out, "train") + read_split(out, "test")
    assert {r["sample_id"]: (r["click"], r["conversion"]) for r in rows} == C.LABELS
    t = {r["sample_id"]: r for r in rows}
    assert t["i1"]["shop__w"] == [0.5, 2.0]
    assert t["i11"]["item_id"] == 0 and "pos" not in t["i1"]
    assert all(1 <= h <= 8 for r in rows for h in r["hist"]) and len(t["i1"]["hist"]) == 2
    rej = pads.dataset(out / "rejects", format="parquet").to_table().to_pylist()
    assert any(r["row"].startswith('{"impression_id": "broken"') for r in rej)


def test_ranged_run_counts_out_of_range_apart(spark, crafted):
    """--start/--end D2: c3 (a D2 click on a D1 impression) is out of range, not an orphan."""
    out = crafted["root"] / "data_range"
    m = run_etl(spark, str(crafted["logs"]), str(out), start=C.day(2), end=C.day(3), split_date=C.day(3))
    assert m["inputs"]["days"]["impressions"] == [C.day(2), C.day(3)]
    assert m["inputs"]["days"]["clicks"] == [C.day(2), C.day(3), C.day(4)]
    assert m["inputs"]["days"]["conversions"] == [C.day(2), C.day(3), C.day(8), C.day(9)]
    # clicks read: c3 c11 c12 c12 (D2), c_orph c_mal1 c_mal2 (D3), c15 (D4: its impression is outside)
    assert m["read"]["clicks"] == 8
    assert m["out_of_range"] == {"clicks": 2, "conversions": 2}  # c3, c15; v3 (on c3), v4 (click c4 on D1)
    assert m["rejects"]["clicks.orphan"] == 1 and m["rejects"]["conversions.orphan"] == 1  # c_orph, v_orph
    assert m["used"] == {"impressions": 5, "clicks": 2, "conversions": 1}  # c11, c12; v12
    for t in ("impressions", "clicks", "conversions"):
        rejected = sum(v for k, v in m["rejects"].items() if k.startswith(t + "."))
        assert m["read"][t] == m["used"][t] + rejected + m["out_of_range"].get(t, 0)
    assert m["splits"]["train"]["days"] == [C.day(2)] and m["splits"]["test"]["days"] == [C.day(3)]


def test_clean_impressions_skip_their_reject_scan(spark, tmp_path):
    """Impressions without a malformed or duplicate row (the shard write observes each one's
    outcome, so the rejects write does not scan them): the clicks' and conversions' rejects
    are still all written and counted, exactly, and no impression row is among them."""
    import pyarrow.compute as pc

    logs = C.write_parquet(tmp_path / "logs")
    day1 = logs / "impressions" / f"dt={C.day(1)}" / "part-00000.parquet"
    t = pq.read_table(day1)
    bad = pc.or_(pc.is_in(t["impression_id"], pa.array(["i7", "i8", ""])),
                 pc.and_(pc.equal(t["impression_id"], "i6"), pc.equal(t["ts"], C.iso(C.at(1, 10)))))
    assert pc.sum(bad).as_py() == 4  # the three malformed rows and the later copy of i6
    pq.write_table(t.filter(pc.invert(bad)), day1)
    m = run_etl(spark, str(logs), str(tmp_path / "data"))
    want = {k: (0 if k.startswith("impressions.") else v) for k, v in C.REJECTS.items()}
    assert m["rejects"] == want
    assert m["read"]["impressions"] == m["used"]["impressions"] == C.USED["impressions"]
    rows = pads.dataset(tmp_path / "data" / "rejects", format="parquet").to_table().to_pylist()
    got: dict = {}
    for r in rows:
        got[f"{r['table']}.{r['reason']}"] = got.get(f"{r['table']}.{r['reason']}", 0) + 1
    assert {k: got.get(k, 0) for k in REJECT_KEYS} == want
    labels = {r["sample_id"]: (r["click"], r["conversion"])
              for r in read_split(tmp_path / "data", "train") + read_split(tmp_path / "data", "test")}
    assert labels == C.LABELS
