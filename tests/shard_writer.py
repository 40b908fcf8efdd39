"""Writes a DATA dir by the README's shard contract with pyarrow (no Spark), for tests.

The labels come from a small latent-factor world: click and conversion both depend
on user x item affinities that share a part, so ESMM has something to learn; the
truth table (p_click, p_convert, would_convert per impression) goes to LOGS/truth/.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FIELDS = [
    {"name": "user_id", "kind": "single", "vocab_size": 0, "group": "user"},
    {"name": "item_id", "kind": "single", "vocab_size": 0, "group": "item"},
    {"name": "cate_id", "kind": "single", "vocab_size": 0, "group": "item"},
    {"name": "hist_cate", "kind": "multi", "vocab_size": 0, "group": "user"},
    {"name": "hist_item", "kind": "weighted", "vocab_size": 0, "group": "user", "weights": "hist_item__w"},
]


def _lists(rng, n, vocab, max_len, min_len=0):
    lengths = rng.integers(min_len, max_len + 1, n)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = rng.integers(0, vocab, offsets[-1]).astype(np.int64)
    return offsets, values


def write_data(root, n_train=2000, n_test=1000, users=50, items=80, cates=10, seed=0, days=4,
               shards_per_day=2, hist_len=5, truth=True, ctr_bias=-2.0, cvr_bias=-1.0):
    """Write ROOT/data (manifest + shards) and, with ``truth``, ROOT/logs/truth/. Returns the data dir."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    data, truth_dir = root / "data", root / "logs" / "truth"
    uf, itf, cf = rng.normal(size=(users, 4)), rng.normal(size=(items, 4)), rng.normal(size=(cates, 4))
    item_cate = rng.integers(1, cates, items)
    vocab = {"user_id": users, "item_id": items, "cate_id": cates, "hist_cate": cates, "hist_item": items}
    fields = [{**f, "vocab_size": vocab[f["name"]]} for f in FIELDS]
    start = dt.date(2026, 1, 1)
    all_days = [str(start + dt.timedelta(d)) for d in range(days)]
    n_total = n_train + n_test
    split_of_day = {d: ("train" if i < days // 2 else "test") for i, d in enumerate(all_days)}
    manifest_splits = {s: {"days": [], "impressions": 0, "clicks": 0, "conversions": 0, "users": users,
                           "items": items, "files": []} for s in ("train", "test")}
    truth_tables = []
    row0 = 0
    for di, day in enumerate(all_days):
        split = split_of_day[day]
        n = (n_train if split == "train" else n_test) // (days // 2 if split == "train" else days - days // 2)
        u = rng.integers(1, users, n)
        it = rng.integers(1, items, n)
        c = item_cate[it]
        aff = (uf[u] * itf[it]).sum(1) + (uf[u] * cf[c]).sum(1)
        p_click = 1 / (1 + np.exp(-(ctr_bias + aff)))
        p_conv = 1 / (1 + np.exp(-(cvr_bias + 0.8 * aff + (uf[u, :2] * itf[it, 2:]).sum(1))))
        click = (rng.random(n) < p_click).astype(np.int8)
        would = (rng.random(n) < p_conv).astype(np.int8)
        conv = (click * would).astype(np.int8)
        ids = np.array([f"imp-{row0 + i:08d}" for i in range(n)], dtype=object)
        row0 += n
        hc_off, hc_val = _lists(rng, n, cates, hist_len)
        hi_off, hi_val = _lists(rng, n, items, hist_len)
        hi_w = rng.random(hi_val.size).astype(np.float32)
        ts = np.datetime64(day) + (rng.integers(0, 86400, n) * 1_000_000).astype("timedelta64[us]")
        cols = {
            "sample_id": pa.array(ids, pa.string()),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "click": pa.array(click, pa.int8()), "conversion": pa.array(conv, pa.int8()),
            "user_id": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.array(u, pa.int64())),
            "item_id": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.array(it, pa.int64())),
            "cate_id": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.array(c, pa.int64())),
            "hist_cate": pa.ListArray.from_arrays(pa.array(hc_off), pa.array(hc_val)),
            "hist_item": pa.ListArray.from_arrays(pa.array(hi_off), pa.array(hi_val)),
            "hist_item__w": pa.ListArray.from_arrays(pa.array(hi_off), pa.array(hi_w, pa.float32())),
        }
        table = pa.table(cols)
        ms = manifest_splits[split]
        ms["days"].append(day)
        ms["impressions"] += n
        ms["clicks"] += int(click.sum())
        ms["conversions"] += int(conv.sum())
        for k, part in enumerate(np.array_split(np.arange(n), shards_per_day)):
            rel = f"{split}/dt={day}/part-{k:05d}.parquet"
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.take(pa.array(part)), data / rel)
            ms["files"].append(rel)
        truth_tables.append(pa.table({"impression_id": cols["sample_id"], "p_click": p_click,
                                      "p_convert": p_conv, "would_convert": pa.array(would, pa.int8())}))
    if truth:
        truth_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(truth_tables), truth_dir / "part-00000.parquet")
    manifest = {
        "format_version": 1, "created_by": "tests/shard_writer.py", "created_at": "2026-12-01T10:00:00Z",
        "inputs": {"kind": "logs", "logs": str(root / "logs"), "truth": str(truth_dir) if truth else None,
                   "start": None, "end": None, "window_days": 7,
                   "split_date": manifest_splits["test"]["days"][0], "features": None},
        "fields": fields, "splits": manifest_splits,
        "read": {"impressions": row0, "clicks": 0, "conversions": 0}, "rejects": {},
    }
    (data / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (data / "_SUCCESS").write_text("")
    return data
