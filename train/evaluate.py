"""Scoring a split and the paper's metrics (plus the entire-space ones on simulated data).

    preds = predict(model, test)                      # {"p_ctr"?, "p_cvr"?, "p_ctcvr"?} numpy
    m = score(preds, test, ctr_preds=..., truth=...)  # the metrics dict metrics.json holds

- CTR AUC over all test impressions; CVR AUC over the clicked ones; CTCVR AUC over all.
- CTCVR as the paper defines it (section 4.2): EVERY model's pCTCVR = its own pCVR x the
  pCTR of one independently trained CTR network (``ctr_preds``), ESMM and ESMM-NS too,
  so the column compares the pCVR estimates alone. Without ``ctr_preds`` (a lone
  `esmm train`), ``ctcvr_*`` falls back to the model's own product (``ctcvr_pctr`` says
  which). A model that predicts its own pCTCVR (ESMM: own pCTR x pCVR, what a deployed
  ESMM serves) also gets it scored as ``own_ctcvr_*``.
- With the simulator's truth (LOGS/truth/, keyed by impression_id == sample_id) the
  pCVR is also scored over the ENTIRE test space against ``would_convert``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from train import metrics
from train.data import Columns
from train.errors import InputError


@torch.no_grad()
def predict(model, split: Columns, batch_size: int = 32768) -> dict[str, np.ndarray]:
    """Every prediction the model makes, for every row of ``split``, in row order."""
    was = model.training
    model.eval()
    parts: dict[str, list] = {}
    for b in split.batches(batch_size):
        for k, v in model.predict(b.features).items():
            parts.setdefault(k, []).append(v.double().numpy())
    model.train(was)
    return {k: np.concatenate(v) for k, v in parts.items()}


def read_truth(truth_dir: str | os.PathLike, sample_id: np.ndarray) -> dict[str, np.ndarray]:
    """would_convert (and p_convert, p_click when present) aligned to ``sample_id``."""
    path = Path(truth_dir)
    if not path.exists():
        raise InputError(f"{path}: truth table named by manifest inputs.truth does not exist")
    table = pq.read_table(path, partitioning=None) if path.is_file() else pq.ParquetDataset(path, partitioning=None).read()
    names = table.schema.names
    for c in ("impression_id", "would_convert"):
        if c not in names:
            raise InputError(f"{path}: truth table lacks column {c!r} (has {names})")
    import pandas as pd

    ids = pd.Index(table.column("impression_id").to_numpy(zero_copy_only=False))
    pos = ids.get_indexer(pd.Index(sample_id))
    if (pos < 0).any():
        raise InputError(f"{path}: {int((pos < 0).sum())} test samples have no truth row "
                         f"(e.g. impression_id {sample_id[np.flatnonzero(pos < 0)[0]]!r})")
    out = {}
    for c in ("would_convert", "p_convert", "p_click"):
        if c in names:
            out[c] = np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)[pos]
    return out


def score(preds: dict[str, np.ndarray], split: Columns, ctr_preds: np.ndarray | None = None,
          truth: dict[str, np.ndarray] | None = None, bins: int = 10) -> dict:
    """The metrics of one model on one split (see the module docstring)."""
    y = split.click.double().numpy()
    z = split.conversion.double().numpy()
    yz = y * z
    clicked = y > 0
    m: dict = {"n": int(y.size), "clicks": int(clicked.sum()), "conversions": int(yz.sum())}
    p_ctr = preds.get("p_ctr")
    if p_ctr is not None:
        m["ctr_auc"] = metrics.auc(y, p_ctr)
        m["ctr_logloss"] = metrics.log_loss(y, p_ctr)
        m["ctr_calibration"] = metrics.calibration(y, p_ctr, bins)
    p_cvr = preds.get("p_cvr")
    if p_cvr is None:
        return m
    m["cvr_auc"] = metrics.auc(z[clicked], p_cvr[clicked])
    m["cvr_logloss"] = metrics.log_loss(z[clicked], p_cvr[clicked])
    m["cvr_calibration"] = metrics.calibration(z[clicked], p_cvr[clicked], bins)
    own = preds.get("p_ctcvr")
    if own is not None:  # the model's own pCTCVR (ESMM: own pCTR x own pCVR)
        m["own_ctcvr_auc"] = metrics.auc(yz, own)
        m["own_ctcvr_logloss"] = metrics.log_loss(yz, own)
        m["own_ctcvr_calibration"] = metrics.calibration(yz, own, bins)
    p_ctcvr = p_cvr * ctr_preds if ctr_preds is not None else own
    if p_ctcvr is not None:
        m["ctcvr_pctr"] = "ctr model" if ctr_preds is not None else "own"
        m["ctcvr_auc"] = metrics.auc(yz, p_ctcvr)
        m["ctcvr_logloss"] = metrics.log_loss(yz, p_ctcvr)
        m["ctcvr_calibration"] = metrics.calibration(yz, p_ctcvr, bins)
    if truth is not None:
        wc = truth["would_convert"]
        m["entire_cvr_auc"] = metrics.auc(wc, p_cvr)
        m["entire_cvr_logloss"] = metrics.log_loss(wc, p_cvr)
        m["entire_cvr_calibration"] = metrics.calibration(wc, p_cvr, bins)
        m["unclicked_cvr_auc"] = metrics.auc(wc[~clicked], p_cvr[~clicked])
        if "p_convert" in truth:
            m["entire_cvr_mean_true_p"] = float(truth["p_convert"].mean())
    return m


def truth_dir(manifest: dict) -> str | None:
    return (manifest.get("inputs") or {}).get("truth")
