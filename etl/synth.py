"""Simulated impression / click / conversion logs with a known truth (``esmm synth``).

The world, in one screen (the logits are in :func:`true_logits`):

    users  u: gender, age, city; shared factor u_s (partly from gender x age), a shared
              engagement bias, click-only taste u_c and click-happiness, conversion-only
              taste u_v, price sensitivity (partly from the city)
    items  i: category, brand (nested in the category), shop; shared factor v_s built
              from the hierarchy (category + brand + shop + item's own part), a shared
              appeal bias, click-only v_c and "clickbait", conversion-only v_v, quality,
              price (level 0..9 is logged)
    click      logit = b_c + SHARED + <u_c, v_c> + clickbait + click-happiness + position
    conversion logit = b_v + SHARED + <u_v, v_v> + quality - clickbait - price sensitivity x price
    SHARED = <u_s, v_s> + 0.9 user engagement + 1.0 item appeal: what a shared embedding transfers.

Selection bias: what gets clicked (good position, clickbait, click-happy users) is not
what converts (quality, cheap for the price-sensitive), while SHARED raises both; so the
clicked impressions are a biased sample of the entire space. b_c and b_v are calibrated
so that the mean p(click) is ``ctr`` and conversions are ``cvr`` of clicks.

Every id carries its factors, so an embedding model can learn them; the behaviour lists
(``hist_cate``, weighted ``hist_shop``) are drawn from the user's preferred categories and
shops. Users and items have Zipf popularity; with the default counts (users = N/200,
items = N/300) the median item gets ~150 impressions and the median user ~130.

Output (the raw-log contract of DESIGN.md), days from ``start``::

    OUT/impressions/dt=YYYY-MM-DD/part-CCCCC.parquet   + _SUCCESS per dt folder
    OUT/clicks/dt=.../       partitioned by the click's own day (can be the next day)
    OUT/conversions/dt=.../  by the conversion's own day (days later; a few > 7 days,
                             so partitions go past the last impression day)
    OUT/truth/part-CCCCC.parquet   impression_id, p_click, p_convert, would_convert
    OUT/_synth.json          the resolved config and the summary

A conversion row exists exactly for the impressions that are clicked AND would_convert
(would_convert is drawn for every impression). Generation runs in chunks of
``chunk_size`` impressions (bounded memory), each from its own seeded RNG, so one seed
gives the same bytes. numpy + pyarrow only. The world model (config, users, items,
true probabilities) is :mod:`etl.synth_world`; this file draws events and writes them.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, fields
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from etl.errors import InputError
from etl.synth_world import (  # noqa: F401  (the world model; re-exported for callers of etl.synth)
    AGE_P, DAY_US, TABLES, SynthConfig, World, _draw, _sigmoid, build_world, draw_position, resolve, true_logits)

# --------------------------------------------------------------------------- Arrow columns


def ids(prefix: str, idx: np.ndarray, width: int, suffix: str = "") -> pa.Array:
    """Fixed-width string ids ``prefix + zero-padded idx + suffix`` built from one byte buffer."""
    idx = np.asarray(idx, dtype=np.int64)
    p, s = prefix.encode(), suffix.encode()
    L = len(p) + width + len(s)
    buf = np.empty((len(idx), L), dtype=np.uint8)
    buf[:, :len(p)] = np.frombuffer(p, np.uint8)
    rest = idx.copy()
    for j in range(width - 1, -1, -1):
        buf[:, len(p) + j] = rest % 10 + 48
        rest //= 10
    if len(s):
        buf[:, len(p) + width:] = np.frombuffer(s, np.uint8)
    if len(idx) * L >= 2**31:
        raise ValueError("ids: too many for int32 offsets; use a smaller chunk_size")
    offsets = np.arange(len(idx) + 1, dtype=np.int32) * np.int32(L)
    return pa.StringArray.from_buffers(len(idx), pa.py_buffer(offsets), pa.py_buffer(buf))


def _width(n: int) -> int:
    return max(4, len(str(max(n - 1, 0))))


def _gather_lists(off: np.ndarray, rows: np.ndarray):
    """Concatenate the lists ``rows`` of a (offsets, values) table: (new offsets, flat index)."""
    lens = off[rows + 1] - off[rows]
    new = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=new[1:])
    flat = np.repeat(off[rows] - new[:-1], lens) + np.arange(new[-1], dtype=np.int64)
    return new.astype(np.int32), flat


class _Vocab:
    """String tables of the world's ids, taken by index per chunk (no per-row Python)."""

    def __init__(self, cfg: SynthConfig):
        self.user = ids("u", np.arange(cfg.users), _width(cfg.users))
        self.item = ids("it", np.arange(cfg.items), _width(cfg.items))
        self.category = ids("cat", np.arange(cfg.categories), _width(cfg.categories))
        self.brand = ids("b", np.arange(cfg.brands), _width(cfg.brands))
        self.shop = ids("s", np.arange(cfg.shops), _width(cfg.shops))
        self.city = ids("city", np.arange(cfg.cities), _width(cfg.cities))
        self.gender = pa.array(["f", "m"])


TS = pa.timestamp("us", tz="UTC")
IMPRESSION_SCHEMA = pa.schema([
    ("impression_id", pa.string()), ("ts", TS), ("user_id", pa.string()), ("item_id", pa.string()),
    ("position", pa.int32()), ("category", pa.string()), ("brand", pa.string()), ("shop", pa.string()),
    ("price_level", pa.int32()), ("gender", pa.string()), ("age", pa.int32()), ("city", pa.string()),
    ("hist_cate", pa.list_(pa.string())), ("hist_shop", pa.map_(pa.string(), pa.float32())),
])
CLICK_SCHEMA = pa.schema([("click_id", pa.string()), ("impression_id", pa.string()), ("ts", TS)])
CONVERSION_SCHEMA = pa.schema([("conversion_id", pa.string()), ("click_id", pa.string()), ("ts", TS),
                               ("value", pa.float64())])
TRUTH_SCHEMA = pa.schema([("impression_id", pa.string()), ("p_click", pa.float64()),
                          ("p_convert", pa.float64()), ("would_convert", pa.int8())])


def _ts(us: np.ndarray) -> pa.Array:
    return pa.array(us.astype(np.int64), type=pa.int64()).cast(TS)


def chunk_tables(w: World, voc: _Vocab, day: int, first: int, n: int, chunk: int) -> dict:
    """Impressions ``first .. first+n-1`` (global numbering), all on day ``day``, and their
    clicks, conversions (event time in epoch us) and truth, as Arrow tables."""
    c = w.cfg
    rng = np.random.default_rng(np.random.SeedSequence([c.seed, 3, chunk]))
    day0 = int(datetime.fromisoformat(c.start).replace(tzinfo=timezone.utc).timestamp()) * 1_000_000
    idx = np.arange(first, first + n, dtype=np.int64)
    ts = day0 + day * DAY_US + np.sort(rng.integers(0, DAY_US, n))
    user = _draw(w.user_cdf, w.user_by_rank, rng, n)
    item = _draw(w.item_cdf, w.item_by_rank, rng, n)
    pos = draw_position(rng, n, c.positions)
    zc, zv = true_logits(w, user, item, pos)
    p_click, p_convert = _sigmoid(zc), _sigmoid(zv)
    clicked = rng.random(n) < p_click
    would = rng.random(n) < p_convert

    imp_id = ids("imp", idx, 10)
    hc_off, hc_flat = _gather_lists(w.hist_cate_off, user)
    hs_off, hs_flat = _gather_lists(w.hist_shop_off, user)
    hist_cate = pa.ListArray.from_arrays(pa.array(hc_off), voc.category.take(pa.array(w.hist_cate_val[hc_flat])))
    hist_shop = pa.MapArray.from_arrays(pa.array(hs_off), voc.shop.take(pa.array(w.hist_shop_val[hs_flat])),
                                        pa.array(w.hist_shop_w[hs_flat]))
    it = pa.array(item)
    imps = pa.Table.from_arrays([
        imp_id, _ts(ts), voc.user.take(pa.array(user)), voc.item.take(it), pa.array(pos),
        voc.category.take(pa.array(w.category[item])), voc.brand.take(pa.array(w.brand[item])),
        voc.shop.take(pa.array(w.shop[item])), pa.array(w.price_level[item]),
        voc.gender.take(pa.array(w.gender[user])), pa.array(w.age[user].astype(np.int32)),
        voc.city.take(pa.array(w.city[user])), hist_cate, hist_shop,
    ], schema=IMPRESSION_SCHEMA)
    truth = pa.Table.from_arrays([imp_id, pa.array(p_click), pa.array(p_convert),
                                  pa.array(would.astype(np.int8))], schema=TRUTH_SCHEMA)

    # clicks: a few seconds after the impression; some impressions get a second click
    ci = np.flatnonzero(clicked)
    click_ts = ts[ci] + 1_000_000 + (rng.exponential(20.0, len(ci)) * 1e6).astype(np.int64)
    dbl = rng.random(len(ci)) < c.double_click_rate
    ts2 = click_ts[dbl] + 1_000_000 + (rng.exponential(120.0, int(dbl.sum())) * 1e6).astype(np.int64)
    click_ids = ids("clk", idx[ci], 10, "-1")
    clicks = pa.Table.from_arrays([
        pa.concat_arrays([click_ids, ids("clk", idx[ci[dbl]], 10, "-2")]),
        imp_id.take(pa.array(np.concatenate([ci, ci[dbl]]))),
        _ts(np.concatenate([click_ts, ts2])),
    ], schema=CLICK_SCHEMA)

    # conversions: exactly the clicked AND would_convert impressions, on their first click;
    # delays lognormal around delay_median_hours within the window, a few beyond it
    vj = np.flatnonzero(would[ci])
    m = len(vj)
    win = c.window_days * DAY_US
    inside = np.minimum(np.exp(rng.normal(math.log(c.delay_median_hours * 3600e6), 1.5, m)), win - 1e6)
    late = rng.random(m) < c.late_conversion_rate
    beyond = win + 1e6 + rng.random(m) * win
    delay = np.where(late, beyond, np.maximum(inside, 1e6)).astype(np.int64)
    value = np.round(w.price[item[ci[vj]]] * (1 + rng.poisson(0.3, m)), 2)
    convs = pa.Table.from_arrays([
        ids("cv", idx[ci[vj]], 10), click_ids.take(pa.array(vj)), _ts(click_ts[vj] + delay), pa.array(value),
    ], schema=CONVERSION_SCHEMA)
    ev_day = {
        "clicks": (np.concatenate([click_ts, ts2]) - day0) // DAY_US,
        "conversions": (click_ts[vj] + delay - day0) // DAY_US,
    }
    stats = {"impressions": n, "clicked": len(ci), "click_events": clicks.num_rows, "conversions": m,
             "late_conversions": int(late.sum()), "sum_p_click": float(p_click.sum()),
             "sum_p_convert": float(p_convert.sum()), "sum_p_convert_clicked": float(p_convert[ci].sum()),
             "would_convert": int(would.sum())}
    return {"impressions": imps, "clicks": clicks, "conversions": convs, "truth": truth,
            "ev_day": ev_day, "stats": stats}


# --------------------------------------------------------------------------- writing


def _day_str(start: str, d: int) -> str:
    return (date.fromisoformat(start) + timedelta(days=int(d))).isoformat()


def _prepare_out(out: Path) -> None:
    """Replace a previous synth output; refuse a non-empty folder that is not one."""
    if out.exists() and not out.is_dir():
        raise InputError(f"synth: --out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "_synth.json").exists():
            raise InputError(f"synth: --out {out}: not empty and not a previous synth output (no _synth.json)")
        for name in (*TABLES, "truth"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "_synth.json").unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=256 * 1024)


def simulate(out, impressions: int = 1_000_000, days: int = 14, seed: int = 0, progress=None, **knobs) -> dict:
    """Write simulated logs under ``out``; returns a summary (counts, rates, seconds).

    Args:
        out (str | Path): the log root; a previous synth output there is replaced.
        impressions, days, seed: see :class:`SynthConfig`.
        progress (callable | None): called with (impressions done, total) after each chunk.
        **knobs: any other :class:`SynthConfig` field (users=..., ctr=..., chunk_size=...).
    """
    names = {f.name for f in fields(SynthConfig)}
    bad = sorted(set(knobs) - names)
    if bad:
        raise InputError(f"synth: unknown knob {bad[0]!r} (known: {', '.join(sorted(names))})")
    cfg = resolve(SynthConfig(impressions=impressions, days=days, seed=seed, **knobs))
    t0 = time.perf_counter()
    out = Path(out)
    _prepare_out(out)
    w = build_world(cfg)
    voc = _Vocab(cfg)
    t_world = time.perf_counter() - t0

    per_day = [cfg.impressions // cfg.days + (d < cfg.impressions % cfg.days) for d in range(cfg.days)]
    tot: dict = {}
    parts = {name: set() for name in TABLES}
    chunk = first = 0
    for day, n_day in enumerate(per_day):
        for s in range(0, n_day, cfg.chunk_size):
            n = min(cfg.chunk_size, n_day - s)
            t = chunk_tables(w, voc, day, first, n, chunk)
            name = f"part-{chunk:05d}.parquet"
            dt = _day_str(cfg.start, day)
            _write(t["impressions"], out / "impressions" / f"dt={dt}" / name)
            parts["impressions"].add(dt)
            _write(t["truth"], out / "truth" / name)
            for table in ("clicks", "conversions"):
                ev = t["ev_day"][table]
                for d in np.unique(ev):
                    dt = _day_str(cfg.start, d)
                    _write(t[table].filter(pa.array(ev == d)), out / table / f"dt={dt}" / name)
                    parts[table].add(dt)
            for k, v in t["stats"].items():
                tot[k] = tot.get(k, 0) + v
            first += n
            chunk += 1
            if progress:
                progress(first, cfg.impressions)
    # every dt folder is complete only now (later chunks add clicks/conversions to later days)
    for table, dts in parts.items():
        for dt in dts:
            (out / table / f"dt={dt}" / "_SUCCESS").touch()
    clicked = max(tot["clicked"], 1)
    summary = {
        "out": str(out.resolve()),
        "impressions": tot["impressions"], "clicked_impressions": tot["clicked"],
        "click_events": tot["click_events"], "conversions": tot["conversions"],
        "late_conversions": tot["late_conversions"],
        "ctr": tot["clicked"] / tot["impressions"], "cvr": tot["conversions"] / clicked,
        "ctcvr": tot["conversions"] / tot["impressions"],
        "mean_p_click": tot["sum_p_click"] / tot["impressions"],
        "mean_p_convert": tot["sum_p_convert"] / tot["impressions"],
        "mean_p_convert_clicked": tot["sum_p_convert_clicked"] / clicked,
        "would_convert": tot["would_convert"],
        "users": cfg.users, "items": cfg.items, "categories": cfg.categories, "brands": cfg.brands,
        "shops": cfg.shops, "cities": cfg.cities,
        "days": {t: sorted(v) for t, v in parts.items()}, "chunks": chunk,
        "seconds": round(time.perf_counter() - t0, 3), "seconds_world": round(t_world, 3),
    }
    meta = {"config": asdict(cfg), "b_click": w.b_click, "b_convert": w.b_convert,
            "summary": {k: v for k, v in summary.items() if k not in ("seconds", "seconds_world", "out")}}
    (out / "_synth.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return summary
