"""DCMT (Zhu et al., ICDE 2023): a factual and a counterfactual CVR tower on the entire space.

Shared embedding, three towers: CTR, factual CVR r (what is served as pCVR) and
counterfactual CVR r*, which predicts the OPPOSITE outcome, 1 - z. On clicked rows the
factual tower learns z; on unclicked rows (z taken as 0) the counterfactual tower
learns 1 - 0 = 1; each side is re-weighted by its inverse propensity, and a soft
constraint ties the towers together (r + r* = 1) on every impression:

    p_i   = clip(sg(pCTR_i), propensity_clip, 1 - propensity_clip)   no gradient through it
    L_CVR = 1/|D| sum_D [ y_i BCE(z_i, r_i) / p_i + (1 - y_i) BCE(1 - z_i, r*_i) / (1 - p_i) ]
    L_C   = 1/|D| sum_D | 1 - (r_i + r*_i) |
    L     = BCE(y, pCTR) + L_CVR + dcmt_lambda L_C

Served: pCTR, pCVR = r, pCTCVR = pCTR x r.
"""
from __future__ import annotations

import torch

from train.jagged import Batch, KeyedJagged
from train.escm2 import propensity
from train.model import ESMM, Towers, bce_logits


def dcmt_terms(ctr_logit, cvr_logit, cf_logit, click, conversion, lam: float, clip: float) -> torch.Tensor:
    """Per-sample DCMT loss (module docstring); its weighted mean is the loss."""
    p = propensity(ctr_logit, clip).clamp(max=1.0 - clip)
    factual = click * bce_logits(cvr_logit, conversion) / p
    counterfactual = (1.0 - click) * bce_logits(cf_logit, 1.0 - conversion) / (1.0 - p)
    constraint = (1.0 - torch.sigmoid(cvr_logit) - torch.sigmoid(cf_logit)).abs()
    return bce_logits(ctr_logit, click) + factual + counterfactual + lam * constraint


class DCMT(ESMM):
    """Factual + counterfactual CVR towers tied by a soft constraint (module docstring)."""

    name = "dcmt"

    def __init__(self, fields, cfg=None, embedding_factory=None):
        super().__init__(fields, cfg, embedding_factory)
        self.dense = Towers(["ctr", "cvr", "cvr_cf"], self.in_dim, self.cfg)

    def forward(self, kjt: KeyedJagged) -> dict[str, torch.Tensor]:
        e = self.embeddings[0](kjt).flatten(1)  # [B, F*dim], shared by the three towers
        a, b, c = self.dense(e, e, e)
        return {"ctr": a, "cvr": b, "cvr_cf": c}

    def priors_from_sums(self, s):
        p = super().priors_from_sums(s)
        return {**p, "cvr_cf": 1.0 - p["cvr"]}

    def sample_losses(self, batch: Batch) -> torch.Tensor:
        out = self(batch.features)
        k = self.cfg
        return dcmt_terms(out["ctr"], out["cvr"], out["cvr_cf"], batch.click, batch.conversion,
                          k.dcmt_lambda, k.propensity_clip)
