"""The simulated world behind ``esmm synth``: users, items, their factors and the true
click / conversion probabilities (numpy only). :mod:`etl.synth` draws events from it and
writes the logs; its docstring draws the whole picture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from datetime import date

import numpy as np

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
