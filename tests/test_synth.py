"""esmm synth: layout of the raw-log contract, determinism, the counterfactual identity,
event order, rates, selection bias and the CLI. Real Parquet, no Spark (a few seconds)."""
from __future__ import annotations

import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl.errors import InputError
from etl.synth import SynthConfig, build_world, resolve, simulate
from jobs import synth as synth_job

REPO = Path(__file__).resolve().parents[1]
# dense events so that every rule is exercised on a small log: several chunks per day,
# double clicks, conversions past the window and past the last impression day
DENSE = dict(impressions=30_000, days=3, seed=7, chunk_size=4_000, ctr=0.2, cvr=0.3,
             late_conversion_rate=0.2, double_click_rate=0.1)


def read(root: Path, table: str) -> pd.DataFrame:
    return pq.read_table(root / table, partitioning="hive").to_pandas()


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "logs"
    knobs = {k: v for k, v in DENSE.items() if k not in ("impressions", "days", "seed")}
    summary = simulate(out, DENSE["impressions"], DENSE["days"], DENSE["seed"], **knobs)
    return out, summary


@pytest.fixture(scope="module")
def default_rates(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "logs"
    return out, simulate(out, impressions=300_000, days=2, seed=3)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(dense, tmp_path):
    out, _ = dense
    knobs = {k: v for k, v in DENSE.items() if k not in ("impressions", "days", "seed")}
    simulate(tmp_path / "again", DENSE["impressions"], DENSE["days"], DENSE["seed"], **knobs)
    a, b = files(out), files(tmp_path / "again")
    assert a.keys() == b.keys() and len(a) > 20
    assert [k for k in a if a[k] != b[k]] == []
    simulate(tmp_path / "other", DENSE["impressions"], DENSE["days"], DENSE["seed"] + 1, **knobs)
    x, y = read(out, "impressions"), read(tmp_path / "other", "impressions")
    assert len(x) == len(y) and not x["user_id"].equals(y["user_id"])
    assert not read(out, "truth")["p_click"].equals(read(tmp_path / "other", "truth")["p_click"])


def test_layout_columns_and_success_markers(dense):
    out, s = dense
    days = [(date(2026, 1, 1) + timedelta(days=d)).isoformat() for d in range(3)]
    imp_dirs = sorted(p.name for p in (out / "impressions").iterdir())
    assert imp_dirs == [f"dt={d}" for d in days]
    for table in ("impressions", "clicks", "conversions"):
        dirs = sorted((out / table).iterdir())
        assert dirs and all(p.name.startswith("dt=") for p in dirs)
        for d in dirs:
            assert (d / "_SUCCESS").is_file(), d
            assert list(d.glob("part-*.parquet")), d
    # conversions past the window land in partitions after the last impression day
    conv_days = sorted(p.name[3:] for p in (out / "conversions").iterdir())
    assert conv_days[-1] > days[-1] and s["days"]["conversions"] == conv_days

    imp = pq.read_schema(next((out / "impressions").rglob("*.parquet")))
    ts = pa.timestamp("us", tz="UTC")
    want = {"impression_id": pa.string(), "ts": ts, "user_id": pa.string(), "item_id": pa.string(),
            "position": pa.int32(), "category": pa.string(), "shop": pa.string(), "brand": pa.string(),
            "price_level": pa.int32(), "gender": pa.string(), "age": pa.int32(), "city": pa.string(),
            "hist_cate": pa.list_(pa.string()), "hist_shop": pa.map_(pa.string(), pa.float32())}
    assert {f.name: f.type for f in imp} == want
    clk = pq.read_schema(next((out / "clicks").rglob("*.parquet")))
    assert {f.name: f.type for f in clk} == {"click_id": pa.string(), "impression_id": pa.string(), "ts": ts}
    conv = pq.read_schema(next((out / "conversions").rglob("*.parquet")))
    assert {f.name: f.type for f in conv} == {"conversion_id": pa.string(), "click_id": pa.string(),
                                             "ts": ts, "value": pa.float64()}
    truth = pq.read_schema(next((out / "truth").rglob("*.parquet")))
    assert {f.name: f.type for f in truth} == {"impression_id": pa.string(), "p_click": pa.float64(),
                                              "p_convert": pa.float64(), "would_convert": pa.int8()}


def test_events_sit_in_their_own_day_partition(dense):
    out, _ = dense
    for table in ("impressions", "clicks", "conversions"):
        df = read(out, table)
        assert (df["ts"].dt.strftime("%Y-%m-%d") == df["dt"].astype(str)).all(), table
    clicks = read(out, "clicks").merge(read(out, "impressions")[["impression_id", "dt"]], on="impression_id",
                                       suffixes=("", "_imp"))
    assert (clicks["dt"].astype(str) > clicks["dt_imp"].astype(str)).any()  # some cross midnight


def test_counterfactual_identity_and_ids(dense):
    out, s = dense
    imp, clk, conv, truth = (read(out, t) for t in ("impressions", "clicks", "conversions", "truth"))
    assert imp["impression_id"].is_unique and clk["click_id"].is_unique and conv["conversion_id"].is_unique
    assert len(imp) == len(truth) == DENSE["impressions"]
    assert set(truth["impression_id"]) == set(imp["impression_id"])
    assert set(clk["impression_id"]) <= set(imp["impression_id"])
    assert set(conv["click_id"]) <= set(clk["click_id"])
    assert clk["impression_id"].duplicated().sum() > 0  # second clicks exist
    t = truth.set_index("impression_id")
    clicked = t.index.isin(clk["impression_id"])
    converted_imps = conv.merge(clk, on="click_id")["impression_id"]
    assert converted_imps.is_unique
    converted = t.index.isin(converted_imps)
    # the identity, for every impression: converted <=> clicked AND would_convert
    assert (converted == (clicked & (t["would_convert"] == 1).to_numpy())).all()
    assert converted.sum() == s["conversions"] > 0 and clicked.sum() == s["clicked_impressions"]
    assert t["would_convert"][~clicked].sum() > 0  # drawn for the unclicked space too
    assert ((t["p_click"] > 0) & (t["p_click"] < 1) & (t["p_convert"] > 0) & (t["p_convert"] < 1)).all()


def test_event_order_and_delays(dense):
    out, _ = dense
    imp, clk, conv = (read(out, t) for t in ("impressions", "clicks", "conversions"))
    c = clk.merge(imp[["impression_id", "ts"]], on="impression_id", suffixes=("", "_imp"))
    assert len(c) == len(clk) and (c["ts"] >= c["ts_imp"]).all()
    v = conv.merge(clk[["click_id", "ts"]], on="click_id", suffixes=("", "_clk"))
    assert len(v) == len(conv) and (v["ts"] >= v["ts_clk"]).all()
    late = (v["ts"] - v["ts_clk"]) > pd.Timedelta(days=7)
    assert 0.1 < late.mean() < 0.3  # late_conversion_rate=0.2: the window rule matters
    assert (conv["value"] > 0).all()


def test_rates_at_defaults_and_configured(default_rates, dense):
    _, s = default_rates
    assert s["users"] == 1500 and s["items"] == 1000  # derived: N/200, N/300
    assert 0.036 < s["ctr"] < 0.044 and abs(s["mean_p_click"] - 0.04) < 0.002
    assert 0.04 < s["cvr"] < 0.06
    assert 0 < s["late_conversions"] < 0.1 * s["conversions"]
    _, d = dense
    assert 0.19 < d["ctr"] < 0.21 and 0.27 < d["cvr"] < 0.33


def test_ids_frequent_and_hierarchy_fixed(default_rates):
    out, _ = default_rates
    imp = read(out, "impressions")
    per_item = imp["item_id"].value_counts()
    assert per_item.median() >= 100  # an embedding can learn ids of this frequency
    for parent in ("category", "shop", "brand", "price_level"):
        assert (imp.groupby("item_id")[parent].nunique() == 1).all(), parent
    for field in ("gender", "age", "city"):
        assert (imp.groupby("user_id")[field].nunique() == 1).all(), field
    # each brand belongs to one category (the hierarchy item -> brand -> category)
    assert (imp.groupby("brand")["category"].nunique() == 1).all()


def test_selection_bias_and_informative_fields(default_rates):
    out, s = default_rates
    imp, clk, truth = (read(out, t) for t in ("impressions", "clicks", "truth"))
    df = imp.merge(truth, on="impression_id")
    df["clicked"] = df["impression_id"].isin(clk["impression_id"])
    # SHARED factors: the clicked are the likelier converters, so a CVR fit on clicks alone
    # overestimates conversion on the unclicked space
    all_cvr, clicked_cvr = df["p_convert"].mean(), df.loc[df["clicked"], "p_convert"].mean()
    assert clicked_cvr > 1.5 * all_cvr
    assert abs(clicked_cvr - s["mean_p_convert_clicked"]) < 1e-9
    # click-only causes: clickbait and position are over-represented among the clicked, and
    # clickbait lowers conversion
    w = build_world(resolve(SynthConfig(impressions=300_000, days=2, seed=3)))
    bait = w.clickbait[df["item_id"].str[2:].astype(int).to_numpy()]
    assert bait[df["clicked"]].mean() > bait.mean() + 0.2
    assert df.loc[df["clicked"], "position"].mean() < df["position"].mean() - 0.5
    hi = bait > 1
    assert df.loc[hi, "p_click"].mean() > df.loc[~hi, "p_click"].mean()
    # behaviour lists are informative: an item in one of the user's recent categories gets
    # clicked and converts more
    in_hist = np.array([c in h for c, h in zip(df["category"], df["hist_cate"])])
    assert df.loc[in_hist, "p_click"].mean() > 1.2 * df.loc[~in_hist, "p_click"].mean()
    assert df.loc[in_hist, "p_convert"].mean() > 1.2 * df.loc[~in_hist, "p_convert"].mean()


def test_rerun_replaces_and_foreign_folder_refused(tmp_path):
    out = tmp_path / "logs"
    simulate(out, impressions=2_000, days=2, seed=1)
    simulate(out, impressions=1_000, days=1, seed=1)
    assert sorted(p.name for p in (out / "impressions").iterdir()) == ["dt=2026-01-01"]
    assert len(read(out, "truth")) == 1_000
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not a previous synth output"):
        simulate(tmp_path / "foreign", impressions=100, days=1)
    assert (tmp_path / "foreign" / "keep.txt").exists()
    with pytest.raises(InputError, match="unknown knob 'ctrr'"):
        simulate(out, impressions=100, days=1, ctrr=0.1)


@pytest.mark.parametrize("argv, msg", [
    (["--impressions", "10"], "--out"),
    (["--out", "X", "--impressions", "0"], "impressions=0"),
    (["--out", "X", "--days", "two"], "--days"),
    (["--out", "X", "--ctr", "1.2"], "ctr=1.2"),
    (["--out", "X", "--set", "nope=1"], "nope=1"),
    (["--out", "X", "--set", "w_price=abc"], "w_price"),
])
def test_cli_bad_args_exit_2_one_line(argv, msg, tmp_path, capsys):
    argv = [str(tmp_path / "o") if a == "X" else a for a in argv]
    assert synth_job.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("esmm: error: synth:") and msg in err


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "logs"
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "synth", "--out", str(out), "--impressions", "3000",
                        "--days", "2", "--seed", "5", "--set", "w_shared_convert=1.5"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "3,000 impressions" in r.stdout
    assert len(read(out, "impressions")) == 3000
    assert '"w_shared_convert": 1.5' in (out / "_synth.json").read_text()
