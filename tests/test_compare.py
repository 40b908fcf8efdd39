"""``esmm compare``: the same figures as ``esmm evaluate``, and a paired bootstrap that is a
bootstrap (each resample's weighted figures equal the figures of the rows it draws)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jobs import compare as compare_job
from jobs import evaluate as evaluate_job
from jobs import train as train_job
from shard_writer import write_data
from train import compare as cmp
from train import metrics


def train_model(data: Path, out: Path, lr: float | None = None) -> Path:
    args = ["--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "256", "--no-progress"]
    assert train_job.main(args + ([] if lr is None else ["--lr", str(lr)])) == 0
    return out


@pytest.fixture(scope="session")
def two_models(tmp_path_factory):
    """DATA, a trained model and an untrained one (lr 0) on it."""
    root = tmp_path_factory.mktemp("compare")
    data = write_data(root, n_train=6000, n_test=3000, days=4)
    return data, train_model(data, root / "trained"), train_model(data, root / "untrained", lr=0.0)


def test_weighted_figures_equal_the_figures_of_the_drawn_rows():
    rng = np.random.default_rng(1)
    n = 300
    label = (rng.random(n) < 0.3).astype(np.float64)
    score = np.round(rng.random(n), 2)  # ties, counted one half
    p = np.clip(score, 0.01, 0.99)
    counts = cmp.bootstrap_counts(rng, 5, n)
    assert (counts.sum(1) == n).all()
    auc = cmp.weighted_auc(label, score, counts)
    ll = cmp._resampled("logloss", label, p, counts)
    ratio = cmp._resampled("ratio", label, p, counts)
    for r in range(5):
        rows = np.repeat(np.arange(n), counts[r].astype(int))
        assert auc[r] == pytest.approx(metrics.auc(label[rows], score[rows]), abs=1e-12)
        assert ll[r] == pytest.approx(metrics.log_loss(label[rows], p[rows]), abs=1e-12)
        assert ratio[r] == pytest.approx(metrics.calibration(label[rows], p[rows])["ratio"], abs=1e-12)
    assert np.isnan(cmp.weighted_auc(np.zeros(n), score, counts)).all()  # no positive: undefined


def test_compare_reports_exactly_what_evaluate_reports(two_models, tmp_path, capsys):
    data, a, b = two_models
    out = tmp_path / "cmp.json"
    assert compare_job.main(["--models", f"{a},{b}", "--data", str(data), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["models"] == [str(a.resolve()), str(b.resolve())] and result["split"] == "test"
    for i, model in enumerate((a, b)):
        ev = tmp_path / f"eval{i}.json"
        assert evaluate_job.main(["--model", str(model), "--data", str(data), "--out", str(ev)]) == 0
        alone = json.loads(ev.read_text())
        for name in ("cvr_auc", "ctcvr_auc", "cvr_logloss", "ctcvr_logloss"):
            assert result["metrics"][name]["values"][i] == alone[name], (model, name)
        for name in ("cvr_calibration", "ctcvr_calibration"):
            assert result["metrics"][name]["values"][i] == alone[name]["ratio"], (model, name)
    n_clicked = alone["clicks"]
    assert result["metrics"]["cvr_auc"]["n"] == n_clicked and result["metrics"]["ctcvr_auc"]["n"] == alone["n"]
    # the untrained model is worse, and the paired interval says so
    cvr = result["metrics"]["ctcvr_auc"]
    assert cvr["diff"] == cvr["values"][1] - cvr["values"][0]
    assert cvr["ci95"][0] <= cvr["diff"] <= cvr["ci95"][1] < 0
    assert "B - A" in capsys.readouterr().out


def test_a_model_against_itself_differs_by_exactly_zero(two_models):
    data, a, _ = two_models
    result = cmp.compare([str(a), str(a)], str(data), resamples=200)
    for name, m in result["metrics"].items():
        assert m["values"][0] == m["values"][1] and m["diff"] == 0.0 and m["ci95"] == [0.0, 0.0], name


def test_paired_interval_is_narrower_than_the_unpaired_one(two_models):
    """What pairing buys: the same rows for both models cancel the noise they share."""
    data, a, b = two_models
    preds = [cmp.predictions(str(m), str(data)) for m in (a, b)]
    paired = cmp.compare_predictions(preds, resamples=300, seed=0)["cvr_auc"]["ci95"]
    # unpaired: each model on its own resamples
    rng = np.random.default_rng(0)
    clicked = preds[0]["y"] > 0
    z = preds[0]["z"][clicked]
    draws = [cmp.weighted_auc(z, p["p_cvr"][clicked], cmp.bootstrap_counts(rng, 300, preds[0]["y"].size)[:, clicked])
             for p in preds]
    unpaired = np.percentile(draws[1] - draws[0], [2.5, 97.5])
    assert paired[1] - paired[0] < unpaired[1] - unpaired[0]


def test_bad_models_argument_is_one_line(two_models, tmp_path, capsys):
    data, a, _ = two_models
    assert compare_job.main(["--models", f"{a},{a},{a}", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == "esmm: error: compare: give one or two models, got 3\n"
    assert compare_job.main(["--models", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "not a model dir" in capsys.readouterr().err
