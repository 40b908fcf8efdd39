"""Ray Train with the sharded embedding, on the real local cluster of ``ray_start_2_cpus``.

- a 2-worker run on tiny shards finishes and writes a model (model.pt with the dense
  weights, the tables as the workers' two shards, config.json, metrics.json); the workers
  score the test split exactly as the merged model does; they held every row but the
  fewer than W that Ray's equal split leaves out, validating on the rows `esmm train` does;
- 1 worker (data_mode=memory) trains exactly like one process: the same losses per epoch;
- data_mode=stream runs too;
- a worker killed mid-epoch (test-only fault) is restarted by Ray Train from the last
  checkpoint: the run ends with the same step count and the same final losses;
- ``ray job submit`` of jobs/train.py against the same cluster succeeds;
- ``esmm cluster up|down`` starts and stops its own loopback cluster, and only that one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shard_writer import write_data
from train.config import resolve
from train.ray_trainer import RayConfig, run_training

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, BATCH, EPOCHS = 1600, 128, 2
SETS = ["checkpoint_every=4", "patience=0"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("raydata"), n_train=N_TRAIN, n_test=400, days=4, shards_per_day=2)


@pytest.fixture(scope="module")
def held_out(tiny_data):
    """(validation rows, the rest) of tiny_data's train split by the holdout rule."""
    from train.data import holdout_mask, load_split

    _, train_cfg = resolve(None, SETS)
    n_val = int(holdout_mask(load_split(tiny_data, "train").sample_id, train_cfg.val_fraction).sum())
    return n_val, N_TRAIN - n_val


def _train(data, out, address, fail_at=None, workers=2, data_mode="memory"):
    model_cfg, train_cfg = resolve(None, SETS, epochs=EPOCHS, batch_size=BATCH, seed=0)
    ray_cfg = RayConfig(num_workers=workers, max_failures=1, fail_at=fail_at, data_mode=data_mode)
    return run_training(str(data), str(out), "esmm", model_cfg, train_cfg, ray_cfg, address=address)


@pytest.fixture(scope="module")
def uninterrupted(ray_start_2_cpus, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray_model")
    return out, _train(tiny_data, out, ray_start_2_cpus["address"])


def test_two_workers_train_and_write_a_model(uninterrupted, tiny_data, held_out):
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from train.data import load_split
    from train.evaluate import predict
    from train.local import evaluate_dir, load_model
    from train.ray_eval import align_predictions

    out, metrics = uninterrupted
    assert {"model.pt", "config.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    t = metrics["training"]
    n_val, n_rest = held_out
    rows = t["rows"]  # Ray's equal split: each dataset loses its rows mod 2, nothing else
    assert rows == {"train": n_rest - n_rest % 2, "val": n_val - n_val % 2, "left_out": n_rest % 2 + n_val % 2}
    steps = -(-(n_rest // 2) // (BATCH // 2))  # each worker: half the rows, half the batch
    assert t["workers"] == 2 and t["steps"] == EPOCHS * steps
    assert [h["steps"] for h in t["history"]] == [steps] * EPOCHS
    assert t["history"][-1]["train_loss"] < t["history"][0]["train_loss"]
    # no process held a whole table: model.pt has the dense weights only, the tables are
    # the bundle's two shard files (one per worker), the test split was scored by the workers
    assert not [k for k in torch.load(out / "model.pt", weights_only=True) if "embeddings" in k]
    assert sorted(p.name for p in out.glob("emb-*.safetensors")) == [f"emb-0.rank={r}-of-2.safetensors" for r in (0, 1)]
    model, cfg = load_model(out)  # one process merges them on purpose
    assert cfg["ray"]["saved_by_workers"] == 2
    test = load_split(tiny_data, "test", model.fields)
    merged = predict(model, test)
    by_workers = align_predictions(pq.read_table(out / "test_predictions.parquet"), test.sample_id, "preds")
    assert sorted(by_workers) == ["p_ctcvr", "p_ctr", "p_cvr"]
    for k, v in merged.items():  # the sharded lookups score every test row as the merged model does
        np.testing.assert_allclose(by_workers[k], v, rtol=0, atol=1e-6)
    assert metrics["ctcvr_auc"] == pytest.approx(evaluate_dir(model, str(tiny_data), "test")["ctcvr_auc"], abs=1e-9)
    assert json.loads((out / "metrics.json").read_text())["model"] == "esmm"


def test_killed_worker_restarts_from_checkpoint(uninterrupted, ray_start_2_cpus, tiny_data, tmp_path):
    _, ref = uninterrupted
    marker = tmp_path / "killed"
    fail_at = {"epoch": 0, "step": 6, "rank": 1, "marker": str(marker)}  # checkpoints at steps 4, 8, ...
    metrics = _train(tiny_data, tmp_path / "model", ray_start_2_cpus["address"], fail_at)
    assert marker.exists()  # the fault did fire
    t, r = metrics["training"], ref["training"]
    assert t["resumed_at_global_step"] == 4  # continued from the step-4 checkpoint, not from scratch
    assert t["steps"] == r["steps"]
    for h, hr in zip(t["history"], r["history"]):
        assert h["steps"] == hr["steps"]
        assert h["train_loss"] == pytest.approx(hr["train_loss"], rel=1e-4)
        assert h["val_loss"] == pytest.approx(hr["val_loss"], rel=1e-4)
    assert metrics["ctcvr_auc"] == pytest.approx(ref["ctcvr_auc"], abs=1e-3)


def test_resume_with_another_worker_count_is_refused(uninterrupted, tiny_data, tmp_path):
    """2 -> 1 workers: each worker's data position and shuffle are its own, so the run is
    refused with one clear line before anything starts (no rows skipped or repeated)."""
    from train.errors import InputError

    out, _ = uninterrupted
    model_cfg, train_cfg = resolve(None, SETS, epochs=EPOCHS, batch_size=BATCH, seed=0)
    ray_cfg = RayConfig(num_workers=1, resume=True, storage_path=str(out / "ray"))
    with pytest.raises(InputError, match=r"saved by 2 workers; resuming it with --workers 1"):
        run_training(str(tiny_data), str(tmp_path / "m"), "esmm", model_cfg, train_cfg, ray_cfg)
    assert not (tmp_path / "m" / "model.pt").exists()


def test_one_worker_trains_like_one_process(ray_start_2_cpus, tiny_data, tmp_path):
    """The same rows, validation rows, shuffles, init and steps as `esmm train`."""
    from train.local import train_on_data

    ray_m = _train(tiny_data, tmp_path / "ray", ray_start_2_cpus["address"], workers=1)
    local = train_on_data(str(tiny_data), str(tmp_path / "local"), "esmm", None, SETS, progress=False,
                          epochs=EPOCHS, batch_size=BATCH, seed=0)
    a, b = ray_m["training"]["history"], local["training"]["history"]
    assert [h["steps"] for h in a] == [h["steps"] for h in b]
    for ha, hb in zip(a, b):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-5)
        assert ha["val_loss"] == pytest.approx(hb["val_loss"], rel=1e-5)
    assert ray_m["ctcvr_auc"] == pytest.approx(local["ctcvr_auc"], abs=1e-5)
    assert ray_m["training"]["rows"]["left_out"] == 0


def test_stream_mode_trains(ray_start_2_cpus, tiny_data, tmp_path, held_out):
    m = _train(tiny_data, tmp_path / "stream", ray_start_2_cpus["address"], data_mode="stream")
    h = m["training"]["history"]
    n_rest = held_out[1]
    assert [x["steps"] for x in h] == [-(-(n_rest // 2) // (BATCH // 2))] * EPOCHS  # same rows as memory mode
    assert h[-1]["train_loss"] < h[0]["train_loss"] and m["training"]["rows"] is None


def test_experiment_on_ray_trains_baselines_on_their_views(ray_start_2_cpus, tiny_data, tmp_path):
    """`esmm experiment --workers 2`: BASE steps over the clicked rows of the whole shard
    (not per streamed batch); UNBIAS gets the protocol's CTR model and its 1/pCTR weights."""
    import math

    import numpy as np
    import pyarrow.parquet as pq

    from train.data import holdout_mask, load_split
    from train.evaluate import predict
    from train.experiment import run_experiment
    from train.local import load_model
    from train.ray_eval import CTR_COLUMN, align_predictions

    model_cfg, train_cfg = resolve(None, SETS, epochs=EPOCHS, batch_size=BATCH)
    report = run_experiment(str(tiny_data), str(tmp_path / "rep"), ["base", "unbias"], 1, model_cfg, train_cfg,
                            progress=False, log=lambda _: None, ray_cfg=RayConfig(num_workers=2),
                            address=ray_start_2_cpus["address"])
    cols = load_split(tiny_data, "train")
    clicks = int(cols.click.numpy()[~holdout_mask(cols.sample_id, train_cfg.val_fraction)].sum())
    steps = report["training"]["base"][0]["history"][0]["steps"]
    # each worker: its share of the clicks, BATCH // 2 rows a step (the rank with more sets the count)
    assert math.ceil(clicks / 2 / (BATCH // 2)) <= steps <= math.ceil(clicks / (BATCH // 2)), (clicks, steps)
    for name in ("ctr", "base", "unbias"):
        assert report["training"][name][0]["workers"] == 2
        assert math.isfinite(report["training"][name][0]["history"][0]["train_loss"])
    # UNBIAS's CTR network ran sharded on the workers and gave the CTR model's own pCTR
    seed_dir = tmp_path / "rep" / "ray_models" / "seed-0"
    test = load_split(tiny_data, "test")
    got = align_predictions(pq.read_table(seed_dir / "unbias" / "test_predictions.parquet"), test.sample_id, "u")
    np.testing.assert_allclose(got[CTR_COLUMN], predict(load_model(seed_dir / "ctr")[0], test)["p_ctr"],
                               rtol=0, atol=1e-6)


def test_ray_job_submit(ray_start_2_cpus, tiny_data, tmp_path):
    out = tmp_path / "job_model"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_start_2_cpus["dashboard"],
           "--working-dir", str(REPO), "--",
           "python", "-m", "jobs.train", "--data", str(tiny_data), "--out", str(out), "--workers", "2",
           "--epochs", "1", "--batch-size", "256", "--set", "val_fraction=0", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "succeeded" in (p.stdout + p.stderr).lower()
    assert "esmm train: esmm ->" in p.stdout
    assert (out / "model.pt").is_file() and json.loads((out / "metrics.json").read_text())["training"]["workers"] == 2


def test_cluster_up_down_stops_only_its_own(ray_start_2_cpus, tmp_path):
    from jobs.cluster import cluster_pids, main

    state = tmp_path / "cluster.json"
    assert main(["up", "--num-cpus", "1", "--state", str(state)]) == 0
    st = json.loads(state.read_text())
    assert st["address"].startswith("127.0.0.1:") and cluster_pids(st["temp_dir"])
    assert main(["status", "--state", str(state)]) == 0
    assert main(["up", "--state", str(state)]) == 2  # already up: one line, exit 2
    assert main(["down", "--state", str(state)]) == 0
    assert not cluster_pids(st["temp_dir"]) and not state.exists()
    assert cluster_pids(ray_start_2_cpus["temp_dir"])  # the other cluster on the machine still runs
