"""ESMM (Ma et al., SIGIR 2018), as in the paper.

    shared embedding e = Emb(features)           one dictionary for both towers
    pCTR   = sigmoid(a)      a = CTR tower(e)
    pCVR   = sigmoid(b)      b = CVR tower(e)
    pCTCVR = pCTR * pCVR     the product, never a third tower
    L = BCE(y, pCTR) + BCE(y*z, pCTCVR)   over ALL impressions; no CVR loss

Everything is computed from the logits: log pCTCVR = logsigmoid(a) + logsigmoid(b) and
log(1 - pCTCVR) = log1mexp(log pCTCVR), so a product of two tiny sigmoids never gives 0,
NaN or -inf in the loss.

Beside it: the plumbing every model shares (train/ctr_cvr_model.py, train/towers.py,
train/losses.py), the paper's baselines (train/baselines.py) and the models that
correct ESMM's own bias (train/escm2.py, train/dcmt.py); the configuration, one part
per concern (train/model_config.py: ModelShape, OptimConfig, ModelKnobs = EsmmConfig).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.ctr_cvr_model import (  # noqa: F401  (re-exported: the model surface)
    CtrCvrModel, EmbeddingFactory, default_embedding_factory, dense_adam,
)
from train.embedding import FieldConfig
from train.jagged import Batch, KeyedJagged
from train.losses import bce_log_prob, bce_logits, fused_esmm_mean_loss, label_sums, log1mexp, weighted_mean  # noqa: F401
from train.model_config import EsmmConfig, ModelKnobs, ModelShape, OptimConfig  # noqa: F401  (one per concern)
from train.towers import MLP, TOWERS, Towers, make_tower  # noqa: F401


class ESMM(CtrCvrModel):
    """ESMM; ``shared=False`` is ESMM-NS (each tower its own embedding dictionary)."""

    name = "esmm"
    outputs = ("p_ctr", "p_cvr", "p_ctcvr")

    def __init__(self, fields: list[FieldConfig], cfg: EsmmConfig | None = None,
                 embedding_factory: EmbeddingFactory | None = None, shared: bool = True):
        cfg = cfg or EsmmConfig()
        super().__init__(fields, cfg)
        make_emb = embedding_factory or default_embedding_factory(cfg)
        self.shared = shared
        self.embeddings = nn.ModuleList([make_emb(self.fields, cfg.dim) for _ in range(1 if shared else 2)])
        self.dense = Towers(["ctr", "cvr"], self.in_dim, cfg)

    def forward(self, kjt: KeyedJagged) -> dict[str, torch.Tensor]:
        e_ctr = self.embeddings[0](kjt).flatten(1)  # [B, F*dim], one dictionary ...
        e_cvr = e_ctr if self.shared else self.embeddings[1](kjt).flatten(1)  # ... for both towers
        a, b = self.dense(e_ctr, e_cvr)  # CTR and CVR logits, [B] each
        return {"ctr": a, "cvr": b}

    def sample_losses(self, batch: Batch) -> torch.Tensor:
        out = self(batch.features)
        return esmm_sample_losses(out["ctr"], out["cvr"], batch.click, batch.conversion)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The mean of ``sample_losses``; unweighted, by one fused kernel where it is built
        (ESMM's own losses only: a subclass with losses of its own takes the general path)."""
        if self.loss_mean is not None or batch.weight is not None or batch.size == 0 \
                or type(self).sample_losses is not ESMM.sample_losses:
            return super().loss(batch)
        out = self(batch.features)
        fused = fused_esmm_mean_loss(out["ctr"], out["cvr"], batch.click, batch.conversion)
        return fused if fused is not None else esmm_loss(out["ctr"], out["cvr"], batch.click, batch.conversion)

    @torch.no_grad()
    def predict(self, kjt: KeyedJagged) -> dict[str, torch.Tensor]:
        out = self(kjt)
        p_ctr, p_cvr = torch.sigmoid(out["ctr"]), torch.sigmoid(out["cvr"])
        return {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr}


def esmm_sample_losses(ctr_logit, cvr_logit, click, conversion) -> torch.Tensor:
    """Per sample BCE(y, pCTR) + BCE(y*z, pCTR*pCVR). No CVR term."""
    log_ctcvr = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    return bce_logits(ctr_logit, click) + bce_log_prob(log_ctcvr, click * conversion)


def esmm_loss(ctr_logit, cvr_logit, click, conversion, weight=None) -> torch.Tensor:
    """L = BCE(y, pCTR) + BCE(y*z, pCTR*pCVR), mean over the batch. No CVR term."""
    return weighted_mean(esmm_sample_losses(ctr_logit, cvr_logit, click, conversion), weight)
