"""The ``esmm`` command: ``esmm <job> [args]`` runs ``jobs/<job>.py``'s ``main``."""
from __future__ import annotations

import importlib
import sys

# job name -> module under jobs/; each module has main(argv) -> int and runs standalone
# (spark-submit jobs/etl.py ..., python -m jobs.train ...).
JOBS = {
    "synth": ("jobs.synth", "write simulated impression/click/conversion logs"),
    "etl": ("jobs.etl", "Spark: join logs into sequential-label Parquet shards"),
    "aliccp": ("jobs.aliccp", "Spark: convert Ali-CCP (raw or processed samples) into shards"),
    "train": ("jobs.train", "train one model (locally or on Ray with --workers)"),
    "evaluate": ("jobs.evaluate", "score a trained model on a split: AUCs, log loss, calibration"),
    "experiment": ("jobs.experiment", "the paper's protocol: all models x seeds -> report"),
    "demo": ("jobs.demo", "synth -> etl -> experiment on the embedded default"),
    "cluster": ("jobs.cluster", "start/stop a local Ray cluster on 127.0.0.1"),
    "export": ("jobs.export", "copy a trained model into a self-contained bundle (safetensors + vocabularies)"),
    "score": ("jobs.score", "score every impression of a day from the raw logs with a model bundle"),
    "compare": ("jobs.compare", "two models on the same rows: figures and paired bootstrap intervals"),
    "publish": ("jobs.publish", "gate a model against production, swap the production pointer"),
}


def usage() -> str:
    lines = ["usage: esmm <job> [args]   (esmm <job> --help for its arguments)", "", "jobs:"]
    lines += [f"  {name:<11} {doc}" for name, (_, doc) in JOBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in JOBS:
        print(f"esmm: error: unknown job {name!r}\n{usage()}", file=sys.stderr)
        return 2
    try:
        mod = importlib.import_module(JOBS[name][0])
    except ModuleNotFoundError as e:
        if e.name == JOBS[name][0]:
            print(f"esmm: error: job {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    return mod.main(rest)


if __name__ == "__main__":
    sys.exit(main())
