"""Per-sample losses computed from logits, and their weighted mean."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
