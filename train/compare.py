"""Two models on the same rows: each one's figures and a paired bootstrap interval of the difference.

    cmp = compare(["MODEL_ROOT/production", "MODEL_ROOT/candidates/X"], "DATA", "test")
    cmp["metrics"]["cvr_auc"]  # {"values": [prod, cand], "diff": cand - prod, "ci95": [lo, hi], ...}

Why paired: the two models are scored on the same impressions, and each bootstrap
resample draws the same rows for both, so the interval of ``B - A`` leaves out the
row-to-row noise both figures share (a model's CVR AUC alone moves by about 0.014 from
one demo-sized day to another; the difference of two models on the same rows moves far
less). The point figures are exactly what ``esmm evaluate`` reports on the same split
(train.evaluate.score); the resamples are computed for all of them at once from
per-row counts (a resample is a multinomial count per row), in chunks.

No torch at module level: reading a comparison file (``esmm publish --comparison``)
needs numpy only; scoring imports torch inside ``predictions``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from train.errors import InputError

# name -> (prediction, rows, label, statistic); rows "clicked" = the clicked test impressions
METRICS = {
    "cvr_auc": ("p_cvr", "clicked", "z", "auc"),
    "ctcvr_auc": ("p_ctcvr", "all", "yz", "auc"),
    "cvr_logloss": ("p_cvr", "clicked", "z", "logloss"),
    "ctcvr_logloss": ("p_ctcvr", "all", "yz", "logloss"),
    "cvr_calibration": ("p_cvr", "clicked", "z", "ratio"),  # mean pCVR / observed CVR
    "ctcvr_calibration": ("p_ctcvr", "all", "yz", "ratio"),
}
HIGHER_IS_BETTER = {"cvr_auc", "ctcvr_auc"}
EPS = 1e-7  # the clip of train.metrics.log_loss


def predictions(model_dir: str, data_dir: str, split: str = "test", manifest: dict | None = None) -> dict:
    """The model's pCVR and pCTCVR on every row of DATA's split, the labels, and its figures
    from ``evaluate_dir`` (the function behind ``esmm evaluate``)."""
    from train import local
    from train.data import load_manifest, load_split, manifest_fields
    from train.evaluate import predict

    model, _ = local.load_model(model_dir)
    manifest = manifest or load_manifest(data_dir)
    local.check_fields(model.fields, manifest_fields(manifest, model.cfg.pooling), f"{data_dir}/manifest.json")
    # the rows exactly as `esmm evaluate` reads them: with branch serving, ids beyond an older
    # model's vocabulary read as out of vocabulary (local.load_split_for)
    load_for = getattr(local, "load_split_for", None)
    cols = load_for(model, data_dir, split, manifest) if load_for else load_split(data_dir, split, model.fields, manifest)
    figures = local.evaluate_dir(model, data_dir, split, None, manifest, cols=cols)
    preds = predict(model, cols)
    if "p_cvr" not in preds or not ("p_ctcvr" in preds or "p_ctr" in preds):
        raise InputError(f"{model_dir}: model {model.name!r} gives no pCVR and pCTCVR of its own to compare")
    y = cols.click.double().numpy()
    z = cols.conversion.double().numpy()
    return {
        "sample_id": np.asarray(cols.sample_id),
        "y": y, "z": z,
        "p_cvr": preds["p_cvr"],
        "p_ctcvr": preds["p_ctcvr"] if "p_ctcvr" in preds else preds["p_cvr"] * preds["p_ctr"],
        "figures": figures,
    }


def _point(stat: str, label: np.ndarray, p: np.ndarray) -> float:
    from train import metrics

    if stat == "auc":
        return metrics.auc(label, p)
    if stat == "logloss":
        return metrics.log_loss(label, p)
    return metrics.calibration(label, p, 1)["ratio"]


def weighted_auc(label: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC of each row of weights ``w`` (R x n, counts): Mann-Whitney with ties counted one half.

    With integer counts this is the AUC of the rows repeated that many times. NaN where a
    resample has no positive or no negative.
    """
    order = np.argsort(score, kind="mergesort")
    s, pos = score[order], label[order] > 0
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    w = w[:, order]
    wp = np.where(pos, w, 0.0)
    P = np.add.reduceat(wp, starts, axis=1)
    N = np.add.reduceat(w - wp, starts, axis=1)
    below = np.cumsum(N, axis=1) - N  # negative weight strictly below each group
    den = P.sum(1) * N.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (P * (below + 0.5 * N)).sum(1) / den, np.nan)


def _resampled(stat: str, label: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    if stat == "auc":
        return weighted_auc(label, p, w)
    total = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if stat == "logloss":
            q = np.clip(p, EPS, 1 - EPS)
            return w @ -(label * np.log(q) + (1 - label) * np.log1p(-q)) / total
        return (w @ p) / (w @ label)


def bootstrap_counts(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """``resamples`` x ``n`` counts: how often each row is drawn in each resample of n rows."""
    idx = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(idx.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def compare_predictions(preds: Sequence[dict], resamples: int = 1000, seed: int = 0,
                        chunk: int = 50) -> dict:
    """Figures of each model and, for two, the paired bootstrap of ``second - first``."""
    ref = preds[0]
    for p in preds[1:]:
        if not np.array_equal(p["sample_id"], ref["sample_id"]):
            raise InputError("the models were scored on different rows (sample_id order differs)")
    y, z = ref["y"], ref["z"]
    labels = {"z": z, "yz": y * z}
    rows = {"all": np.ones(y.size, dtype=bool), "clicked": y > 0}
    out: dict = {}
    for name, (pred, sub, lab, stat) in METRICS.items():
        m = rows[sub]
        out[name] = {"rows": sub, "n": int(m.sum()),
                     "values": [_point(stat, labels[lab][m], p[pred][m]) for p in preds]}
    if len(preds) == 2:
        rng = np.random.default_rng(seed)
        diffs = {name: [] for name in METRICS}
        for start in range(0, resamples, chunk):
            w = bootstrap_counts(rng, min(chunk, resamples - start), y.size)
            for name, (pred, sub, lab, stat) in METRICS.items():
                m = rows[sub]
                a, b = (_resampled(stat, labels[lab][m], p[pred][m], w[:, m]) for p in preds)
                diffs[name].append(b - a)
        for name, d in diffs.items():
            d = np.concatenate(d)
            ok = d[~np.isnan(d)]
            v = out[name]["values"]
            out[name].update(diff=v[1] - v[0], nan_resamples=int(d.size - ok.size),
                             ci95=[float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))]
                             if ok.size else [float("nan"), float("nan")])
    return out


def compare(models: Sequence[str], data_dir: str, split: str = "test", resamples: int = 1000,
            seed: int = 0) -> dict:
    """Score each model on DATA's split and compare them (see the module docstring)."""
    from train.data import load_manifest

    if not 1 <= len(models) <= 2:
        raise InputError(f"compare: give one or two models, got {len(models)}")
    manifest = load_manifest(data_dir)
    preds = [predictions(m, data_dir, split, manifest) for m in models]
    return {
        "models": [str(Path(m).resolve()) for m in models],
        "data": str(Path(data_dir).resolve()), "split": split,
        "rows": int(preds[0]["y"].size),
        "bootstrap": {"resamples": resamples, "seed": seed, "paired": True, "level": 0.95},
        "metrics": compare_predictions(preds, resamples, seed),
        "evaluate": [p["figures"] for p in preds],  # each model's full `esmm evaluate` figures
    }


def write(result: dict, out: str | os.PathLike) -> Path:
    from train.metrics import jsonable

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(jsonable(result), indent=2) + "\n")
    os.replace(tmp, out)
    return out


def read(path: str | os.PathLike) -> dict:
    """A comparison file written by ``esmm compare``; None figures (NaN in JSON) come back as NaN."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        data["models"], data["metrics"]  # noqa: B018 - the keys every reader needs
    except FileNotFoundError:
        raise InputError(f"{p}: comparison file not found (run `esmm compare ... --out {p}`)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{p}: not a comparison file from `esmm compare`: {e}") from None
    nan = float("nan")
    for m in data["metrics"].values():
        m["values"] = [nan if v is None else float(v) for v in m["values"]]
        if "ci95" in m:
            m["ci95"] = [nan if v is None else float(v) for v in m["ci95"]]
            m["diff"] = nan if m.get("diff") is None else float(m["diff"])
    return data
