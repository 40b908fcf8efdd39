"""The publish gate and the production pointer: no Airflow, and no torch unless it scores.

A model root holds candidate models and one pointer, ``ROOT/production``, a
symlink to the model now serving::

    MODEL_ROOT/
      candidates/2026-01-07__run1/   a model dir (written by ``esmm train``)
      production -> candidates/2026-01-07__run1
      publish_log.jsonl              one line per publish, newest last

The gate compares like with like: production and the candidate are scored on the
same rows (DATA's test split, train/compare.py), and a candidate is refused only when
the paired bootstrap 95% interval of candidate - production, for CTCVR AUC or CVR AUC
(the two the paper reports), lies wholly below -tolerance. A candidate equal to
production therefore passes, and a difference inside the noise never blocks a
publish. The pointer is swapped by ``os.replace`` of a fresh symlink, which POSIX
makes atomic: a reader resolving ``production`` sees the old model or the new one,
never a missing or half-written pointer. ``esmm publish`` calls these functions; the
Airflow DAG runs ``esmm publish`` as a process.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from train.errors import InputError

POINTER = "production"
LOG_FILE = "publish_log.jsonl"
GATED = ("ctcvr_auc", "cvr_auc")


@dataclass
class GateResult:
    """Outcome of comparing a candidate with production on the same rows.

    Args:
        passed (bool): True when the candidate may be published.
        candidate (dict): the candidate's gated figures.
        production (dict | None): production's gated figures on the same rows, None when
            nothing is published yet.
        tolerance (float): the allowed drop per metric.
        intervals (dict): per gated metric, the 95% interval of candidate - production.
        failures (list[str]): one line per metric that failed, both figures and the interval in it.
    """

    passed: bool
    candidate: dict
    production: dict | None
    tolerance: float
    intervals: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def describe(self, k: str) -> str:
        if self.production is None:
            return f"{k} candidate {self.candidate[k]:.4f} (no production model)"
        lo, hi = self.intervals[k]
        return (f"{k} candidate {self.candidate[k]:.4f} vs production {self.production[k]:.4f}, "
                f"difference {self.candidate[k] - self.production[k]:+.4f} (95% CI {lo:+.4f} .. {hi:+.4f})")

    def message(self) -> str:
        if self.passed:
            return f"gate passed (tolerance {self.tolerance:g}): " + "; ".join(self.describe(k) for k in self.candidate)
        return f"gate failed (tolerance {self.tolerance:g}): " + "; ".join(self.failures)


def gate(comparison: dict, tolerance: float, keys: Sequence[str] = GATED) -> GateResult:
    """The verdict on a comparison ``[production, candidate]`` (or ``[candidate]`` alone).

    Fails a metric only when the whole 95% interval of candidate - production lies below
    ``-tolerance``: the candidate is then worse by more than the tolerance with 95%
    confidence. A candidate figure that is NaN (e.g. no positives) fails: the gate cannot
    vouch for it. With no production model only that check applies.
    """
    if tolerance < 0 or math.isnan(tolerance):
        raise InputError(f"tolerance must be >= 0, got {tolerance}")
    metrics = comparison["metrics"]
    first = len(comparison["models"]) == 1
    cand = {k: float(metrics[k]["values"][-1]) for k in keys}
    prod = None if first else {k: float(metrics[k]["values"][0]) for k in keys}
    intervals = {} if first else {k: tuple(metrics[k]["ci95"]) for k in keys}
    result = GateResult(True, cand, prod, tolerance, intervals)
    for k in keys:
        if math.isnan(cand[k]):
            result.failures.append(f"{k} candidate is NaN (no positives or no negatives on these rows)")
        elif not first and intervals[k][1] < -tolerance:
            result.failures.append(result.describe(k) + f": worse by more than the tolerance {tolerance:g}")
    result.passed = not result.failures
    return result


def production_dir(root: str | os.PathLike) -> Path | None:
    """The model dir ``ROOT/production`` points at, or None when nothing is published."""
    p = Path(root) / POINTER
    if not p.is_symlink():
        if p.exists():
            raise InputError(f"{p}: expected a symlink to the production model, found a real file or dir")
        return None
    target = p.resolve()
    if not target.is_dir():
        raise InputError(f"{p}: points at {target}, which is not a model dir")
    return target


def comparison(candidate: str | os.PathLike, root: str | os.PathLike, data: str | os.PathLike,
               split: str = "test", comparison_file: str | os.PathLike | None = None,
               resamples: int = 1000, seed: int = 0) -> dict:
    """Production (what ``root``'s pointer names now) and ``candidate`` compared on DATA's split.

    With ``comparison_file`` (from ``esmm compare``) nothing is scored, so no torch is
    needed; the file must name exactly these models, data and split, else it is stale.
    """
    from train import compare as cmp

    prod = production_dir(root)
    models = [str(Path(m).resolve()) for m in ([candidate] if prod is None else [prod, candidate])]
    if comparison_file is None:
        return cmp.compare(models, str(data), split, resamples, seed)
    result = cmp.read(comparison_file)
    want = {"models": models, "data": str(Path(data).resolve()), "split": split}
    got = {k: result.get(k) for k in want}
    if got != want:
        raise InputError(f"{comparison_file}: compares {got}, the gate needs {want} "
                         f"(production changed since? rerun `esmm compare`)")
    return result


def check(candidate: str | os.PathLike, root: str | os.PathLike, data: str | os.PathLike,
          tolerance: float, split: str = "test", comparison_file: str | os.PathLike | None = None,
          **kw) -> tuple[GateResult, dict]:
    """Gate ``candidate`` against production on the same rows; returns (verdict, comparison)."""
    cmp_result = comparison(candidate, root, data, split, comparison_file, **kw)
    return gate(cmp_result, tolerance), cmp_result


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def swap_pointer(root: str | os.PathLike, model_dir: str | os.PathLike) -> Path:
    """Point ``ROOT/production`` at ``model_dir`` atomically; returns the pointer path.

    A model outside ``root`` is first copied to ``ROOT/models/<name>`` (staged, then
    renamed), so everything production can name lives under the root. The symlink is
    relative, so the root can be moved or mounted elsewhere.
    """
    root = Path(root).resolve()
    model = Path(model_dir).resolve()
    if not model.is_dir():
        raise InputError(f"{model}: candidate model dir not found")
    root.mkdir(parents=True, exist_ok=True)
    if root not in model.parents:
        dest = root / "models" / model.name
        if dest.exists():
            raise InputError(f"{dest}: already exists; give the candidate a new name")
        staging = dest.with_name(f".{dest.name}.staging-{uuid.uuid4().hex[:8]}")
        shutil.copytree(model, staging)
        os.replace(staging, dest)
        model = dest
    pointer = root / POINTER
    if pointer.exists() and not pointer.is_symlink():
        raise InputError(f"{pointer}: expected a symlink to the production model, found a real file or dir")
    tmp = root / f".{POINTER}.tmp-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(model, root), tmp)
    try:
        os.replace(tmp, pointer)  # atomic rename over the old symlink
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(root)
    return pointer


def publish(candidate: str | os.PathLike, root: str | os.PathLike, data: str | os.PathLike,
            tolerance: float, split: str = "test", comparison_file: str | os.PathLike | None = None,
            force: bool = False, **kw) -> GateResult:
    """Gate ``candidate``; if it passes (or ``force``), swap the pointer to it and log the publish.

    Returns the GateResult; on a failed gate nothing under ``root`` changes.
    """
    result, cmp_result = check(candidate, root, data, tolerance, split, comparison_file, **kw)
    if not (result.passed or force):
        return result
    previous = production_dir(root)
    pointer = swap_pointer(root, candidate)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(pointer.resolve()),
        "previous": None if previous is None else str(previous),
        "data": cmp_result["data"], "split": split,
        "metrics": result.candidate,
        "production_metrics": result.production,
        "ci95": result.intervals,
        "tolerance": tolerance,
        "forced": bool(force and not result.passed),
    }
    with open(Path(root) / LOG_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return result
