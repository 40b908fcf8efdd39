"""The torch half of ``esmm score``: raw impressions (Parquet) -> one score row each.

Output columns: ``impression_id``, ``p_ctr``, ``p_cvr``, ``p_ctcvr`` (float32) and
``model_version`` (the bundle's). Two ways, same rows and scores:

- one process: the Scorer over each input file's record batches;
- Ray (``workers`` > 0): Ray Data ``read_parquet`` -> ``map_batches`` over an actor pool
  of ``workers`` actors, each loading the bundle once -> ``write_parquet``.

Both write to a staging folder that :func:`commit` renames into place with ``_SUCCESS``.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from train.errors import InputError
from train.scorer import OUTPUTS, Scorer

SCHEMA = pa.schema([("impression_id", pa.string())] + [(k, pa.float32()) for k in OUTPUTS]
                   + [("model_version", pa.string())])


def scores_table(scorer: Scorer, rows: pa.Table) -> pa.Table:
    """The score rows of raw impression ``rows`` (same order)."""
    p = scorer.score(rows)
    ids = rows.column("impression_id").cast(pa.string())
    return pa.table([ids] + [pa.array(p[k], pa.float32()) for k in OUTPUTS]
                    + [pa.array([scorer.model_version] * rows.num_rows, pa.string())], schema=SCHEMA)


class ScoreActor:
    """Ray Data map_batches callable: loads the bundle once per actor."""

    def __init__(self, bundle: str, batch_size: int, device: str = "cpu"):
        self.scorer = Scorer(bundle, batch_size=batch_size, device=device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return scores_table(self.scorer, batch)


def input_files(in_dir: str | os.PathLike) -> list[str]:
    files = sorted(str(p) for p in Path(in_dir).glob("*.parquet") if not p.name.startswith(("_", ".")))
    if not files:
        raise InputError(f"{in_dir}: no Parquet files of impressions to score")
    return files


def score_local(bundle: str, in_dir: str, out_dir: str, batch_size: int = 8192) -> int:
    """One process: one output file per input file. Returns the rows written."""
    scorer = Scorer(bundle, batch_size=batch_size)
    n = 0
    for i, f in enumerate(input_files(in_dir)):
        pf = pq.ParquetFile(f)
        with pq.ParquetWriter(Path(out_dir) / f"part-{i:05d}.parquet", SCHEMA) as w:
            for b in pf.iter_batches(batch_size=batch_size):
                t = scores_table(scorer, pa.Table.from_batches([b]))
                w.write_table(t)
                n += t.num_rows
    return n


def score_ray(bundle: str, in_dir: str, out_dir: str, workers: int, address: str | None = None,
              gpus_per_worker: float = 0.0, cpus_per_worker: float = 0.5, batch_size: int = 8192) -> int:
    """Ray Data over ``workers`` scoring actors. Returns the rows written."""
    import ray
    from ray.data import ActorPoolStrategy

    from train.ray_trainer import ray_cluster

    with ray_cluster(address):
        ds = ray.data.read_parquet(input_files(in_dir))
        gpu = {"num_gpus": gpus_per_worker} if gpus_per_worker > 0 else {}
        scored = ds.map_batches(ScoreActor, fn_constructor_args=(bundle, batch_size, "cuda" if gpu else "cpu"),
                                batch_format="pyarrow", batch_size=batch_size,
                                compute=ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker, **gpu)
        scored.write_parquet(str(out_dir))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in Path(out_dir).glob("*.parquet"))


def score_impressions(bundle: str, in_dir: str, out: str, workers: int = 0, address: str | None = None,
                      gpus_per_worker: float = 0.0, summary: dict | None = None) -> dict:
    """Score every impression under ``in_dir``; write ``out`` (staging, then rename, ``_SUCCESS``).

    Args:
        summary (dict | None): written to ``out/_score.json`` with the rows scored added.

    Returns:
        dict: the _score.json content.
    """
    out_p = Path(out).resolve()
    staging = out_p.with_name(f".{out_p.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        bundle = str(Path(bundle).resolve())
        if workers > 0:
            n = score_ray(bundle, in_dir, str(staging), workers, address, gpus_per_worker)
        else:
            n = score_local(bundle, in_dir, str(staging))
        from train.bundle import read_bundle

        meta = {**(summary or {}), "scored": n, "model": bundle,
                "model_version": read_bundle(bundle).model_version, "workers": workers}
        expected = (summary or {}).get("impressions", {}).get("valid")
        if expected is not None and expected != n:
            raise RuntimeError(f"{expected} valid impressions but {n} score rows written")
        (staging / "_score.json").write_text(json.dumps(meta, indent=2) + "\n")
        (staging / "_SUCCESS").write_text("")
        old = None
        if out_p.exists():  # replace a previous run's output only once this one is whole
            old = out_p.with_name(f".{out_p.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out_p, old)
        os.replace(staging, out_p)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return meta
    finally:
        shutil.rmtree(staging, ignore_errors=True)
