"""The publish gate on the same rows and the atomic production pointer (train/publish.py, esmm publish)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import compare as compare_job
from jobs import publish as publish_job
from test_compare import two_models  # noqa: F401  (the session fixture: DATA, trained, untrained)
from train import publish as pub
from train.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def comparison(cvr: tuple, ctcvr: tuple, cvr_ci=None, ctcvr_ci=None) -> dict:
    """A comparison dict as train.compare writes it; one model when no interval is given."""
    def metric(values, ci):
        m = {"values": list(values)}
        if ci is not None:
            m.update(ci95=list(ci), diff=values[1] - values[0])
        return m

    return {"models": ["p", "c"][-len(cvr):], "metrics": {"cvr_auc": metric(cvr, cvr_ci),
                                                          "ctcvr_auc": metric(ctcvr, ctcvr_ci)}}


def test_gate_refuses_only_when_the_whole_interval_is_below_minus_tolerance():
    inside = comparison((0.60, 0.59), (0.70, 0.70), (-0.03, 0.01), (-0.01, 0.01))
    assert pub.gate(inside, 0.0).passed  # a drop inside the noise does not block
    worse = comparison((0.60, 0.55), (0.70, 0.70), (-0.08, -0.02), (-0.01, 0.01))
    r = pub.gate(worse, 0.01)
    assert not r.passed and len(r.failures) == 1
    assert r.failures[0] == ("cvr_auc candidate 0.5500 vs production 0.6000, difference -0.0500 "
                             "(95% CI -0.0800 .. -0.0200): worse by more than the tolerance 0.01")
    assert pub.gate(worse, 0.02).passed  # the interval reaches -0.02: within a 0.02 tolerance
    assert pub.gate(comparison((0.1,), (0.1,)), 0.0).passed  # nothing published yet
    assert not pub.gate(comparison((math.nan,), (0.6,)), 0.0).passed  # NaN cannot be vouched for
    with pytest.raises(InputError):
        pub.gate(inside, -1)


def test_first_publishes_untrained_fails_with_interval_same_model_passes(two_models, tmp_path, capsys):  # noqa: F811
    data, trained, untrained = two_models
    root = tmp_path / "models"
    a, b = root / "candidates" / "a", root / "candidates" / "b"  # candidates live under the root
    shutil.copytree(trained, a)
    shutil.copytree(untrained, b)
    args = ["--root", str(root), "--data", str(data), "--resamples", "300"]

    assert publish_job.main(["--candidate", str(a), *args]) == 0  # the first model publishes
    pointer = root / pub.POINTER
    assert os.readlink(pointer) == "candidates/a"
    assert "(no production model)" in capsys.readouterr().out

    assert publish_job.main(["--candidate", str(b), *args]) == 1  # lr 0: worse on the same rows
    out = capsys.readouterr()
    assert os.readlink(pointer) == "candidates/a"
    assert "not published: production unchanged" in out.err
    line = out.out.strip()
    assert line.startswith("gate failed (tolerance 0): ")
    cmp = json.loads(json.dumps(pub.comparison(b, root, data, resamples=300)))  # what the gate saw
    for k in ("ctcvr_auc",):
        m = cmp["metrics"][k]
        assert m["ci95"][1] < 0
        assert (f"{k} candidate {m['values'][1]:.4f} vs production {m['values'][0]:.4f}, "
                f"difference {m['diff']:+.4f} (95% CI {m['ci95'][0]:+.4f} .. {m['ci95'][1]:+.4f})") in line

    assert publish_job.main(["--candidate", str(a), *args]) == 0  # equal to production: passes
    assert "difference +0.0000 (95% CI +0.0000 .. +0.0000)" in capsys.readouterr().out
    log = [json.loads(l) for l in (root / pub.LOG_FILE).read_text().splitlines()]
    assert [Path(e["model"]).name for e in log] == ["a", "a"]
    assert log[0]["previous"] is None and log[1]["ci95"]["cvr_auc"] == [0.0, 0.0]


def test_comparison_file_gates_without_torch_and_stale_ones_are_refused(two_models, tmp_path):  # noqa: F811
    """The Airflow worker's path: `esmm compare` ran elsewhere; `esmm publish --comparison` needs no torch."""
    data, trained, untrained = two_models
    root = tmp_path / "models"
    pub.swap_pointer(root, trained)  # copied to ROOT/models/trained
    prod = pub.production_dir(root)
    cmp_file = tmp_path / "cmp.json"
    assert compare_job.main(["--models", f"{prod},{untrained}", "--data", str(data),
                             "--out", str(cmp_file), "--resamples", "300"]) == 0

    def run_without_torch(*argv):
        code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
                "from jobs.cli import main; sys.exit(main(sys.argv[1:]))")
        return subprocess.run([sys.executable, "-c", code, "publish", *argv], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    r = run_without_torch("--candidate", str(untrained), "--root", str(root), "--data", str(data),
                          "--comparison", str(cmp_file))
    assert r.returncode == 1, r.stderr
    assert "gate failed" in r.stdout and "95% CI" in r.stdout
    assert pub.production_dir(root) == prod
    # a comparison of other models (production changed since) is refused, nothing is scored
    r = run_without_torch("--candidate", str(prod), "--root", str(root), "--data", str(data),
                          "--comparison", str(cmp_file), "--check")
    assert r.returncode == 2 and r.stderr.startswith(f"esmm: error: {cmp_file}: compares ")
    assert "Traceback" not in r.stderr


def test_swap_pointer_is_relative_atomic_and_copies_outside_models(tmp_path):
    root = tmp_path / "root"
    inside = root / "candidates" / "m0"
    inside.mkdir(parents=True)
    pub.swap_pointer(root, inside)
    assert os.readlink(root / pub.POINTER) == "candidates/m0"
    outside = tmp_path / "elsewhere" / "m1"
    outside.mkdir(parents=True)
    (outside / "model.pt").write_text("m1")
    pub.swap_pointer(root, outside)
    assert os.readlink(root / pub.POINTER) == "models/m1"
    assert (root / "models" / "m1" / "model.pt").read_text() == "m1"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp symlink left
    with pytest.raises(InputError, match="already exists"):
        pub.swap_pointer(root, outside)


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / pub.POINTER).mkdir()
    assert publish_job.main(["--candidate", str(tmp_path), "--root", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "expected a symlink to the production model" in capsys.readouterr().err
