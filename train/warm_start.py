"""Warm start (``esmm train ... --init-from MODEL``): a new model begins where MODEL ended.

- the dense weights (towers) are MODEL's;
- every embedding row MODEL has is copied: field f's id i (i < MODEL's vocab_size of f)
  keeps its row, which moves from MODEL's global row ``old_offset[f] + i`` to
  ``new_offset[f] + i`` (the vocabulary grew with ``esmm etl --vocab-from``: known
  values keep their ids, new ones come after);
- rows of new ids start fresh (the usual N(0, init_std) init);
- optimizer state (Adam moments, step counts) starts fresh: MODEL's bundle holds no
  optimizer state, and the output biases are not re-initialised from the base rates.

The rows are read from the bundle's shard files one at a time, and each rank takes only
the rows it owns, so a sharded run (``--workers W``) warm-starts from a model trained on
any number of workers.
"""
from __future__ import annotations

import os

import torch

from train.bundle import dense_state, is_table, read_bundle, table_shards
from train.errors import InputError


def check_fields(old: list[dict], new) -> None:
    """Same fields (names, kinds, order); vocabularies only grow."""
    a = [(f["name"], f["kind"]) for f in old]
    b = [(f.name, f.kind) for f in new]
    if a != b:
        raise InputError(f"--init-from: the model's fields {a} differ from the data's {b}")
    for f, g in zip(old, new):
        if g.vocab_size < int(f["vocab_size"]):
            raise InputError(f"--init-from: field {g.name!r} has {g.vocab_size} ids in the data but "
                             f"{f['vocab_size']} in the model: vocabularies only grow (esmm etl --vocab-from MODEL)")


def old_global_ids(old_sizes: list[int], new_sizes: list[int], gids: torch.Tensor) -> torch.Tensor:
    """For new global rows ``gids``: the same (field, id)'s row in the old table, -1 if new."""
    new_sizes_t = torch.tensor(new_sizes, dtype=torch.long)
    old_sizes_t = torch.tensor(old_sizes, dtype=torch.long)
    new_end = torch.cumsum(new_sizes_t, 0)
    new_off, old_off = new_end - new_sizes_t, torch.cumsum(old_sizes_t, 0) - old_sizes_t
    f = torch.searchsorted(new_end, gids, right=True)
    i = gids - new_off[f]
    return torch.where(i < old_sizes_t[f], old_off[f] + i, torch.full_like(gids, -1))


def _local_rows(module):
    """(global ids of the rows this process holds, the row tensor) of an embedding module."""
    from train.shard import ShardedEmbeddingCollection, owned_gids

    if isinstance(module, ShardedEmbeddingCollection):
        return owned_gids(module.num_rows, module.rank, module.world), module.rows
    return torch.arange(module.weight.shape[0]), module.weight


@torch.no_grad()
def init_from(model, bundle_path: str | os.PathLike) -> dict:
    """Load MODEL's dense weights and known embedding rows into ``model`` (before DDP wraps it).

    Returns:
        dict: {"parent": bundle path, "model_version", "rows_copied": n, "rows_new": n} (this process).
    """
    b = read_bundle(bundle_path)
    if b.meta["model"] != model.name:
        raise InputError(f"--init-from {bundle_path}: a {b.meta['model']!r} model, training {model.name!r}")
    check_fields(b.fields, model.fields)
    dense = dense_state(b)
    res = model.load_state_dict(dense, strict=False)
    missing = [k for k in res.missing_keys if not is_table(k)]
    if missing or res.unexpected_keys:
        raise InputError(f"--init-from {bundle_path}: dense weights do not fit (missing {missing}, "
                         f"unexpected {res.unexpected_keys}); same model config needed")
    old_sizes = [int(f["vocab_size"]) for f in b.fields]
    new_sizes = [f.vocab_size for f in model.fields]
    copied = new = 0
    for key in b.meta["weights"]["tables"]:
        module = model.get_submodule(key.rsplit(".", 1)[0])
        gids, rows = _local_rows(module)
        old = old_global_ids(old_sizes, new_sizes, gids.cpu())
        world, shards = table_shards(b, key)
        for r, shard in shards:  # one shard file in memory at a time
            sel = torch.nonzero((old >= 0) & (old % world == r)).flatten()
            rows[sel.to(rows.device)] = shard[old[sel] // world].to(rows.device, rows.dtype)
            copied += sel.numel()
        new += int((old < 0).sum())
    return {"parent": str(b.path), "model_version": b.model_version, "rows_copied": copied, "rows_new": new}


# ---------------------------------------------------------------- the Ray side (train/ray_trainer.py, ray_worker.py)

def warm_start_source(init_from: str | None, name: str, fields) -> str | None:
    """Driver: check ``--init-from`` before any worker starts; its absolute path for the workers."""
    if not init_from:
        return None
    b = read_bundle(init_from)
    if b.meta["model"] != name:
        raise InputError(f"--init-from {init_from}: a {b.meta['model']!r} model, training {name!r}")
    check_fields(b.fields, fields)
    return str(b.path)


def warm_start_worker(model, config: dict, fresh: bool) -> dict | None:
    """Worker, once after building its model (before DDP): its rows and the dense weights
    from ``config["init_from"]``; nothing on a restart (the checkpoint has them)."""
    if not config.get("init_from") or not fresh:
        return None
    return init_from(model, config["init_from"])
