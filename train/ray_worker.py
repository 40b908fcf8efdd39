"""The Ray Train worker: ``train_loop_per_worker(config)``, one per rank.

Like Ray Train's examples: build the model, restore from ``ray.train.get_checkpoint()``
if there is one, loop, ``ray.train.report`` from every rank. Here:

- ``build_worker_model``: the model with a ``ShardedEmbeddingCollection`` on the shard
  process group (each rank holds its 1/W of the rows), the dense towers later wrapped in DDP;
- batches from ``train.ray_data`` (``memory_source`` / ``stream_source``);
- the loop is ``train.loop.fit``, the one training loop of `esmm train`;
- checkpoints: ``ray.train.report(checkpoint=...)`` from every rank; the checkpoint
  dir holds ``shard-rank={r}.pt`` (the rank's rows + the optimizer state living with
  them, train/shard/checkpoint.py) and, from rank 0, ``dense.pt`` (dense weights, dense
  optimizer, data position = epoch + batches consumed, early-stopping state, config);
- restarts resume from the latest checkpoint at the step it recorded.

The step's loss is ``GlobalMeanLoss``: the mean over every rank's real rows (blank
padding rows weigh 0), whatever the split, and the reported train_loss is that same
mean over the epoch (``LossTally``), so 2 workers report what one process would.

At the end every rank predicts its part of the test split (train/ray_eval.py) and
reports the final (best-epoch) model, its predictions and the fit result.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from train.warm_start import warm_start_worker
from train.embedding import FieldConfig
from train.loop import TrainConfig, fit
from train.model import EsmmConfig
from train.ray_data import memory_source, stream_source
from train.ray_eval import predict_test, write_predictions
from train.shard.checkpoint import load_shard, merge_state, plain_keys, save_shard, split_state, wrapped_keys

DENSE_FILE = "dense.pt"
RNG_FILE = "rng-rank={rank}.pt"  # each rank's global torch RNG state (dropout), beside its rows


class LossTally:
    """sum(w * loss) and sum(w) of this rank's real rows since the epoch began."""

    def __init__(self):
        self.sums = torch.zeros(2, dtype=torch.float64)

    def add(self, weighted_sum: torch.Tensor, weight_sum: torch.Tensor) -> None:
        self.sums += torch.stack([weighted_sum.detach().double().cpu(), weight_sum.detach().double().cpu()])

    def global_sums(self, device, world: int) -> torch.Tensor:
        # a copy: on CPU .to() returns the tally itself, and the in-place all-reduce would
        # leave every rank holding the global sum, counted again at the next checkpoint
        s = self.sums.clone().to(device)
        if world > 1:
            dist.all_reduce(s)
        return s.cpu()


class GlobalMeanLoss:
    """``model.loss_mean`` on Ray: rank r's loss = W * sum_r(w l) / sum_all(w).

    DDP averages the dense gradients over the W ranks and the sharded embedding averages
    row gradients the same way (train/shard/collection.py: grad_dist), so the step's
    gradient is that of sum_all(w l) / sum_all(w): the mean over every rank's real rows,
    exactly the one-process gradient of the same rows, however unevenly they are split
    (a rank with a blank row contributes 0 and is not counted). One 1-float all-reduce per
    step. A step with no real row on any rank returns a constant: no forward, no lookup,
    no gradient, so no optimizer moves anything (torch's Adam skips parameters without a
    gradient, the row-wise optimizers rows without one)."""

    def __init__(self, world: int, device, tally: LossTally | None = None):
        self.world, self.device, self.tally = world, device, tally

    def __call__(self, model, batch) -> torch.Tensor:
        w = batch.weight if batch.weight is not None else torch.ones(batch.size, device=batch.click.device)
        total = w.sum().double().reshape(1).to(self.device)
        if self.world > 1:
            dist.all_reduce(total)
        total = float(total)
        if total <= 0:
            return torch.zeros((), device=batch.click.device, requires_grad=True)
        weighted = (model.sample_losses(batch) * w).sum()
        if self.tally is not None and model.training:
            self.tally.add(weighted, w.sum())
        return weighted * (self.world / total)


def build_worker_model(config: dict, group, device, bias_from_counts: bool):
    """The model ``config["model"]`` with its tables sharded over ``group``, on ``device``."""
    from train.baselines import NEEDS_CTR_MODEL, build_model
    from train.shard import ShardedEmbeddingCollection

    model_cfg = EsmmConfig.from_dict(config["model_cfg"])
    seed = int(config["train_cfg"].get("seed", 0))
    fields = [FieldConfig(**f) for f in config["fields"]]

    def factory(fs, dim):  # like the local default: each table its own init seed (ESMM-NS has two)
        table_seed = int(torch.randint(0, 2**31 - 1, (1,)))  # the same on every rank (seeded below)
        return ShardedEmbeddingCollection(fs, dim, init_std=model_cfg.init_std, group=group, seed=table_seed)

    torch.manual_seed(seed)
    model = build_model(config["model"], fields, model_cfg, factory)
    if bias_from_counts and model_cfg.init_bias and config.get("train_counts"):
        _init_bias_from_counts(model, config["train_counts"], seed)
    if config["model"] in NEEDS_CTR_MODEL:  # UNBIAS's CTR network, its tables sharded like the model's
        from train.ray_eval import sharded_ctr_model

        model.set_ctr_model(sharded_ctr_model(config["ctr_model_dir"], group, device))
    return model.to(device)


def _init_bias_from_counts(model, counts: dict, seed: int) -> None:
    """EsmmConfig.init_bias on Ray: towers start at their labels' base rates, taken from
    the manifest's train counts (the local trainer reads the rows; here a label-only
    stand-in with the same rates goes through the model's own row selection)."""
    n_all = int(counts.get("impressions") or 0)
    if n_all <= 0 or not hasattr(model, "init_output_bias"):
        return
    n = min(n_all, 1_000_000)
    c = round(int(counts.get("clicks", 0)) * n / n_all)
    z = min(c, round(int(counts.get("conversions", 0)) * n / n_all))
    click = torch.zeros(n)
    click[:c] = 1.0
    conversion = torch.zeros(n)
    conversion[:z] = 1.0
    rows = model.select_rows(click, conversion, torch.Generator().manual_seed(seed)) \
        if hasattr(model, "select_rows") else None
    if rows is not None:
        click, conversion = click[rows], conversion[rows]
    model.init_output_bias(click, conversion, None)


def restore_state(model, directory: str, rank: int, world: int) -> dict:
    """This rank's training state from a checkpoint dir (its rows re-sharded to ``world``)."""
    rows, _ = load_shard(directory, rank, world)
    rest = torch.load(Path(directory) / DENSE_FILE, map_location="cpu", weights_only=True)
    if rest.get("world") != world:  # the driver refuses this first (check_resume_world)
        raise RuntimeError(f"checkpoint saved by {rest.get('world')} workers, this run has {world}")
    rng = Path(directory) / RNG_FILE.format(rank=rank)
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True)["cpu"])
    state = merge_state(rows, rest)
    for key in ("model", "best_model"):
        if state.get(key) is not None:
            state[key] = wrapped_keys(model, state[key])
    return state


def write_checkpoint(directory: str | os.PathLike, model, state: dict, rank: int, world: int,
                     extra: dict) -> None:
    """This rank's checkpoint files in ``directory``: its rows (``shard-rank=<r>.pt``), its
    global torch RNG state (``rng-rank=<r>.pt``: dropout resumes as it would have run) and,
    on rank 0, the dense state; ``restore_state`` reads them back."""
    rows, counts, rest = split_state(model, state)
    for key in ("model", "best_model"):
        if rest.get(key) is not None:
            rest[key] = plain_keys(model, rest[key])
    save_shard(directory, rank, world, rows, counts, meta={"epoch": state.get("epoch"), "step": state.get("step")})
    torch.save({"cpu": torch.get_rng_state()}, Path(directory) / RNG_FILE.format(rank=rank))
    if rank == 0:
        torch.save({**rest, **extra, "world": world}, Path(directory) / DENSE_FILE)


def report_checkpoint(model, state: dict, rank: int, world: int, metrics: dict, extra: dict,
                      write_more=None) -> None:
    """``ray.train.report`` with a checkpoint (``write_checkpoint``; ``write_more(dir)``:
    this rank's other files, e.g. its test predictions)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="esmm-ckpt-") as d:
        write_checkpoint(d, model, state, rank, world, extra)
        if write_more is not None:
            write_more(d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _maybe_fail(fail_at: dict | None, epoch: int, step: int, rank: int) -> None:
    """Tests only (RayConfig.fail_at): kill this worker once at (epoch, step, rank)."""
    if not fail_at or (epoch, step, rank) != (fail_at["epoch"], fail_at["step"], fail_at["rank"]):
        return
    marker = Path(fail_at["marker"])
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} at epoch {epoch} step {step}\n")
    # Ray Train's controller collects reported checkpoints when it polls the workers
    # (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): a crash right after a report could
    # lose it, so the fault waits a few polls, like a real crash long after a checkpoint.
    time.sleep(float(fail_at.get("delay_s", 6.0)))
    print(f"[esmm] test fault: killing rank {rank} at epoch {epoch} step {step}", flush=True)
    os._exit(1)


def _val_loss_fn(val_batches, device, world: int):
    """Early stopping's validation loss: the weighted mean over every rank's rows."""
    from train.device import to_device

    def eval_fn(m) -> float:
        total = torch.zeros(2, dtype=torch.float64, device=device)
        was = m.training
        m.eval()
        with torch.no_grad():
            for v in val_batches():
                v = to_device(v, device)
                w = v.weight if v.weight is not None else torch.ones(v.size, device=device)
                total[0] += float((m.sample_losses(v) * w).sum())  # blank rows weigh 0
                total[1] += float(w.sum())
        m.train(was)
        if world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    return eval_fn


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build, restore if there is a checkpoint, ``fit``, report."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from train.device import prepare_towers, to_device
    from train.shard import shard_group

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = bool(config["use_gpu"])
    device = torch.device(ray.train.torch.get_device()) if use_gpu else torch.device("cpu")
    train_cfg = TrainConfig.from_dict(config["train_cfg"])
    if not use_gpu:  # the workers share the machine's cores
        train_cfg.threads = max(1, int(config["threads_per_worker"]))
    group = shard_group()
    memory = config["data_mode"] == "memory"
    model = build_worker_model(config, group, device, bias_from_counts=not memory)
    fields = model.fields
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_from"):
        ckpt = ray.train.Checkpoint(config["resume_from"])
    warm = warm_start_worker(model, config, ckpt is None)
    local_bs = max(1, train_cfg.batch_size // world)
    eval_bs = max(1, train_cfg.eval_batch_size // world)
    if memory:
        train_batches, val_batches, rows, sums = memory_source(model, fields, config, rank, local_bs, eval_bs,
                                                               device, world)
        if ckpt is None and not warm and model.cfg.init_bias and hasattr(model, "init_output_bias"):
            model.init_output_bias(None, None, sums=sums())  # the rows' own base rates, as in one process
    else:
        train_batches, val_batches, rows = stream_source(model, fields, config, local_bs, eval_bs, device, world)
    # the same tower set-up as one process (fused first layers; auto | fp32 | bf16), announced by rank 0
    prepare_towers(model, model.cfg.tower_precision, device.type, announce=rank == 0)
    if world > 1:
        model.dense = DDP(model.dense, device_ids=[device.index] if use_gpu else None)
    tally = LossTally()
    model.loss_mean = GlobalMeanLoss(world, device, tally)

    start_state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start_state = restore_state(model, d, rank, world)
        # the epoch's loss so far (all ranks', summed when saved): rank 0 carries it on
        tally.sums = torch.tensor(start_state.get("loss_tally") or [0.0, 0.0], dtype=torch.float64) \
            if rank == 0 else torch.zeros(2, dtype=torch.float64)
        if rank == 0:
            print(f"[esmm] resuming at epoch {start_state['epoch']} step {start_state['step']} "
                  f"(global step {start_state['global_step']}, saved by {start_state.get('world')} workers)", flush=True)
    fail_at = config.get("fail_at")

    def batches(epoch: int, start_step: int):
        for step, batch in enumerate(train_batches(epoch, start_step), start_step):
            _maybe_fail(fail_at, epoch, step, rank)
            yield to_device(batch, device)

    extra = {"config": {k: config[k] for k in ("model", "model_cfg", "train_cfg", "fields")}}

    def checkpoint_cb(state: dict) -> None:
        sums = tally.global_sums(device, world)  # a collective: every rank is here
        if state["step"] == 0 and state["history"] and not state["history"][-1].get("global_mean"):
            # an epoch just ended: its train_loss is the mean over every rank's real rows
            # (fit's own figure is this rank's, padding included); fit's history entry is
            # this same dict, so the result carries it too
            state["history"][-1].update(train_loss=float(sums[0] / sums[1]) if sums[1] > 0 else float("nan"),
                                        samples=int(sums[1]) if sums[1] == int(sums[1]) else float(sums[1]),
                                        global_mean=True)
            tally.sums.zero_()
            sums = torch.zeros(2, dtype=torch.float64)
        state = {**state, "loss_tally": sums.tolist()}
        metrics = {"epoch": state["epoch"], "step": state["step"], "global_step": state["global_step"]}
        if state["history"]:
            metrics["train_loss"] = state["history"][-1]["train_loss"]
            metrics["val_loss"] = state["history"][-1]["val_loss"]
        report_checkpoint(model, state, rank, world, metrics, extra)
        if rank == 0 and state["step"] == 0 and state["history"]:
            h = state["history"][-1]
            print(f"[esmm] epoch {h['epoch'] + 1}: train loss {h['train_loss']:.5f} val loss {h['val_loss']:.5f} "
                  f"({h['samples']} samples, {h['seconds']:.1f} s)", flush=True)

    t0 = time.perf_counter()
    eval_fn = _val_loss_fn(val_batches, device, world) if config["has_val"] else None
    result = fit(model, batches, eval_fn, train_cfg,
                 checkpoint_cb=checkpoint_cb, start_state=start_state, progress=False, apply_view=False)
    result.pop("optimizers", None)
    result["seconds"] = time.perf_counter() - t0
    # where this attempt started: > 0 after a restart from a checkpoint
    result["resumed_at_global_step"] = int(start_state["global_step"]) if start_state else 0
    result["rows"] = rows  # memory mode: the train / validation rows the workers held, summed
    # the test split scored here, with the sharded tables: the driver never builds the model
    preds = predict_test(model, config["test_files"], fields, eval_bs, device, rank, world)
    final = {"model": model.state_dict(), "final": True}
    report_checkpoint(model, final, rank, world, {"final": 1, "global_step": result["steps"],
                                                  "result": json.dumps(result, default=float)}, extra,
                      write_more=lambda d: write_predictions(preds, d, rank))
