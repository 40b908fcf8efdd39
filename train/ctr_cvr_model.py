"""What every model shares: the surface the loop, the evaluation and the Ray worker use.

A model is embedding modules (built by an ``EmbeddingFactory``, so a sharded collection
drops in) plus ``model.dense``, a plain ``nn.Module`` holding the towers (the part DDP
wraps). It defines ``forward(kjt) -> {head: logit}``, ``sample_losses(batch) -> [B]`` and
``predict(kjt)``; ``loss(batch)`` is the weighted mean of the per-sample losses, or, with
``loss_mean`` set (the Ray worker's global mean), whatever that computes from them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from train.embedding import EmbeddingCollection, FieldConfig
from train.jagged import Batch, KeyedJagged, take_batch
from train.losses import label_sums, weighted_mean
from train.model_config import EsmmConfig, ModelShape, OptimConfig

EmbeddingFactory = Callable[[list[FieldConfig], int], nn.Module]


def default_embedding_factory(cfg: ModelShape) -> EmbeddingFactory:
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


def dense_adam(params, **kw) -> torch.optim.Adam:
    """Adam on the towers, fused (one kernel over all tensors; CPU and CUDA) when torch
    has it: ~1.5 % less CPU per ESMM step here. Same update up to float rounding (a
    checkpoint from an unfused optimizer loads and resumes unfused: its param_groups win)."""
    params = list(params)
    try:
        return LeanAdam(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # an older torch or a device without the kernel
        return torch.optim.Adam(params, **kw)


class LeanAdam(torch.optim.Adam):
    """``torch.optim.Adam(fused=True)`` whose step, in the plain case, calls the fused
    kernel itself: the same kernel with the same arguments (the same update, bit for bit),
    without ``Optimizer.step``'s per-call grouping and checks (~0.26 -> ~0.11 ms a step
    for ESMM's 10 tower tensors here). The plain case: one parameter group, every parameter
    with a dense gradient and its state made (from the second step on), no closure, no
    hooks, no amsgrad, maximize, capturable or differentiable; anything else is Adam's
    own step."""

    def _plain(self) -> tuple[list, list, list, list, list] | None:
        if len(self.param_groups) != 1 or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks:
            return None
        g = self.param_groups[0]
        if not g["fused"] or g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"] \
                or torch.is_tensor(g["lr"]):
            return None
        ps, grads, m, v, steps = g["params"], [], [], [], []
        for p in ps:
            st = self.state.get(p)
            if p.grad is None or p.grad.is_sparse or not st:
                return None
            grads.append(p.grad)
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            steps.append(st["step"])
        return ps, grads, m, v, steps

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim import optimizer as _opt

        lists = None if closure is not None or _opt._global_optimizer_pre_hooks or \
            _opt._global_optimizer_post_hooks else self._plain()
        if lists is None:
            return super().step(closure)
        ps, grads, m, v, steps = lists
        g = self.param_groups[0]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(ps, grads, m, v, [], steps, amsgrad=False, lr=g["lr"], beta1=g["betas"][0],
                           beta2=g["betas"][1], weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
                           grad_scale=None, found_inf=None)
        return None


class CtrCvrModel(nn.Module):
    """What the loop, the evaluation and the Ray worker rely on.

    Subclasses set ``self.embeddings`` (nn.ModuleList of embedding modules) and
    ``self.dense`` (the towers), and define ``forward(kjt) -> {head: logit}``,
    ``sample_losses(batch) -> [B]`` and ``predict(kjt) -> {"p_ctr"|"p_cvr"|"p_ctcvr": prob}``.
    ``train_view(batch, gen)`` turns a batch of impressions into what the model trains
    on (identity here; the baselines filter, sample, replicate or weight).
    """

    name = "model"
    outputs: tuple[str, ...] = ()  # which of p_ctr, p_cvr, p_ctcvr predict() gives
    # (model, batch) -> loss; None = the batch's weighted mean. The Ray worker sets its
    # global mean over every rank's real rows (train.ray_worker.GlobalMeanLoss).
    loss_mean: Callable | None = None

    def __init__(self, fields: list[FieldConfig], cfg: EsmmConfig):
        super().__init__()
        self.fields, self.cfg = list(fields), cfg

    def sample_losses(self, batch: Batch) -> torch.Tensor:
        """[B] per-sample losses of the batch's rows (before weights)."""
        raise NotImplementedError

    def loss(self, batch: Batch) -> torch.Tensor:
        """The training loss of ``batch``: the weighted mean of ``sample_losses``."""
        if self.loss_mean is not None:
            return self.loss_mean(self, batch)
        if batch.size == 0:  # e.g. a batch without clicks for BASE
            return sum(p.sum() * 0.0 for p in self.dense_parameters())
        return weighted_mean(self.sample_losses(batch), batch.weight)

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
        o = self.cfg.part(OptimConfig)
        opts = [dense_adam(self.dense_parameters(), lr=o.lr, betas=o.betas, eps=o.eps)]
        return opts + [e.make_optimizer(o.rows()) for e in self.embedding_modules()]

    def select_rows(self, click: torch.Tensor, conversion: torch.Tensor,
                    gen: torch.Generator | None = None) -> torch.Tensor | None:
        """Indices of the rows to train on (repeats allowed); None = every row as is."""
        return None

    weighs_rows = False  # True when row_weight gives weights (UNBIAS: from another model's pCTR)

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
