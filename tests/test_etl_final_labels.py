"""Final labels of ranged runs (``--click-horizon-days H``, window W): nothing lost silently.

Days E1..E5 = 2026-02-01..05, H = 1, W = 2 days; daily runs (start = end):

    imp  day        click                conversion              run E1     run E2
    j1   E2 23:00   c1 E3 00:30          v1 E5 00:30 (= W later)  -          y=1 z=1
    j2   E1 10:00   c2 E3 10:00 (> E1+H) v2 E4 10:00              y=0 z=0    c2, v2 after_horizon
    j3   E1 12:00   c3 E2 01:00          v3 E4 00:30              y=1 z=1    c3, v3 out_of_range
    j4   E2 09:00   c4 E2 09:30          v4 E2 10:00              (c4, v4 out_of_range)  y=1 z=1
    j5   E3 08:00   c5 E3 08:10          -                        -          c5 out_of_range
    j6   E2 09:00   -                    -                        -          y=0 z=0

Run E1 reads clicks E1..E2 and conversions E1..E4; v2 follows c2, a click after its
horizon (read as an id): out of range, not an orphan. Run E2 reads clicks E2..E3 and
conversions E2..E5, so j1 (clicked after midnight, converting W after the click) gets
z = 1, and c2 (a click on E1's impression later than E1 + H, which run E1 never read)
and its conversion are counted under ``after_horizon``.
"""
from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl.pipeline import run_etl

UTC = dt.timezone.utc


def t(day, h, m=0):
    return dt.datetime(2026, 2, day, h, m, tzinfo=UTC)


IMPS = [("j1", t(2, 23)), ("j2", t(1, 10)), ("j3", t(1, 12)), ("j4", t(2, 9)), ("j5", t(3, 8)), ("j6", t(2, 9))]
CLICKS = [("c1", "j1", t(3, 0, 30)), ("c2", "j2", t(3, 10)), ("c3", "j3", t(2, 1)), ("c4", "j4", t(2, 9, 30)),
          ("c5", "j5", t(3, 8, 10))]
CONVS = [("v1", "c1", t(5, 0, 30)), ("v2", "c2", t(4, 10)), ("v3", "c3", t(4, 0, 30)), ("v4", "c4", t(2, 10))]


def E(n):
    return f"2026-02-{n:02d}"


def write_logs(root):
    ts = pa.timestamp("us", tz="UTC")
    for name, rows, cols in (("impressions", IMPS, ["impression_id", "ts"]),
                             ("clicks", CLICKS, ["click_id", "impression_id", "ts"]),
                             ("conversions", CONVS, ["conversion_id", "click_id", "ts"])):
        by_day: dict = {}
        for r in rows:
            by_day.setdefault(r[-1].date().isoformat(), []).append(r)
        for d, part in by_day.items():
            data = {c: [r[i] for r in part] for i, c in enumerate(cols)}
            if name == "impressions":
                data["user_id"] = ["u"] * len(part)
                data["item_id"] = ["a"] * len(part)
            table = pa.table({k: pa.array(v, type=ts if k == "ts" else pa.string()) for k, v in data.items()})
            (root / name / f"dt={d}").mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / name / f"dt={d}" / "part-0.parquet")
    return root


def labels(out):
    m = json.loads((out / "manifest.json").read_text())
    got = {}
    for s in m["splits"].values():
        for f in s["files"]:
            for r in pq.read_table(out / f).to_pylist():
                got[r["sample_id"]] = (r["click"], r["conversion"])
    return got


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return write_logs(tmp_path_factory.mktemp("final") / "logs")


def daily(spark, logs, out, d):
    return run_etl(spark, str(logs), str(out), start=E(d), end=E(d), split_date=E(d + 1), window_days=2,
                   click_horizon_days=1, shards=1)


def test_last_day_clicked_after_midnight_converting_w_later_is_labelled(spark, logs, tmp_path):
    m = daily(spark, logs, tmp_path / "e2", 2)
    assert labels(tmp_path / "e2") == {"j1": (1, 1), "j4": (1, 1), "j6": (0, 0)}
    assert m["inputs"]["days"] == {"impressions": [E(2)], "clicks": [E(2), E(3)],
                                   "conversions": [E(2), E(4), E(5)]}
    assert m["inputs"]["click_horizon_days"] == 1
    assert m["read"] == {"impressions": 3, "clicks": 5, "conversions": 4}
    assert m["used"] == {"impressions": 3, "clicks": 2, "conversions": 2}
    assert m["out_of_range"] == {"clicks": 2, "conversions": 1}  # c3, c5; v3
    assert m["after_horizon"] == {"clicks": 1, "conversions": 1}  # c2 and v2: read by no run
    assert sum(m["rejects"].values()) == 0
    for tb in ("clicks", "conversions"):
        assert m["read"][tb] == m["used"][tb] + m["out_of_range"][tb] + m["after_horizon"][tb]


def test_previous_day_counts_the_late_click_nowhere_and_rejects_nothing(spark, logs, tmp_path):
    m = daily(spark, logs, tmp_path / "e1", 1)
    assert labels(tmp_path / "e1") == {"j2": (0, 0), "j3": (1, 1)}
    assert m["inputs"]["days"] == {"impressions": [E(1)], "clicks": [E(2)],
                                   "conversions": [E(2), E(4)]}
    assert m["used"] == {"impressions": 2, "clicks": 1, "conversions": 1}
    assert m["out_of_range"] == {"clicks": 1, "conversions": 2}  # c4; v4, v2 (c2 is read as an id)
    assert m["after_horizon"] == {"clicks": 0, "conversions": 0}
    assert sum(m["rejects"].values()) == 0  # v2 is not an orphan


def test_a_longer_horizon_labels_the_late_click(spark, logs, tmp_path):
    """H = 2: run E1 reads c2 (E3) and v2 (E4 <= E1 + 2 + 2): j2 gets y = 1, z = 1."""
    out = tmp_path / "e1h2"
    m = run_etl(spark, str(logs), str(out), start=E(1), end=E(1), split_date=E(2), window_days=2,
                click_horizon_days=2, shards=1)
    assert labels(out) == {"j2": (1, 1), "j3": (1, 1)}
    assert m["inputs"]["days"]["clicks"] == [E(2), E(3)]
