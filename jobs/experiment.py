"""``esmm experiment --data DATA --out REPORT [--models ...] [--seeds N]``: the paper's protocol.

Per seed one independent ``ctr`` model supplies the pCTR of every baseline's pCTCVR;
ESMM and ESMM-NS use their own. Writes REPORT/report.json (per model mean, std and
every seed's value), REPORT/report.md (Table 2 with the gain over BASE) and plots.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

from jobs.common import Parser, run_main  # noqa: E402

DEFAULT_MODELS = "base,aman,oversampling,unbias,division,esmm-ns,esmm,escm2-ips,escm2-dr,dcmt"


def add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    p.add_argument("--seeds", type=int, default=3, help="repetitions per model (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed+seeds-1 (default 0)")
    p.add_argument("--epochs", type=int, help="most epochs per model (default 20; early stopping on validation loss, patience 2)")
    p.add_argument("--batch-size", type=int, help="batch size (default 2048)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    p.add_argument("--config", help="JSON/YAML file of config keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="esmm experiment", description="ESMM and the paper's baselines x seeds -> report.")
    p.add_argument("--data", help="DATA dir (manifest.json + shards)")
    p.add_argument("--out", required=True, help="REPORT dir to write")
    p.add_argument("--merge", help="comma-separated REPORT dirs of the same experiment over other seeds: "
                   "write their combined report to --out (no training)")
    add_training_args(p)
    p.add_argument("--workers", type=int, default=0, help="train every model on Ray with W workers (0 = in this process)")
    p.add_argument("--address", help="Ray cluster address (default with --workers: one local cluster for the run)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs reserved per Ray worker (default 0.5)")
    p.add_argument("--data-mode", choices=("memory", "stream"), default="memory",
                   help="Ray workers hold their rows in memory (default) or stream them (see `esmm train -h`)")
    return p


def run(args, data: str, out: str) -> dict:
    from train.config import resolve
    from train.experiment import run_experiment

    model_cfg, train_cfg = resolve(args.config, args.set, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    ray_cfg = None
    workers = getattr(args, "workers", 0)  # `esmm demo` passes its own args, without the Ray flags
    if workers:
        from train.errors import InputError
        from train.ray_trainer import RayConfig

        if workers < 0:
            raise InputError(f"experiment: --workers must be >= 0, got {workers}")
        ray_cfg = RayConfig(num_workers=workers, cpus_per_worker=args.cpus_per_worker, data_mode=args.data_mode)
    return run_experiment(data, out, models, args.seeds, model_cfg, train_cfg,
                          progress=False if args.no_progress else None, first_seed=args.first_seed,
                          ray_cfg=ray_cfg, address=getattr(args, "address", None))


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from train.errors import InputError
    from train.report import table2

    if args.merge:
        from train.experiment import merge_reports

        report = merge_reports([d for d in args.merge.split(",") if d], args.out)
    elif not args.data:
        raise InputError("experiment: --data is required (or --merge)")
    else:
        report = run(args, args.data, args.out)
    print(table2(report))
    print(f"esmm experiment: {args.out}/report.md, report.json, auc.png, calibration.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
