"""The paper's Table 2 baselines, each a first-class model name in ``MODELS``.

Every baseline but DIVISION is one DNN (its own embedding dictionary + one tower of
ESMM's shape) predicting pCVR; they differ only in what they train on, which is
exactly ``train_view(batch)``:

    ctr           all impressions, label y                 (the independent CTR network)
    base          clicked impressions only, label z
    aman          clicked + each unclicked one with prob aman_rate, as negatives (z=0)
    oversampling  clicked; converted ones appear oversample_k times
    unbias        clicked, weighted by min(1/pCTR, unbias_clip), pCTR from the ctr model
    division      two networks on all impressions: CTR (y) and CTCVR (y*z);
                  pCVR = pCTCVR / pCTR clamped to [0, 1]
    esmm-ns       ESMM with one embedding dictionary per tower
    esmm          ESMM
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from train.embedding import FieldConfig
from train.jagged import Batch, KeyedJagged
from train.model import (
    ESMM, CtrCvrModel, EmbeddingFactory, EsmmConfig, Towers, bce_logits, default_embedding_factory,
    weighted_mean,
)


class SingleTask(CtrCvrModel):
    """One embedding dictionary, one tower, one label (``label``: click | conversion)."""

    label = "conversion"

    def __init__(self, fields: list[FieldConfig], cfg: EsmmConfig | None = None,
                 embedding_factory: EmbeddingFactory | None = None):
        cfg = cfg or EsmmConfig()
        super().__init__(fields, cfg)
        make_emb = embedding_factory or default_embedding_factory(cfg)
        self.embeddings = nn.ModuleList([make_emb(self.fields, cfg.dim)])
        self.dense = Towers([self.label], self.in_dim, cfg)

    @property
    def outputs(self):
        return ("p_ctr",) if self.label == "click" else ("p_cvr",)

    def priors_from_sums(self, s):
        w, wc, wz, _ = (float(x) for x in s)
        return {self.label: (wc if self.label == "click" else wz) / max(w, 1e-12)}

    def forward(self, kjt: KeyedJagged) -> dict[str, torch.Tensor]:
        (logit,) = self.dense(self.embeddings[0](kjt).flatten(1))
        return {"ctr" if self.label == "click" else "cvr": logit}

    def loss(self, batch: Batch) -> torch.Tensor:
        if batch.size == 0:  # e.g. a batch without clicks for BASE
            return sum(p.sum() * 0.0 for p in self.dense_parameters())
        (logit,) = self(batch.features).values()
        target = batch.click if self.label == "click" else batch.conversion
        return weighted_mean(bce_logits(logit, target), batch.weight)

    @torch.no_grad()
    def predict(self, kjt: KeyedJagged) -> dict[str, torch.Tensor]:
        (logit,) = self(kjt).values()
        return {self.outputs[0]: torch.sigmoid(logit)}


class CTR(SingleTask):
    name, label = "ctr", "click"


def clicked_rows(click: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(click > 0).squeeze(1)


class Base(SingleTask):
    name = "base"

    def select_rows(self, click, conversion, gen=None):
        return clicked_rows(click)


class AMAN(SingleTask):
    """All Missing As Negative: unclicked impressions sampled in as z=0 negatives."""
    name = "aman"

    def select_rows(self, click, conversion, gen=None):
        keep = (click > 0) | (torch.rand(click.numel(), generator=gen) < self.cfg.aman_rate)
        return torch.nonzero(keep).squeeze(1)  # conversion is 0 on unclicked rows


class Oversampling(SingleTask):
    name = "oversampling"

    def select_rows(self, click, conversion, gen=None):
        clicked = clicked_rows(click)
        copies = torch.where(conversion[clicked] > 0, self.cfg.oversample_k, 1)
        return torch.repeat_interleave(clicked, copies)


class Unbias(SingleTask):
    """Clicked samples re-weighted by 1/pCTR of the independent CTR network (clipped)."""
    name = "unbias"

    def __init__(self, fields, cfg=None, embedding_factory=None, ctr_model: CtrCvrModel | None = None):
        super().__init__(fields, cfg, embedding_factory)
        self.set_ctr_model(ctr_model)

    def set_ctr_model(self, ctr_model: CtrCvrModel | None) -> None:
        # kept outside the module tree: not trained, not saved with this model
        self.__dict__["ctr_model"] = ctr_model

    def select_rows(self, click, conversion, gen=None):
        return clicked_rows(click)

    @torch.no_grad()
    def row_weight(self, kjt):
        if self.ctr_model is None:
            raise RuntimeError("unbias needs the independent ctr model (set_ctr_model)")
        was_training = self.ctr_model.training
        self.ctr_model.eval()
        p_ctr = self.ctr_model.predict(kjt)["p_ctr"]
        self.ctr_model.train(was_training)
        return (1.0 / p_ctr.clamp(min=1e-12)).clamp(max=self.cfg.unbias_clip)


class Division(CtrCvrModel):
    """Separate CTR and CTCVR networks (no shared parameters); pCVR = pCTCVR / pCTR."""
    name = "division"
    outputs = ("p_ctr", "p_cvr", "p_ctcvr")

    def __init__(self, fields, cfg=None, embedding_factory=None):
        cfg = cfg or EsmmConfig()
        super().__init__(fields, cfg)
        make_emb = embedding_factory or default_embedding_factory(cfg)
        self.embeddings = nn.ModuleList([make_emb(self.fields, cfg.dim) for _ in range(2)])
        self.dense = Towers(["ctr", "ctcvr"], self.in_dim, cfg)

    def forward(self, kjt):
        a, c = self.dense(self.embeddings[0](kjt).flatten(1), self.embeddings[1](kjt).flatten(1))
        return {"ctr": a, "ctcvr": c}

    def loss(self, batch):
        out = self(batch.features)
        per = bce_logits(out["ctr"], batch.click) + bce_logits(out["ctcvr"], batch.click * batch.conversion)
        return weighted_mean(per, batch.weight)

    @torch.no_grad()
    def predict(self, kjt):
        out = self(kjt)
        p_ctr, p_ctcvr = torch.sigmoid(out["ctr"]), torch.sigmoid(out["ctcvr"])
        p_cvr = (p_ctcvr / p_ctr.clamp(min=self.cfg.division_min_ctr)).clamp(0.0, 1.0)
        return {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctcvr}


class EsmmNS(ESMM):
    name = "esmm-ns"

    def __init__(self, fields, cfg=None, embedding_factory=None):
        super().__init__(fields, cfg, embedding_factory, shared=False)


# name -> class; every class takes (fields, cfg, embedding_factory)
MODELS: dict[str, Callable[..., CtrCvrModel]] = {
    "ctr": CTR, "base": Base, "aman": AMAN, "oversampling": Oversampling, "unbias": Unbias,
    "division": Division, "esmm-ns": EsmmNS, "esmm": ESMM,
}
# the models with their own pCTR: a lone `esmm train` (no independent ctr model) scores
# their CTCVR with it; `esmm experiment` uses the ctr model's pCTR for every model (the paper's)
OWN_CTR = ("esmm", "esmm-ns", "ctr")
NEEDS_CTR_MODEL = ("unbias",)


def build_model(name: str, fields: list[FieldConfig], cfg: EsmmConfig | None = None,
                embedding_factory: EmbeddingFactory | None = None) -> CtrCvrModel:
    """The model registered as ``name`` (see MODELS)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r} (have {', '.join(MODELS)})")
    return MODELS[name](fields, cfg or EsmmConfig(), embedding_factory)
