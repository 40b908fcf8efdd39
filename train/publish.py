"""The publish gate and the production pointer: pure Python, no Airflow, no torch.

A model root holds candidate models and one pointer, ``ROOT/production``, a
symlink to the model now serving::

    MODEL_ROOT/
      candidates/2026-01-07__run1/   a model dir (written by ``esmm train``) with
                                     evaluation.json (written by ``esmm evaluate``)
      production -> candidates/2026-01-07__run1
      publish_log.jsonl              one line per publish, newest last

A candidate replaces production only when none of the gated metrics (CTCVR AUC and
CVR AUC, the two the paper reports) is worse than production's by more than a
tolerance. The pointer is swapped by ``os.replace`` of a fresh symlink, which POSIX
makes atomic: a reader resolving ``production`` sees the old model or the new one,
never a missing or half-written pointer. The Airflow DAG and ``esmm publish`` call
the same functions.
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
from typing import Mapping, Sequence

from train.errors import InputError

POINTER = "production"
METRICS_FILE = "evaluation.json"
LOG_FILE = "publish_log.jsonl"
GATED = ("ctcvr_auc", "cvr_auc")


@dataclass
class GateResult:
    """Outcome of comparing a candidate's metrics with production's.

    Args:
        passed (bool): True when the candidate may be published.
        candidate (dict): the candidate's gated figures.
        production (dict | None): production's gated figures, None when nothing is published yet.
        tolerance (float): the allowed drop per metric.
        failures (list[str]): one line per metric that failed, both figures in it.
    """

    passed: bool
    candidate: dict
    production: dict | None
    tolerance: float
    failures: list[str] = field(default_factory=list)

    def message(self) -> str:
        figs = ", ".join(
            f"{k} candidate {self.candidate[k]:.4f} vs production "
            + ("n/a" if self.production is None else f"{self.production[k]:.4f}")
            for k in self.candidate
        )
        if self.passed:
            return f"gate passed (tolerance {self.tolerance:g}): {figs}"
        return f"gate failed (tolerance {self.tolerance:g}): " + "; ".join(self.failures)


def read_metrics(model_dir: str | os.PathLike, name: str = METRICS_FILE,
                 keys: Sequence[str] = GATED) -> dict:
    """Read ``model_dir/name`` and return the gated figures as floats.

    Raises:
        InputError: the file is missing, not JSON, or lacks one of ``keys``.
    """
    path = Path(model_dir) / name
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: metrics file not found (run `esmm evaluate --out {path}` first)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable metrics file: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    missing = [k for k in keys if k not in data]
    if missing:
        raise InputError(f"{path}: missing metric(s) {', '.join(missing)}")
    try:
        return {k: float(data[k]) for k in keys}
    except (TypeError, ValueError):
        raise InputError(f"{path}: metrics {', '.join(keys)} must be numbers") from None


def gate(candidate: Mapping[str, float], production: Mapping[str, float] | None,
         tolerance: float, keys: Sequence[str] = GATED) -> GateResult:
    """Pass when, for every key, ``candidate >= production - tolerance``.

    A candidate figure that is NaN (e.g. a test split with no positives) fails: the
    gate cannot vouch for it. A NaN production figure does not constrain. With no
    production model the gate passes.
    """
    if tolerance < 0 or math.isnan(tolerance):
        raise InputError(f"tolerance must be >= 0, got {tolerance}")
    cand = {k: float(candidate[k]) for k in keys}
    prod = None if production is None else {k: float(production[k]) for k in keys}
    failures = []
    for k in keys:
        c = cand[k]
        if math.isnan(c):
            failures.append(f"{k} candidate is NaN (production {'n/a' if prod is None else f'{prod[k]:.4f}'})")
        elif prod is not None and not math.isnan(prod[k]) and c < prod[k] - tolerance:
            failures.append(f"{k} candidate {c:.4f} < production {prod[k]:.4f} - tolerance {tolerance:g}")
    return GateResult(not failures, cand, prod, tolerance, failures)


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


def check(candidate: str | os.PathLike, root: str | os.PathLike, tolerance: float,
          metrics_name: str = METRICS_FILE) -> GateResult:
    """Gate ``candidate`` against what ``root``'s pointer names (figures from each model's metrics file)."""
    cand = read_metrics(candidate, metrics_name)
    prod_dir = production_dir(root)
    prod = None if prod_dir is None else read_metrics(prod_dir, metrics_name)
    return gate(cand, prod, tolerance)


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


def publish(candidate: str | os.PathLike, root: str | os.PathLike, tolerance: float,
            metrics_name: str = METRICS_FILE, force: bool = False) -> GateResult:
    """Gate ``candidate``; if it passes (or ``force``), swap the pointer to it and log the publish.

    Returns the GateResult; on a failed gate nothing under ``root`` changes.
    """
    result = check(candidate, root, tolerance, metrics_name)
    if not (result.passed or force):
        return result
    previous = production_dir(root)
    pointer = swap_pointer(root, candidate)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(pointer.resolve()),
        "previous": None if previous is None else str(previous),
        "metrics": result.candidate,
        "production_metrics": result.production,
        "tolerance": tolerance,
        "forced": bool(force and not result.passed),
    }
    with open(Path(root) / LOG_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return result
