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
gives the same bytes. numpy + pyarrow only.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from etl.errors import InputError

DAY_US = 86_400 * 1_000_000
TABLES = ("impressions", "clicks", "conversions")
AGE_P = np.array([0.08, 0.22, 0.27, 0.2, 0.12, 0.07, 0.04])  # age buckets 0..6


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the simulator. ``None`` counts are derived from ``impressions`` (see :func:`resolve`).

    Scale:
        impressions: total impressions, spread evenly over the days.
        days: number of impression days starting at ``start`` (the ETL trains on the first half).
        seed: everything is a function of (config, seed).
        start: first day, ISO date.
        chunk_size: impressions generated and written per step (bounds memory).
    Population (None = derived):
        users: default max(50, impressions // 200): ~200 impressions per user (Ali-CCP ~210).
        items: default max(50, impressions // 300): median item ~150 impressions.
        categories: default clip(2 * sqrt(items), 5, 2000).
        brands: default max(categories, items // 10); each brand belongs to one category.
        shops: default max(5, items // 20).
        cities: default clip(users // 100, 5, 400).
        user_zipf, item_zipf: popularity exponents, weight of rank r = (r + 10) ** -zipf.
    Rates:
        ctr: mean p(click) over all impressions.
        cvr: conversions per clicked impression, mean of p(convert | click).
        double_click_rate: share of clicked impressions with a second click event.
        late_conversion_rate: share of conversions later than ``window_days`` after the click.
        window_days: the attribution window the delays are drawn around.
        delay_median_hours: median click-to-conversion delay of the in-window ones.
    The world (logit weights, see :func:`true_logits`):
        dim_shared, dim_click, dim_convert: latent factor sizes.
        w_shared_click, w_shared_convert: weight of SHARED in the click / conversion logit;
            the conversion one is what clicks can teach a shared embedding.
        w_user_engage, w_item_appeal: weights of the user's engagement and the item's appeal
            (partly its category's) inside SHARED, beside the taste match <u_s, v_s>; these
            per-id main effects are what an embedding learns fastest from clicks.
        w_click_only, w_convert_only: weight of the click-only / conversion-only taste match.
        w_clickbait: clickbait raises the click logit by this ...
        w_clickbait_convert: ... and lowers the conversion logit by this.
        w_click_happy: weight of the user's click-only propensity.
        w_quality, w_price: weight of item quality and of (price sensitivity x price).
        w_position: the click logit falls by w_position * ln(position).
        positions: positions 1..positions (top ones shown most).
        hist_len, hist_shop_len: mean lengths of the behaviour lists.
    """

    impressions: int = 1_000_000
    days: int = 14
    seed: int = 0
    start: str = "2026-01-01"
    chunk_size: int = 500_000
    users: int | None = None
    items: int | None = None
    categories: int | None = None
    brands: int | None = None
    shops: int | None = None
    cities: int | None = None
    user_zipf: float = 0.6
    item_zipf: float = 0.8
    ctr: float = 0.04
    cvr: float = 0.05
    double_click_rate: float = 0.02
    late_conversion_rate: float = 0.03
    window_days: int = 7
    delay_median_hours: float = 6.0
    dim_shared: int = 8
    dim_click: int = 4
    dim_convert: int = 4
    w_shared_click: float = 1.0
    w_shared_convert: float = 1.0
    w_user_engage: float = 0.9
    w_item_appeal: float = 1.0
    w_click_only: float = 0.6
    w_convert_only: float = 0.5
    w_clickbait: float = 0.6
    w_clickbait_convert: float = 0.3
    w_click_happy: float = 0.4
    w_quality: float = 0.5
    w_price: float = 0.4
    w_position: float = 0.35
    positions: int = 20
    hist_len: float = 10.0
    hist_shop_len: float = 6.0


def resolve(cfg: SynthConfig) -> SynthConfig:
    """Validate ``cfg`` and fill the derived counts; a bad value raises InputError naming it."""
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise InputError(f"synth: {name}={getattr(cfg, name)!r}: {what}")

    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "start" or v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputError(f"synth: {f.name}={v!r}: must be a number")
        if "int" in str(f.type) and int(v) != v:
            raise InputError(f"synth: {f.name}={v!r}: must be an integer")
    cfg = replace(cfg, **{f.name: int(getattr(cfg, f.name)) for f in fields(cfg)
                          if "int" in str(f.type) and getattr(cfg, f.name) is not None})
    need(cfg.impressions >= 1, "impressions", "must be >= 1")
    need(cfg.days >= 1, "days", "must be >= 1")
    need(cfg.seed >= 0, "seed", "must be >= 0")
    need(1 <= cfg.chunk_size <= 50_000_000, "chunk_size", "must be in [1, 50000000]")
    try:
        date.fromisoformat(cfg.start)
    except (TypeError, ValueError):
        need(False, "start", "must be an ISO date YYYY-MM-DD")
    for name in ("ctr", "cvr"):
        need(0.0 < getattr(cfg, name) < 1.0, name, "must be in (0, 1)")
    for name in ("double_click_rate", "late_conversion_rate"):
        need(0.0 <= getattr(cfg, name) < 1.0, name, "must be in [0, 1)")
    need(cfg.window_days >= 1, "window_days", "must be >= 1")
    need(cfg.delay_median_hours > 0, "delay_median_hours", "must be > 0")
    for name in ("dim_shared", "dim_click", "dim_convert", "positions"):
        need(getattr(cfg, name) >= 1, name, "must be >= 1")
    for name in ("user_zipf", "item_zipf", "hist_len", "hist_shop_len"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    n = cfg.impressions
    users = cfg.users if cfg.users is not None else max(50, n // 200)
    items = cfg.items if cfg.items is not None else max(50, n // 300)
    cfg = replace(cfg, users=users, items=items)
    for name in ("users", "items"):
        need(getattr(cfg, name) >= 1, name, "must be >= 1")
    cats = cfg.categories if cfg.categories is not None else int(np.clip(2 * math.sqrt(items), 5, 2000))
    cfg = replace(cfg, categories=cats)
    need(cats >= 1, "categories", "must be >= 1")
    brands = cfg.brands if cfg.brands is not None else max(cats, items // 10)
    shops = cfg.shops if cfg.shops is not None else max(5, items // 20)
    cities = cfg.cities if cfg.cities is not None else int(np.clip(users // 100, 5, 400))
    cfg = replace(cfg, brands=brands, shops=shops, cities=cities)
    need(brands >= cats, "brands", f"must be >= categories ({cats})")
    for name in ("shops", "cities"):
        need(getattr(cfg, name) >= 1, name, "must be >= 1")
    return cfg


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """Every latent and observed attribute of users and items; index = the id's number."""

    cfg: SynthConfig
    # users
    user_cdf: np.ndarray          # popularity CDF over popularity ranks
    user_by_rank: np.ndarray      # popularity rank -> user index
    gender: np.ndarray            # int8 0/1
    age: np.ndarray               # int8 0..6
    city: np.ndarray              # int32
    u_shared: np.ndarray          # (U, dim_shared)
    u_engage: np.ndarray          # shared engagement bias
    u_click: np.ndarray           # (U, dim_click)
    u_click_happy: np.ndarray     # click-only propensity
    u_convert: np.ndarray         # (U, dim_convert)
    u_price_sens: np.ndarray      # price sensitivity
    hist_cate_off: np.ndarray     # behaviour lists as offsets + flat values
    hist_cate_val: np.ndarray
    hist_shop_off: np.ndarray
    hist_shop_val: np.ndarray
    hist_shop_w: np.ndarray
    # items
    item_cdf: np.ndarray
    item_by_rank: np.ndarray
    category: np.ndarray
    brand: np.ndarray
    shop: np.ndarray
    v_shared: np.ndarray          # (I, dim_shared)
    v_appeal: np.ndarray          # shared appeal bias
    v_click: np.ndarray           # (I, dim_click)
    clickbait: np.ndarray
    v_convert: np.ndarray         # (I, dim_convert)
    quality: np.ndarray
    price_z: np.ndarray           # standardised log price
    price: np.ndarray
    price_level: np.ndarray       # int32 0..9, the logged price bucket
    # calibrated intercepts
    b_click: float = 0.0
    b_convert: float = 0.0


def _zipf_cdf(n: int, a: float) -> np.ndarray:
    w = (np.arange(n, dtype=np.float64) + 10.0) ** -a
    c = np.cumsum(w)
    return c / c[-1]


def _draw(cdf: np.ndarray, by_rank: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    r = np.searchsorted(cdf, rng.random(n), side="right")
    return by_rank[np.minimum(r, len(cdf) - 1)]


def _mix(rng: np.random.Generator, parts: list[tuple[float, np.ndarray]], shape) -> np.ndarray:
    """sum w_k * part_k + sqrt(1 - sum w_k^2) * noise: unit variance per coordinate."""
    out = sum(w * p for w, p in parts)
    rest = 1.0 - sum(w * w for w, _ in parts)
    return out + math.sqrt(max(rest, 0.0)) * rng.standard_normal(shape)


def _top_lists(rng, u_fac, targets, mean_len, weighted, block=2048):
    """Per user: a list of distinct targets drawn by preference (Gumbel top-k over
    <u, target> * 2), length 1 + Poisson(mean_len - 1) capped at the number of targets.
    Returns offsets (U+1,), values (int32) and, if weighted, weights (float32) that grow
    with the affinity (exp(affinity / 4))."""
    n_users, n_t = len(u_fac), len(targets)
    k = u_fac.shape[1]
    lens = np.minimum(1 + rng.poisson(max(mean_len - 1.0, 0.0), n_users), n_t)
    kmax = int(lens.max())
    vals, ws = [], []
    for s in range(0, n_users, block):
        aff = (u_fac[s:s + block] @ targets.T) * (2.0 / math.sqrt(k))
        score = aff + rng.gumbel(size=aff.shape)
        if kmax < n_t:
            top = np.argpartition(-score, kmax - 1, axis=1)[:, :kmax]
        else:
            top = np.broadcast_to(np.arange(n_t), score.shape).copy()
        order = np.argsort(-np.take_along_axis(score, top, 1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        keep = np.arange(kmax)[None, :] < lens[s:s + block, None]
        vals.append(top[keep].astype(np.int32))
        if weighted:
            a = np.take_along_axis(aff, top, 1)[keep]
            ws.append(np.round(np.exp(a / 4.0), 3).astype(np.float32))  # intensity: 1 at affinity 0
    off = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    return off, np.concatenate(vals), (np.concatenate(ws) if weighted else None)


def build_world(cfg: SynthConfig) -> World:
    """All users and items of ``cfg`` (resolved), from the seed alone; intercepts calibrated."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))
    U, I, C, B, S = cfg.users, cfg.items, cfg.categories, cfg.brands, cfg.shops
    ks, kc, kv = cfg.dim_shared, cfg.dim_click, cfg.dim_convert

    # users: gender x age carry part of the shared factor, the city part of price sensitivity
    gender = (rng.random(U) < 0.5).astype(np.int8)
    age = rng.choice(len(AGE_P), size=U, p=AGE_P).astype(np.int8)
    city = rng.permutation(cfg.cities)[np.minimum(
        np.searchsorted(_zipf_cdf(cfg.cities, 1.0), rng.random(U), side="right"), cfg.cities - 1)].astype(np.int32)
    demo = rng.standard_normal((2, len(AGE_P), ks))
    u_shared = _mix(rng, [(math.sqrt(0.3), demo[gender, age])], (U, ks))
    u_engage = rng.standard_normal(U)
    u_click = rng.standard_normal((U, kc))
    u_click_happy = rng.standard_normal(U)
    u_convert = rng.standard_normal((U, kv))
    city_sens = rng.standard_normal(cfg.cities)
    u_price_sens = 1.0 + 0.4 * city_sens[city] + 0.4 * rng.standard_normal(U)

    # items: category (Zipf sizes) -> brands nested in it; shops across categories
    category = rng.permutation(C)[np.minimum(
        np.searchsorted(_zipf_cdf(C, 0.7), rng.random(I), side="right"), C - 1)].astype(np.int32)
    brand_cat = np.concatenate([np.arange(C), rng.integers(0, C, B - C)]) if B > C else np.arange(C)
    brand_order = np.argsort(brand_cat, kind="stable")             # brands grouped by category
    first = np.searchsorted(brand_cat[brand_order], np.arange(C))
    count = np.bincount(brand_cat, minlength=C)
    brand = brand_order[first[category] + (rng.random(I) * count[category]).astype(np.int64)].astype(np.int32)
    shop = rng.permutation(S)[np.minimum(
        np.searchsorted(_zipf_cdf(S, 0.8), rng.random(I), side="right"), S - 1)].astype(np.int32)
    cat_f, brand_f, shop_f = (rng.standard_normal((n, ks)) for n in (C, B, S))
    # the hierarchy: category, brand and shop ids carry part of every item's shared factor
    v_shared = _mix(rng, [(0.5, cat_f[category]), (0.35, brand_f[brand]), (0.3, shop_f[shop])], (I, ks))
    v_appeal = _mix(rng, [(0.5, rng.standard_normal(C)[category])], I)
    v_click = rng.standard_normal((I, kc))
    clickbait = _mix(rng, [(0.5, rng.standard_normal(S)[shop])], I)
    v_convert = rng.standard_normal((I, kv))
    quality = _mix(rng, [(0.4, rng.standard_normal(B)[brand]), (0.3, rng.standard_normal(S)[shop])], I)
    log_price = rng.normal(3.5, 0.8, C)[category] + 0.5 * rng.standard_normal(I)
    price_z = (log_price - log_price.mean()) / max(log_price.std(), 1e-9)
    price = np.round(np.exp(log_price), 2)
    edges = np.quantile(log_price, np.linspace(0, 1, 11)[1:-1])
    price_level = np.searchsorted(edges, log_price, side="right").astype(np.int32)

    # behaviour lists: preferred categories (by the category factor) and shops, weighted
    hc_off, hc_val, _ = _top_lists(rng, u_shared, cat_f, cfg.hist_len, False)
    hs_off, hs_val, hs_w = _top_lists(rng, u_shared, shop_f, cfg.hist_shop_len, True)

    w = World(
        cfg=cfg,
        user_cdf=_zipf_cdf(U, cfg.user_zipf), user_by_rank=rng.permutation(U),
        gender=gender, age=age, city=city, u_shared=u_shared, u_engage=u_engage, u_click=u_click,
        u_click_happy=u_click_happy, u_convert=u_convert, u_price_sens=u_price_sens,
        hist_cate_off=hc_off, hist_cate_val=hc_val, hist_shop_off=hs_off, hist_shop_val=hs_val, hist_shop_w=hs_w,
        item_cdf=_zipf_cdf(I, cfg.item_zipf), item_by_rank=rng.permutation(I),
        category=category, brand=brand, shop=shop, v_shared=v_shared, v_appeal=v_appeal, v_click=v_click,
        clickbait=clickbait, v_convert=v_convert, quality=quality, price_z=price_z, price=price,
        price_level=price_level,
    )
    _calibrate(w, np.random.default_rng(np.random.SeedSequence([cfg.seed, 2])))
    return w


def draw_position(rng: np.random.Generator, n: int, positions: int) -> np.ndarray:
    """Positions 1..positions, top slots shown most (geometric)."""
    return np.minimum(rng.geometric(0.15, n), positions).astype(np.int32)


def true_logits(w: World, user: np.ndarray, item: np.ndarray, position: np.ndarray):
    """The ground truth: (click logit, conversion logit) of impressions (user, item, position).

    p_click = sigmoid(click logit) = p(y=1 | x); p_convert = sigmoid(conversion logit)
    = p(z=1 | y=1, x). Dot products are scaled by 1/sqrt(dim) so every term has unit scale.
    """
    c = w.cfg
    dot = lambda a, b: np.einsum("ij,ij->i", a, b) / math.sqrt(a.shape[1])  # noqa: E731
    # SHARED: the user's taste meets the item's (through its category/brand/shop/own id),
    # plus user engagement and item appeal; it raises click AND conversion.
    shared = (dot(w.u_shared[user], w.v_shared[item])
              + c.w_user_engage * w.u_engage[user] + c.w_item_appeal * w.v_appeal[item])
    bait = w.clickbait[item]
    click = (
        w.b_click
        + c.w_shared_click * shared
        + c.w_click_only * dot(w.u_click[user], w.v_click[item])   # looks/taste: click only
        + c.w_clickbait * bait                                      # clickbait: click up ...
        + c.w_click_happy * w.u_click_happy[user]                   # browsers click a lot
        - c.w_position * np.log(position)                           # position: click only
    )
    convert = (
        w.b_convert
        + c.w_shared_convert * shared
        + c.w_convert_only * dot(w.u_convert[user], w.v_convert[item])  # fit/need: conversion only
        - c.w_clickbait_convert * bait                              # ... conversion down
        + c.w_quality * w.quality[item]                             # quality: conversion only
        - c.w_price * w.u_price_sens[user] * w.price_z[item]        # price: conversion only
    )
    return click, convert


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _calibrate(w: World, rng: np.random.Generator, n: int = 200_000) -> None:
    """Set b_click so mean p_click = ctr, then b_convert so sum(p_click p_convert) / sum(p_click) = cvr,
    over a sample of the impression distribution (bisection; deterministic)."""
    c = w.cfg
    u = _draw(w.user_cdf, w.user_by_rank, rng, n)
    i = _draw(w.item_cdf, w.item_by_rank, rng, n)
    pos = draw_position(rng, n, c.positions)
    w.b_click = w.b_convert = 0.0
    zc, zv = true_logits(w, u, i, pos)

    def solve(f, target):
        lo, hi = -40.0, 40.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return 0.5 * (lo + hi)

    w.b_click = solve(lambda b: _sigmoid(zc + b).mean(), c.ctr)
    pc = _sigmoid(zc + w.b_click)
    w.b_convert = solve(lambda b: (pc * _sigmoid(zv + b)).sum() / pc.sum(), c.cvr)


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
