"""The towers: the dense, replicated part of every model (what DDP wraps).

``TOWERS`` maps a name to a class ``(in_dim, cfg) -> module`` mapping [B, in_dim] to [B]
logits; the paper's is the MLP (200-80-1). ``Towers`` holds one per head.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from train.model_config import ModelShape

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "prelu": nn.PReLU}


class MLP(nn.Module):
    """in -> hidden... -> 1 logit; the paper's tower (200-80-1 on the field embeddings)."""

    def __init__(self, in_dim: int, cfg: ModelShape):
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
# optional (used by ModelShape.init_bias).
TOWERS: dict[str, Callable[[int, ModelShape], nn.Module]] = {"mlp": MLP}


def make_tower(in_dim: int, cfg: ModelShape) -> nn.Module:
    if cfg.tower not in TOWERS:
        raise KeyError(f"unknown tower {cfg.tower!r} (have {sorted(TOWERS)})")
    return TOWERS[cfg.tower](in_dim, cfg)


class Towers(nn.Module):
    """The dense, replicated part: one tower per head, each on its own input."""

    def __init__(self, names: list[str], in_dim: int, cfg: ModelShape):
        super().__init__()
        self.names = list(names)
        self.towers = nn.ModuleList(make_tower(in_dim, cfg) for _ in names)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t(x) for t, x in zip(self.towers, xs))
