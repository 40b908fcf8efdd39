"""The paper's Table 2 baselines, each a first-class model name in ``MODELS`` (with ESMM
and the models after it, train/escm2.py and train/dcmt.py).

Every baseline but DIVISION is one DNN (its own embedding dictionary + one tower of
ESMM's shape) predicting pCVR; they differ only in what they train on, which is
exactly ``train_view(batch)``:

    ctr           all impressions, label y                 (the independent CTR network)
    base          clicked impressions only, label z
    aman          clicked + each unclicked one with prob aman_rate, as negatives (z=0)
    oversampling  clicked; converted ones appear oversample_k times
    unbias        the paper's: clicked, rejection-sampled with the ctr model's pCTR as the
                  rejection probability (a row is kept when u >= pCTR)
    unbias-ips    clicked, weighted by min(1/pCTR, unbias_clip) (inverse propensity)
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
from train.dcmt import DCMT
from train.escm2 import Escm2DR, Escm2IPS
from train.model import ESMM, CtrCvrModel, EmbeddingFactory, EsmmConfig, Towers, bce_logits, default_embedding_factory


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

    def sample_losses(self, batch: Batch) -> torch.Tensor:
        (logit,) = self(batch.features).values()
        return bce_logits(logit, batch.click if self.label == "click" else batch.conversion)

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


class UnbiasIPS(SingleTask):
    """Clicked samples re-weighted by 1/pCTR of the independent CTR network (clipped)."""
    name = "unbias-ips"
    weighs_rows = True

    def __init__(self, fields, cfg=None, embedding_factory=None, ctr_model: CtrCvrModel | None = None):
        super().__init__(fields, cfg, embedding_factory)
        self.set_ctr_model(ctr_model)

    def set_ctr_model(self, ctr_model: CtrCvrModel | None) -> None:
        # kept outside the module tree: not trained, not saved with this model
        self.__dict__["ctr_model"] = ctr_model

    def select_rows(self, click, conversion, gen=None):
        return clicked_rows(click)

    @torch.no_grad()
    def p_ctr(self, kjt) -> torch.Tensor:
        if self.ctr_model is None:
            raise RuntimeError(f"{self.name} needs the independent ctr model (set_ctr_model)")
        was_training = self.ctr_model.training
        self.ctr_model.eval()
        p = self.ctr_model.predict(kjt)["p_ctr"]
        self.ctr_model.train(was_training)
        return p

    @torch.no_grad()
    def row_weight(self, kjt):
        return (1.0 / self.p_ctr(kjt).clamp(min=1e-12)).clamp(max=self.cfg.unbias_clip)


def row_uniform(kjt: KeyedJagged, salt: int = 0) -> torch.Tensor:
    """[B] a uniform(0, 1) draw per row that is a fixed function of the row's ids (a hash),
    so the same row gets the same draw in every epoch, after a resume and on any number
    of workers."""
    B, nF = kjt.batch_size, len(kjt.keys)
    lengths = kjt.lengths()
    row = torch.arange(nF * B, device=lengths.device).remainder(B)
    row_of_value = torch.repeat_interleave(row, lengths, output_size=kjt.values.numel())
    field_of_value = torch.repeat_interleave(torch.arange(nF * B, device=lengths.device) // B, lengths,
                                             output_size=kjt.values.numel())
    h = (kjt.values.long() + 1) * 0x9E3779B1 + (field_of_value + 1) * 0x85EBCA77 + salt * 0xC2B2AE3D
    h = (h ^ (h >> 15)) * 0x2C1B3C6D
    acc = torch.zeros(B, dtype=torch.long, device=h.device).index_add_(0, row_of_value, h & 0x7FFFFFFF)
    acc = (acc ^ (acc >> 13)) * 0x27D4EB2F
    return (acc & 0xFFFFFF).double().div(float(1 << 24)).float()


class Unbias(UnbiasIPS):
    """The paper's UNBIAS: clicked samples rejection-sampled with pCTR as the rejection
    probability. A row is kept (weight 1) when its draw u >= pCTR, else rejected (weight
    0: it joins the batch but contributes nothing); u is a hash of the row's ids, so the
    kept set is one fixed sample of the training data, as a one-off rejection sampling."""
    name = "unbias"

    @torch.no_grad()
    def row_weight(self, kjt):
        return (row_uniform(kjt) >= self.p_ctr(kjt)).float()


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

    def sample_losses(self, batch):
        out = self(batch.features)
        return bce_logits(out["ctr"], batch.click) + bce_logits(out["ctcvr"], batch.click * batch.conversion)

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
    "unbias-ips": UnbiasIPS, "division": Division, "esmm-ns": EsmmNS, "esmm": ESMM,
    "escm2-ips": Escm2IPS, "escm2-dr": Escm2DR, "dcmt": DCMT,
}
# the models with their own pCTR: a lone `esmm train` (no independent ctr model) scores
# their CTCVR with it; `esmm experiment` uses the ctr model's pCTR for every model (the paper's)
OWN_CTR = ("esmm", "esmm-ns", "ctr")
NEEDS_CTR_MODEL = ("unbias", "unbias-ips")


def build_model(name: str, fields: list[FieldConfig], cfg: EsmmConfig | None = None,
                embedding_factory: EmbeddingFactory | None = None) -> CtrCvrModel:
    """The model registered as ``name`` (see MODELS)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r} (have {', '.join(MODELS)})")
    return MODELS[name](fields, cfg or EsmmConfig(), embedding_factory)
