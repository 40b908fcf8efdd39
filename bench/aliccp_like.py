"""Ali-CCP-shaped data for the benches, generated in memory (numpy, seeded).

23 single-valued id fields named as in Ali-CCP (user profile 101..129, item side
205..216, the combination features 508..853, position 301 and the four 14-day
behaviour fields, here single-valued), with Zipf-distributed ids (id 1 the most
frequent, as a count-sorted vocabulary gives; 0 = out of vocabulary), scaled so
that 1M rows see each user ~20 times. Labels come from a few fields' hidden
effects: CTR about 4 %, CVR about 5 % of clicks, with the item/shop/user effects
shared between click and conversion, so both AUCs mean something and the shared
embedding has something to teach.

    data = make(1_000_000, 200_000, seed=0)      # {"train": Split, "test": Split}
    write_shards(data, "/tmp/DATA", shards=4)    # the project's shard + manifest contract

Reads back with ``read_shards(DATA)`` (pyarrow only), so every contender of
bench/train.py trains on the same files.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

# (name, vocab_size incl. id 0, zipf exponent, group)
FIELDS: list[tuple[str, int, float, str]] = [
    ("101", 50_000, 0.6, "user"),     # user_id
    ("121", 98, 1.0, "user"),         # user categorical id
    ("122", 14, 0.8, "user"),         # user group
    ("124", 3, 0.5, "user"),          # gender
    ("125", 8, 0.6, "user"),          # age
    ("126", 4, 0.6, "user"),          # consumption level 1
    ("127", 4, 0.6, "user"),          # consumption level 2
    ("128", 3, 0.5, "user"),          # occupation
    ("129", 5, 0.6, "user"),          # geography
    ("205", 120_000, 1.0, "item"),    # item_id
    ("206", 6_000, 1.0, "item"),      # category
    ("207", 60_000, 1.0, "item"),     # shop
    ("210", 30_000, 1.0, "item"),     # intention node
    ("216", 40_000, 1.0, "item"),     # brand
    ("508", 6_000, 1.0, "combo"),     # user-cate
    ("509", 120_000, 1.0, "combo"),   # user-shop
    ("702", 80_000, 1.0, "combo"),    # user-brand
    ("853", 30_000, 1.0, "combo"),    # user-intention
    ("301", 4, 0.8, "context"),       # position
    ("109_14", 6_000, 1.0, "user"),   # 14-day category behaviour
    ("110_14", 60_000, 1.0, "user"),  # 14-day shop behaviour
    ("127_14", 40_000, 1.0, "user"),  # 14-day brand behaviour
    ("150_14", 30_000, 1.0, "user"),  # 14-day intention behaviour
]
# vocab="real": the sizes of the real Ali-CCP fields (ESMM paper Table 1: ~0.4M users, ~4.3M
# items; shop/brand/category as bench/aliccp.py writes them; the crosses and 14-day lists sized
# like the field they cross or list; the small user-profile and context fields as above).
# About 9.2M embedding rows in all, against ~0.7M for the default sizes.
REAL_VOCAB = {"101": 400_000, "205": 4_300_000, "206": 10_000, "207": 400_000, "210": 100_000, "216": 200_000,
              "508": 60_000, "509": 1_500_000, "702": 1_000_000, "853": 500_000,
              "109_14": 10_000, "110_14": 400_000, "127_14": 200_000, "150_14": 100_000}
VOCABS = ("bench", "real")


def fields_for(vocab: str = "bench") -> list[tuple[str, int, float, str]]:
    """FIELDS with the vocabulary sizes ``vocab`` names (bench | real)."""
    if vocab not in VOCABS:
        raise ValueError(f"vocab must be one of {VOCABS}, got {vocab!r}")
    if vocab == "bench":
        return list(FIELDS)
    return [(n, REAL_VOCAB.get(n, v), a, g) for n, v, a, g in FIELDS]


NAMES = [f[0] for f in FIELDS]
VOCAB = {f[0]: f[1] for f in FIELDS}
GROUP = {f[0]: f[3] for f in FIELDS}
USER = [n for n in NAMES if GROUP[n] == "user"]
ITEM = [n for n in NAMES if GROUP[n] != "user"]  # item, combination and context fields

# fields whose ids move the labels, and how strongly (std of the hidden per-id effect)
CLICK_EFFECT = {"101": 0.6, "205": 0.8, "207": 0.4, "206": 0.4, "301": 0.5, "125": 0.2}
CONV_EFFECT = {"101": 0.5, "205": 0.7, "207": 0.5, "216": 0.3, "124": 0.2}
SHARED = 0.6  # share of each conversion effect that is the click effect of the same id
CTR_TARGET, CVR_TARGET = 0.04, 0.05
OOV_RATE = 0.01


@dataclass
class Split:
    ids: np.ndarray  # int64 [N, 23], field-local ids in [0, vocab)
    click: np.ndarray  # int8 [N]
    conversion: np.ndarray  # int8 [N], conversion implies click
    p_click: np.ndarray | None = None  # float64 [N] true click probability (``make`` only)
    p_cvr: np.ndarray | None = None  # float64 [N] true conversion probability given a click

    def __len__(self) -> int:
        return len(self.click)


def _zipf_ids(rng: np.random.Generator, n: int, vocab: int, a: float) -> np.ndarray:
    ranks = np.arange(1, vocab, dtype=np.float64)
    cdf = np.cumsum(ranks ** -a)
    ids = np.searchsorted(cdf, rng.random(n) * cdf[-1]) + 1
    ids[rng.random(n) < OOV_RATE] = 0
    return ids.astype(np.int64)


def _calibrate(logit: np.ndarray, rate: float) -> float:
    """Bias b with mean(sigmoid(logit + b)) == rate (bisection, 40 steps)."""
    lo, hi = -20.0, 20.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(logit + mid)))) > rate:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


def make(n_train: int = 1_000_000, n_test: int = 200_000, seed: int = 0, vocab: str = "bench") -> dict[str, Split]:
    """Train and test splits drawn from one distribution (test rows come after train rows);
    ``vocab`` picks the fields' vocabulary sizes (``fields_for``)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    fields = fields_for(vocab)
    sizes = {f[0]: f[1] for f in fields}
    ids = np.stack([_zipf_ids(rng, n, v, a) for _, v, a, _ in fields], axis=1)
    col = {name: i for i, name in enumerate(NAMES)}
    click_logit = np.zeros(n)
    conv_logit = np.zeros(n)
    for name in sorted(set(CLICK_EFFECT) | set(CONV_EFFECT)):
        v, sc, sv = sizes[name], CLICK_EFFECT.get(name, 0.0), CONV_EFFECT.get(name, 0.0)
        ce = rng.normal(0, 1, v)
        ve = rng.normal(0, 1, v)
        if sc and sv:  # the same id moves both: correlation SHARED between its two effects
            ve = SHARED * ce + np.sqrt(1 - SHARED ** 2) * ve
        ce, ve = sc * ce, sv * ve
        ce[0] = ve[0] = 0.0  # out of vocabulary carries no signal
        click_logit += ce[ids[:, col[name]]]
        conv_logit += ve[ids[:, col[name]]]
    click_logit += _calibrate(click_logit[:n_train], CTR_TARGET)
    p_click = 1 / (1 + np.exp(-click_logit))
    click = rng.random(n) < p_click
    conv_logit += _calibrate(conv_logit[:n_train][click[:n_train]], CVR_TARGET)
    p_cvr = 1 / (1 + np.exp(-conv_logit))
    conversion = click & (rng.random(n) < p_cvr)
    split = lambda s: Split(ids[s], click[s].astype(np.int8), conversion[s].astype(np.int8),  # noqa: E731
                            p_click[s], p_cvr[s])
    return {"train": split(slice(0, n_train)), "test": split(slice(n_train, n))}


def write_shards(data: dict[str, Split], root: str, shards: int = 4,
                 days: dict[str, str] | None = None, row_group: int = 65_536, vocab: str = "bench",
                 seed: int | None = None) -> str:
    """Writes ``data`` as ROOT/manifest.json + Parquet shards in the project's contract.

    Args:
        data (dict[str, Split]): ``{"train": ..., "test": ...}`` from ``make``.
        root (str): output folder (created; existing shards are overwritten).
        shards (int): files per split.
        days (dict[str, str] | None): the ``dt=`` day per split.
        row_group (int): Parquet row group size.
        vocab (str): the vocabulary sizes ``data`` was made with (``make(..., vocab=)``).
        seed (int | None): ``make``'s seed, recorded so a bench can recompute the truth.

    Returns:
        str: the manifest's path.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    days = days or {"train": "2026-01-01", "test": "2026-01-02"}
    base_ts = {"train": np.datetime64("2026-01-01T00:00:00", "us"),
               "test": np.datetime64("2026-01-02T00:00:00", "us")}
    splits = {}
    for name, s in data.items():
        n = len(s)
        files = []
        for k, part in enumerate(np.array_split(np.arange(n), shards)):
            rel = f"{name}/dt={days[name]}/part-{k:05d}.parquet"
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            m = len(part)
            offsets = pa.array(np.arange(m + 1, dtype=np.int32))
            cols = {
                "sample_id": pa.array([f"{name}-{i}" for i in part], pa.string()),
                "ts": pa.array(base_ts[name] + (part * 50).astype("timedelta64[us]"),
                               pa.timestamp("us", tz="UTC")),
                "click": pa.array(s.click[part], pa.int8()),
                "conversion": pa.array(s.conversion[part], pa.int8()),
            }
            for j, field in enumerate(NAMES):
                cols[field] = pa.ListArray.from_arrays(offsets, pa.array(s.ids[part, j], pa.int64()))
            pq.write_table(pa.table(cols), path, row_group_size=row_group)
            files.append(rel)
        splits[name] = {
            "days": [days[name]], "impressions": int(n), "clicks": int(s.click.sum()),
            "conversions": int(s.conversion.sum()),
            "users": int(len(np.unique(s.ids[:, 0]))), "items": int(len(np.unique(s.ids[:, NAMES.index("205")]))),
            "files": files,
        }
    manifest = {
        "format_version": 1,
        "created_by": "bench/aliccp_like.py",
        "created_at": "2026-12-01T00:00:00Z",
        "inputs": {"kind": "bench", "logs": None, "truth": None, "start": None, "end": None,
                   "window_days": 7, "split_date": days["test"], "features": None},
        "fields": [{"name": n, "kind": "single", "vocab_size": v, "group": g} for n, v, _, g in fields_for(vocab)],
        "bench": {"vocab": vocab, "seed": seed},
        "splits": splits,
        "read": {"impressions": sum(len(s) for s in data.values()),
                 "clicks": sum(int(s.click.sum()) for s in data.values()),
                 "conversions": sum(int(s.conversion.sum()) for s in data.values())},
        "rejects": {},
    }
    path = os.path.join(root, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    open(os.path.join(root, "_SUCCESS"), "w").close()
    return path


def _flat(col) -> np.ndarray:
    """A field column's ids: an int64 column (single fields, format 2) or its lists' values."""
    import pyarrow as pa

    return col.to_numpy() if pa.types.is_integer(col.type) else col.flatten().to_numpy()


def read_shards(root: str) -> tuple[dict[str, Split], list[dict]]:
    """Reads a split-by-split copy of what ``write_shards`` wrote (single-valued fields only).

    Returns:
        tuple: ``({"train": Split, "test": Split}, manifest["fields"])``.
    """
    import pyarrow.parquet as pq

    with open(os.path.join(root, "manifest.json")) as f:
        manifest = json.load(f)
    fields = manifest["fields"]
    out = {}
    for name, sp in manifest["splits"].items():
        tables = [pq.read_table(os.path.join(root, rel), columns=["click", "conversion"] +
                                [fd["name"] for fd in fields]) for rel in sp["files"]]
        ids = np.stack([np.concatenate([_flat(t.column(fd["name"]).combine_chunks()) for t in tables])
                        for fd in fields], axis=1)
        if len(ids) != sp["impressions"]:
            raise ValueError(f"{root}: split {name} has multi-valued or missing ids ({len(ids)} values "
                             f"for {sp['impressions']} rows); the bench readers take single-valued fields")
        click = np.concatenate([t.column("click").to_numpy() for t in tables]).astype(np.int8)
        conv = np.concatenate([t.column("conversion").to_numpy() for t in tables]).astype(np.int8)
        out[name] = Split(ids.astype(np.int64), click, conv)
    return out, fields


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Exact ROC AUC over the whole set, ties counted half (average ranks)."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p, kind="mergesort")
    ps = p[order]
    ranks = np.empty(len(p))
    # average rank of each run of tied scores
    starts = np.r_[0, np.flatnonzero(np.diff(ps)) + 1]
    ends = np.r_[starts[1:], len(ps)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def esmm_aucs(split: Split, p_ctr: np.ndarray, p_cvr: np.ndarray) -> dict[str, float]:
    """The paper's three test AUCs: CTR (all), CTCVR (all), CVR (clicked only)."""
    clicked = split.click == 1
    return {
        "ctr_auc": auc(split.click, p_ctr),
        "ctcvr_auc": auc(split.conversion, p_ctr * p_cvr),
        "cvr_auc_clicked": auc(split.conversion[clicked], p_cvr[clicked]),
    }


def embedding_batches(steps: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """``steps`` batches of [batch, 23] field-local ids from the same distribution (for bench/shard*.py)."""
    rng = np.random.default_rng(seed)
    return [np.stack([_zipf_ids(rng, batch, v, a) for _, v, a, _ in FIELDS], axis=1) for _ in range(steps)]


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description="write Ali-CCP-shaped bench shards")
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--test-rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--vocab", choices=VOCABS, default="bench",
                    help="field vocabulary sizes: bench (~0.7M rows) or real (Ali-CCP's, ~9.2M rows)")
    a = ap.parse_args()
    t = time.time()
    d = make(a.rows, a.test_rows, a.seed, a.vocab)
    t1 = time.time()
    write_shards(d, a.out, a.shards, vocab=a.vocab, seed=a.seed)
    tr = d["train"]
    print(f"generated in {t1 - t:.1f}s, written in {time.time() - t1:.1f}s: {len(tr)} train rows, "
          f"CTR {tr.click.mean():.4f}, CVR|click {tr.conversion[tr.click == 1].mean():.4f}")
