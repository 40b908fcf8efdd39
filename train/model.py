"""ESMM (Ma et al., SIGIR 2018), top to bottom as in the paper.

    pCTR   = sigmoid(a)          a = CTR tower(shared embeddings)
    pCVR   = sigmoid(b)          b = CVR tower(the same embeddings)
    pCTCVR = pCTR * pCVR         the product, never a third tower
    L = BCE(y, pCTR) + BCE(y*z, pCTCVR)   over ALL impressions; no CVR loss

Everything is computed from the logits: log pCTCVR = logsigmoid(a) + logsigmoid(b)
and log(1 - pCTCVR) = log1mexp(log pCTCVR), so a product of two tiny sigmoids never
gives 0, NaN or -inf in the loss.

Two parts, kept apart on purpose: embedding modules (built by ``embedding_factory``,
so a sharded collection drops in) and ``model.dense``, a plain ``nn.Module`` holding
the towers (the part DDP wraps: ``model.dense = DDP(model.dense)``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields as dc_fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from train.embedding import EmbeddingCollection, FieldConfig
from train.jagged import Batch, KeyedJagged, take_batch


@dataclass
class EsmmConfig:
    """Model and optimizer knobs (the paper's defaults); the baselines read theirs too."""
    dim: int = 18  # embedding dimension
    tower: str = "mlp"  # key of TOWERS
    hidden: tuple[int, ...] = (200, 80)  # tower hidden sizes; the output is one logit
    activation: str = "relu"
    dropout: float = 0.0
    pooling: str = "sum"  # multi / weighted fields: sum | mean over ALL values
    lr: float = 1e-3  # Adam for the towers
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    sparse_optimizer: str = "adam"  # embedding rows: adam (lazy) | adagrad (row-wise where supported)
    sparse_lr: float | None = None  # None = lr
    init_std: float = 0.01
    init_bias: bool = True  # start each tower's output bias at its label's log-odds in the training data
    tower_precision: str = "auto"  # auto | fp32 | bf16: towers under bf16 autocast (2.2x faster matmuls on CPUs
    #                                with avx512_bf16/AMX, and on GPU); weights, embedding rows and losses stay fp32
    embedding: str = "sharded"  # sharded: train/shard's collection at world size 1 (lazy row-wise
    #                             optimizers, deduplicated lookups; the fast path) | plain: the reference
    # baselines (see train/baselines.py)
    aman_rate: float = 0.1  # AMAN: fraction of unclicked impressions sampled in as negatives
    oversample_k: int = 5  # OVERSAMPLING: each converted clicked sample appears k times
    unbias_clip: float = 100.0  # UNBIAS: weight 1/pCTR clipped to at most this
    division_min_ctr: float = 1e-4  # DIVISION: pCVR = pCTCVR / max(pCTR, this), clamped to [0, 1]

    @classmethod
    def from_dict(cls, d: dict) -> "EsmmConfig":
        known = {f.name for f in dc_fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise KeyError(f"unknown model config keys {sorted(unknown)}")
        d = dict(d)
        for k in ("hidden", "betas"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


EmbeddingFactory = Callable[[list[FieldConfig], int], nn.Module]


def default_embedding_factory(cfg: EsmmConfig) -> EmbeddingFactory:
    """One process: ``cfg.embedding`` picks the collection; every table draws its init
    from torch's global generator, so seeds differ and ESMM-NS's two tables differ."""
    if cfg.embedding == "plain":
        return lambda fields, dim: EmbeddingCollection(fields, dim, init_std=cfg.init_std)
    if cfg.embedding != "sharded":
        raise KeyError(f"unknown embedding {cfg.embedding!r} (sharded | plain)")
    from train.shard import ShardedEmbeddingCollection

    def make(fields, dim):
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        return ShardedEmbeddingCollection(fields, dim, init_std=cfg.init_std, seed=seed)

    return make


# ---------------------------------------------------------------- towers (pluggable)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "prelu": nn.PReLU}


class MLP(nn.Module):
    """in -> hidden... -> 1 logit; the paper's tower (200-80-1 on the field embeddings)."""

    def __init__(self, in_dim: int, cfg: EsmmConfig):
        super().__init__()
        layers, d = [], in_dim
        for h in cfg.hidden:
            layers += [nn.Linear(d, h), ACTIVATIONS[cfg.activation]()]
            if cfg.dropout:
                layers.append(nn.Dropout(cfg.dropout))
            d = h
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in] -> [B]
        return self.net(x).squeeze(-1)

    @torch.no_grad()
    def set_output_bias(self, logit: float) -> None:
        self.net[-1].bias.fill_(logit)


# name -> (in_dim, cfg) -> module mapping [B, in_dim] to [B] logits. Register newer
# sub-networks here (the paper invites replacing the MLP); ``set_output_bias(logit)`` is
# optional (used by EsmmConfig.init_bias).
TOWERS: dict[str, Callable[[int, EsmmConfig], nn.Module]] = {"mlp": MLP}


def make_tower(in_dim: int, cfg: EsmmConfig) -> nn.Module:
    if cfg.tower not in TOWERS:
        raise KeyError(f"unknown tower {cfg.tower!r} (have {sorted(TOWERS)})")
    return TOWERS[cfg.tower](in_dim, cfg)


class Towers(nn.Module):
    """The dense, replicated part: one tower per head, each on its own input."""

    def __init__(self, names: list[str], in_dim: int, cfg: EsmmConfig):
        super().__init__()
        self.names = list(names)
        self.towers = nn.ModuleList(make_tower(in_dim, cfg) for _ in names)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t(x) for t, x in zip(self.towers, xs))


# ---------------------------------------------------------------- losses from logits

def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near0 = x > -math.log(2.0)
    # each branch sees only inputs where it is finite, so the unused one's gradient is 0, not NaN
    hi = torch.log(-torch.expm1(torch.where(near0, x, -1.0)))
    lo = torch.log1p(-torch.exp(torch.where(near0, -1.0, x)))
    return torch.where(near0, hi, lo)


def bce_logits(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE(target, sigmoid(logit))."""
    return F.binary_cross_entropy_with_logits(logit, target, reduction="none")


def bce_log_prob(log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE(target, p) given log p (p may be a product of sigmoids)."""
    return -(target * log_p + (1.0 - target) * log1mexp(log_p))


def label_sums(click: torch.Tensor, conversion: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [4]: sums of w, w*click, w*conversion, w*click*conversion over the rows."""
    w = torch.ones_like(click, dtype=torch.float64) if weight is None else weight.double()
    c, z = click.double(), conversion.double()
    return torch.stack([w.sum(), (w * c).sum(), (w * z).sum(), (w * c * z).sum()])


def weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_sample.mean()
    return (per_sample * weight).sum() / weight.sum().clamp(min=1e-12)


def esmm_loss(ctr_logit, cvr_logit, click, conversion, weight=None) -> torch.Tensor:
    """L = BCE(y, pCTR) + BCE(y*z, pCTR*pCVR), mean over the batch. No CVR term."""
    log_ctcvr = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    per_sample = bce_logits(ctr_logit, click) + bce_log_prob(log_ctcvr, click * conversion)
    return weighted_mean(per_sample, weight)


# ---------------------------------------------------------------- the common model surface

def dense_adam(params, **kw) -> torch.optim.Adam:
    """Adam on the towers, fused (one kernel over all tensors; CPU and CUDA) when torch
    has it: ~1.5 % less CPU per ESMM step here. Same update up to float rounding (a
    checkpoint from an unfused optimizer loads and resumes unfused: its param_groups win)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # an older torch or a device without the kernel
        return torch.optim.Adam(params, **kw)


class CtrCvrModel(nn.Module):
    """What the loop, the evaluation and the Ray worker rely on.

    Subclasses set ``self.embeddings`` (nn.ModuleList of embedding modules) and
    ``self.dense`` (the towers), and define ``forward(kjt) -> {head: logit}``,
    ``loss(batch)`` and ``predict(kjt) -> {"p_ctr"|"p_cvr"|"p_ctcvr": prob}``.
    ``train_view(batch, gen)`` turns a batch of impressions into what the model trains
    on (identity here; the baselines filter, sample, replicate or weight).
    """

    name = "model"
    outputs: tuple[str, ...] = ()  # which of p_ctr, p_cvr, p_ctcvr predict() gives

    def __init__(self, fields: list[FieldConfig], cfg: EsmmConfig):
        super().__init__()
        self.fields, self.cfg = list(fields), cfg

    def embedding_modules(self) -> list[nn.Module]:
        return list(self.embeddings)

    def dense_parameters(self) -> list[nn.Parameter]:
        return list(self.dense.parameters())

    def label_priors(self, click: torch.Tensor, conversion: torch.Tensor,
                     weight: torch.Tensor | None = None) -> dict[str, float]:
        """Each head's base rate on the rows it trains on (its ``train_view``'s labels)."""
        return self.priors_from_sums(label_sums(click, conversion, weight))

    def priors_from_sums(self, s: torch.Tensor) -> dict[str, float]:
        """Base rates from ``label_sums`` (sums add up across workers)."""
        w, wc, _, wcz = (float(x) for x in s)
        return {"ctr": wc / max(w, 1e-12), "cvr": wcz / max(wc, 1e-12), "ctcvr": wcz / max(w, 1e-12)}

    @torch.no_grad()
    def init_output_bias(self, click: torch.Tensor | None, conversion: torch.Tensor | None,
                         weight: torch.Tensor | None = None, sums: torch.Tensor | None = None) -> dict[str, float]:
        """Start every tower at its label's base rate (no steps wasted learning the bias).

        Pass the labels (and weights) of the rows the model trains on, e.g. the whole
        training view, or their ``label_sums`` (summed over workers); returns the priors used.
        """
        priors = self.priors_from_sums(sums if sums is not None else label_sums(click, conversion, weight))
        for name, tower in zip(self.dense.names, self.dense.towers):
            p = min(max(priors[name], 1e-6), 1 - 1e-6)
            if hasattr(tower, "set_output_bias"):
                tower.set_output_bias(math.log(p / (1 - p)))
        return priors

    def make_optimizers(self) -> list:
        """Adam on the dense towers, plus each embedding module's own sparse optimizer."""
        c = self.cfg
        opts = [dense_adam(self.dense_parameters(), lr=c.lr, betas=c.betas, eps=c.eps)]
        ecfg = {"lr": c.lr, "sparse_lr": c.sparse_lr or c.lr, "sparse_optimizer": c.sparse_optimizer,
                "betas": c.betas, "eps": c.eps}
        return opts + [e.make_optimizer(ecfg) for e in self.embedding_modules()]

    def select_rows(self, click: torch.Tensor, conversion: torch.Tensor,
                    gen: torch.Generator | None = None) -> torch.Tensor | None:
        """Indices of the rows to train on (repeats allowed); None = every row as is."""
        return None

    def row_weight(self, kjt: KeyedJagged) -> torch.Tensor | None:
        """Per-sample loss weights of the selected rows; None = 1."""
        return None

    def train_view(self, batch: Batch, gen: torch.Generator | None = None) -> Batch:
        """What the model trains on from ``batch``: select_rows, then row_weight. The local
        trainer applies the same two to the whole split once per epoch instead."""
        rows = self.select_rows(batch.click, batch.conversion, gen)
        view = batch if rows is None else take_batch(batch, rows)
        w = self.row_weight(view.features) if view.size else None
        if w is not None:
            view = Batch(view.features, view.click, view.conversion, w)
        return view

    @torch.no_grad()
    def predict(self, kjt: KeyedJagged) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def in_dim(self) -> int:
        return len(self.fields) * self.cfg.dim


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

    def loss(self, batch: Batch) -> torch.Tensor:
        out = self(batch.features)
        return esmm_loss(out["ctr"], out["cvr"], batch.click, batch.conversion, batch.weight)

    @torch.no_grad()
    def predict(self, kjt: KeyedJagged) -> dict[str, torch.Tensor]:
        out = self(kjt)
        p_ctr, p_cvr = torch.sigmoid(out["ctr"]), torch.sigmoid(out["cvr"])
        return {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr}
