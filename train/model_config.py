"""The model's configuration, one dataclass per concern.

- ``ModelShape``: what the network is (embedding dimension, towers, pooling, init,
  precision, which embedding implementation);
- ``OptimConfig``: how its weights move (Adam for the towers, the row-wise optimizer
  for the embedding rows);
- ``ModelKnobs``: the knobs of the paper's baselines and of the models after ESMM, each
  read by one model only.

``EsmmConfig`` is the three together, flat: it is what config files, ``--set key=value``
and MODEL/config.json name (train/config.py), so a key never says which part it is in.
Code that needs one concern takes that part (``cfg.part(OptimConfig)``), not the whole.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields as dc_fields
from typing import TypeVar

T = TypeVar("T")


@dataclass
class ModelShape:
    """The network (the paper's defaults)."""
    dim: int = 18  # embedding dimension
    tower: str = "mlp"  # key of TOWERS
    hidden: tuple[int, ...] = (200, 80)  # tower hidden sizes; the output is one logit
    activation: str = "relu"
    dropout: float = 0.0
    pooling: str = "sum"  # multi / weighted fields: sum | mean over ALL values
    init_std: float = 0.01
    init_bias: bool = True  # start each tower's output bias at its label's log-odds in the training data
    tower_precision: str = "auto"  # auto | fp32 | bf16: towers under bf16 autocast (2.2x faster matmuls on CPUs
    #                                with avx512_bf16/AMX, and on GPU); weights, embedding rows and losses stay fp32
    embedding: str = "sharded"  # sharded: train/shard's collection at world size 1 (lazy row-wise
    #                             optimizers, deduplicated lookups; the fast path) | plain: the reference


@dataclass
class OptimConfig:
    """Adam for the towers; the embedding rows' own row-wise optimizer."""
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    sparse_optimizer: str = "adam"  # embedding rows: adam (lazy) | adagrad (row-wise where supported)
    sparse_lr: float | None = None  # None = lr

    def rows(self) -> dict:
        """What an embedding module's make_optimizer reads."""
        return {"lr": self.lr, "sparse_lr": self.sparse_lr or self.lr, "sparse_optimizer": self.sparse_optimizer,
                "betas": self.betas, "eps": self.eps}


@dataclass
class ModelKnobs:
    """Each baseline's and later model's own knobs (see train/baselines.py, escm2.py, dcmt.py)."""
    aman_rate: float = 0.1  # AMAN: fraction of unclicked impressions sampled in as negatives
    oversample_k: int = 5  # OVERSAMPLING: each converted clicked sample appears k times
    unbias_clip: float = 100.0  # UNBIAS-IPS: weight 1/pCTR clipped to at most this
    division_min_ctr: float = 1e-4  # DIVISION: pCVR = pCTCVR / max(pCTR, this), clamped to [0, 1]
    # the models after ESMM; defaults set a priori, not tuned
    lambda_cvr: float = 1.0  # ESCM²: weight of the counterfactual CVR risk (IPS or DR)
    propensity_clip: float = 0.01  # ESCM², DCMT: pCTR clipped to >= this (DCMT: and <= 1 - this)
    dcmt_lambda: float = 1.0  # DCMT: weight of the soft constraint |1 - (pCVR + counterfactual pCVR)|


@dataclass
class EsmmConfig(ModelKnobs, OptimConfig, ModelShape):
    """ModelShape + OptimConfig + ModelKnobs, flat (fields in that order)."""

    def part(self, cls: type[T]) -> T:
        """The ``cls`` concern alone (ModelShape, OptimConfig or ModelKnobs), as a copy."""
        return cls(**{f.name: getattr(self, f.name) for f in dc_fields(cls)})

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
