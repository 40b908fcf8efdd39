"""End to end on a tiny DATA dir: `esmm experiment`, `esmm train`, `esmm evaluate`, errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shard_writer import write_data

TINY = ["--batch-size", "256", "--set", "dim=4", "--set", "hidden=16,8", "--set", "threads=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("exp"), n_train=1600, n_test=800, seed=1)


def test_experiment_end_to_end(data, tmp_path, capsys):
    from jobs.experiment import main

    out = tmp_path / "report"
    args = ["--data", str(data), "--models", "base,unbias,division,esmm-ns,esmm", "--epochs", "2", "--no-progress", *TINY]
    # seed 0 and seed 1 as two runs (as when seeds run in parallel), then merged
    assert main(["--out", str(tmp_path / "r0"), "--seeds", "1", *args]) == 0
    assert main(["--out", str(tmp_path / "r1"), "--seeds", "1", "--first-seed", "1", *args]) == 0
    capsys.readouterr()
    assert main(["--merge", f"{tmp_path / 'r0'},{tmp_path / 'r1'}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    r0 = json.loads((tmp_path / "r0" / "report.json").read_text())
    r1 = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert "| ESMM |" in printed and "| BASE |" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1] and report["entire_space"] is True
    s = report["summary"]
    assert s["esmm"]["cvr_auc"]["values"] == [r0["summary"]["esmm"]["cvr_auc"]["values"][0],
                                              r1["summary"]["esmm"]["cvr_auc"]["values"][0]]
    for name in ("base", "unbias", "division", "esmm-ns", "esmm"):
        for metric in ("cvr_auc", "ctcvr_auc", "entire_cvr_auc"):
            assert len(s[name][metric]["values"]) == 2, (name, metric)
            assert 0 <= s[name][metric]["mean"] <= 1 and s[name][metric]["std"] >= 0
    assert len(s["ctr"]["ctr_auc"]["values"]) == 2  # the independent CTR model, per seed
    # the paper's protocol: EVERY model's pCTCVR uses the independent ctr model's pCTR;
    # the models with their own pCTCVR have it scored beside, under its own name
    for name in ("base", "unbias", "division", "esmm-ns", "esmm"):
        assert {r["ctcvr_pctr"] for r in report["per_seed"][name]} == {"ctr model"}
    for name in ("division", "esmm-ns", "esmm"):
        assert all("own_ctcvr_auc" in r for r in report["per_seed"][name])
    assert not any("own_ctcvr_auc" in r for r in report["per_seed"]["base"])
    # every model is scored on the same test rows
    n = {r["n"] for runs in report["per_seed"].values() for r in runs}
    assert n == {800}
    assert set(report["checks"]) == {"cvr_auc", "ctcvr_auc", "entire_cvr_auc"}
    md = (out / "report.md").read_text()
    assert "Table 2" in md and md.count("\n| ") >= 2 + 5
    for png in ("auc.png", "calibration.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_new_models_knob_grid_ece_and_reliability_plots(data, tmp_path):
    """escm2-ips / escm2-dr / dcmt run through the protocol; AMAN's rate is picked from its
    grid by validation CVR AUC (the argmax, reported); ECE is the count-weighted gap of
    the reliability curve; one reliability plot per model."""
    from train.config import resolve
    from train.experiment import GRIDS, run_experiment

    model_cfg, train_cfg = resolve(None, ["dim=4", "hidden=16,8", "threads=1"], epochs=1, batch_size=256)
    models = ["aman", "escm2-ips", "escm2-dr", "dcmt", "esmm"]
    report = run_experiment(str(data), str(tmp_path / "r"), models, 1, model_cfg, train_cfg,
                            progress=False, log=lambda _: None)
    p = report["picked"]["aman"]
    aucs = {float(k): v for k, v in p["validation_cvr_auc"].items()}
    assert p["knob"] == "aman_rate" and sorted(aucs) == sorted(GRIDS["aman"][1])
    assert p["picked"] == max(aucs, key=aucs.get)
    for name in models:
        m = report["per_seed"][name][0]
        c = m["entire_cvr_calibration"]
        hand = sum(b["n"] * abs(b["pred"] - b["observed"]) for b in c["curve"]) / sum(b["n"] for b in c["curve"])
        assert c["ece"] == pytest.approx(hand, rel=1e-12) and m["ctcvr_pctr"] == "ctr model"
        assert report["summary"][name]["entire_cvr_ece"]["values"] == [c["ece"]]
        assert (tmp_path / "r" / f"reliability-{name}.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| ESCM²-DR |" in md and "| DCMT |" in md and "aman_rate = " in md


def test_ctcvr_is_own_pcvr_times_the_ctr_networks_pctr():
    """score(): ctcvr_* = pCVR x the independent pCTR even for a model with its own pCTCVR,
    own_ctcvr_* = the model's own product; checked against AUCs computed by hand."""
    import numpy as np
    import torch

    from train.evaluate import score

    class Split:  # the two label columns score() reads
        click = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
        conversion = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])

    p_cvr = np.array([0.9, 0.2, 0.3, 0.8, 0.1, 0.4])
    p_own_ctr = np.array([0.1, 0.9, 0.9, 0.1, 0.1, 0.9])  # own product ranks positives 2nd/3rd..
    ctr_net = np.array([0.5, 0.5, 0.9, 0.5, 0.5, 0.5])
    preds = {"p_ctr": p_own_ctr, "p_cvr": p_cvr, "p_ctcvr": p_own_ctr * p_cvr}
    m = score(preds, Split, ctr_preds=ctr_net)
    # paper: pCTCVR = [.45 .10 .27 .40 .05 .20]; positives rows 0, 2 (y*z): pairs vs 4 negatives
    # row 0 (.45) beats all 4; row 2 (.27) beats .10 .05 .20, loses to .40 -> (4 + 3) / 8
    assert m["ctcvr_pctr"] == "ctr model" and m["ctcvr_auc"] == 7 / 8
    # own: [.09 .18 .27 .08 .01 .36]: row 0 beats .08 .01 (2), row 2 beats .18 .08 .01 (3) -> 5 / 8
    assert m["own_ctcvr_auc"] == 5 / 8
    alone = score(preds, Split)  # a lone `esmm train`: no independent ctr network
    assert alone["ctcvr_pctr"] == "own" and alone["ctcvr_auc"] == 5 / 8


def test_train_then_evaluate_agree(data, tmp_path):
    from jobs.evaluate import main as evaluate
    from jobs.train import main as train

    model = tmp_path / "m"
    assert train(["--data", str(data), "--out", str(model), "--model", "esmm", "--epochs", "1",
                  "--no-progress", *TINY]) == 0
    # the training files, and the bundle beside them (one process: the whole table is one shard)
    assert {p.name for p in model.iterdir()} == {"model.pt", "config.json", "metrics.json", "bundle.json",
                                                 "weights.safetensors", "emb-0.rank=0-of-1.safetensors"}
    trained = json.loads((model / "metrics.json").read_text())
    assert trained["model"] == "esmm" and trained["n"] == 800
    for k in ("ctr_auc", "cvr_auc", "ctcvr_auc", "entire_cvr_auc", "ctr_logloss", "cvr_logloss",
              "ctcvr_logloss", "cvr_calibration"):
        assert k in trained, k
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["model_cfg"]["dim"] == 4 and cfg["model_cfg"]["hidden"] == [16, 8]
    assert evaluate(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    for k in ("ctr_auc", "cvr_auc", "ctcvr_auc", "entire_cvr_auc"):
        assert again[k] == trained[k]


def test_python_m_jobs_train_runs_standalone(data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--data", str(data), "--out", str(tmp_path / "b"),
                        "--model", "base", "--epochs", "1", "--no-progress", *TINY],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "esmm train: base" in r.stdout


@pytest.mark.parametrize("argv, needle", [
    (["--data", "/nonexistent/data", "--out", "/tmp/x"], "/nonexistent/data"),
    (["--set", "no_such_key=1"], "unknown config key 'no_such_key'"),
    (["--set", "dim=abc"], "'dim'"),
    (["--model", "nope"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys, argv, needle):
    from jobs.train import main

    base = ["--data", str(data), "--out", str(tmp_path / "m"), "--epochs", "1", "--no-progress"]
    rc = main(base + argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1 and err.startswith("esmm: error:")


def test_demo_runs_synth_etl_experiment_and_prints_table2(spark, tmp_path, capsys):
    """The README's first command, at a tiny size: synth -> Spark ETL -> experiment -> Table 2."""
    from jobs import demo

    out = tmp_path / "demo"
    rc = demo.main(["--out", str(out), "--impressions", "6000", "--days", "4", "--seeds", "1",
                    "--models", "base,esmm", "--epochs", "1", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "## Results (Table 2)" in printed and "| ESMM |" in printed and "| BASE |" in printed
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["models"] == ["base", "esmm"] and set(report["per_seed"]) >= {"base", "esmm", "ctr"}
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["impressions"] + manifest["splits"]["test"]["impressions"] == 6000
    # a second run reuses the data (same simulation) and still prints the table
    assert demo.main(["--out", str(out), "--impressions", "6000", "--days", "4", "--seeds", "1",
                      "--models", "base,esmm", "--epochs", "1", "--no-progress"]) == 0
    assert "reusing" in capsys.readouterr().out
