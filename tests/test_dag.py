"""The daily DAG with real Airflow: it parses cheaply, its graph is the specified chain, run
conf cannot redirect its code or model root, a retried Ray ``train`` stops the earlier try's
job and resumes its checkpoint, and ``dag.test()`` runs two consecutive days on simulated
logs (spark-submit on local[2], Ray jobs on a real local cluster): day 2 builds its shards
with ``--vocab-from`` production, warm-starts from it, is compared with it on day 2's test
rows, publishes and scores; an untrained model then stops at the gate.

Airflow reads AIRFLOW_HOME when it is first imported, so this module points it at a
temp dir before any Airflow import and the ``airflow_db`` fixture migrates that DB. The
DAG reads its model root from ESMM_MODEL_ROOT when parsed, so that is set here too.
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
    "ESMM_MODEL_ROOT": str(Path(_HOME) / "models"),  # a deployment setting: not run conf
}
os.environ.update(AIRFLOW_ENV)

MODELS = Path(AIRFLOW_ENV["ESMM_MODEL_ROOT"])


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
    # as the dag processor and the task runner load the dags-folder bundle: its path on
    # sys.path, so the DAG imports esmm_ray_jobs beside it
    from airflow.dag_processing.dagbag import BundleDagBag

    return BundleDagBag(dag_folder=str(DAGS), bundle_path=DAGS)


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags["esmm_daily"]


def dag_module():
    sys.path.insert(0, str(DAGS))  # as Airflow does for the dags folder: esmm_ray_jobs beside it
    spec = importlib.util.spec_from_file_location("esmm_daily_dag", DAGS / "esmm_daily.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def missing_cli() -> list[str]:
    """The contract-4 commands the DAG runs that this checkout does not have yet (other branches)."""
    def has(module: str, flag: str) -> bool:
        path = REPO / (module.replace(".", "/") + ".py")
        return path.exists() and f'"{flag}"' in path.read_text()

    need = [("jobs.etl", "--click-horizon-days"), ("jobs.etl", "--vocab-from"), ("jobs.train", "--init-from"),
            ("jobs.score", "--logs")]
    return [f"{m} {f}" for m, f in need if not has(m, f)]


def test_dag_folder_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dag_ids) == ["esmm_daily"]


def test_parsing_imports_no_heavy_libraries(airflow_db):
    # in a fresh interpreter: this test process may have torch/ray loaded by other tests
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from airflow.dag_processing.dagbag import BundleDagBag\n"
        f"b = BundleDagBag(dag_folder={str(DAGS)!r}, bundle_path=Path({str(DAGS)!r}))\n"
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
    for tid in ("etl", "train", "evaluate", "score"):  # the Spark and Ray tasks retry with back-off
        assert tasks[tid].retries >= 2 and tasks[tid].retry_exponential_backoff, tid
    for tid in ("gate", "publish"):  # a failed gate is a verdict, not a flake
        assert tasks[tid].retries == 0, tid
    assert tasks["etl"]._conn_id == "spark_default"
    assert [a.name for a in tasks["etl"].outlets] == ["esmm_shards"]
    assert [a.name for a in tasks["publish"].outlets] == ["esmm_production_model"]
    assert tasks["wait_for_logs"].mode == "reschedule"
    assert dag.catchup is False and dag.max_active_runs == 1


def test_plan_labels_the_day_whose_labels_are_final(airflow_db):
    m = dag_module()
    # W = 7, H = 1: the run for 2026-01-14 labels 2026-01-06, whose clicks come through
    # 01-07 and whose conversions through 01-14
    p = m.plan_days("2026-01-14", window_days=7, click_horizon_days=1, history_days=14, test_days=2)
    assert p == {
        "ds": "2026-01-14", "label_day": "2026-01-06", "start": "2025-12-24", "end": "2026-01-06",
        "split_date": "2026-01-05",
        "wait": ["2026-01-06", "2026-01-07", "2026-01-08", "2026-01-09", "2026-01-10", "2026-01-11", "2026-01-12",
                 "2026-01-13", "2026-01-14"],
    }
    assert m.plan_days("2026-01-14", 0, 0, 2, 1)["label_day"] == "2026-01-14"


def test_run_conf_cannot_redirect_code_or_model_root(dag):
    """Where the code and the models live is the deployment's, fixed when the DAG is parsed."""
    import jinja2

    m = dag_module()
    assert not {"code_dir", "ray_working_dir", "model_root"} & set(dag.params)
    etl = next(t for t in dag.tasks if t.task_id == "etl")
    conf = {**dag.params.dump(), "code_dir": "/evil", "ray_working_dir": "/evil", "model_root": "/evil"}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    assert env.from_string(etl.application).render(params=conf) == str(REPO / "jobs" / "etl.py")
    assert m.MODEL_ROOT == str(MODELS) and m.RAY_WORKING_DIR == str(REPO)
    plan = {**m.plan_days("2026-01-14", 7, 1, 14, 1), "data": "/d", "candidate": f"{MODELS}/candidates/c",
            "production": None}
    args = m.publish_args(plan, conf, check=False)
    assert args[args.index("--root") + 1] == str(MODELS)


def test_ray_connection_carries_the_token(airflow_db, monkeypatch):
    m = dag_module()
    monkeypatch.setenv("AIRFLOW_CONN_RAY_TOKEN", json.dumps(
        {"conn_type": "http", "host": "ray-head", "port": 8265, "password": "t0ken"}))
    assert m.ray_jobs.endpoint("ray_token") == ("http://ray-head:8265", {"Authorization": "Bearer t0ken"})
    monkeypatch.setenv("AIRFLOW_CONN_RAY_OPEN", json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": 8265}))
    assert m.ray_jobs.endpoint("ray_open") == ("http://127.0.0.1:8265", {})


def test_job_arguments_match_the_jobs_parsers(dag, monkeypatch):
    """The argument lists the DAG builds parse with the jobs' own parsers."""
    import jinja2
    from test_infra_specs import parse_job_args

    missing = missing_cli()
    m = dag_module()
    params = {**dag.params.dump(), "gpus_per_worker": 1, "lr": 0.0}
    plan = {**m.plan_days("2026-01-14", 7, 1, 14, 1), "data": "/d/2026-01-06",
            "candidate": f"{MODELS}/candidates/c", "production": f"{MODELS}/candidates/p"}

    class TI:
        def xcom_pull(self, task_ids):
            assert task_ids == "wait_for_logs"
            return plan

    etl = next(t for t in dag.tasks if t.task_id == "etl")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    args = [env.from_string(a).render(params=params, ti=TI(), ds="2026-01-14") for a in etl.application_args]
    train = m.train_args(plan, params, try_number=2)
    assert train[train.index("--init-from") + 1] == plan["production"] and train[-1] == "--resume"
    assert "--init-from" not in m.train_args(plan, {**params, "warm_start": False}, 1)
    assert "--resume" not in m.train_args(plan, params, 1)
    assert m.compare_args(plan)[m.compare_args(plan).index("--models") + 1] == f"{plan['production']},{plan['candidate']}"
    parse_job_args("jobs.compare", m.compare_args(plan)[3:], monkeypatch)
    parse_job_args("jobs.publish", m.publish_args(plan, params, check=True)[2:], monkeypatch)
    if missing:
        pytest.skip(f"this checkout lacks {', '.join(missing)} (contract 4, other branches)")
    ns = parse_job_args("jobs.etl", args + ["--vocab-from", plan["production"]], monkeypatch)
    assert (ns.start, ns.end, ns.split_date, ns.window_days, ns.click_horizon_days) == \
        ("2025-12-24", "2026-01-06", "2026-01-06", 7, 1)
    ns = parse_job_args("jobs.train", train[3:], monkeypatch)
    assert ns.workers == params["workers"] and float(ns.lr) == 0.0 and float(ns.gpus_per_worker) == 1.0
    ns = parse_job_args("jobs.score", m.score_args("/m", params, "2026-01-14")[3:], monkeypatch)
    assert float(ns.gpus_per_worker) == 1.0


# --- a retried Ray train ------------------------------------------------------------


@pytest.fixture
def airflow_runtime_env(ray_start_2_cpus, monkeypatch):
    """Connections and tools the tasks use: Spark local[2], the fixture's Ray job API."""
    host, port = ray_start_2_cpus["dashboard"].removeprefix("http://").split(":")
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": "local[2]"}))
    monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps({"conn_type": "http", "host": host, "port": int(port)}))
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")  # spark-submit, esmm
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    return ray_start_2_cpus


def test_retried_train_stops_the_earlier_try_and_resumes_its_checkpoint(airflow_runtime_env, airflow_db, tmp_path):
    """Try 1's Ray job hangs after its step-4 checkpoint (its Airflow task died, the job did not);
    try 2, the DAG's own train arguments and job client, stops it and continues from step 4 to
    the step count of an uninterrupted run."""
    import logging
    import math
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    from shard_writer import write_data
    from train.data import holdout_mask, load_split
    from train.ray_trainer import FAIL_ENV, FAIL_HOLD_ENV

    n_train, batch, epochs = 1600, 128, 2
    data = write_data(tmp_path / "w", n_train=n_train, n_test=400, days=4, shards_per_day=2)
    m = dag_module()
    plan = {"data": str(data), "candidate": str(tmp_path / "candidate"), "production": None}
    params = {"model": "esmm", "epochs": epochs, "workers": 2, "gpus_per_worker": 0, "batch_size": batch,
              "lr": None, "warm_start": True}
    sets = ["--set", "checkpoint_every=4", "--set", "patience=0"]  # checkpoints at steps 4, 8, ...
    run_id = "manual__retry"
    client = JobSubmissionClient(airflow_runtime_env["dashboard"])
    marker = tmp_path / "fault"

    first = m.ray_jobs.submission_id("train", run_id, 1)
    m.ray_jobs.submit(client, m.train_args(plan, params, 1) + sets, first, working_dir="",
                      env={FAIL_ENV: f"0:6:1:{marker}", FAIL_HOLD_ENV: "900"})
    deadline = time.monotonic() + 1200  # generous: a loaded machine starts Ray Train slowly
    while not marker.exists():  # rank 1 reached step 6 of epoch 0 and hangs there
        assert time.monotonic() < deadline and not client.get_job_status(first).is_terminal(), \
            client.get_job_logs(first)[-3000:]
        time.sleep(1)
    time.sleep(6)  # Ray Train's controller collects the step-4 checkpoint (it polls every 2 s)
    assert client.get_job_status(first) == JobStatus.RUNNING

    second = m.ray_jobs.run("train", m.train_args(plan, params, 2) + sets, run_id, 2, conn_id="ray_default",
                            working_dir="", log=logging.getLogger("test.train"))
    assert client.get_job_status(first) == JobStatus.STOPPED
    assert client.get_job_status(second) == JobStatus.SUCCEEDED
    t = json.loads((tmp_path / "candidate" / "metrics.json").read_text())["training"]
    from train.config import resolve

    val_fraction = resolve(None, sets[1::2])[1].val_fraction
    n_val = int(holdout_mask(load_split(data, "train").sample_id, val_fraction).sum())
    rest = n_train - n_val
    uninterrupted = epochs * math.ceil((rest // 2) / (batch // 2))  # each worker: half the rows, half the batch
    assert t["resumed_at_global_step"] == 4
    assert t["steps"] == uninterrupted


# --- the whole DAG: two consecutive days, then an untrained model -----------------------


def _run(dag, day: str, conf: dict, **kw):
    import pendulum

    dr = dag.test(logical_date=pendulum.parse(day), run_conf=conf, **kw)
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
def fresh_model_root():
    """Each whole-DAG test starts with nothing published (the model root is the deployment's)."""
    shutil.rmtree(MODELS, ignore_errors=True)
    yield MODELS


ALL_OK = {t: "success" for t in ("wait_for_logs", "etl", "train", "evaluate", "gate", "publish", "score")}


def test_two_days_carry_the_model_over_and_an_untrained_model_stops_at_the_gate(dag, airflow_runtime_env,
                                                                                fresh_model_root, tmp_path, capfd):
    """Needs the contract-4 commands of branches etl and serving: skipped until they are merged."""
    missing = missing_cli()
    if missing:
        pytest.skip(f"this checkout lacks {', '.join(missing)} (contract 4, other branches)")
    import pyarrow.dataset as ds
    from ray.job_submission import JobSubmissionClient

    from jobs.synth import main as synth
    from train import publish as pub

    logs, data, scores = tmp_path / "logs", tmp_path / "shards", tmp_path / "scores"
    # 7 days, CTR and CVR raised so one test day has a few hundred conversions: enough for the
    # paired interval to tell a trained model from an untrained one.
    assert synth(["--out", str(logs), "--impressions", "35000", "--days", "7", "--seed", "3",
                  "--ctr", "0.15", "--cvr", "0.3", "--quiet"]) == 0
    conf = {"log_root": str(logs), "data_root": str(data), "score_root": str(scores),
            "window_days": 1, "click_horizon_days": 1, "history_days": 4, "test_days": 1, "shards": 2,
            "workers": 2, "epochs": 3, "batch_size": 512, "lr": 0.01, "tolerance": 0.0,
            "spark_driver_memory": "1g", "spark_shuffle_partitions": 4}
    client = JobSubmissionClient(airflow_runtime_env["dashboard"])

    # day 1 (ds 01-06 labels 01-04 = ds - H - W): nothing in production, the candidate publishes
    dr, states = _run(dag, "2026-01-06", conf)
    assert states == ALL_OK and dr.state == "success"
    first = pub.production_dir(MODELS)
    assert first.parent == (MODELS / "candidates").resolve() and first.name.startswith("2026-01-04__")
    m1 = json.loads((data / "2026-01-04" / "manifest.json").read_text())
    assert m1["splits"]["train"]["days"] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert m1["splits"]["test"]["days"] == ["2026-01-04"] and not (m1.get("vocab") or {}).get("parent")
    cmp1 = json.loads((first / "compare.json").read_text())
    assert cmp1["models"] == [str(first)] and cmp1["data"] == str(data / "2026-01-04")
    (event,) = [e for e in _asset_events("esmm_production_model") if e["label_day"] == "2026-01-04"]
    assert event["path"] == str(first) and event["metrics"]["cvr_auc"] == cmp1["metrics"]["cvr_auc"]["values"][0]

    # day 2 (ds 01-07 labels 01-05): ids from production, warm start, compared on the same rows
    dr2, states2 = _run(dag, "2026-01-07", conf)
    assert states2 == ALL_OK and dr2.state == "success"
    second = pub.production_dir(MODELS)
    assert second != first and second.name.startswith("2026-01-05__")
    shards2 = data / "2026-01-05"
    m2 = json.loads((shards2 / "manifest.json").read_text())
    assert m2["vocab"]["parent"] == str(first)
    entry = client.get_job_info(m := dag_module().ray_jobs.submission_id("train", dr2.run_id, 1)).entrypoint
    assert f"--init-from {first}" in entry, (m, entry)
    lineage = json.loads((second / "bundle.json").read_text())["lineage"]
    assert Path(lineage["parent_model"]).resolve() == first
    cmp = json.loads((second / "compare.json").read_text())
    assert cmp["models"] == [str(first), str(second)] and cmp["data"] == str(shards2) and cmp["split"] == "test"
    assert cmp["rows"] == m2["splits"]["test"]["impressions"]
    for k in pub.GATED:  # both models' figures on day 2's test rows, and the interval of the difference
        assert len(cmp["metrics"][k]["values"]) == 2 and len(cmp["metrics"][k]["ci95"]) == 2
    # score: every valid impression of the newest complete day, by the published model
    out = scores / "dt=2026-01-07"
    summary = json.loads((out / "_score.json").read_text())
    read = ds.dataset(logs / "impressions" / "dt=2026-01-07", format="parquet").count_rows()
    table = ds.dataset(out, format="parquet").to_table()
    assert (out / "_SUCCESS").exists() and summary["impressions"]["read"] == read
    assert table.num_rows == summary["impressions"]["valid"] == read - sum(summary["impressions"]["rejects"].values())
    assert Path(summary["model"]).resolve() == second
    assert [Path(e["model"]).resolve() for e in map(json.loads, (MODELS / pub.LOG_FILE).read_text().splitlines())] \
        == [first, second]
    assert [e["path"] for e in _asset_events("esmm_production_model")][-2:] == [str(first), str(second)]

    # day 2 again, learning rate 0 and no warm start: an untrained model stops at the gate
    capfd.readouterr()
    dr3, states3 = _run(dag, "2026-01-07", {**conf, "lr": 0.0, "warm_start": False}, mark_success_pattern="etl")
    printed = "".join(capfd.readouterr())
    assert dr3.state == "failed"
    assert states3["evaluate"] == "success" and states3["gate"] == "failed"
    assert states3["publish"] == "upstream_failed" and states3["score"] == "upstream_failed"
    assert pub.production_dir(MODELS) == second
    third = next(p for p in (MODELS / "candidates").iterdir() if p.resolve() not in (first, second))
    cmp3 = json.loads((third / "compare.json").read_text())
    worse = [k for k in pub.GATED if cmp3["metrics"][k]["ci95"][1] < 0]
    assert worse, cmp3["metrics"]
    k = worse[0]
    c = cmp3["metrics"][k]
    assert (f"{k} candidate {c['values'][1]:.4f} vs production {c['values'][0]:.4f}, difference {c['diff']:+.4f} "
            f"(95% CI {c['ci95'][0]:+.4f} .. {c['ci95'][1]:+.4f})") in printed
