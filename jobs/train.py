"""``esmm train --data DATA --out MODEL --model NAME [...]``: train one model, write MODEL/.

MODEL/ gets model.pt, config.json (model name, fields, resolved configs), the bundle
(bundle.json, weights.safetensors, emb-*.safetensors, vocab/: train/bundle.py) and
metrics.json (CTR AUC on all test impressions, CVR AUC on the clicked ones, CTCVR AUC
on all, log losses, calibration; entire-space CVR metrics on simulated data).
Also ``python -m jobs.train ...`` (e.g. under ``ray job submit``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: python jobs/train.py
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

from jobs.common import Parser, run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from train.baselines import MODELS

    p = Parser(prog="esmm train", description="Train one model (ESMM or a baseline) on DATA, evaluate on its test split.")
    p.add_argument("--data", required=True, help="DATA dir (manifest.json + shards, from `esmm etl`)")
    p.add_argument("--out", required=True, help="MODEL dir to write")
    p.add_argument("--model", default="esmm", choices=list(MODELS), help="model name (default esmm)")
    p.add_argument("--epochs", type=int, help="most epochs (default 20; early stopping on validation loss, patience 2)")
    p.add_argument("--batch-size", type=int, help="batch size (default 2048)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--config", help="JSON/YAML file of config keys (EsmmConfig / TrainConfig fields)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument("--ctr-model", help="MODEL dir of an independent `ctr` model: UNBIAS weights and baselines' pCTCVR")
    p.add_argument("--init-from", metavar="MODEL", help="warm start from this model bundle (an earlier `esmm train` "
                   "MODEL or `esmm export` BUNDLE): its dense weights and the rows of every id it knows; new ids "
                   "start fresh, optimizer state starts fresh (the data's vocabularies must extend the model's: "
                   "esmm etl --vocab-from MODEL)")
    p.add_argument("--resume", action="store_true", help="continue from MODEL/checkpoint.pt of an interrupted run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # distributed training (helper "ray" adds the dispatch): --workers W --address A --gpus-per-worker G
    p.add_argument("--workers", type=int, default=0, help="Ray Train workers (0 = train in this process)")
    p.add_argument("--address", help="Ray cluster address (default: start a local one)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray worker")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs reserved per Ray worker (default 0.5: "
                   "leaves cores to Ray Data's read tasks)")
    p.add_argument("--data-mode", choices=("memory", "stream"), default="memory",
                   help="Ray workers hold their rows in memory and shuffle them per epoch like one process "
                   "(default), or stream them from Ray Data (data larger than the workers' memory)")
    p.add_argument("--max-failures", type=int, default=2, help="Ray Train restarts from the last checkpoint")
    return p


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from train.errors import InputError

    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    if args.workers:
        try:
            from train.ray_trainer import train_on_ray
        except ImportError:
            raise InputError("train: --workers needs train/ray_trainer.py (not in this build)") from None
        metrics = train_on_ray(args, overrides)
    else:
        from train.local import train_on_data

        metrics = train_on_data(args.data, args.out, args.model, args.config, args.set,
                                progress=False if args.no_progress else None, ctr_model_dir=args.ctr_model,
                                resume=args.resume, init_from=args.init_from, **overrides)
    from train.bundle import read_bundle, write_bundle

    if args.workers:  # the Ray driver wrote the bundle from the workers' shards
        meta = read_bundle(args.out).meta
    else:  # MODEL/ is also the self-contained bundle (bundle.json, safetensors, vocab/)
        meta = write_bundle(args.out, parent_model=str(Path(args.init_from).resolve()) if args.init_from else None)
    keys = ("ctr_auc", "cvr_auc", "ctcvr_auc", "entire_cvr_auc", "ctr_logloss", "cvr_logloss", "ctcvr_logloss")
    shown = {k: round(metrics[k], 4) for k in keys if isinstance(metrics.get(k), float)}
    print(f"esmm train: {args.model} -> {args.out} (model_version {meta['model_version']}): {json.dumps(shown)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
