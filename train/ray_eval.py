"""What a Ray run needs beyond training, with every table kept sharded.

Worker side:
- ``sharded_ctr_model``: UNBIAS's independent CTR network, its rows sharded like the
  model's (each rank reads only the rows it owns from the CTR MODEL's bundle, one shard
  file at a time), so no worker holds a whole table;
- ``predict_test``: after training, rank r predicts the test files ``r::W`` with the
  sharded tables (lookups in lockstep, blank rows once its files run out) and the final
  checkpoint carries its ``pred-test-rank=<r>.parquet``.

Driver side: ``read_predictions`` puts those files in the test split's row order, so the
driver scores the model without ever building it (train/ray_trainer.py).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from train.errors import InputError

PRED_FILE = "pred-test-rank={rank}.parquet"
_PRED_RE = re.compile(r"^pred-test-rank=(\d+)\.parquet$")
CTR_COLUMN = "ctr_model_p_ctr"  # the independent CTR network's pCTR (UNBIAS), beside the model's own


def sharded_ctr_model(ctr_dir: str, group, device):
    """The CTR network of bundle ``ctr_dir`` with ShardedEmbeddingCollection tables on
    ``group``: this rank's rows only, in eval mode (it is never trained here)."""
    from train.baselines import build_model
    from train.bundle import field_configs, read_bundle
    from train.model import EsmmConfig
    from train.shard import ShardedEmbeddingCollection
    from train.warm_start import init_from

    b = read_bundle(ctr_dir)
    cfg = EsmmConfig.from_dict(b.meta["config"]["model_cfg"])

    def factory(fs, dim):
        return ShardedEmbeddingCollection(fs, dim, init_std=cfg.init_std, group=group, seed=0)

    with torch.random.fork_rng():  # the model's own initialisation draws what it drew before
        model = build_model("ctr", field_configs(b), cfg, factory)
    init_from(model, ctr_dir)  # towers + owned rows; the rest of the table is never read here
    return model.to(device).eval()


def _test_batches(files: list[str], fields, batch_size: int):
    """(Batch, sample ids) of ``files`` in order, one file in memory at a time."""
    from train.data import shard_columns, table_to_columns

    for f in files:
        try:
            cols = table_to_columns(pq.read_table(f, columns=shard_columns(fields), partitioning=None), fields)
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise InputError(f"{f}: cannot read shard columns ({e})") from None
        for i, b in enumerate(cols.batches(batch_size)):
            yield b, cols.sample_id[i * batch_size:i * batch_size + b.size]


@torch.no_grad()
def predict_test(model, files: list[str], fields, batch_size: int, device, rank: int, world: int) -> pa.Table:
    """This rank's test files ``files[rank::world]`` predicted: sample_id and every output
    (plus ``CTR_COLUMN`` for UNBIAS), in file order."""
    from train.device import to_device
    from train.ray_data import blank_row, lockstep

    blank = (blank_row(fields), None)
    ctr = getattr(model, "ctr_model", None)
    was = model.training
    model.eval()
    parts: dict[str, list] = {}
    sids = []
    for batch, sid in lockstep(_test_batches(files[rank::world], fields, batch_size), device, world,
                               fill=lambda: blank):
        kjt = to_device(batch, device).features
        out = dict(model.predict(kjt))
        if ctr is not None:
            out[CTR_COLUMN] = ctr.predict(kjt)["p_ctr"]
        if sid is None:  # a blank row: this rank only joined the others' lookups
            continue
        sids.append(sid)
        for k, v in out.items():
            parts.setdefault(k, []).append(v.double().cpu().numpy())
    model.train(was)
    cols = {"sample_id": pa.array(np.concatenate(sids) if sids else np.zeros(0, dtype=object), pa.string())}
    cols.update({k: pa.array(np.concatenate(v)) for k, v in parts.items()})
    return pa.table(cols)


def write_predictions(table: pa.Table, directory: str | os.PathLike, rank: int) -> None:
    pq.write_table(table, Path(directory) / PRED_FILE.format(rank=rank))


def read_predictions(directory: str | os.PathLike, sample_id: np.ndarray) -> dict[str, np.ndarray]:
    """The ranks' test predictions in the order of ``sample_id`` (the test split as
    train.data.load_split reads it); every row predicted exactly once, or InputError."""
    files = sorted((int(m.group(1)), Path(directory) / p) for p in os.listdir(directory)
                   if (m := _PRED_RE.match(p)))
    if not files:
        raise InputError(f"{directory}: no {PRED_FILE.format(rank='*')} (a final checkpoint without test predictions)")
    return align_predictions(pa.concat_tables([pq.read_table(p) for _, p in files]), sample_id, str(directory))


def align_predictions(t: pa.Table, sample_id: np.ndarray, where: str) -> dict[str, np.ndarray]:
    """Columns of prediction table ``t`` (sample_id + outputs) in the order of ``sample_id``."""
    import pyarrow.compute as pc

    want = pa.array(sample_id, pa.string())
    pos = pc.index_in(want, value_set=t.column("sample_id"))
    if t.num_rows != len(want) or pos.null_count:
        raise InputError(f"{where}: {t.num_rows} test predictions for {len(want)} test rows "
                         f"({pos.null_count} rows without one)")
    idx = pos.to_numpy(zero_copy_only=False)
    if np.unique(idx).size != idx.size:
        raise InputError(f"{where}: a test row was predicted twice")
    return {k: t.column(k).to_numpy()[idx] for k in t.column_names if k != "sample_id"}
