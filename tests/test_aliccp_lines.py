"""The Arrow parse of Ali-CCP lines (``etl.aliccp_lines``): each check's reason, Spark's
number rules, and every field's column against a plain-Python split of random lines."""
from __future__ import annotations

import random

import pyarrow as pa
import pytest

from etl import aliccp_lines as L
from etl.aliccp_spec import FieldSpec

SK = [FieldSpec("205", "single", "item"), FieldSpec("206", "single", "item"), FieldSpec("210", "multi", "item"),
      FieldSpec("508", "weighted", "combination")]
COM = [FieldSpec("101", "single", "user"), FieldSpec("109_14", "weighted", "user")]


def E(field, fid, value="1.0"):
    return f"{field}\x02{fid}\x03{value}"


def batch(lines):
    return pa.RecordBatch.from_pydict({"line": lines, "source": ["f"] * len(lines), "pos": list(range(len(lines)))})


def sk(sid, click, conv, key, entries, num=None):
    return f"{sid},{click},{conv},{key},{len(entries) if num is None else num},{chr(1).join(entries)}"


def test_skeleton_reasons_in_order_and_spark_number_rules():
    lines = [
        sk(1, 1, 0, "k", [E(205, " +07 "), E(210, 3), E(210, "-2"), E(508, 9, " 0.5 "), E(999, 1)]),
        sk(2, 0, 1, "k", []),                                  # empty list, click=0/conversion=1
        "3,0,0,k,1",                                           # 5 columns
        sk("", 0, 0, "k", [E(205, 1)]),
        sk(5, 2, 0, "k", [E(205, 1)]),
        sk(6, 0, "x", "k", [E(205, 1)]),
        sk(7, 0, 0, "", [E(205, 1)]),
        sk(8, 0, 0, "k", [E(205, 1)], num="n"),
        sk(9, 0, 0, "k", [E(205, "1.0")]),                     # Spark's try_cast(bigint) rejects 1.0
        sk(10, 0, 0, "k", [E(205, "9223372036854775808")]),    # out of int64
        sk(11, 0, 0, "k", [E(205, 1, "NaN")]),
        sk(12, 0, 0, "k", [E(205, 1, "abc")]),
        sk(13, 0, 0, "k", ["205\x021"]),                        # no \x03
        sk(14, 0, 0, "k", [E(205, 1)], num=" 9"),
        sk(15, 0, 0, "k", [E(206, 1), E(205, 1), E(206, 2), E(205, 2), E(205, 3)]),  # 205 first in spec order
        sk(16, 0, 0, "k", [E("", 1)]),
        sk(17, 0, 0, "k", [E(205, "9223372036854775807", "-Infinity")]),
    ]
    got = L.parse_skeleton_batch(batch(lines), SK).to_pylist()
    assert [r["bad"] for r in got] == [
        None, None, "expected 6 comma-separated columns, got 5", "empty sample_id", "click is not 0/1",
        "conversion is not 0/1", "empty common_feature_index", "feature_num is not an integer", L.BAD_ENTRY,
        L.BAD_ENTRY, L.BAD_ENTRY, L.BAD_ENTRY, L.BAD_ENTRY, "feature_num 9 but 1 entries",
        "field 205 is single but has 3 entries", L.BAD_ENTRY, None]
    r = got[0]
    assert (r["205"], r["206"], r["210"], r["508"], r["508__w"], r["unlisted"]) == ("7", None, ["3", "-2"], ["9"],
                                                                                  [0.5], 1)
    assert (got[1]["click"], got[1]["conversion"], got[1]["210"], got[1]["508__w"]) == (0, 1, [], [])
    assert got[16]["205"] == "9223372036854775807" and got[16]["508"] == []
    # the text is kept only where the line can become a reject
    assert [r["line"] is not None for r in got] == [False, True] + [True] * 13 + [True, False]
    assert [r["pos"] for r in got] == list(range(len(lines)))


def test_common_and_paddlerec_lines():
    com = L.parse_common_batch(batch([
        f"u1,3,{E(101, 5)}\x01{E('109_14', 30, '0.25')}\x01{E('109_14', 31, '1e1')}",
        "u2,0,", "u3,1", f",1,{E(101, 5)}"]), COM).to_pylist()
    assert [c["bad"] for c in com] == [None, None, "expected 3 comma-separated columns, got 2",
                                       "empty common_feature_index"]
    assert (com[0]["101"], com[0]["109_14"], com[0]["109_14__w"]) == ("5", ["30", "31"], [0.25, 10.0])
    assert (com[1]["101"], com[1]["109_14"]) == (None, [])
    fields = [FieldSpec("101", "single", "user"), FieldSpec("210", "multi", "item")]
    pad = L.parse_paddlerec_batch(batch(["7,1,0,101:5,210:3,210:4,999:1", "8,0,1", "9,0,0,101:x", "10,0,0,101:1:2",
                                         "11,0", "12,1,0,210:1,"]), fields).to_pylist()
    assert [p["bad"] for p in pad] == [None, None, L.BAD_TOKEN, L.BAD_TOKEN,
                                       "expected sample_id,click,conversion,field:feat,...", L.BAD_TOKEN]
    assert (pad[0]["sample_id"], pad[0]["101"], pad[0]["210"], pad[0]["unlisted"], pad[0]["cfi"]) == \
        ("7", "5", ["3", "4"], 1, None)
    assert (pad[1]["conversion"], pad[1]["210"], pad[1]["line"]) == (1, [], "8,0,1")


def test_every_field_column_equals_a_plain_split():
    rnd = random.Random(7)
    names = ["205", "206", "210", "508", "999"]
    lines = []
    for i in range(400):
        ents = [E(rnd.choice(names), rnd.randint(0, 30), f"{rnd.random():.3f}") for _ in range(rnd.randint(0, 12))]
        lines.append(sk(i, 1, 0, "k", ents))
    got = L.parse_skeleton_batch(batch(lines), SK).to_pylist()
    for line, r in zip(lines, got):
        fl = line.split(",", 5)[5]
        ents = [e.replace("\x03", "\x02").split("\x02") for e in fl.split("\x01")] if fl else []
        by = {n: [e for e in ents if e[0] == n] for n in names}
        single_many = [n for n in ("205", "206") if len(by[n]) > 1]
        if single_many:
            assert r["bad"] == f"field {single_many[0]} is single but has {len(by[single_many[0]])} entries"
            continue
        assert r["bad"] is None and r["unlisted"] == len(by["999"])
        for n in ("205", "206"):
            assert r[n] == (by[n][0][1] if by[n] else None)
        assert r["210"] == [e[1] for e in by["210"]]
        assert r["508"] == [e[1] for e in by["508"]]
        assert r["508__w"] == pytest.approx([float(e[2]) for e in by["508"]], rel=1e-6)


def test_a_batch_is_parsed_in_slices_of_bounded_text():
    lines = [sk(i, 0, 0, "k", [E(205, i)] * (1 + i % 3)) for i in range(50)] + ["x" * 500]
    b = batch(lines)
    pieces = list(L.slices(b, 100))
    assert pa.Table.from_batches(pieces).to_pylist() == pa.Table.from_batches([b]).to_pylist()
    sizes = [sum(len(x) for x in p.column("line").to_pylist()) for p in pieces]
    assert all(s <= 100 for s in sizes[:-1]) and sizes[-1] == 500 and len(pieces) > 5
    whole = L.parse_skeleton_batch(b, SK).to_pylist()
    assert [r for p in pieces for r in L.parse_skeleton_batch(p, SK).to_pylist()] == whole
