"""Crafted raw logs for the ETL tests: one case per label rule and per reject reason.

Days D1..D4 = 2026-01-01..04 (default split: D1, D2 train; D3, D4 test). Impression ts
are ISO-8601 strings, click ts epoch ms (int64), conversion ts Parquet timestamps, so
the Parquet variant exercises all three ts encodings.

    imp  day  user item   clicks                     conversions                  y z
    i1   D1   u1   a      c1                         v1                           1 1
    i2   D1   u1   b      c2, c2b (second click)     v2 on c2b                    1 1
    i3   D1   u2   a      c3 (next day partition)    v3 (D3 partition)            1 1
    i4   D1   u2   b      c4                         v4 7 days + 1 min: outside   1 0
    i5   D1   u3   a      c5 before the impression   v5 on c5: orphan             0 0
    i6   D1   u3   a      c6 (after the earlier copy of i6, before the later)    1 0
    i6'  D1   duplicate of i6, later ts -> impressions.duplicate
    i7   D1   user missing -> malformed; i8 ts "garbage" -> malformed; "" id -> malformed
    i10  D2   u1   a      -                                                       0 0
    i11  D2   u4   c      c11                        v11 before its click         1 0
    i12  D2   u1   a      c12, c12 again (dup)       v12 exactly 7 days later,
                                                     v12 again (dup)              1 1
    i13  D3   u9   z      (u9, z, h_new only in test: ids 0)                      0 0
    i14  D3   u1   a      -                                                       0 0
    i15  D4   u2   a      c15                                                     1 0
    clicks: c_orph -> orphan, c_mal1 (no impression_id), c_mal2 (ts in seconds) -> malformed
    conversions: v_orph -> orphan, v_mal (no click_id) -> malformed
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

UTC = dt.timezone.utc
D1 = dt.datetime(2026, 1, 1, tzinfo=UTC)


def at(day: int, h: int = 10, m: int = 0, s: int = 0) -> dt.datetime:
    return D1 + dt.timedelta(days=day - 1, hours=h, minutes=m, seconds=s)


def iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


# (partition day, impression_id, ts(str), user, item, pos, hist, shop)
IMPRESSIONS = [
    (1, "i1", iso(at(1)), "u1", "a", 1, ["h1", "h2"], {"s1": 0.5, "s2": 2.0}),
    (1, "i2", iso(at(1)), "u1", "b", 2, ["h1"], {"s1": 1.0}),
    (1, "i3", iso(at(1, 23)), "u2", "a", 1, [], {}),
    (1, "i4", iso(at(1)), "u2", "b", 3, ["h2"], {"s2": 1.5}),
    (1, "i5", iso(at(1)), "u3", "a", 1, None, None),
    (1, "i6", iso(at(1, 10)), "u3", "a", 2, ["h1"], {"s1": 1.0}),   # later copy: duplicate
    (1, "i6", iso(at(1, 9)), "u3", "a", 2, ["h1"], {"s1": 1.0}),    # earliest: kept
    (1, "i7", iso(at(1)), None, "a", 1, [], {}),
    (1, "i8", "garbage", "u1", "a", 1, [], {}),
    (1, "", iso(at(1)), "u1", "a", 1, [], {}),
    (2, "i10", iso(at(2)), "u1", "a", 1, ["h1"], {}),
    (2, "i11", iso(at(2)), "u4", "c", 1, ["h2"], {"s3": 1.0}),
    (2, "i12", iso(at(2)), "u1", "a", 1, ["h1"], {"s1": 1.0}),
    (3, "i13", iso(at(3)), "u9", "z", 1, ["h_new"], {"s9": 1.0}),
    (3, "i14", iso(at(3)), "u1", "a", 2, ["h1"], {}),
    (4, "i15", iso(at(4)), "u2", "a", 1, ["h2"], {}),
]
# (partition day, click_id, impression_id, ts(ms))
CLICKS = [
    (1, "c1", "i1", ms(at(1, 10, 5))),
    (1, "c2", "i2", ms(at(1, 10, 1))),
    (1, "c2b", "i2", ms(at(1, 10, 30))),
    (2, "c3", "i3", ms(at(2, 0, 30))),
    (1, "c4", "i4", ms(at(1, 10, 10))),
    (1, "c5", "i5", ms(at(1, 9, 0))),
    (1, "c6", "i6", ms(at(1, 9, 30))),
    (2, "c11", "i11", ms(at(2, 10, 5))),
    (2, "c12", "i12", ms(at(2, 10, 5))),
    (2, "c12", "i12", ms(at(2, 11, 0))),
    (3, "c_orph", "nope", ms(at(3))),
    (3, "c_mal1", None, ms(at(3))),
    (3, "c_mal2", "i14", ms(at(3)) // 1000),
    (4, "c15", "i15", ms(at(4, 10, 1))),
]
# (partition day, conversion_id, click_id, ts(datetime))
CONVERSIONS = [
    (1, "v1", "c1", at(1, 11)),
    (1, "v2", "c2b", at(1, 11)),
    (3, "v3", "c3", at(3, 1)),
    (8, "v4", "c4", at(8, 10, 11)),
    (1, "v5", "c5", at(1, 12)),
    (2, "v11", "c11", at(2, 10, 0)),
    (9, "v12", "c12", at(9, 10, 5)),
    (9, "v12", "c12", at(9, 10, 6)),
    (3, "v_orph", "nope", at(3)),
    (3, "v_mal", None, at(3)),
]

LABELS = {  # sample_id -> (click, conversion)
    "i1": (1, 1), "i2": (1, 1), "i3": (1, 1), "i4": (1, 0), "i5": (0, 0), "i6": (1, 0),
    "i10": (0, 0), "i11": (1, 0), "i12": (1, 1), "i13": (0, 0), "i14": (0, 0), "i15": (1, 0),
}
REJECTS = {
    "impressions.malformed": 3, "impressions.duplicate": 1,
    "clicks.malformed": 2, "clicks.duplicate": 1, "clicks.orphan": 1, "clicks.before_impression": 1,
    "conversions.malformed": 1, "conversions.duplicate": 1, "conversions.orphan": 2,
    "conversions.before_click": 1, "conversions.outside_window": 1,
}
READ = {"impressions": len(IMPRESSIONS), "clicks": len(CLICKS), "conversions": len(CONVERSIONS)}
USED = {"impressions": 12, "clicks": 9, "conversions": 4}


def day(n: int) -> str:
    return (D1 + dt.timedelta(days=n - 1)).strftime("%Y-%m-%d")


def _by_day(rows):
    out: dict[int, list] = {}
    for r in rows:
        out.setdefault(r[0], []).append(r[1:])
    return out


def write_parquet(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    imp_schema = pa.schema([("impression_id", pa.string()), ("ts", pa.string()), ("user_id", pa.string()),
                            ("item_id", pa.string()), ("pos", pa.int32()), ("hist", pa.list_(pa.string())),
                            ("shop", pa.map_(pa.string(), pa.float32()))])
    clk_schema = pa.schema([("click_id", pa.string()), ("impression_id", pa.string()), ("ts", pa.int64())])
    cnv_schema = pa.schema([("conversion_id", pa.string()), ("click_id", pa.string()),
                            ("ts", pa.timestamp("us", tz="UTC")), ("value", pa.float64())])
    for name, rows, schema in (("impressions", IMPRESSIONS, imp_schema), ("clicks", CLICKS, clk_schema),
                               ("conversions", [r + (9.99,) for r in CONVERSIONS], cnv_schema)):
        for d, part in sorted(_by_day(rows).items()):
            folder = root / name / f"dt={day(d)}"
            folder.mkdir(parents=True, exist_ok=True)
            cols = list(zip(*part))
            arrays = []
            for f, c in zip(schema, cols):
                if pa.types.is_map(f.type):
                    c = [None if v is None else list(v.items()) for v in c]
                arrays.append(pa.array(list(c), type=f.type))
            pq.write_table(pa.Table.from_arrays(arrays, schema=schema), folder / "part-00000.parquet")
    return root


def write_jsonl(root: Path, corrupt_line: bool = True) -> Path:
    """The same logs as JSON Lines; click ts alternate epoch ms and ISO; one corrupt line."""
    for name, rows in (("impressions", IMPRESSIONS), ("clicks", CLICKS), ("conversions", CONVERSIONS)):
        for d, part in sorted(_by_day(rows).items()):
            folder = root / name / f"dt={day(d)}"
            folder.mkdir(parents=True, exist_ok=True)
            lines = []
            for i, r in enumerate(part):
                if name == "impressions":
                    rec = dict(zip(["impression_id", "ts", "user_id", "item_id", "pos", "hist", "shop"], r))
                elif name == "clicks":
                    rec = dict(zip(["click_id", "impression_id", "ts"], r))
                    if i % 2 and rec["ts"] > 10**12:  # ISO for every other valid click
                        rec["ts"] = iso(dt.datetime.fromtimestamp(rec["ts"] / 1000, UTC))
                else:
                    rec = dict(zip(["conversion_id", "click_id", "ts"], r))
                    rec["ts"] = iso(rec["ts"])
                lines.append(json.dumps(rec))
            if corrupt_line and name == "impressions" and d == 1:
                lines.append('{"impression_id": "broken", "ts": ')
            (folder / "part-00000.json").write_text("\n".join(lines) + "\n")
    return root
