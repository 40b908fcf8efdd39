"""The data sources of Ray training: Ray Data datasets on the driver, batches on the workers.

Driver side (``datasets``): the manifest's train files through ``ray.data.read_parquet``,
split into ``{"train", "val"}`` by the same sample_id rule as `esmm train`
(``holdout_rows``), in the manifest's block order so every run gives each worker the
same rows.

Worker side (``memory_source`` / ``stream_source``): each returns
``(train_batches(epoch, start_step), val_batches(), rows[, label_sums])``, the batches
already the model's training view and in lockstep with the other ranks (every step is
an all-to-all): a rank that runs out first pads with a blank row until the last is done.

- ``memory`` (default) reads the worker's ``get_dataset_shard("train")`` once
  (``iter_batches(batch_format="pyarrow")`` -> ``train.data.table_to_columns``) and then
  trains exactly like one process: per epoch the model's view of all its rows
  (``train.local.dataset_view``), shuffled with (seed, rank, epoch).
- ``stream`` converts each streamed batch (``train.data.arrow_to_batch``) under a local
  shuffle buffer and takes the view per batch, for data larger than the workers' memory.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from train.embedding import FieldConfig
from train.errors import InputError
from train.jagged import Batch
from train.loop import step_generator

# ---------------------------------------------------------------- driver: Ray Data datasets


def holdout_rows(table, fraction: float, keep_val: bool):
    """Ray Data batch fn: the validation rows (``keep_val``) or the rest, by the same
    sample_id rule as `esmm train` (train.data.holdout_mask); sample_id is dropped."""
    import pyarrow as pa

    from train.data import holdout_mask

    mask = holdout_mask(table.column("sample_id").to_numpy(zero_copy_only=False), fraction)
    keep = mask if keep_val else ~mask
    return table.filter(pa.array(keep)).drop_columns(["sample_id"])


def datasets(data_dir: str, manifest: dict, fields: list[FieldConfig], val_fraction: float) -> dict:
    """``{"train": ds[, "val": ds]}`` for ``TorchTrainer(datasets=...)``."""
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
    split = lambda keep_val: ds.map_batches(holdout_rows, batch_format="pyarrow", batch_size=None,  # noqa: E731
                                            fn_kwargs={"fraction": val_fraction, "keep_val": keep_val})
    return {"train": split(False), "val": split(True)}


# ---------------------------------------------------------------- worker: batches in lockstep

def lockstep(it, device, world: int, fill=None):
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


def blank_row(fields) -> Batch:
    """One row with NO ids (every bag empty), weight 0: it joins the step's all-to-alls
    and DDP's all-reduce, but looks up no embedding row, so no row and no row's optimizer
    state can move (a row of id 0 would: lazy Adam updates every row a step touches),
    and its weight 0 keeps it out of the global mean (train.ray_worker.GlobalMeanLoss)."""
    from train.data import FieldColumn, collate

    empty = lambda: FieldColumn(torch.zeros(0, dtype=torch.long), torch.zeros(2, dtype=torch.long), None)  # noqa: E731
    b = collate([empty() for _ in fields], [f.name for f in fields], torch.zeros(1), torch.zeros(1))
    b.weight = torch.zeros(1)
    return b


def view_or_blank(model, batch: Batch | None, gen, fields) -> Batch:
    """The model's training view of ``batch``; a blank row when there is nothing to train on
    (this rank is out of batches, or BASE on a batch without clicks), so the rank still
    joins the step's collectives."""
    if batch is not None:
        view = model.train_view(batch, gen)  # weighs the view's rows when it has any
        if view.size:
            return view
    blank = blank_row(fields)
    if model.weighs_rows:  # UNBIAS: the other ranks look their rows up in the sharded CTR table now
        model.row_weight(blank.features)
    return blank


def _val_views(model, batches, seed: int, fields, device, world: int):
    """Validation batches in lockstep, as the model's views with `esmm train`'s fixed sampling."""
    for i, batch in enumerate(lockstep(batches, device, world, fill=lambda: None)):
        yield view_or_blank(model, batch, step_generator(seed, -1, i), fields)


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


def memory_source(model, fields, config: dict, rank: int, local_bs: int, eval_bs: int, device, world: int):
    """data_mode=memory: read this worker's rows once; each epoch, the model's view of all of
    them (train.local.dataset_view), shuffled with (seed, rank, epoch), like one process.
    Ranks with fewer batches (views differ: BASE's clicks) pad with blank rows: every row of
    every rank is trained on."""
    from train.local import dataset_view

    seed = int(config["train_cfg"].get("seed", 0))
    rank_seed = seed + 1_000_003 * rank  # rank 0 of 1 worker shuffles like `esmm train`
    train = _materialize("train", fields)
    val = _materialize("val", fields) if config["has_val"] else None
    blank = blank_row(fields)
    views: dict = {}

    def weigh_batches(view):  # UNBIAS weighs with the sharded CTR table: as many lookups on every rank
        return lockstep(view.batches(eval_bs) if view is not None else (), device, world, fill=lambda: blank)

    def view_of(epoch: int):  # this epoch's view of the rank's rows (kept for the epoch's steps)
        if epoch not in views:
            views.clear()
            if train is not None:
                views[epoch] = dataset_view(model, train, rank_seed, epoch, weigh_batches=weigh_batches)
            elif model.weighs_rows:  # no rows here: only join the other ranks' lookups
                views[epoch] = None
                for b in weigh_batches(None):
                    model.row_weight(b.features)
        return views.get(epoch)

    def train_batches(epoch: int, start_step: int):
        view = view_of(epoch)
        it = view.batches(local_bs, shuffle=True, seed=rank_seed, epoch=epoch,
                          start_step=start_step) if view is not None else ()
        return lockstep(it, device, world, fill=lambda: blank)

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


def stream_source(model, fields, config: dict, local_bs: int, eval_bs: int, device, world: int):
    """data_mode=stream: batches straight from the Ray Data stream (a local shuffle buffer
    over blocks in manifest order), the model's view taken per batch; a rank whose view
    runs out first pads with blank rows until the last one is done."""
    import ray.train

    from train.data import arrow_to_batch

    seed = int(config["train_cfg"].get("seed", 0))
    buffer = int(config["shuffle_batches"]) * local_bs

    def train_batches(epoch: int, start_step: int):
        shard = ray.train.get_dataset_shard("train")
        raw = shard.iter_batches(batch_size=local_bs, batch_format="pyarrow", prefetch_batches=2,
                                 local_shuffle_buffer_size=buffer or None,
                                 local_shuffle_seed=(seed * 1_000_003 + epoch) if buffer else None)
        for step, table in enumerate(lockstep(raw, device, world, fill=lambda: None)):
            if step >= start_step:  # resume: the earlier batches were trained on before the restart
                batch = None if table is None else arrow_to_batch(table, fields)
                yield view_or_blank(model, batch, step_generator(seed, epoch, step), fields)

    def val_batches():
        tables = ray.train.get_dataset_shard("val").iter_batches(batch_size=eval_bs, batch_format="pyarrow")
        return _val_views(model, (arrow_to_batch(t, fields) for t in tables), seed, fields, device, world)

    return train_batches, val_batches, None  # rows are not known before the stream ends
