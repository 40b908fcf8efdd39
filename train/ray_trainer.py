"""Ray Train driver: ``run_training`` (and ``esmm train --workers W``).

    esmm train --data DATA --out MODEL --workers 2                 # local cluster on 127.0.0.1
    esmm train --data DATA --out MODEL --workers 2 --address 127.0.0.1:6379
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.train --data DATA --out MODEL --workers 2

Three files, the way Ray Train's examples read:

- this one, the driver: reads the manifest, builds the per-worker ``config`` dict (JSON
  values only), ``ScalingConfig`` / ``RunConfig`` / ``FailureConfig`` and a
  ``TorchTrainer``, then writes MODEL/ like ``esmm train`` does (model.pt, config.json)
  and evaluates it on the test split (metrics.json);
- train/ray_worker.py: ``train_loop_per_worker(config)``, the job on each worker
  (build with the sharded embedding, restore, ``train.loop.fit``, report checkpoints);
- train/ray_data.py: the data sources (Ray Data datasets in, lockstep batches out).

Restarts: ``FailureConfig(max_failures)``; a restarted worker group resumes from the
latest checkpoint at the step it recorded. The global batch is ``batch_size``; each of
W workers takes ``batch_size // W`` rows of it. Validation (early stopping) holds out
the training rows ``train.data.holdout_mask`` picks by sample_id: the same rows as
`esmm train` / `esmm experiment` in one process. GPU (``--gpus-per-worker``): NCCL,
bf16 towers, fp32 rows, pinned batches (train/device.py).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from train.warm_start import warm_start_source
from train.errors import InputError
from train.loop import TrainConfig
from train.model import EsmmConfig
from train.ray_data import datasets
from train.ray_worker import DENSE_FILE, train_loop_per_worker

FAIL_ENV = "ESMM_TEST_FAIL_AT"  # tests only: "EPOCH:STEP:RANK:MARKER" kills that worker once
FAIL_HOLD_ENV = "ESMM_TEST_FAIL_HOLD_S"  # tests only: the faulty worker hangs this long first (a stuck try)


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


def worker_omp_env() -> dict:
    """The local cluster's workers' OpenMP wait policy: asleep at once (PASSIVE), since they
    share the cores with Ray Data's read tasks and each other; a user's OMP_WAIT_POLICY
    wins. (A single-process ``esmm train`` spins briefly instead: jobs/common.py.)"""
    if "OMP_WAIT_POLICY" in os.environ:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}


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
                       log_to_driver=True, runtime_env={"env_vars": worker_omp_env()})
        try:
            yield ctx.address_info["gcs_address"]
        finally:
            ray.shutdown()
    finally:
        if saved is None:
            _set_auth_mode(None)
        shutil.rmtree(tmp, ignore_errors=True)


def storage_dir(out: Path, ray_cfg: RayConfig) -> Path:
    """Where Ray Train keeps this run's checkpoints (``storage_path/name``'s parent); a
    fresh run (not ``resume``) clears an old run of the same name, which Ray would resume."""
    storage = Path(ray_cfg.storage_path or out / "ray").resolve()
    if not ray_cfg.resume and (storage / ray_cfg.name).exists():
        shutil.rmtree(storage / ray_cfg.name)
    return storage


def check_resume_world(run_dir: Path, num_workers: int) -> None:
    """Refuse to resume a run saved by another number of workers: each worker's data
    position counts its own batches of ``batch_size // W`` rows over its own part of the
    data, shuffled by its rank, so another W would skip or repeat rows."""
    for dense in sorted(run_dir.glob("**/" + DENSE_FILE)):
        saved = torch.load(dense, map_location="cpu", weights_only=True).get("world")
        if saved is not None and saved != num_workers:
            raise InputError(f"{dense.parent}: checkpoint saved by {saved} workers; resuming it with "
                             f"--workers {num_workers} would skip or repeat rows (each worker's data position "
                             f"and shuffle are its own): resume with --workers {saved}, or start fresh without --resume")


def worker_config(name: str, manifest: dict, fields, model_cfg: EsmmConfig, train_cfg: TrainConfig,
                  ray_cfg: RayConfig, ctr_model_dir: str | None) -> dict:
    """The ``config`` dict every ``train_loop_per_worker`` gets (JSON values only)."""
    cores = os.cpu_count() or 1
    return {
        "model": name, "model_cfg": model_cfg.to_dict(), "train_cfg": train_cfg.to_dict(),
        "fields": [asdict(f) for f in fields], "use_gpu": ray_cfg.gpus_per_worker > 0,
        "threads_per_worker": max(1, min(train_cfg.threads or cores, cores) // ray_cfg.num_workers),
        "data_mode": ray_cfg.data_mode, "shuffle_batches": ray_cfg.shuffle_batches,
        "has_val": train_cfg.val_fraction > 0, "fail_at": ray_cfg.fail_at,
        "train_counts": {k: manifest["splits"]["train"].get(k) for k in ("impressions", "clicks", "conversions")},
        "ctr_model_dir": str(Path(ctr_model_dir).resolve()) if ctr_model_dir else None,
    }


def fit_on_ray(config: dict, ray_cfg: RayConfig, storage: Path, train_datasets: dict):
    """Run ``train_loop_per_worker`` on ``ray_cfg.num_workers`` workers; the Ray Train Result."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = bool(config["use_gpu"])
    resources = {"CPU": ray_cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = ray_cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=ray_cfg.name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=train_datasets,
        # preserve_order: the split of blocks to workers is the same on every run, so a
        # restarted run skips exactly the batches it had trained on
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    res = trainer.fit()
    if res.error is not None:
        raise RuntimeError(f"Ray training failed: {res.error}") from res.error
    if res.checkpoint is None or not res.metrics.get("final"):
        raise RuntimeError("Ray training ended without its final model checkpoint")
    return res


def run_training(data_dir: str, out_dir: str, name: str, model_cfg: EsmmConfig, train_cfg: TrainConfig,
                 ray_cfg: RayConfig, ctr_model_dir: str | None = None, address: str | None = None,
                 init_from: str | None = None) -> dict:
    """Train ``name`` on Ray; write MODEL/ (model.pt with the dense weights, the bundle with
    the tables as the workers held them, config.json, metrics.json, test_predictions.parquet).
    Returns metrics. No process here ever holds a whole table: the workers score the test
    split and the tables go from their checkpoint shards to the bundle one shard at a time.
    ``init_from``: a model bundle every worker warm-starts its part from (train/warm_start.py)."""
    import pyarrow.parquet as pq

    from train.baselines import NEEDS_CTR_MODEL
    from train.bundle import is_bundle, write_bundle
    from train.data import load_manifest, load_split, manifest_fields, split_files
    from train.local import evaluate_preds, write_model_dir
    from train.ray_eval import CTR_COLUMN, read_predictions

    if ray_cfg.num_workers < 1:
        raise InputError(f"--workers must be >= 1, got {ray_cfg.num_workers}")
    if ray_cfg.data_mode not in ("memory", "stream"):
        raise InputError(f"--data-mode must be memory or stream, got {ray_cfg.data_mode!r}")
    if name in NEEDS_CTR_MODEL and not ctr_model_dir:
        raise InputError(f"train: --model {name} with --workers needs --ctr-model (a trained `ctr` MODEL dir)")
    if ctr_model_dir and not is_bundle(ctr_model_dir):
        raise InputError(f"--ctr-model {ctr_model_dir}: not a model bundle (`esmm train` writes one into MODEL; "
                         f"`esmm export --model MODEL --out BUNDLE` for an older MODEL)")
    manifest = load_manifest(data_dir)
    fields = manifest_fields(manifest, model_cfg.pooling)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = storage_dir(out, ray_cfg)
    if ray_cfg.resume and (storage / ray_cfg.name).exists():
        check_resume_world(storage / ray_cfg.name, ray_cfg.num_workers)
    config = worker_config(name, manifest, fields, model_cfg, train_cfg, ray_cfg, ctr_model_dir)
    config["init_from"] = warm_start_source(init_from, name, fields)
    config["test_files"] = split_files(data_dir, manifest, "test")
    with ray_cluster(address):
        res = fit_on_ray(config, ray_cfg, storage, datasets(data_dir, manifest, fields, train_cfg.val_fraction))
    fit_result = json.loads(res.metrics["result"])
    test = load_split(data_dir, "test", fields, manifest)
    with res.checkpoint.as_directory() as d:
        rest = torch.load(Path(d) / DENSE_FILE, map_location="cpu", weights_only=True)
        write_model_dir(out, name, fields, rest["model"], model_cfg, train_cfg,
                        {"data": str(Path(data_dir).resolve()),
                         **({"init_from": str(Path(init_from).resolve())} if init_from else {}),
                         "ray": {"workers": ray_cfg.num_workers, "saved_by_workers": rest.get("world"),
                                 "checkpoint": res.checkpoint.path}})
        preds = read_predictions(d, test.sample_id)
        pq.write_table(pa_predictions(test.sample_id, preds), out / "test_predictions.parquet")
        ctr_preds = preds.pop(CTR_COLUMN, None)
        metrics = evaluate_preds(name, preds, test, ctr_preds, manifest, data_dir, "test")
        metrics["training"] = {**fit_result, "workers": ray_cfg.num_workers}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
        write_bundle(out, shards_dir=d)  # the tables, one shard at a time; metrics.json goes in too
    return metrics


def pa_predictions(sample_id, preds: dict):
    import pyarrow as pa

    return pa.table({"sample_id": pa.array(sample_id, pa.string()), **{k: pa.array(v) for k, v in preds.items()}})


def _fail_at_from_env() -> dict | None:
    v = os.environ.get(FAIL_ENV)
    if not v:
        return None
    epoch, step, rank, marker = v.split(":", 3)
    fail = {"epoch": int(epoch), "step": int(step), "rank": int(rank), "marker": marker}
    if os.environ.get(FAIL_HOLD_ENV):
        fail["delay_s"] = float(os.environ[FAIL_HOLD_ENV])
    return fail


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
                        ctr_model_dir=args.ctr_model, address=args.address,
                        init_from=getattr(args, "init_from", None))
