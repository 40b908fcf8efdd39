"""``esmm demo``: simulated logs -> Spark ETL -> the paper's experiment, then prints Table 2.

    OUT/logs/     esmm synth (etl/synth.py), with the truth table LOGS/truth/
    OUT/data/     esmm etl: manifest.json + Parquet shards (first half of the days trains)
    OUT/report/   esmm experiment: report.md, report.json, auc.png, calibration.png

A rerun with the same simulation arguments reuses OUT/logs and OUT/data (``--fresh``
redoes them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

from jobs.common import Parser, run_main  # noqa: E402
from jobs.experiment import add_training_args  # noqa: E402

# Sized to finish in minutes on 2 cores: 300k impressions over 14 days -> ~150k training
# impressions, ~150 per item and per user (the simulator's defaults keep these ratios).
DEFAULT_IMPRESSIONS = 300_000


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="esmm demo", description="synth -> etl -> experiment with all models; prints Table 2.")
    p.add_argument("--out", default="runs/demo", help="work folder (default runs/demo)")
    p.add_argument("--impressions", type=int, default=DEFAULT_IMPRESSIONS, help=f"simulated impressions (default {DEFAULT_IMPRESSIONS})")
    p.add_argument("--days", type=int, default=14, help="simulated days (default 14; the first half trains)")
    p.add_argument("--synth-seed", type=int, default=0, help="simulator seed (default 0)")
    p.add_argument("--synth-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a SynthConfig knob for the simulator (repeatable)")
    p.add_argument("--fresh", action="store_true", help="redo synth and etl even if OUT/data matches")
    add_training_args(p)
    return p


def _synth_knobs(sets: list[str]) -> dict:
    from dataclasses import fields

    from etl.errors import InputError
    from etl.synth import SynthConfig

    types = {f.name: str(f.type) for f in fields(SynthConfig)}
    knobs = {}
    for kv in sets:
        k, sep, v = kv.partition("=")
        if not sep or k not in types or k in ("impressions", "days", "seed"):
            raise InputError(f"demo: --synth-set {kv!r}: expected KEY=VALUE with KEY a SynthConfig field")
        try:
            knobs[k] = v if "str" in types[k] else (float(v) if "float" in types[k] else int(v))
        except ValueError:
            raise InputError(f"demo: --synth-set {kv!r}: not a number") from None
    return knobs


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    logs, data, report_dir = out / "logs", out / "data", out / "report"
    knobs = _synth_knobs(args.synth_set)
    sim = {"impressions": args.impressions, "days": args.days, "seed": args.synth_seed, **knobs}
    stamp = out / "demo.json"
    t0 = time.perf_counter()
    reuse = (not args.fresh and (data / "_SUCCESS").exists() and stamp.exists()
             and json.loads(stamp.read_text()).get("synth") == sim)
    if reuse:
        print(f"demo: reusing {data} (same simulation; --fresh to redo)")
    else:
        from etl.synth import simulate

        print(f"demo: 1/3 synth {args.impressions:,} impressions over {args.days} days -> {logs}", flush=True)
        s = simulate(logs, impressions=args.impressions, days=args.days, seed=args.synth_seed, **knobs)
        print(f"  CTR {s['ctr']:.4f}, CVR of clicks {s['cvr']:.4f}, {s['users']:,} users, {s['items']:,} items", flush=True)
        print(f"demo: 2/3 etl (Spark local) -> {data}", flush=True)
        os.environ.setdefault("ESMM_SPARK_DRIVER_MEMORY", "1g")
        from jobs import etl as etl_job

        rc = etl_job.main(["--logs", str(logs), "--out", str(data)])
        if rc:
            return rc
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"synth": sim}, indent=2) + "\n")
    print(f"demo: 3/3 experiment ({args.models}; {args.seeds} seeds) -> {report_dir}", flush=True)
    from jobs.experiment import run
    from train.report import markdown

    report = run(args, str(data), str(report_dir))
    print()
    print(markdown(report))
    print(f"demo: done in {time.perf_counter() - t0:.0f} s; report in {report_dir}/report.md")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
