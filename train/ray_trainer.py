"""Ray Train data-parallel training with the row-wise sharded embedding.

    esmm train --data DATA --out MODEL --workers 2                 # local cluster on 127.0.0.1
    esmm train --data DATA --out MODEL --workers 2 --address 127.0.0.1:6379
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.train --data DATA --out MODEL --workers 2

The driver (``run_training``) reads the manifest, hands the train split's files to Ray
Data (``read_parquet``) and starts a ``TorchTrainer``. Each worker
(``train_loop_per_worker``) builds the model with a ``ShardedEmbeddingCollection`` on
the shard process group, wraps the dense towers in DDP and calls ``train.loop.fit`` —
the one training loop — with:

- batches (``RayConfig.data_mode``): ``memory`` (default) reads the worker's
  ``get_dataset_shard("train")`` once (``iter_batches(batch_format="pyarrow")`` ->
  ``train.data.table_to_columns``) and then trains exactly like one process: per epoch
  the model's view of all its rows (``train.local.dataset_view``), shuffled with
  (seed, rank, epoch); ``stream`` converts each streamed batch
  (``train.data.arrow_to_batch``) under a local shuffle buffer and takes the view per
  batch, for data larger than the workers' memory. The global batch is ``batch_size``,
  each of W workers takes ``batch_size // W`` rows of it. Every rank steps in lockstep
  (a 1-int all-reduce per step) because every step is an all-to-all.
- checkpoints: ``ray.train.report(checkpoint=...)`` from every rank; the checkpoint
  dir holds ``shard-rank={r}.pt`` (the rank's rows + the optimizer state living with
  them, train/shard/checkpoint.py) and, from rank 0, ``dense.pt`` (dense weights, dense
  optimizer, data position = epoch + batches consumed, early-stopping state, config).
- restarts: ``FailureConfig(max_failures)``; a restarted worker group resumes from the
  latest checkpoint at the step it recorded; restoring with a different number of
  workers re-shards the rows.

At the end every rank reports the final (best-epoch) model; the driver assembles the
whole table (re-sharding to world 1), writes MODEL/ like ``esmm train`` does
(model.pt, config.json) and evaluates it on the test split (metrics.json).

Validation (early stopping) holds out the training rows ``train.data.holdout_mask``
picks by sample_id: the same rows as `esmm train` / `esmm experiment` in one process.
GPU (``--gpus-per-worker``): NCCL, bf16 towers, fp32 rows, pinned batches (train/device.py).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from train.embedding import FieldConfig
from train.errors import InputError
from train.jagged import Batch
from train.loop import TrainConfig, fit, step_generator
from train.model import EsmmConfig
from train.shard.checkpoint import load_shard, merge_state, plain_keys, save_shard, split_state, wrapped_keys

DENSE_FILE = "dense.pt"
FAIL_ENV = "ESMM_TEST_FAIL_AT"  # tests only: "EPOCH:STEP:RANK:MARKER" kills that worker once


@dataclass
class RayConfig:
    """How the job runs on Ray (not part of the model's config)."""

    num_workers: int = 2
    cpus_per_worker: float = 0.5  # leaves CPU to Ray Data's read tasks on a small machine
    gpus_per_worker: float = 0.0
    max_failures: int = 2
    storage_path: str | None = None  # default MODEL/ray
    name: str = "train"
    resume: bool = False  # continue the run under storage_path/name (else it is cleared)
    # memory: each worker holds its 1/W of the rows and, per epoch, takes the model's view of
    # all of them (BASE's clicked rows, AMAN's sampled negatives) and shuffles it, exactly as
    # one process does. stream: batches stream from Ray Data with a local shuffle buffer of
    # shuffle_batches batches and the view per batch, for data larger than the workers' memory.
    data_mode: str = "memory"
    shuffle_batches: int = 16
    fail_at: dict | None = field(default=None)  # tests only, see FAIL_ENV


# ---------------------------------------------------------------- the worker

def _lockstep(it, device, world: int, fill=None):
    """Yield items in step with the other ranks (every step is an all-to-all). Without
    ``fill``: while EVERY rank still has one. With ``fill``: while ANY rank has one; a rank
    that has run out takes ``fill()`` (a blank row, or None for the caller to turn into
    one), so no rank's rows are dropped."""
    it = iter(it)
    while True:
        item = next(it, None)
        if world > 1:
            flag = torch.tensor([0 if item is None else 1], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN if fill is None else dist.ReduceOp.MAX)
            if int(flag) == 0:
                return
            if item is None:
                item = fill()
        elif item is None:
            return
        yield item


def _blank_row(fields) -> Batch:
    """One row of id 0 (out of vocabulary) in every field, weight 0: a step that joins the
    all-to-alls and DDP's all-reduce and changes nothing (zero gradients)."""
    from train.data import FieldColumn, collate

    one = lambda: FieldColumn(torch.zeros(1, dtype=torch.long), torch.tensor([0, 1]), None)  # noqa: E731
    b = collate([one() for _ in fields], [f.name for f in fields], torch.zeros(1), torch.zeros(1))
    b.weight = torch.zeros(1)
    return b


def _view(model, batch: Batch | None, gen, fields) -> Batch:
    """The model's training view of ``batch``; a blank row when there is nothing to train on
    (this rank is out of batches, or BASE on a batch without clicks), so the rank still
    joins the step's collectives."""
    if batch is not None:
        view = model.train_view(batch, gen)
        if view.size:
            return view
    return _blank_row(fields)


def _val_views(model, batches, seed: int, fields, device, world: int):
    """Validation batches in lockstep, as the model's views with `esmm train`'s fixed sampling."""
    from train.loop import step_generator

    for i, batch in enumerate(_lockstep(batches, device, world, fill=lambda: None)):
        yield _view(model, batch, step_generator(seed, -1, i), fields)


def _materialize(name: str, fields):
    """This worker's part of dataset ``name`` (its get_dataset_shard) as one Columns, or
    None when the split gave it no rows (it then pads every step)."""
    import pyarrow as pa
    import ray.train

    from train.data import table_to_columns

    shard = ray.train.get_dataset_shard(name)
    tables = list(shard.iter_batches(batch_size=65536, batch_format="pyarrow", prefetch_batches=1))
    if sum(t.num_rows for t in tables) == 0:
        return None
    return table_to_columns(pa.concat_tables(tables).combine_chunks(), fields)


def _memory_source(model, fields, config: dict, rank: int, local_bs: int, eval_bs: int, device, world: int):
    """data_mode=memory: read this worker's rows once; each epoch, the model's view of all of
    them (train.local.dataset_view), shuffled with (seed, rank, epoch), like one process.
    Ranks with fewer batches (views differ: BASE's clicks) pad with blank rows: every row of
    every rank is trained on."""
    from train.local import dataset_view

    seed = int(config["train_cfg"].get("seed", 0))
    rank_seed = seed + 1_000_003 * rank  # rank 0 of 1 worker shuffles like `esmm train`
    train = _materialize("train", fields)
    val = _materialize("val", fields) if config["has_val"] else None
    blank = _blank_row(fields)
    views: dict = {}

    def view_of(epoch: int):  # this epoch's view of the rank's rows (kept for the epoch's steps)
        if train is not None and epoch not in views:
            views.clear()
            views[epoch] = dataset_view(model, train, rank_seed, epoch)
        return views.get(epoch)

    def train_batches(epoch: int, start_step: int):
        view = view_of(epoch)
        it = view.batches(local_bs, shuffle=True, seed=rank_seed, epoch=epoch,
                          start_step=start_step) if view is not None else ()
        return _lockstep(it, device, world, fill=lambda: blank)

    def val_batches():
        return _val_views(model, val.batches(eval_bs) if val is not None else (), seed, fields, device, world)

    def label_sums():  # of epoch 0's view, summed over the workers (EsmmConfig.init_bias)
        from train.model import label_sums as sums_of

        v = view_of(0)
        s = sums_of(v.click, v.conversion, v.weight) if v is not None else torch.zeros(4, dtype=torch.float64)
        s = s.to(device)
        if world > 1:
            dist.all_reduce(s)
        return s.cpu()

    held = torch.tensor([len(train) if train is not None else 0, len(val) if val is not None else 0], device=device)
    if world > 1:
        dist.all_reduce(held)
    rows = {"train": int(held[0]), "val": int(held[1])}
    total = (config.get("train_counts") or {}).get("impressions")
    if total is not None:  # what Ray Train's equal split left out (fewer than W per dataset)
        rows["left_out"] = int(total) - rows["train"] - rows["val"]
        if rank == 0 and rows["left_out"]:
            print(f"[esmm] {rows['left_out']} of {total} training rows left out by Ray Train's equal split "
                  f"into {world} workers (at most {world - 1} per dataset)", flush=True)
    return train_batches, val_batches, rows, label_sums


def _stream_source(model, fields, config: dict, local_bs: int, eval_bs: int, device, world: int):
    """data_mode=stream: batches straight from the Ray Data stream (a local shuffle buffer
    over blocks in manifest order), the model's view taken per batch; a rank whose view
    runs out first pads with blank rows until the last one is done."""
    import ray.train

    from train.data import arrow_to_batch
    from train.loop import step_generator

    seed = int(config["train_cfg"].get("seed", 0))
    buffer = int(config["shuffle_batches"]) * local_bs

    def train_batches(epoch: int, start_step: int):
        shard = ray.train.get_dataset_shard("train")
        raw = shard.iter_batches(batch_size=local_bs, batch_format="pyarrow", prefetch_batches=2,
                                 local_shuffle_buffer_size=buffer or None,
                                 local_shuffle_seed=(seed * 1_000_003 + epoch) if buffer else None)
        for step, table in enumerate(_lockstep(raw, device, world, fill=lambda: None)):
            if step >= start_step:  # resume: the earlier batches were trained on before the restart
                batch = None if table is None else arrow_to_batch(table, fields)
                yield _view(model, batch, step_generator(seed, epoch, step), fields)

    def val_batches():
        tables = ray.train.get_dataset_shard("val").iter_batches(batch_size=eval_bs, batch_format="pyarrow")
        return _val_views(model, (arrow_to_batch(t, fields) for t in tables), seed, fields, device, world)

    return train_batches, val_batches, None  # rows are not known before the stream ends


def _maybe_fail(fail_at: dict | None, epoch: int, step: int, rank: int) -> None:
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


def _build(config: dict, group, device, bias_from_counts: bool):
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
    if config["model"] in NEEDS_CTR_MODEL:
        from train.local import load_model

        model.set_ctr_model(load_model(config["ctr_model_dir"])[0].to(device))
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


def _restore(model, directory: str, rank: int, world: int) -> dict:
    rows, _ = load_shard(directory, rank, world)
    rest = torch.load(Path(directory) / DENSE_FILE, map_location="cpu", weights_only=False)
    state = merge_state(rows, rest)
    for key in ("model", "best_model"):
        if state.get(key) is not None:
            state[key] = wrapped_keys(model, state[key])
    return state


def _report_checkpoint(model, state: dict, rank: int, world: int, metrics: dict, extra: dict) -> None:
    import ray.train

    rows, counts, rest = split_state(model, state)
    for key in ("model", "best_model"):
        if rest.get(key) is not None:
            rest[key] = plain_keys(model, rest[key])
    with tempfile.TemporaryDirectory(prefix="esmm-ckpt-") as d:
        save_shard(d, rank, world, rows, counts, meta={"epoch": state.get("epoch"), "step": state.get("step")})
        if rank == 0:
            torch.save({**rest, **extra, "world": world}, Path(d) / DENSE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build, restore if there is a checkpoint, ``fit``, report."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from train.device import bf16_towers, to_device
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
    model = _build(config, group, device, bias_from_counts=not memory)
    fields = model.fields
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_from"):
        ckpt = ray.train.Checkpoint(config["resume_from"])
    local_bs = max(1, train_cfg.batch_size // world)
    eval_bs = max(1, train_cfg.eval_batch_size // world)
    if memory:
        train_batches, val_batches, rows, sums = _memory_source(model, fields, config, rank, local_bs, eval_bs,
                                                                 device, world)
        if ckpt is None and model.cfg.init_bias and hasattr(model, "init_output_bias"):
            model.init_output_bias(None, None, sums=sums())  # the rows' own base rates, as in one process
    else:
        train_batches, val_batches, rows = _stream_source(model, fields, config, local_bs, eval_bs, device, world)
    if use_gpu:
        bf16_towers(model.dense, "cuda")
    if world > 1:
        model.dense = DDP(model.dense, device_ids=[device.index] if use_gpu else None)

    start_state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start_state = _restore(model, d, rank, world)
        if rank == 0:
            print(f"[esmm] resuming at epoch {start_state['epoch']} step {start_state['step']} "
                  f"(global step {start_state['global_step']}, saved by {start_state.get('world')} workers)", flush=True)
    fail_at = config.get("fail_at")

    def batches(epoch: int, start_step: int):
        for step, batch in enumerate(train_batches(epoch, start_step), start_step):
            _maybe_fail(fail_at, epoch, step, rank)
            yield to_device(batch, device)

    def eval_fn(m) -> float:
        total = torch.zeros(2, dtype=torch.float64, device=device)
        was = m.training
        m.eval()
        with torch.no_grad():
            for v in val_batches():
                v = to_device(v, device)
                w = float(v.weight.sum()) if v.weight is not None else float(v.size)
                total[0] += float(m.loss(v)) * w
                total[1] += w
        m.train(was)
        if world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    extra = {"config": {k: config[k] for k in ("model", "model_cfg", "train_cfg", "fields")}}

    def checkpoint_cb(state: dict) -> None:
        metrics = {"epoch": state["epoch"], "step": state["step"], "global_step": state["global_step"]}
        if state["history"]:
            metrics["train_loss"] = state["history"][-1]["train_loss"]
            metrics["val_loss"] = state["history"][-1]["val_loss"]
        _report_checkpoint(model, state, rank, world, metrics, extra)
        if rank == 0 and state["step"] == 0 and state["history"]:
            h = state["history"][-1]
            print(f"[esmm] epoch {h['epoch'] + 1}: train loss {h['train_loss']:.5f} val loss {h['val_loss']:.5f} "
                  f"({h['samples'] * world} samples, {h['seconds']:.1f} s)", flush=True)

    t0 = time.perf_counter()
    result = fit(model, batches, eval_fn if config["has_val"] else None, train_cfg,
                 checkpoint_cb=checkpoint_cb, start_state=start_state, progress=False, apply_view=False)
    result.pop("optimizers", None)
    result["seconds"] = time.perf_counter() - t0
    # where this attempt started: > 0 after a restart from a checkpoint
    result["resumed_at_global_step"] = int(start_state["global_step"]) if start_state else 0
    result["rows"] = rows  # memory mode: the train / validation rows the workers held, summed
    final = {"model": model.state_dict(), "final": True}
    _report_checkpoint(model, final, rank, world, {"final": 1, "global_step": result["steps"],
                                                   "result": json.dumps(result, default=float)}, extra)


# ---------------------------------------------------------------- the driver

def _set_auth_mode(mode: str | None) -> None:
    """Set RAY_AUTH_MODE (None = unset) and make Ray's native config re-read it (it is
    read once per process, at import)."""
    if mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = mode
    try:
        from ray._raylet import Config

        Config.initialize("")
    except Exception:  # noqa: BLE001 - older/newer Ray: the environment alone decides
        pass


@contextmanager
def ray_cluster(address: str | None, num_cpus: int | None = None):
    """Connect to ``address`` (or RAY_ADDRESS, as under ``ray job submit``); with neither,
    start a private local cluster bound to 127.0.0.1 and stop it afterwards."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        yield None
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        try:
            yield address
        finally:
            ray.shutdown()
        return
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths are length-limited
    # A private cluster on loopback for this one job, without token auth: by default
    # ray.init would write ~/.ray/auth_token, which turns auth on for every later
    # `ray start` on the machine (and clients given an explicit address never send it).
    saved = os.environ.get("RAY_AUTH_MODE")
    if saved is None:
        _set_auth_mode("disabled")
    try:
        ctx = ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                       _node_ip_address="127.0.0.1", _temp_dir=tmp, object_store_memory=512 * 2**20,
                       log_to_driver=True)
        try:
            yield ctx.address_info["gcs_address"]
        finally:
            ray.shutdown()
    finally:
        if saved is None:
            _set_auth_mode(None)
        shutil.rmtree(tmp, ignore_errors=True)


def _holdout_rows(table, fraction: float, keep_val: bool):
    """Ray Data batch fn: the validation rows (``keep_val``) or the rest, by the same
    sample_id rule as `esmm train` (train.data.holdout_mask); sample_id is dropped."""
    import pyarrow as pa

    from train.data import holdout_mask

    mask = holdout_mask(table.column("sample_id").to_numpy(zero_copy_only=False), fraction)
    keep = mask if keep_val else ~mask
    return table.filter(pa.array(keep)).drop_columns(["sample_id"])


def _datasets(data_dir: str, manifest: dict, fields: list[FieldConfig], val_fraction: float):
    import ray.data

    from train.data import shard_columns, split_files

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one line per epoch from rank 0 is the progress report
    # blocks keep the manifest's file order, so each worker's rows are the same on every
    # run (a restarted run replays exactly what it skipped)
    ctx.execution_options.preserve_order = True
    files = split_files(data_dir, manifest, "train")
    if not files:
        raise InputError(f"{data_dir}/manifest.json: split 'train' lists no files")
    ds = ray.data.read_parquet(files, partitioning=None).select_columns(shard_columns(fields, sample_id=True))
    if val_fraction <= 0:
        return {"train": ds.drop_columns(["sample_id"])}
    split = lambda keep_val: ds.map_batches(_holdout_rows, batch_format="pyarrow", batch_size=None,  # noqa: E731
                                            fn_kwargs={"fraction": val_fraction, "keep_val": keep_val})
    return {"train": split(False), "val": split(True)}


def run_training(data_dir: str, out_dir: str, name: str, model_cfg: EsmmConfig, train_cfg: TrainConfig,
                 ray_cfg: RayConfig, ctr_model_dir: str | None = None, address: str | None = None) -> dict:
    """Train ``name`` on Ray; write MODEL/ (model.pt, config.json, metrics.json). Returns metrics."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from train.baselines import NEEDS_CTR_MODEL, build_model
    from train.data import load_manifest, manifest_fields
    from train.local import evaluate_dir, load_model, save_model

    if ray_cfg.num_workers < 1:
        raise InputError(f"--workers must be >= 1, got {ray_cfg.num_workers}")
    if ray_cfg.data_mode not in ("memory", "stream"):
        raise InputError(f"--data-mode must be memory or stream, got {ray_cfg.data_mode!r}")
    if name in NEEDS_CTR_MODEL and not ctr_model_dir:
        raise InputError(f"train: --model {name} with --workers needs --ctr-model (a trained `ctr` MODEL dir)")
    manifest = load_manifest(data_dir)
    fields = manifest_fields(manifest, model_cfg.pooling)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = Path(ray_cfg.storage_path or out / "ray").resolve()
    if not ray_cfg.resume and (storage / ray_cfg.name).exists():
        shutil.rmtree(storage / ray_cfg.name)  # a fresh run; Ray Train would resume an old one
    use_gpu = ray_cfg.gpus_per_worker > 0
    cores = os.cpu_count() or 1
    config = {
        "model": name, "model_cfg": model_cfg.to_dict(), "train_cfg": train_cfg.to_dict(),
        "fields": [asdict(f) for f in fields], "use_gpu": use_gpu,
        "threads_per_worker": max(1, min(train_cfg.threads or cores, cores) // ray_cfg.num_workers),
        "data_mode": ray_cfg.data_mode, "shuffle_batches": ray_cfg.shuffle_batches,
        "has_val": train_cfg.val_fraction > 0, "fail_at": ray_cfg.fail_at,
        "train_counts": {k: manifest["splits"]["train"].get(k) for k in ("impressions", "clicks", "conversions")},
        "ctr_model_dir": str(Path(ctr_model_dir).resolve()) if ctr_model_dir else None,
    }
    resources = {"CPU": ray_cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = ray_cfg.gpus_per_worker
    with ray_cluster(address):
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=ray_cfg.name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
            datasets=_datasets(data_dir, manifest, fields, train_cfg.val_fraction),
            # preserve_order: the split of blocks to workers is the same on every run, so a
            # restarted run skips exactly the batches it had trained on
            dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        )
        res = trainer.fit()
    if res.error is not None:
        raise RuntimeError(f"Ray training failed: {res.error}") from res.error
    if res.checkpoint is None or not res.metrics.get("final"):
        raise RuntimeError("Ray training ended without its final model checkpoint")
    fit_result = json.loads(res.metrics["result"])
    with res.checkpoint.as_directory() as d:
        rows, _ = load_shard(d, 0, 1)  # the whole table: re-sharded to one process
        state = merge_state(rows, torch.load(Path(d) / DENSE_FILE, map_location="cpu", weights_only=False))
        saved_by = state.get("world")
    model = build_model(name, fields, model_cfg)
    model.load_state_dict(state["model"])
    model.eval()
    ctr_model = None
    if ctr_model_dir:
        ctr_model = load_model(ctr_model_dir)[0]
        if hasattr(model, "set_ctr_model"):
            model.set_ctr_model(ctr_model)
    save_model(model, out, name, model_cfg, train_cfg,
               {"data": str(data_dir), "ray": {"workers": ray_cfg.num_workers, "saved_by_workers": saved_by,
                                                "checkpoint": res.checkpoint.path}})
    metrics = evaluate_dir(model, data_dir, "test", ctr_model, manifest)
    metrics["training"] = {**fit_result, "workers": ray_cfg.num_workers}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    return metrics


def _fail_at_from_env() -> dict | None:
    v = os.environ.get(FAIL_ENV)
    if not v:
        return None
    epoch, step, rank, marker = v.split(":", 3)
    return {"epoch": int(epoch), "step": int(step), "rank": int(rank), "marker": marker}


def train_on_ray(args, overrides: dict) -> dict:
    """``esmm train ... --workers W [--address A] [--gpus-per-worker G]`` (jobs/train.py)."""
    from train.config import resolve

    model_cfg, train_cfg = resolve(args.config, args.set, **overrides)
    ray_cfg = RayConfig(num_workers=args.workers, gpus_per_worker=float(args.gpus_per_worker or 0.0),
                        cpus_per_worker=float(getattr(args, "cpus_per_worker", None) or 0.5),
                        max_failures=int(getattr(args, "max_failures", None) or 2),
                        resume=bool(getattr(args, "resume", False)), fail_at=_fail_at_from_env(),
                        data_mode=getattr(args, "data_mode", None) or "memory")
    return run_training(args.data, args.out, args.model, model_cfg, train_cfg, ray_cfg,
                        ctr_model_dir=args.ctr_model, address=args.address)
