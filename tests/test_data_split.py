"""The validation hold-out: a function of each row's sample_id alone.

The local trainer (``Columns.split_off``) and every Ray worker (``train.ray_data.holdout_rows`` on its
blocks) pick the same rows, whatever the file order, row order or worker count.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from shard_writer import write_data
from train.data import holdout_mask, load_split
from train.ray_data import holdout_rows as _holdout_rows


def test_holdout_depends_on_the_id_only(tmp_path):
    ids = np.array([f"imp-{i:08d}" for i in range(20_000)], dtype=object)
    m = holdout_mask(ids, 0.1)
    assert 0.09 < m.mean() < 0.11
    perm = np.random.default_rng(0).permutation(len(ids))
    assert (holdout_mask(ids[perm], 0.1) == m[perm]).all()  # any order, any subset: same choice
    assert (holdout_mask(ids[:500], 0.1) == m[:500]).all()
    assert not (holdout_mask(ids, 0.1, seed=1) == m).all()  # the seed picks another set
    assert not holdout_mask(ids, 0.0).any() and holdout_mask(ids[:0], 0.1).size == 0


def test_split_off_and_ray_blocks_pick_the_same_rows(tmp_path):
    cols = load_split(write_data(tmp_path, n_train=600, n_test=100), "train")
    rest, val = cols.split_off(0.2)
    assert len(rest) + len(val) == len(cols)
    assert set(val.sample_id) == set(cols.sample_id[holdout_mask(cols.sample_id, 0.2)])
    # a Ray block holding some of the rows, in another order
    order = torch.randperm(len(cols), generator=torch.Generator().manual_seed(3))[:400].numpy()
    table = pa.table({"sample_id": pa.array(list(cols.sample_id[order])), "click": cols.click[order].numpy()})
    kept_val = _holdout_rows(table, 0.2, keep_val=True)
    kept_rest = _holdout_rows(table, 0.2, keep_val=False)
    assert "sample_id" not in kept_val.schema.names
    assert kept_val.num_rows + kept_rest.num_rows == 400
    assert kept_val.num_rows == len(set(cols.sample_id[order]) & set(val.sample_id))
