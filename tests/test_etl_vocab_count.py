"""The vocabulary count of the log ETL (etl/vocab.py) against the plain Spark way to say it.

``count_vocab`` counts every field with one posexplode and numbers the values on the
driver; these tests hold it to ``groupBy`` + ``countDistinct`` + the window numbering
(``assign_ids``) on a crafted frame with null singles, null and empty lists, map keys,
integer columns, ties in count and non-ASCII values.
"""
from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl.vocab import assign_ids, count_vocab, field_values, number_values

SCHEMA = T.StructType([
    T.StructField("_dt", T.StringType()), T.StructField("user_id", T.StringType()),
    T.StructField("item_id", T.StringType()), T.StructField("pos", T.IntegerType()),
    T.StructField("tags", T.ArrayType(T.StringType())), T.StructField("shop", T.MapType(T.StringType(), T.FloatType())),
])
ROWS = [
    ("d1", "u1", "é", 1, ["a", "b", "a"], {"s2": 1.0, "s1": 0.5}),
    ("d1", "u2", "z", None, None, None),
    ("d1", "u1", "B", 2, [], {}),
    ("d1", "u3", "é", 1, ["ä", None, "b"], {"s1": None}),
    ("d2", "u4", "z", 3, ["a"], {"s9": 1.0}),
    ("d2", "u1", "q", 3, ["new"], None),
]
FIELDS = [{"name": "user_id", "kind": "single", "min_count": 1}, {"name": "item_id", "kind": "single", "min_count": 1},
          {"name": "pos", "kind": "single", "min_count": 2}, {"name": "tags", "kind": "multi", "min_count": 1},
          {"name": "shop", "kind": "weighted", "min_count": 1}]


@pytest.fixture(scope="module")
def frame(spark):
    return spark.createDataFrame(ROWS, SCHEMA)


def test_field_values_are_every_non_null_value_with_its_field(frame):
    want = Counter()
    for _, u, i, p, tags, shop in ROWS[:4]:
        want[("user_id", u)] += 1
        want[("item_id", i)] += 1
        if p is not None:
            want[("pos", str(p))] += 1
        want.update(("tags", t) for t in (tags or []) if t is not None)
        want.update(("shop", k) for k in (shop or {}))
    got = Counter((r["field"], r["value"]) for r in field_values(frame.where("_dt = 'd1'"), FIELDS).collect())
    assert got == want


@pytest.mark.parametrize("with_user_field", [True, False])
def test_count_vocab_equals_groupby_and_window(spark, frame, with_user_field):
    fields = FIELDS if with_user_field else FIELDS[1:]  # without: users counted apart from the fields
    vocab, values, uniques = count_vocab(frame, fields, ["d1"])
    train = frame.where("_dt = 'd1'")
    want = assign_ids(field_values(train, fields).groupBy("field", "value").count(),
                      {f["name"]: f["min_count"] for f in fields})
    key = lambda r: (r["field"], r["id"])  # noqa: E731
    assert sorted(vocab.collect(), key=key) == sorted(want.collect(), key=key)
    assert values["item_id"] == ["é", "B", "z"]  # count 2 first, then byte order: "B" < "z"
    assert values["pos"] == ["1"]  # pos 2 occurs once, under its min_count
    distinct = {r["s"]: (r["u"], r["i"]) for r in frame.groupBy(
        F.when(F.col("_dt") == "d1", "train").otherwise("test").alias("s")).agg(
        F.countDistinct("user_id").alias("u"), F.countDistinct("item_id").alias("i")).collect()}
    assert uniques == distinct == {"train": (3, 3), "test": (2, 2)}


def test_number_values_equals_assign_ids(spark):
    rows = [("f", v, c) for v, c in [("b", 3), ("a", 3), ("é", 3), ("Z", 1), ("ä", 5), ("c", 2), ("e\u0301", 3)]]
    rows += [("g", v, c) for v, c in [("x", 1), ("y", 1), ("w", 4)]]
    counts = pa.table({"field": [r[0] for r in rows], "value": [r[1] for r in rows], "count": [r[2] for r in rows]})
    got = number_values(counts, {"f": 2, "g": 1}).to_pylist()
    want = assign_ids(spark.createDataFrame(rows, "field string, value string, count bigint"),
                      {"f": 2, "g": 1}).collect()
    assert sorted(got, key=lambda r: (r["field"], r["id"])) == \
        sorted((r.asDict() for r in want), key=lambda r: (r["field"], r["id"]))
    assert [r["value"] for r in got if r["field"] == "f"] == ["ä", "a", "b", "e\u0301", "é", "c"]


def test_value_index_same_ids_both_ways():
    """Arrow's per-call hash (small vocabularies) and the pandas index built once (large
    ones) give the same ids: position + 1, 0 for unknown and null, and a parent's unused
    id (None in the list) matched by nothing."""
    from etl.list_encode import ValueIndex

    vocab = ["a", None, "c", "é", "q"]
    flat = pa.array(["c", "x", None, "a", "é", "c"], pa.string())
    want = [3, 0, 0, 1, 4, 3]
    index = ValueIndex(vocab)
    assert index.ids(flat).tolist() == want  # 5 values <= 4 x 6 looked up: index_in
    assert index._pandas is None
    # one value at a time: 5 > 4 x 1, the pandas index
    assert [int(index.ids(flat.slice(i, 1))[0]) for i in range(len(flat))] == want
    assert index._pandas is not None
