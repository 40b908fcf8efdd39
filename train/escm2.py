"""ESCM² (Wang et al., SIGIR 2022): ESMM plus a counterfactual CVR risk on the clicked rows.

ESMM trains pCVR only through pCTR x pCVR, so where pCTR is small its gradient fades
and pCVR is barely identified (ESCM² measured ESMM's pCVR running high). ESCM² adds a
risk that estimates the ideal entire-space CVR loss from the clicked rows alone,
weighting each by its inverse propensity (the click probability):

    e_i  = BCE(z_i, pCVR_i)                  the CVR error, known on clicked rows only
    p_i  = max(sg(pCTR_i), propensity_clip)  the propensity, no gradient through it
    R_IPS = 1/|D| sum_D  y_i e_i / p_i       E[y/p] = 1 per row: unbiased for 1/|D| sum_D e_i

``escm2-ips``:  L = BCE(y, pCTR) + BCE(y z, pCTR pCVR) + lambda_cvr R_IPS

``escm2-dr`` adds an imputation tower: g_i = sigmoid(imputation logit) is the imputed
conversion probability of EVERY impression, and the imputed error is
ê_i = BCE(sg(g_i), pCVR_i) (a function of pCVR, so unclicked rows train pCVR towards g):

    R_DR  = 1/|D| sum_D [ ê_i + y_i (e_i - ê_i) / p_i ]
    R_IMP = 1/|D| sum_D   y_i (sg(e_i) - BCE(g_i, sg(pCVR_i)))^2 / p_i
    L = BCE(y, pCTR) + BCE(y z, pCTR pCVR) + lambda_cvr (R_DR + R_IMP)

R_DR is unbiased when either the propensity or the imputation is right (doubly robust);
R_IMP fits the imputation where errors are observed, weighted like R_IPS (DR-JL).
Every term is a mean over ALL impressions (the paper's 1/|D|): per clicked row that is
the issue's "mean over clicked rows" times the batch's click rate, so lambda_cvr here
is the clicked-row lambda times the CTR. Serving is ESMM's: pCTR, pCVR, their product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from train.jagged import Batch, KeyedJagged
from train.model import ESMM, Towers, bce_log_prob, bce_logits


def propensity(ctr_logit: torch.Tensor, clip: float) -> torch.Tensor:
    """max(pCTR, clip), detached: the propensity divides the risk, it is not trained by it."""
    x = ctr_logit.detach()
    return torch.sigmoid(x if x.dtype == torch.float64 else x.float()).clamp(min=clip)


def esmm_terms(ctr_logit, cvr_logit, click, conversion) -> torch.Tensor:
    """Per-sample BCE(y, pCTR) + BCE(y z, pCTR pCVR) (ESMM's loss before the mean)."""
    log_ctcvr = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    return bce_logits(ctr_logit, click) + bce_log_prob(log_ctcvr, click * conversion)


def escm2_ips_terms(ctr_logit, cvr_logit, click, conversion, lam: float, clip: float) -> torch.Tensor:
    """Per-sample ESCM²-IPS loss (module docstring); its weighted mean is the loss."""
    e = bce_logits(cvr_logit, conversion)
    return esmm_terms(ctr_logit, cvr_logit, click, conversion) + lam * click * e / propensity(ctr_logit, clip)


def escm2_dr_terms(ctr_logit, cvr_logit, imp_logit, click, conversion, lam: float, clip: float) -> torch.Tensor:
    """Per-sample ESCM²-DR loss (module docstring); its weighted mean is the loss."""
    p = propensity(ctr_logit, clip)
    e = bce_logits(cvr_logit, conversion)
    g = torch.sigmoid(imp_logit)
    e_hat = bce_logits(cvr_logit, g.detach())  # imputed error, trains pCVR on every row
    dr = e_hat + click * (e - e_hat) / p
    imp = click * (e.detach() - bce_logits(cvr_logit.detach(), g)).square() / p
    return esmm_terms(ctr_logit, cvr_logit, click, conversion) + lam * (dr + imp)


class Escm2IPS(ESMM):
    """ESMM + lambda_cvr x the IPS counterfactual CVR risk (shared embedding, two towers)."""

    name = "escm2-ips"

    def sample_losses(self, batch: Batch) -> torch.Tensor:
        out = self(batch.features)
        k = self.cfg
        return escm2_ips_terms(out["ctr"], out["cvr"], batch.click, batch.conversion, k.lambda_cvr,
                               k.propensity_clip)


class Escm2DR(ESMM):
    """ESMM + lambda_cvr x (the doubly robust CVR risk + the imputation tower's fit)."""

    name = "escm2-dr"

    def __init__(self, fields, cfg=None, embedding_factory=None):
        super().__init__(fields, cfg, embedding_factory)
        self.dense = Towers(["ctr", "cvr", "imp"], self.in_dim, self.cfg)

    def forward(self, kjt: KeyedJagged) -> dict[str, torch.Tensor]:
        e = self.embeddings[0](kjt).flatten(1)  # [B, F*dim], shared by the three towers
        a, b, g = self.dense(e, e, e)
        return {"ctr": a, "cvr": b, "imp": g}

    def priors_from_sums(self, s):
        p = super().priors_from_sums(s)
        return {**p, "imp": p["cvr"]}  # the imputation starts at the clicked rows' CVR

    def sample_losses(self, batch: Batch) -> torch.Tensor:
        out = self(batch.features)
        k = self.cfg
        return escm2_dr_terms(out["ctr"], out["cvr"], out["imp"], batch.click, batch.conversion,
                              k.lambda_cvr, k.propensity_clip)
