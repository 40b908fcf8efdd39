"""``esmm export --model MODEL --out BUNDLE``: a self-contained copy of a trained model.

BUNDLE gets bundle.json (fields, config, metrics, lineage, model_version), the weights
in safetensors (the embedding copied shard by shard from the Ray checkpoint when the
model was trained on workers) and every field's vocabulary (train/bundle.py). It loads
with torch, safetensors and pyarrow alone: ``train.scorer.Scorer(BUNDLE)``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script: python jobs/export.py
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

from jobs.common import Parser, run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="esmm export", description="Write a self-contained model bundle from a trained MODEL dir.")
    p.add_argument("--model", required=True, help="MODEL dir from `esmm train`")
    p.add_argument("--out", required=True, help="BUNDLE dir to write (replaced)")
    p.add_argument("--shards", help="a Ray checkpoint dir with shard-rank=<r>.pt files to copy the embedding from "
                   "(default: the one MODEL/config.json names, if it still exists)")
    return p


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from train.bundle import write_bundle

    meta = write_bundle(args.model, args.out, shards_dir=args.shards)
    tables = meta["weights"]["tables"]
    print(f"esmm export: {args.model} -> {args.out}: model_version {meta['model_version']}, "
          f"{len(meta['fields'])} fields, {len(meta['vocab_fields'])} vocabularies, "
          + ", ".join(f"{k} {t['rows']}x{t['dim']} in {len(t['files'])} shard file(s)" for k, t in tables.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
