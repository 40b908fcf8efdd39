"""The publish gate and the atomic production pointer (train/publish.py, esmm publish)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from jobs import publish as publish_job
from train import publish as pub
from train.errors import InputError


def model(root: Path, name: str, ctcvr: float, cvr: float, **extra) -> Path:
    d = root / "candidates" / name
    d.mkdir(parents=True)
    (d / "weights.pt").write_text(name)
    (d / pub.METRICS_FILE).write_text(json.dumps({"ctr_auc": 0.7, "ctcvr_auc": ctcvr, "cvr_auc": cvr, **extra}))
    return d


def test_gate_compares_each_metric_with_tolerance():
    prod = {"ctcvr_auc": 0.70, "cvr_auc": 0.60}
    assert pub.gate({"ctcvr_auc": 0.695, "cvr_auc": 0.61}, prod, 0.01).passed
    r = pub.gate({"ctcvr_auc": 0.70, "cvr_auc": 0.58}, prod, 0.01)
    assert not r.passed
    assert r.failures == ["cvr_auc candidate 0.5800 < production 0.6000 - tolerance 0.01"]
    assert "0.5800" in r.message() and "0.6000" in r.message()
    assert pub.gate({"ctcvr_auc": 0.1, "cvr_auc": 0.1}, None, 0.0).passed  # nothing published yet


def test_gate_nan_candidate_fails_nan_production_does_not_constrain():
    assert not pub.gate({"ctcvr_auc": math.nan, "cvr_auc": 0.6}, None, 0.0).passed
    assert pub.gate({"ctcvr_auc": 0.5, "cvr_auc": 0.6}, {"ctcvr_auc": math.nan, "cvr_auc": 0.6}, 0.0).passed
    with pytest.raises(InputError):
        pub.gate({"ctcvr_auc": 0.5, "cvr_auc": 0.6}, None, -1)


def test_publish_swaps_pointer_and_gate_failure_changes_nothing(tmp_path):
    a = model(tmp_path, "a", 0.70, 0.60)
    b = model(tmp_path, "b", 0.72, 0.55)
    assert pub.production_dir(tmp_path) is None
    assert pub.publish(a, tmp_path, 0.01).passed
    pointer = tmp_path / pub.POINTER
    assert pointer.is_symlink() and os.readlink(pointer) == "candidates/a"
    assert pub.production_dir(tmp_path) == a.resolve()
    r = pub.publish(b, tmp_path, 0.01)
    assert not r.passed and "cvr_auc candidate 0.5500 < production 0.6000" in r.message()
    assert os.readlink(pointer) == "candidates/a"
    assert len((tmp_path / pub.LOG_FILE).read_text().splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp symlink left
    c = model(tmp_path, "c", 0.71, 0.60)
    assert pub.publish(c, tmp_path, 0.0).passed
    assert os.readlink(pointer) == "candidates/c"
    log = [json.loads(l) for l in (tmp_path / pub.LOG_FILE).read_text().splitlines()]
    assert [Path(e["model"]).name for e in log] == ["a", "c"]
    assert Path(log[1]["previous"]).name == "a"


def test_model_outside_root_is_copied_under_it(tmp_path):
    outside = model(tmp_path / "elsewhere", "m1", 0.7, 0.6)
    root = tmp_path / "root"
    pub.publish(outside, root, 0.0)
    assert os.readlink(root / pub.POINTER) == "models/m1"
    assert (root / "models" / "m1" / "weights.pt").read_text() == "m1"


def test_cli_exit_codes(tmp_path, capsys):
    a = model(tmp_path, "a", 0.70, 0.60)
    b = model(tmp_path, "b", 0.60, 0.60)
    assert publish_job.main(["--candidate", str(a), "--root", str(tmp_path), "--tolerance", "0.01"]) == 0
    assert publish_job.main(["--candidate", str(b), "--root", str(tmp_path), "--check"]) == 1
    assert publish_job.main(["--candidate", str(b), "--root", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "ctcvr_auc candidate 0.6000 < production 0.7000" in out.out
    assert os.readlink(tmp_path / pub.POINTER) == "candidates/a"
    (b / pub.METRICS_FILE).write_text("{not json")
    assert publish_job.main(["--candidate", str(b), "--root", str(tmp_path)]) == 2
    assert "unreadable metrics file" in capsys.readouterr().err
    assert publish_job.main(["--candidate", str(tmp_path / "nope"), "--root", str(tmp_path)]) == 2
