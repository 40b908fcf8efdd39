"""Metrics over a whole set (never averaged over batches): AUC, log loss, calibration."""
from __future__ import annotations

import math

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties sharing the mean of their ranks (float64)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # group boundaries of equal values in sorted order
    new_group = np.empty(xs.size, dtype=bool)
    new_group[:1] = True
    np.not_equal(xs[1:], xs[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], xs.size)  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(xs.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auc(labels, scores) -> float:
    """Exact ROC AUC = Mann-Whitney U / (n_pos * n_neg), ties counted one half.

    NaN when one class is absent.
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(s)
    u = r[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def log_loss(labels, probs, eps: float = 1e-7) -> float:
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def reliability_curve(labels, probs, bins: int = 10) -> list[dict]:
    """Equal-count bins by predicted probability: per bin mean prediction, observed rate, count."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.size == 0:
        return []
    order = np.argsort(p, kind="mergesort")
    out = []
    for idx in np.array_split(order, min(bins, y.size)):
        if idx.size:
            out.append({"pred": float(p[idx].mean()), "observed": float(y[idx].mean()), "n": int(idx.size)})
    return out


def ece(curve: list[dict]) -> float:
    """Expected calibration error of a reliability curve: sum over bins of
    n_b / N * |mean prediction_b - observed rate_b|. The bins are equal-count (by predicted
    probability), so rare-event predictions are not all lumped into one fixed-width bin."""
    n = sum(c["n"] for c in curve)
    if n == 0:
        return float("nan")
    return float(sum(c["n"] * abs(c["pred"] - c["observed"]) for c in curve) / n)


def calibration(labels, probs, bins: int = 10) -> dict:
    """mean prediction, observed rate, their ratio (1 = calibrated on average), the
    expected calibration error over ``bins`` equal-count bins (0 = calibrated in every
    bin) and the curve."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    mean_pred = float(p.mean()) if p.size else float("nan")
    rate = float(y.mean()) if y.size else float("nan")
    curve = reliability_curve(y, p, bins)
    return {"mean_pred": mean_pred, "observed": rate,
            "ratio": mean_pred / rate if rate > 0 else float("nan"),
            "ece": ece(curve), "curve": curve}


def jsonable(obj):
    """``obj`` with NaN/inf floats as None (strict JSON) and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
