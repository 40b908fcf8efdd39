"""The daily DAG with real Airflow: it parses cheaply, its graph is the specified chain,
and ``dag.test()`` runs a whole day on simulated logs with spark-submit on local[2] and
``ray job submit`` to a real local Ray cluster; a worse model then stops at the gate.

Airflow reads AIRFLOW_HOME when it is first imported, so this module points it at a
temp dir before any Airflow import and the ``airflow_db`` fixture migrates that DB.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "infra" / "airflow" / "dags"
VENV_BIN = Path(sys.executable).parent

_HOME = tempfile.mkdtemp(prefix="airflow-home-")
atexit.register(shutil.rmtree, _HOME, True)  # also when no test here runs
AIRFLOW_ENV = {
    "AIRFLOW_HOME": _HOME,
    "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),  # dag.test() syncs the dags-folder bundle to the DB
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
}
os.environ.update(AIRFLOW_ENV)

DAY = "2026-01-06"  # ds of the test runs; with window_days=1 the label day is 2026-01-05


@pytest.fixture(scope="module")
def airflow_db():
    """A fresh metadata DB (SQLite under the temp AIRFLOW_HOME), removed afterwards."""
    env = {**os.environ, **AIRFLOW_ENV}
    subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    yield _HOME
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags["esmm_daily"]


def dag_module():
    spec = importlib.util.spec_from_file_location("esmm_daily_dag", DAGS / "esmm_daily.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dag_folder_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dag_ids) == ["esmm_daily"]


def test_parsing_imports_no_heavy_libraries(airflow_db):
    # in a fresh interpreter: this test process may have torch/ray loaded by other tests
    code = (
        "import sys, json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"b = DagBag(dag_folder={str(DAGS)!r})\n"
        "print(json.dumps({'errors': {str(k): v for k, v in b.import_errors.items()},\n"
        "  'heavy': sorted(m for m in ('torch', 'ray', 'pyspark') if m in sys.modules)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AIRFLOW_ENV},
                         capture_output=True, text=True, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res == {"errors": {}, "heavy": []}


def test_task_graph(dag):
    downstream = {t.task_id: set(t.downstream_task_ids) for t in dag.tasks}
    assert downstream == {
        "wait_for_logs": {"etl"},
        "etl": {"train"},
        "train": {"evaluate"},
        "evaluate": {"gate"},
        "gate": {"publish"},
        "publish": {"score"},
        "score": set(),
    }
    tasks = {t.task_id: t for t in dag.tasks}
    for tid in ("etl", "train", "evaluate"):  # the Spark and Ray tasks retry with back-off
        assert tasks[tid].retries >= 2 and tasks[tid].retry_exponential_backoff, tid
    for tid in ("gate", "publish"):  # a failed gate is a verdict, not a flake
        assert tasks[tid].retries == 0, tid
    assert tasks["etl"]._conn_id == "spark_default"
    assert [a.name for a in tasks["etl"].outlets] == ["esmm_shards"]
    assert [a.name for a in tasks["publish"].outlets] == ["esmm_production_model"]
    assert tasks["wait_for_logs"].mode == "reschedule"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert set(dag.params) >= {"log_root", "data_root", "model_root", "window_days", "workers",
                               "ray_conn_id", "ray_address", "tolerance"}


def test_plan_days_labels_the_day_whose_conversions_are_final(airflow_db):
    m = dag_module()
    p = m.plan_days("2026-01-14", window_days=7, history_days=14, test_days=2)
    assert p == {
        "ds": "2026-01-14", "label_day": "2026-01-07", "start": "2025-12-25", "end": "2026-01-07",
        "split_date": "2026-01-06",
        "wait": ["2026-01-07", "2026-01-08", "2026-01-09", "2026-01-10", "2026-01-11", "2026-01-12",
                 "2026-01-13", "2026-01-14"],
    }
    assert m.plan_days("2026-01-14", 0, 2, 1)["label_day"] == "2026-01-14"


def test_job_arguments_match_the_jobs_parsers(dag, monkeypatch):
    """The argument lists the DAG builds parse with jobs/etl.py, jobs/train.py, jobs/evaluate.py."""
    import jinja2
    from test_infra_specs import parse_job_args

    m = dag_module()
    params = dag.params.dump()
    plan = {**m.plan_days("2026-01-14", 7, 14, 1), "data": "/d/2026-01-07"}

    class TI:
        def xcom_pull(self, task_ids):
            assert task_ids == "wait_for_logs"
            return plan

    etl = next(t for t in dag.tasks if t.task_id == "etl")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    args = [env.from_string(a).render(params=params, ti=TI(), ds="2026-01-14") for a in etl.application_args]
    ns = parse_job_args("jobs.etl", args, monkeypatch)
    assert (ns.start, ns.end, ns.split_date, ns.window_days) == ("2025-12-25", "2026-01-07", "2026-01-07", 7)
    assert env.from_string(etl.application).render(params=params) == f"{REPO}/jobs/etl.py"

    ns = parse_job_args("jobs.train", m.train_args("/d", "/m", {**params, "lr": 0.0})[1:], monkeypatch)
    assert ns.workers == params["workers"] and float(ns.lr) == 0.0
    parse_job_args("jobs.evaluate", m.evaluate_args("/m", "/d", "/m/evaluation.json")[1:], monkeypatch)


# --- the whole DAG, twice -------------------------------------------------------------


def _run(dag, conf: dict, **kw):
    import pendulum

    dr = dag.test(logical_date=pendulum.parse(DAY), run_conf=conf, **kw)
    return dr, {ti.task_id: ti.state for ti in dr.get_task_instances()}


def _asset_events(name: str) -> list[dict]:
    from airflow import settings
    from airflow.models.asset import AssetEvent, AssetModel
    from sqlalchemy import select

    with settings.Session() as s:
        rows = s.scalars(select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                         .where(AssetModel.name == name).order_by(AssetEvent.id))
        return [dict(r.extra) for r in rows]


@pytest.fixture
def airflow_runtime_env(ray_start_2_cpus, monkeypatch):
    """Connections and tools the tasks use: Spark local[2], the fixture's Ray job API."""
    host, port = ray_start_2_cpus["dashboard"].removeprefix("http://").split(":")
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": "local[2]"}))
    monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps({"conn_type": "http", "host": host, "port": int(port)}))
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")  # spark-submit
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    return ray_start_2_cpus


def test_daily_run_publishes_then_worse_model_stops_at_gate(dag, airflow_runtime_env, tmp_path, capfd):
    from jobs.synth import main as synth
    from train import publish as pub

    logs, data, models = tmp_path / "logs", tmp_path / "shards", tmp_path / "models"
    # 6 days, CTR and CVR raised so the one test day has a few hundred conversions: enough
    # for the AUCs to tell a trained model from an untrained one.
    assert synth(["--out", str(logs), "--impressions", "30000", "--days", "6", "--seed", "3",
                  "--ctr", "0.15", "--cvr", "0.3", "--quiet"]) == 0
    conf = {"log_root": str(logs), "data_root": str(data), "model_root": str(models),
            "window_days": 1, "history_days": 5, "test_days": 1, "shards": 2,
            "workers": 2, "epochs": 4, "batch_size": 512, "lr": 0.01, "tolerance": 0.01,
            "spark_driver_memory": "1g", "spark_shuffle_partitions": 4}

    # run 1: nothing in production yet -> the candidate publishes
    dr, states = _run(dag, conf)
    assert states == {"wait_for_logs": "success", "etl": "success", "train": "success", "evaluate": "success",
                      "gate": "success", "publish": "success",
                      "score": "success" if (REPO / "jobs/score.py").exists() else "skipped"}
    assert dr.state == "success"
    shards = data / "2026-01-05"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert (shards / "_SUCCESS").exists()
    assert manifest["splits"]["train"]["days"] == ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
    assert manifest["splits"]["test"]["days"] == ["2026-01-05"]
    first = pub.production_dir(models)
    assert first is not None and first.parent == (models / "candidates").resolve()
    assert first.name.startswith("2026-01-05__")
    m1 = pub.read_metrics(first)
    (shard_event,) = _asset_events("esmm_shards")
    assert shard_event["path"] == str(shards) and shard_event["day"] == "2026-01-05"
    assert shard_event["splits"]["test"]["impressions"] == manifest["splits"]["test"]["impressions"] > 0
    (model_event,) = _asset_events("esmm_production_model")
    assert model_event["path"] == str(first) and model_event["metrics"] == m1

    # run 2: the same day, learning rate 0 -> an untrained (worse) model: the gate stops it.
    # The day's shards are already built (run 1 checked the ETL), so etl is marked success.
    capfd.readouterr()
    dr2, states2 = _run(dag, {**conf, "lr": 0.0}, mark_success_pattern="etl")
    out = capfd.readouterr()
    assert dr2.state == "failed"
    assert states2["evaluate"] == "success" and states2["gate"] == "failed"
    assert states2["publish"] == "upstream_failed" and states2["score"] == "upstream_failed"
    assert pub.production_dir(models) == first  # the pointer still names the first model
    assert len((models / pub.LOG_FILE).read_text().splitlines()) == 1
    assert len(_asset_events("esmm_production_model")) == 1
    second = next(p for p in (models / "candidates").iterdir() if p.resolve() != first)
    m2 = pub.read_metrics(second)
    worse = [k for k in pub.GATED if m2[k] < m1[k] - 0.01]
    assert worse, (m1, m2)
    # the failure names both figures
    k = worse[0]
    assert f"{k} candidate {m2[k]:.4f} < production {m1[k]:.4f}" in out.out + out.err
