"""The paper's protocol (Ma et al. 2018, section 4): every model x every seed, one test set.

Per seed: first the independent ``ctr`` network (BASE's structure, on all impressions);
as in the paper (section 4.2) it supplies the pCTR of EVERY model's pCTCVR = pCVR x pCTR,
ESMM and ESMM-NS included, so the CTCVR column compares pCVR estimates alone (and it
gives UNBIAS its pCTR). ESMM's own pCTR x pCVR is scored beside it as ``own_ctcvr_auc``. Every model sees the same train rows, the same validation rows (for
early stopping) and is scored on the same test rows: CVR AUC over the clicked test
impressions, CTCVR AUC over all of them, and, when the data came from the simulator,
CVR AUC and calibration over the entire test space against ``would_convert``.

    report = run_experiment("DATA", "REPORT", models=["esmm", "base"], seeds=3)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from train.baselines import MODELS
from train.data import load_manifest, load_split, manifest_fields
from train.errors import InputError
from train.evaluate import predict, read_truth, score, truth_dir
from train.local import train_model
from train.loop import TrainConfig
from train.model import EmbeddingFactory, EsmmConfig

# the order of the paper's Table 2
DEFAULT_MODELS = ["base", "aman", "oversampling", "unbias", "division", "esmm-ns", "esmm",
                  "escm2-ips", "escm2-dr", "dcmt"]
# the knobs the paper searched for two baselines: picked per run from these grids by the
# clicked-row CVR AUC on the validation split (first seed), reported in report.json "picked"
GRIDS = {"aman": ("aman_rate", (0.05, 0.1, 0.2)), "oversampling": ("oversample_k", (2, 5, 10))}
# metrics summarised as mean/std over seeds (path into the metrics dict)
SUMMARY = {
    "cvr_auc": ("cvr_auc",), "ctcvr_auc": ("ctcvr_auc",), "ctr_auc": ("ctr_auc",),
    "own_ctcvr_auc": ("own_ctcvr_auc",),
    "entire_cvr_auc": ("entire_cvr_auc",), "unclicked_cvr_auc": ("unclicked_cvr_auc",),
    "cvr_logloss": ("cvr_logloss",), "ctcvr_logloss": ("ctcvr_logloss",), "ctr_logloss": ("ctr_logloss",),
    "entire_cvr_logloss": ("entire_cvr_logloss",),
    "cvr_calibration": ("cvr_calibration", "ratio"), "ctcvr_calibration": ("ctcvr_calibration", "ratio"),
    "entire_cvr_calibration": ("entire_cvr_calibration", "ratio"),
    "entire_cvr_ece": ("entire_cvr_calibration", "ece"), "cvr_ece": ("cvr_calibration", "ece"),
}
# ESMM must beat BASE on these by more than the seeds' spread (the issue's acceptance)
CHECKS = ("cvr_auc", "ctcvr_auc", "entire_cvr_auc")


def _get(m: dict, path: tuple):
    for k in path:
        if not isinstance(m, dict) or k not in m:
            return None
        m = m[k]
    return m


def summarise(per_seed: dict[str, list[dict]]) -> dict:
    """{model: {metric: {mean, std, values}}}; std is the sample std over seeds (0 for one)."""
    out = {}
    for name, runs in per_seed.items():
        s = {}
        for metric, path in SUMMARY.items():
            vals = [_get(r, path) for r in runs]
            if any(v is None for v in vals) or not vals:
                continue
            a = np.asarray(vals, dtype=np.float64)
            s[metric] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
                         "values": [float(v) for v in a]}
        out[name] = s
    return out


def checks(summary: dict) -> dict:
    """ESMM - BASE per metric, and whether it exceeds the seeds' spread (the larger std)."""
    out = {}
    if "esmm" not in summary or "base" not in summary:
        return out
    for metric in CHECKS:
        e, b = summary["esmm"].get(metric), summary["base"].get(metric)
        if e is None or b is None:
            continue
        gain, spread = e["mean"] - b["mean"], max(e["std"], b["std"])
        out[metric] = {"esmm_minus_base": gain, "spread": spread, "beats": bool(gain > spread)}
    return out


def run_experiment(data_dir: str, out_dir: str | None = None, models: list[str] | None = None,
                   seeds: int = 3, model_cfg: EsmmConfig | None = None, train_cfg: TrainConfig | None = None,
                   embedding_factory: EmbeddingFactory | None = None, progress: bool | None = None,
                   log: Callable[[str], None] = print, first_seed: int = 0,
                   ray_cfg=None, address: str | None = None) -> dict:
    """Run the protocol on DATA and (with ``out_dir``) write report.json, report.md and plots.

    Args:
        models (list[str]): models to compare (``ctr`` is always trained: it is the protocol's).
        seeds (int): repetitions; seed s uses TrainConfig.seed = first_seed + s.
        ray_cfg (train.ray_trainer.RayConfig | None): train every model on Ray with these
            workers (one cluster for the whole run: ``address``, or a private local one);
            the models land in REPORT/ray_models/seed-S/NAME. Scoring is unchanged.
    Returns:
        the report dict (see report.json).
    """
    models = list(models or DEFAULT_MODELS)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise InputError(f"unknown model(s) {unknown} (have {', '.join(MODELS)})")
    if seeds < 1:
        raise InputError(f"--seeds must be >= 1, got {seeds}")
    model_cfg, train_cfg = model_cfg or EsmmConfig(), train_cfg or TrainConfig()
    if model_cfg.tower_precision != "fp32":  # Table 2 is an fp32 comparison, whatever the default
        log(f"experiment: tower_precision {model_cfg.tower_precision!r} -> 'fp32' (Table 2 runs are fp32)")
        model_cfg = replace(model_cfg, tower_precision="fp32")
    t_start = time.perf_counter()
    manifest = load_manifest(data_dir)
    fields = manifest_fields(manifest, model_cfg.pooling)
    train_all = load_split(data_dir, "train", fields, manifest)
    test = load_split(data_dir, "test", fields, manifest)
    train, val = train_all.split_off(train_cfg.val_fraction) if train_cfg.val_fraction > 0 else (train_all, None)
    tdir = truth_dir(manifest)
    truth = read_truth(tdir, test.sample_id) if tdir and os.path.exists(tdir) else None
    log(f"data {data_dir}: train {len(train)} (+{len(val) if val else 0} validation), test {len(test)}, "
        f"{len(fields)} fields, truth {'yes' if truth else 'no'}")

    per_seed: dict[str, list[dict]] = {m: [] for m in (["ctr"] + [m for m in models if m != "ctr"])}
    cfgs = {name: model_cfg for name in per_seed}
    picked = {}
    if ray_cfg is None and val is not None and len(val):
        picked = pick_knobs([m for m in models if m in GRIDS], train, val, model_cfg,
                            replace(train_cfg, seed=first_seed), embedding_factory, progress, log)
        for name, p in picked.items():
            cfgs[name] = replace(model_cfg, **{p["knob"]: p["picked"]})
    training: dict[str, list[dict]] = {m: [] for m in per_seed}
    if ray_cfg is not None:
        from train.ray_trainer import ray_cluster

        ray_root = Path(out_dir or tempfile.mkdtemp(prefix="esmm-exp-")) / "ray_models"
        cluster = ray_cluster(address)  # one cluster for every model x seed (run_training reuses it)
    else:
        cluster = contextlib.nullcontext()
    with cluster:
        for s in range(seeds):
            tc = replace(train_cfg, seed=first_seed + s)
            ctr_model, ctr_preds = None, None
            for name in per_seed:
                t0 = time.perf_counter()
                if ray_cfg is None:
                    model, result = train_model(name, train, cfgs[name], tc, val, ctr_model=ctr_model,
                                                embedding_factory=embedding_factory, progress=progress)
                    preds = predict(model, test)
                else:  # the workers score the test split: no process builds the whole model
                    model, (preds, result) = None, _train_on_ray(data_dir, ray_root / f"seed-{tc.seed}", name,
                                                                 cfgs[name], tc, ray_cfg, test.sample_id)
                if name == "ctr":
                    ctr_model, ctr_preds = model, preds["p_ctr"]
                m = score(preds, test, ctr_preds, truth)
                m["seed"] = tc.seed
                per_seed[name].append(m)
                training[name].append({k: v for k, v in result.items() if k != "optimizers"}
                                      | {"seconds": time.perf_counter() - t0})
                shown = "  ".join(f"{k} {m[k]:.4f}" for k in ("ctr_auc", "cvr_auc", "ctcvr_auc", "entire_cvr_auc") if k in m)
                log(f"seed {tc.seed} {name:<12} {shown}  ({time.perf_counter() - t0:.1f}s, best epoch {result['best_epoch'] + 1})")

    summary = summarise(per_seed)
    report = {
        "data": str(data_dir), "models": models, "seeds": [first_seed + s for s in range(seeds)],
        "model_cfg": model_cfg.to_dict(), "train_cfg": train_cfg.to_dict(),
        "dataset": {split: {k: v for k, v in manifest["splits"][split].items() if k != "files"}
                    for split in ("train", "test") if split in manifest["splits"]},
        "entire_space": truth is not None, "workers": ray_cfg.num_workers if ray_cfg is not None else 0,
        "summary": summary, "checks": checks(summary), "picked": picked,
        "per_seed": per_seed,
        "training": training, "elapsed_s": time.perf_counter() - t_start,
    }
    if out_dir:
        from train.report import write_report

        write_report(report, out_dir)
    return report


def pick_knobs(names: list[str], train, val, model_cfg: EsmmConfig, tc: TrainConfig,
               embedding_factory=None, progress=None, log=print) -> dict:
    """For each of ``names`` in GRIDS: train once per grid value (seed ``tc.seed``) and keep
    the value with the best clicked-row CVR AUC on the validation split (the test split is
    never looked at). Returns {name: {knob, picked, validation_cvr_auc: {value: auc}}}."""
    from train import metrics

    out = {}
    clicked = val.click.numpy() > 0
    z = val.conversion.numpy()[clicked]
    for name in names:
        knob, grid = GRIDS[name]
        aucs = {}
        for v in grid:
            model, _ = train_model(name, train, replace(model_cfg, **{knob: v}), tc, val,
                                   embedding_factory=embedding_factory, progress=progress)
            aucs[v] = metrics.auc(z, predict(model, val)["p_cvr"][clicked])
        finite = {v: a for v, a in aucs.items() if _finite(a)}
        best = max(finite, key=finite.get) if finite else getattr(model_cfg, knob)
        log(f"picked {name} {knob}={best} by validation CVR AUC "
            + " ".join(f"{v}:{a:.4f}" for v, a in aucs.items()))
        out[name] = {"knob": knob, "picked": best, "validation_cvr_auc": {str(v): a for v, a in aucs.items()}}
    return out


def _train_on_ray(data_dir: str, seed_dir: Path, name: str, model_cfg: EsmmConfig, tc: TrainConfig, ray_cfg,
                  sample_id) -> tuple[dict, dict]:
    """Train ``name`` with train.ray_trainer.run_training into SEED_DIR/NAME; baselines
    that need the independent CTR model get SEED_DIR/ctr (trained first in the protocol).
    Returns (the workers' test predictions in the order of ``sample_id``, fit result)."""
    import pyarrow.parquet as pq

    from train.baselines import NEEDS_CTR_MODEL
    from train.ray_eval import CTR_COLUMN, align_predictions
    from train.ray_trainer import run_training

    ctr_dir = str(seed_dir / "ctr") if name in NEEDS_CTR_MODEL else None
    metrics = run_training(data_dir, str(seed_dir / name), name, model_cfg, tc,
                           replace(ray_cfg, name=name), ctr_model_dir=ctr_dir)
    path = seed_dir / name / "test_predictions.parquet"
    preds = align_predictions(pq.read_table(path), sample_id, str(path))
    preds.pop(CTR_COLUMN, None)
    return preds, metrics["training"]


def merge_reports(report_dirs: list[str], out_dir: str | None = None) -> dict:
    """One report from several runs of the same data and models over different seeds
    (e.g. seeds run in parallel with ``--first-seed``); summaries are recomputed."""
    reports = [load_report(d) for d in report_dirs]
    first = reports[0]
    for d, r in zip(report_dirs, reports):
        if r["models"] != first["models"] or r["data"] != first["data"]:
            raise InputError(f"{d}: report has other models or data than {report_dirs[0]}")
    per_seed = {name: [m for r in reports for m in r["per_seed"].get(name, [])] for name in first["per_seed"]}
    training = {name: [t for r in reports for t in r["training"].get(name, [])] for name in first["training"]}
    seeds = [s for r in reports for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise InputError(f"merge: seeds overlap across reports ({seeds})")
    nan = lambda v: float("nan") if v is None else v  # noqa: E731  JSON null back to NaN
    per_seed = {n: [{k: nan(v) if k in SUMMARY else v for k, v in m.items()} for m in runs] for n, runs in per_seed.items()}
    summary = summarise(per_seed)
    report = {**first, "seeds": seeds, "summary": summary, "checks": checks(summary), "per_seed": per_seed,
              "training": training, "elapsed_s": max(r.get("elapsed_s", 0) for r in reports),
              "merged_from": [str(d) for d in report_dirs]}
    if out_dir:
        from train.report import write_report

        write_report(report, out_dir)
    return report


def load_report(out_dir: str) -> dict:
    p = Path(out_dir) / "report.json"
    if not p.is_file():
        raise InputError(f"{p}: no report.json")
    return json.loads(p.read_text())


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
