"""``esmm evaluate --model MODEL --data DATA --out metrics.json [--split test]``.

Scores a trained model on a split of DATA with the paper's metrics (the Airflow DAG's
evaluation task). ``--ctr-model`` gives a baseline's pCTCVR from an independent CTR model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: python jobs/evaluate.py
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

from jobs.common import Parser, run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="esmm evaluate", description="Score a trained model on DATA: CTR / CVR / CTCVR AUC, log loss, calibration.")
    p.add_argument("--model", required=True, help="MODEL dir from `esmm train`")
    p.add_argument("--data", required=True, help="DATA dir (manifest.json + shards)")
    p.add_argument("--out", required=True, help="metrics JSON file to write")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--ctr-model", help="MODEL dir of the independent ctr model (baselines' pCTCVR)")
    return p


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from train.data import load_manifest, manifest_fields
    from train.local import check_fields, evaluate_dir, load_model
    from train.metrics import jsonable

    model, cfg = load_model(args.model)
    manifest = load_manifest(args.data)
    check_fields(model.fields, manifest_fields(manifest, model.cfg.pooling), f"{args.data}/manifest.json")
    ctr = load_model(args.ctr_model)[0] if args.ctr_model else None
    m = evaluate_dir(model, args.data, args.split, ctr, manifest)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(m), indent=2) + "\n")
    keys = ("ctr_auc", "cvr_auc", "ctcvr_auc", "entire_cvr_auc")
    print(f"esmm evaluate: {cfg['model']} on {args.split}: " +
          ", ".join(f"{k} {m[k]:.4f}" for k in keys if isinstance(m.get(k), float)) + f" -> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
