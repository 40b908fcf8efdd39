"""``esmm synth --out LOGS [--impressions N] [--days D] [--seed S] [knobs]``: simulated raw logs.

Writes LOGS/{impressions,clicks,conversions}/dt=YYYY-MM-DD/ (the raw-log contract) and
LOGS/truth/ (p_click, p_convert, would_convert per impression); see etl/synth.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script: python jobs/synth.py
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

from jobs.common import Parser, run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="esmm synth", description="Write simulated impression/click/conversion logs and their truth.")
    p.add_argument("--out", required=True, help="log root to write (a previous synth output there is replaced)")
    p.add_argument("--impressions", type=int, default=1_000_000, help="total impressions (default 1000000)")
    p.add_argument("--days", type=int, default=14, help="impression days (default 14)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--start", default="2026-01-01", help="first day (default 2026-01-01)")
    p.add_argument("--users", type=int, help="number of users (default impressions/200)")
    p.add_argument("--items", type=int, help="number of items (default impressions/300)")
    p.add_argument("--ctr", type=float, help="mean p(click) (default 0.04)")
    p.add_argument("--cvr", type=float, help="conversions per click (default 0.05)")
    p.add_argument("--chunk-size", type=int, help="impressions per generated chunk (default 500000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other SynthConfig field, e.g. --set w_shared_convert=1.5 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    return p


def _knobs(args) -> dict:
    from dataclasses import fields

    from etl.errors import InputError
    from etl.synth import SynthConfig

    types = {f.name: f.type for f in fields(SynthConfig)}
    knobs = {k: getattr(args, k) for k in ("users", "items", "ctr", "cvr", "chunk_size") if getattr(args, k) is not None}
    knobs["start"] = args.start
    for kv in args.set:
        key, sep, raw = kv.partition("=")
        if not sep or key not in types or key in ("impressions", "days", "seed"):
            raise InputError(f"synth: --set {kv!r}: expected KEY=VALUE with KEY a SynthConfig field "
                             f"other than impressions/days/seed")
        kind = str(types[key])
        try:
            knobs[key] = raw if "str" in kind else (float(raw) if "float" in kind else int(raw))
        except ValueError:
            raise InputError(f"synth: --set {kv!r}: {key} must be a {'float' if 'float' in kind else 'integer'}") from None
    return knobs


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from etl.synth import simulate

    knobs = _knobs(args)

    def progress(done: int, total: int) -> None:
        if not args.quiet and sys.stderr.isatty():
            print(f"\rsynth: {done:,}/{total:,} impressions", end="", file=sys.stderr, flush=True)

    s = simulate(args.out, impressions=args.impressions, days=args.days, seed=args.seed, progress=progress, **knobs)
    if not args.quiet and sys.stderr.isatty():
        print(file=sys.stderr)
    if not args.quiet:
        days = s["days"]["impressions"]
        print(f"synth: wrote {s['out']}  ({days[0]} .. {days[-1]}, {len(days)} impression days)")
        print(f"  users {s['users']:,}  items {s['items']:,}  categories {s['categories']:,}  "
              f"brands {s['brands']:,}  shops {s['shops']:,}  cities {s['cities']:,}")
        print(f"  impressions {s['impressions']:,}  clicked {s['clicked_impressions']:,} "
              f"(click events {s['click_events']:,})  conversions {s['conversions']:,} "
              f"(later than the window: {s['late_conversions']:,})")
        print(f"  CTR {s['ctr']:.4f}  CVR (of clicks) {s['cvr']:.4f}  CTCVR {s['ctcvr']:.5f}  "
              f"mean p_convert all {s['mean_p_convert']:.4f} vs clicked {s['mean_p_convert_clicked']:.4f}")
    print(f"synth: {s['impressions']:,} impressions in {s['seconds']:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
