"""Warm start (`esmm train --init-from`) and yesterday's model on today's shards.

Day 2's data extends day 1's vocabularies the way `esmm etl --vocab-from` does: every
day-1 id keeps its meaning, new ids come after the old ones (here: 5 new user ids and 5
new item ids, used by a tenth of day 2's rows). Same latent world on both days.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shard_writer import write_data

NEW = 5  # new ids per grown field on day 2
TINY = ["--set", "dim=4", "--set", "hidden=16,8", "--set", "lr=0.01", "--seed", "3", "--no-progress"]


def grow(data: Path) -> None:
    """Give ``data`` NEW new user and item ids after the old ones; every 10th row uses them."""
    m = json.loads((data / "manifest.json").read_text())
    old = {f["name"]: f["vocab_size"] for f in m["fields"]}
    for f in m["fields"]:
        if f["name"] in ("user_id", "item_id"):
            f["vocab_size"] += NEW
    m["vocab"] = {"parent": "day1", "new_ids": {"user_id": NEW, "item_id": NEW}}
    (data / "manifest.json").write_text(json.dumps(m))
    for split in m["splits"].values():
        for rel in split["files"]:
            t = pq.read_table(data / rel)
            cols = {n: t.column(n) for n in t.column_names}
            for name in ("user_id", "item_id"):
                v = np.array([x[0] for x in cols[name].to_pylist()])
                hit = np.arange(len(v)) % 10 == 0
                v[hit] = old[name] + v[hit] % NEW
                cols[name] = pa.array([[int(x)] for x in v], pa.list_(pa.int64()))
            pq.write_table(pa.table(cols), data / rel)


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    from jobs.train import main as train_main

    root = tmp_path_factory.mktemp("warm")
    d1 = write_data(root / "d1", n_train=3000, n_test=600, seed=11)
    d2 = write_data(root / "d2", n_train=1600, n_test=800, seed=11)  # same world (same seed), other rows
    grow(d2)
    m1 = root / "m1"
    assert train_main(["--data", str(d1), "--out", str(m1), "--epochs", "4", *TINY]) == 0
    return {"root": root, "d1": d1, "d2": d2, "m1": m1}


def test_init_from_copies_known_rows_and_dense_weights(days):
    from train.baselines import build_model
    from train.bundle import load_bundle
    from train.data import load_manifest, manifest_fields
    from train.model import EsmmConfig
    from train.warm_start import init_from

    old, b = load_bundle(days["m1"])
    fields = manifest_fields(load_manifest(days["d2"]))
    cfg = EsmmConfig.from_dict(b.meta["config"]["model_cfg"])
    torch.manual_seed(0)
    cold = build_model("esmm", fields, cfg)
    torch.manual_seed(0)
    warm = build_model("esmm", fields, cfg)
    info = init_from(warm, days["m1"])
    assert info["rows_new"] == 2 * NEW and info["rows_copied"] == sum(f["vocab_size"] for f in b.fields)
    ow, cw, ww = (m.state_dict()["embeddings.0.weight"] for m in (old, cold, warm))
    o_off = n_off = 0
    for f_old, f_new in zip(b.fields, fields):
        n = f_old["vocab_size"]
        assert torch.equal(ww[n_off:n_off + n], ow[o_off:o_off + n]), f_new.name  # known ids: day 1's rows
        assert torch.equal(ww[n_off + n:n_off + f_new.vocab_size], cw[n_off + n:n_off + f_new.vocab_size])  # new: fresh
        o_off, n_off = o_off + n, n_off + f_new.vocab_size
    for k, v in old.state_dict().items():
        if not k.startswith("embeddings."):
            assert torch.equal(warm.state_dict()[k], v), k


def first_epoch_loss(model_dir: Path) -> float:
    return json.loads((model_dir / "metrics.json").read_text())["training"]["history"][0]["train_loss"]


def test_warm_start_begins_day2_lower_than_cold_one_process(days):
    from jobs.train import main as train_main

    steps = ["--epochs", "1", "--set", "max_steps=4", "--batch-size", "256"]
    cold, warm = days["root"] / "cold", days["root"] / "warm1"
    assert train_main(["--data", str(days["d2"]), "--out", str(cold), *steps, *TINY]) == 0
    assert train_main(["--data", str(days["d2"]), "--out", str(warm), "--init-from", str(days["m1"]), *steps, *TINY]) == 0
    lc, lw = first_epoch_loss(cold), first_epoch_loss(warm)
    assert lw < lc, (lw, lc)
    meta = json.loads((warm / "bundle.json").read_text())
    assert meta["lineage"]["parent_model"] == str(days["m1"].resolve())


def test_day1_model_scores_day2_test_split(days):
    """Ids beyond day 1's table count as out of vocabulary: the row scores as with id 0."""
    from train.data import load_manifest, load_split, manifest_fields
    from train.evaluate import predict
    from train.local import evaluate_dir, load_model, load_split_for

    model, _ = load_model(days["m1"])
    m2 = load_manifest(days["d2"])
    got = predict(model, load_split_for(model, str(days["d2"]), "test", m2))
    raw = load_split(days["d2"], "test", manifest_fields(m2), m2)
    n_new = int((raw.columns[0].values >= model.fields[0].vocab_size).sum())
    assert n_new == 80  # every 10th of 800 test rows has a new user id
    # the same rows, new ids replaced by 0 by hand, read as day 1's fields
    for c, f in zip(raw.columns, model.fields):
        c.values[c.values >= f.vocab_size] = 0
    raw.fields = model.fields
    want = predict(model, raw)
    for k in ("p_ctr", "p_cvr", "p_ctcvr"):
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=0, atol=1e-7)
    m = evaluate_dir(model, str(days["d2"]), "test", None, m2)  # `esmm evaluate` takes the same path
    assert m["split"] == "test"


def test_warm_start_begins_day2_lower_than_cold_on_two_ray_workers(days, ray_start_2_cpus):
    """Same on 2 Ray workers (rows re-sharded from the 1-process day-1 model); the run's
    bundle is written from the 2 workers' shard files one at a time; model.pt holds the
    dense weights only, and load_model merges the bundle's shards into the same model."""
    from jobs.train import main as train_main
    from train.bundle import load_bundle
    from train.local import load_model

    ray = ["--workers", "2", "--address", ray_start_2_cpus["address"], "--cpus-per-worker", "0.5"]
    steps = ["--epochs", "1", "--set", "max_steps=4", "--batch-size", "256"]
    cold, warm = days["root"] / "cold2", days["root"] / "warm2"
    assert train_main(["--data", str(days["d2"]), "--out", str(cold), *ray, *steps, *TINY]) == 0
    assert train_main(["--data", str(days["d2"]), "--out", str(warm), "--init-from", str(days["m1"]),
                       *ray, *steps, *TINY]) == 0
    lc, lw = first_epoch_loss(cold), first_epoch_loss(warm)
    assert lw < lc, (lw, lc)
    model, b = load_bundle(warm)
    assert [t["world"] for t in b.meta["weights"]["tables"].values()] == [2]
    assert len(list(warm.glob("emb-0.rank=*-of-2.safetensors"))) == 2
    sd = torch.load(warm / "model.pt", weights_only=True)  # the dense weights: the tables stay in shards
    assert sorted(sd) == sorted(k for k in model.state_dict() if "embeddings" not in k)
    for k, v in load_model(warm)[0].state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def _rank_worker(rank: int, world: int, port: int, bundle: str, data: str, out: str):
    """One of 2 gloo ranks: build the day-2 model sharded over the world, warm-start it
    through the Ray worker's hook, save this rank's rows."""
    import torch.distributed as dist

    from train.baselines import build_model
    from train.bundle import read_bundle
    from train.data import load_manifest, manifest_fields
    from train.model import EsmmConfig
    from train.shard import ShardedEmbeddingCollection, shard_group
    from train.warm_start import warm_start_worker

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = shard_group()
    cfg = EsmmConfig.from_dict(read_bundle(bundle).meta["config"]["model_cfg"])
    model = build_model("esmm", manifest_fields(load_manifest(data)), cfg,
                        lambda fs, dim: ShardedEmbeddingCollection(fs, dim, init_std=cfg.init_std, group=group, seed=0))
    info = warm_start_worker(model, {"init_from": bundle}, fresh=True)
    torch.save({"rows": model.embeddings[0].rows, "info": info,
                "dense": {k: v for k, v in model.state_dict().items() if not k.startswith("embeddings.")}},
               f"{out}/rank-{rank}.pt")
    dist.destroy_process_group()


def test_warm_start_on_two_gloo_ranks_takes_each_ranks_rows(days, tmp_path):
    """The Ray worker hook on 2 ranks (real gloo group, no Ray): each rank holds exactly
    rows r, r+2, ... of the one-process warm-started table, and the same dense weights."""
    import socket

    import torch.multiprocessing as mp

    from train.baselines import build_model
    from train.bundle import read_bundle
    from train.data import load_manifest, manifest_fields
    from train.model import EsmmConfig
    from train.shard import ShardedEmbeddingCollection
    from train.warm_start import init_from

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_worker, args=(2, port, str(days["m1"]), str(days["d2"]), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    cfg = EsmmConfig.from_dict(read_bundle(days["m1"]).meta["config"]["model_cfg"])
    one = build_model("esmm", manifest_fields(load_manifest(days["d2"])), cfg,
                      lambda fs, dim: ShardedEmbeddingCollection(fs, dim, init_std=cfg.init_std, seed=0))
    init_from(one, days["m1"])
    table = one.embeddings[0].rows
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    for r, got in enumerate(ranks):
        assert torch.equal(got["rows"], table[r::2]), r
        for k, v in got["dense"].items():
            assert torch.equal(v, one.state_dict()[k]), k
    assert sum(g["info"]["rows_new"] for g in ranks) == 2 * NEW
