"""The one training loop. It knows nothing about Ray, files or data formats.

    result = fit(model, train_batches_fn, eval_fn, TrainConfig(epochs=2))

- ``train_batches_fn(epoch, start_step) -> iterable of Batch``: epoch ``epoch``'s batches
  starting at step ``start_step`` (shuffled per epoch by the caller: locally
  ``Columns.batches(..., shuffle=True, seed, epoch, start_step)``; on Ray a dataset shard).
- ``eval_fn(model) -> float``: the validation loss (lower is better), once per epoch;
  early stopping watches it. On Ray it all-reduces across workers.
- ``checkpoint_cb(state)``: called with the full training state (model, optimizer
  states, data position, early-stopping state) at every epoch end and every
  ``checkpoint_every`` steps. ``fit(..., start_state=state)`` continues exactly there.

Randomness inside a step (AMAN's sampling) comes from a generator seeded by
(seed, epoch, step), so a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, fields as dc_fields
from typing import Callable, Iterable

import torch

from train.jagged import Batch
from train.malloc import keep_step_memory


@dataclass
class TrainConfig:
    epochs: int = 20  # at most; early stopping on the validation loss ends it sooner
    batch_size: int = 2048
    seed: int = 0
    patience: int = 2  # stop after this many epochs without a better validation loss; 0 = never
    min_delta: float = 0.0  # an improvement must beat the best by more than this
    restore_best: bool = True  # end with the weights of the best validation epoch
    val_fraction: float = 0.1  # training rows held out for validation / early stopping
    eval_batch_size: int = 32768
    threads: int = 2  # torch intra-op threads (0 = leave as is)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = epoch ends only
    max_steps: int = 0  # stop after this many steps in all (tests, benches); 0 = no limit

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in dc_fields(cls)}
        if unknown:
            raise KeyError(f"unknown train config keys {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) * 1_000_003 + int(step))


def train_step(model, batch: Batch, optimizers: list, gen: torch.Generator | None = None,
               apply_view: bool = True) -> float:
    """One step: the model's view of the batch (unless the data is a view already), loss,
    backward, every optimizer."""
    view = model.train_view(batch, gen) if apply_view else batch
    loss = model.loss(view)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return float(loss.detach())


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(model, train_batches_fn: Callable[[int, int], Iterable[Batch]],
        eval_fn: Callable[[object], float] | None, cfg: TrainConfig,
        optimizers: list | None = None, checkpoint_cb: Callable[[dict], None] | None = None,
        start_state: dict | None = None, progress: bool | None = None,
        steps_per_epoch: int | None = None, apply_view: bool = True) -> dict:
    """Train ``model`` for ``cfg.epochs`` epochs with per-epoch evaluation and early stopping.

    Args:
        model: a train.model.CtrCvrModel (train_view, loss, make_optimizers).
        train_batches_fn (callable): (epoch, start_step) -> batches of that epoch from that step.
        eval_fn (callable | None): model -> validation loss; None = no early stopping.
        cfg (TrainConfig): epochs, patience, seed, checkpoint_every ...
        optimizers (list | None): default ``model.make_optimizers()``.
        checkpoint_cb (callable | None): receives the state dict to persist.
        start_state (dict | None): a state given to checkpoint_cb earlier: resume from it.
        progress (bool | None): tqdm bar; None = only when stderr is a terminal.
        steps_per_epoch (int | None): the bar's total.
        apply_view (bool): call ``model.train_view`` on each batch; False when the batches
            come from a view of the whole split already (train.local.dataset_view).

    Returns:
        dict: history (per epoch: train_loss, val_loss, samples, seconds), best_epoch,
        best_val_loss, steps, stopped_early, and ``optimizers`` (the live objects).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_step_memory()  # a step's few-MB tensors reuse the heap, no page faults per step (train/malloc.py)
    optimizers = optimizers if optimizers is not None else model.make_optimizers()
    st = {"epoch": 0, "step": 0, "global_step": 0, "history": [], "best_val_loss": math.inf,
          "best_epoch": -1, "bad_epochs": 0, "stopped_early": False, "best_model": None,
          "epoch_loss_sum": 0.0, "epoch_samples": 0}
    if start_state is not None:
        model.load_state_dict(start_state["model"])
        for opt, s in zip(optimizers, start_state["optimizers"]):
            opt.load_state_dict(s)
        st.update({k: v for k, v in start_state.items() if k in st})

    def state() -> dict:
        return {**st, "model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers]}

    show = sys.stderr.isatty() if progress is None else progress
    while st["epoch"] < cfg.epochs and not st["stopped_early"]:
        epoch, t0 = st["epoch"], time.perf_counter()
        model.train()
        batches = train_batches_fn(epoch, st["step"])
        if show:
            from tqdm import tqdm
            batches = tqdm(batches, total=steps_per_epoch, initial=st["step"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           unit="batch", leave=False, dynamic_ncols=True)
        hit_max = False
        for batch in batches:
            loss = train_step(model, batch, optimizers, step_generator(cfg.seed, epoch, st["step"]), apply_view)
            st["step"] += 1
            st["global_step"] += 1
            st["epoch_loss_sum"] += loss * batch.size
            st["epoch_samples"] += batch.size
            if show and st["step"] % 20 == 0:
                batches.set_postfix(loss=f"{st['epoch_loss_sum'] / max(st['epoch_samples'], 1):.4f}")
            if cfg.max_steps and st["global_step"] >= cfg.max_steps:
                hit_max = True
                break
            if checkpoint_cb and cfg.checkpoint_every and st["step"] % cfg.checkpoint_every == 0:
                checkpoint_cb(state())
        if show:
            batches.close()
        val = float(eval_fn(model)) if eval_fn is not None else math.nan
        model.train()
        st["history"].append({"epoch": epoch, "train_loss": st["epoch_loss_sum"] / max(st["epoch_samples"], 1),
                              "val_loss": val, "samples": st["epoch_samples"], "steps": st["step"],
                              "seconds": time.perf_counter() - t0})
        if eval_fn is not None:
            if val < st["best_val_loss"] - cfg.min_delta:
                st.update(best_val_loss=val, best_epoch=epoch, bad_epochs=0)
                if cfg.restore_best:
                    st["best_model"] = _snapshot(model)
            else:
                st["bad_epochs"] += 1
                if cfg.patience and st["bad_epochs"] >= cfg.patience:
                    st["stopped_early"] = True
        st.update(epoch=epoch + 1, step=0, epoch_loss_sum=0.0, epoch_samples=0)
        if hit_max:
            st["stopped_early"] = True
        if checkpoint_cb:
            checkpoint_cb(state())
    if cfg.restore_best and st["best_model"] is not None and st["best_epoch"] != st["epoch"] - 1:
        model.load_state_dict(st["best_model"])
    return {"history": st["history"], "best_epoch": st["best_epoch"], "best_val_loss": st["best_val_loss"],
            "steps": st["global_step"], "stopped_early": st["stopped_early"], "optimizers": optimizers}


@torch.no_grad()
def view_loss(model, batches: Iterable[Batch], seed: int = 0) -> float:
    """Mean training loss (the model's own view, fixed sampling) over ``batches``: the
    validation loss early stopping watches."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i, b in enumerate(batches):
        v = model.train_view(b, step_generator(seed, -1, i))
        if v.size == 0:
            continue
        w = float(v.weight.sum()) if v.weight is not None else v.size
        total += float(model.loss(v)) * w
        n += w
    model.train(was)
    return total / n if n else math.nan


def snapshot_state(state: dict) -> dict:
    """A deep copy of a training state, safe to keep while training goes on."""
    return copy.deepcopy(state)
