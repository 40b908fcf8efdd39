"""bench/aliccp_like.py: its shards follow the README's contract (the project's reader
takes them as they are) and its AUC is the exact pairwise one."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from train.data import load_manifest, load_split, manifest_fields

# by path: bench/ also holds a train.py, which must not shadow the train package
_spec = importlib.util.spec_from_file_location(
    "aliccp_like", Path(__file__).resolve().parents[1] / "bench" / "aliccp_like.py")
aliccp_like = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aliccp_like)


def test_shards_round_trip_through_the_project_reader(tmp_path):
    data = aliccp_like.make(3000, 1000, seed=1)
    aliccp_like.write_shards(data, str(tmp_path), shards=3)
    m = load_manifest(tmp_path)
    assert [f["name"] for f in m["fields"]] == aliccp_like.NAMES
    assert m["splits"]["train"]["impressions"] == 3000 and len(m["splits"]["train"]["files"]) == 3
    assert m["splits"]["train"]["clicks"] == int(data["train"].click.sum())
    assert (tmp_path / "_SUCCESS").exists()
    t = pq.read_table(tmp_path / m["splits"]["test"]["files"][0])
    assert str(t.schema.field("ts").type) == "timestamp[us, tz=UTC]"
    assert str(t.schema.field("click").type) == "int8" and pa.types.is_list(t.schema.field("101").type) \
        and t.schema.field("101").type.value_type == pa.int64()
    fields = manifest_fields(m)
    train = load_split(tmp_path, "train", fields, m)
    assert len(train) == 3000
    assert int(train.click.sum()) == int(data["train"].click.sum())
    assert int(train.conversion.sum()) == int(data["train"].conversion.sum())
    for j, col in enumerate(train.columns):  # every row one id, in row order
        assert np.array_equal(col.offsets.numpy(), np.arange(3001))
        assert np.array_equal(col.values.numpy(), data["train"].ids[:, j])
    # the bench's own reader gives the same rows
    back, _ = aliccp_like.read_shards(str(tmp_path))
    assert np.array_equal(back["test"].ids, data["test"].ids)
    assert np.array_equal(back["test"].conversion, data["test"].conversion)


def test_labels_are_sequential_and_near_their_rates():
    d = aliccp_like.make(200_000, 10, seed=0)["train"]
    assert not np.any((d.conversion == 1) & (d.click == 0))  # z = 1 implies y = 1
    assert abs(d.click.mean() - aliccp_like.CTR_TARGET) < 0.005
    assert abs(d.conversion[d.click == 1].mean() - aliccp_like.CVR_TARGET) < 0.01
    assert d.ids.min() >= 0 and all(d.ids[:, j].max() < v for j, (_, v, _, _) in enumerate(aliccp_like.FIELDS))


def test_auc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(3)
    y = rng.random(400) < 0.3
    p = rng.integers(0, 12, 400).astype(float)  # many ties
    pos, neg = p[y], p[~y]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert abs(aliccp_like.auc(y, p) - brute) < 1e-12
