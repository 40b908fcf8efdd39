"""esmm_daily: logs -> Spark ETL -> Ray training -> compare with production -> gate -> publish -> score.

One run per day ``ds``; every task runs a job a person can run (README, "Scheduling"):

    wait_for_logs   every table's dt=D/_SUCCESS, from the label day through ds
    etl             spark-submit jobs/etl.py --vocab-from PRODUCTION --click-horizon-days H
    train           Ray job: esmm train --init-from PRODUCTION (a retry resumes the Ray checkpoint)
    evaluate        Ray job: esmm compare --models PRODUCTION,CANDIDATE on this run's test rows
    gate            process: esmm publish --check --comparison (fails: worse beyond the interval,
                    its verdict line the task's error)
    publish         process: esmm publish --comparison (atomic swap of MODEL_ROOT/production)
    score           Ray job: esmm score of the newest complete day (ds) with the published model

Which day a run labels: ``ds - (H + W)``. A click may come up to H days after its
impression (the click horizon) and a conversion counts within W days of its click, so
the labels of impression day D are final once the logs through D + H + W are in. The
run for ``ds`` waits for those days and builds ``history_days`` of shards ending on
the label day; the ETL reads clicks through end + H and conversions through end + H + W.

Deployment settings come from the environment when the DAG is parsed, not from run
conf: ESMM_MODEL_ROOT (candidates/ and the production pointer), ESMM_RAY_WORKING_DIR
(the code shipped with each Ray job; empty when the image has it) and this repo as the
code spark-submit runs. A run's conf can change dates, sizes and learning settings, but
cannot make a run publish into another model root or run other code.
"""
from __future__ import annotations

import datetime as dt
import os
import shlex
import tempfile
import zipfile
from pathlib import Path

import pendulum
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Asset, CronTriggerTimetable, Param, PokeReturnValue, dag, task
from airflow.sdk.exceptions import AirflowFailException

import esmm_ray_jobs as ray_jobs

REPO = Path(__file__).resolve().parents[3]  # jobs/ for spark-submit
MODEL_ROOT = os.environ.get("ESMM_MODEL_ROOT", "/data/esmm/models")
RAY_WORKING_DIR = os.environ.get("ESMM_RAY_WORKING_DIR", str(REPO))
TABLES = ("impressions", "clicks", "conversions")

SHARDS = Asset(name="esmm_shards", uri="esmm://shards/daily", group="esmm")
MODEL = Asset(name="esmm_production_model", uri="esmm://models/production", group="esmm")

# Spark and Ray tasks retry with back-off: a cluster briefly unreachable should not fail the day.
RETRY = dict(retries=2, retry_delay=dt.timedelta(minutes=2), retry_exponential_backoff=True,
             max_retry_delay=dt.timedelta(minutes=30))


def plan_days(ds: str, window_days: int, click_horizon_days: int, history_days: int, test_days: int) -> dict:
    """The days a run for ``ds`` labels, reads and waits for (see the module docstring)."""
    if min(window_days, click_horizon_days) < 0 or history_days < 2 or not 1 <= test_days < history_days:
        raise AirflowFailException(
            f"bad params: window_days={window_days}, click_horizon_days={click_horizon_days} (>= 0), "
            f"history_days={history_days} (>= 2), test_days={test_days} (1 .. history_days-1)")
    day = dt.date.fromisoformat(ds)
    label = day - dt.timedelta(days=click_horizon_days + window_days)
    days = lambda n: (label - dt.timedelta(days=n)).isoformat()  # noqa: E731
    return {"ds": ds, "label_day": label.isoformat(), "start": days(history_days - 1), "end": label.isoformat(),
            "split_date": days(test_days - 1),
            "wait": [(label + dt.timedelta(days=i)).isoformat() for i in range((day - label).days + 1)]}


def production() -> str | None:
    """The model dir MODEL_ROOT/production names now, resolved (None before the first publish)."""
    pointer = Path(MODEL_ROOT) / "production"
    return str(pointer.resolve()) if pointer.is_symlink() else None


def train_args(plan: dict, params: dict, try_number: int) -> list[str]:
    """``python -m jobs.train``: warm-started from the production the run started with; a retry resumes."""
    args = ["python", "-m", "jobs.train", "--data", plan["data"], "--out", plan["candidate"],
            "--model", params["model"], "--epochs", str(params["epochs"]), "--workers", str(params["workers"]),
            "--gpus-per-worker", repr(float(params["gpus_per_worker"])), "--address", "auto"]
    if params["warm_start"] and plan["production"]:
        args += ["--init-from", plan["production"]]
    if params.get("batch_size") is not None:
        args += ["--batch-size", str(params["batch_size"])]
    if params.get("lr") is not None:
        args += ["--lr", repr(float(params["lr"]))]
    if try_number > 1:  # continue the Ray checkpoints of the earlier try under the same candidate dir
        args.append("--resume")
    return args


def compare_args(plan: dict) -> list[str]:
    """``python -m jobs.compare``: production (if any) and the candidate on the same test rows."""
    models = [m for m in (plan["production"], plan["candidate"]) if m]
    return ["python", "-m", "jobs.compare", "--models", ",".join(models), "--data", plan["data"],
            "--out", str(Path(plan["candidate"]) / "compare.json")]


def publish_args(plan: dict, params: dict, check: bool) -> list[str]:
    """``esmm publish`` on the comparison the evaluate task wrote (no scoring: no torch here)."""
    args = ["esmm", "publish", "--candidate", plan["candidate"], "--root", MODEL_ROOT, "--data", plan["data"],
            "--comparison", str(Path(plan["candidate"]) / "compare.json"), "--tolerance", repr(float(params["tolerance"]))]
    return args + (["--check"] if check else [])


def score_args(model: str, params: dict, day: str) -> list[str]:
    """``python -m jobs.score``: every impression of ``day`` with the published model."""
    return ["python", "-m", "jobs.score", "--model", model, "--logs", params["log_root"], "--day", day,
            "--out", str(Path(params["score_root"]) / f"dt={day}"), "--workers", str(params["workers"]),
            "--address", "auto", "--gpus-per-worker", repr(float(params["gpus_per_worker"]))]


def ray_resources(params: dict) -> dict:
    """What an entrypoint that computes in its own process asks for (no Ray workers: it is the worker)."""
    if params["workers"]:
        return {}
    return {"num_cpus": 1, "num_gpus": float(params["gpus_per_worker"])}


class EtlSubmit(SparkSubmitOperator):
    """spark-submit jobs/etl.py with etl/ and jobs/ shipped as --py-files (a cluster's driver and
    executors import them), ids carried over from production; marks SHARDS with the manifest's counts."""

    def execute(self, context):
        import json

        plan = context["ti"].xcom_pull(task_ids="wait_for_logs")
        if plan["production"]:  # known values keep the ids production was trained with
            self.application_args = [*self.application_args, "--vocab-from", plan["production"]]
        with tempfile.TemporaryDirectory() as tmp:
            self.py_files = str(Path(tmp) / "esmm_py.zip")
            with zipfile.ZipFile(self.py_files, "w") as z:
                for pkg in ("etl", "jobs"):
                    for f in (REPO / pkg).rglob("*.py"):
                        z.write(f, f.relative_to(REPO).as_posix())
            super().execute(context)
        manifest = Path(plan["data"]) / "manifest.json"
        extra: dict = {"path": plan["data"], "day": plan["label_day"]}
        if manifest.exists():  # absent when the data root is remote (hdfs://, s3://)
            m = json.loads(manifest.read_text())
            extra["splits"] = {name: {k: s.get(k) for k in ("days", "impressions", "clicks", "conversions")}
                               for name, s in m.get("splits", {}).items()}
            extra["rejected"] = int(sum(m.get("rejects", {}).values()))
            extra["vocab"] = m.get("vocab")
        context["outlet_events"][SHARDS].extra = extra


def _plan(key: str) -> str:
    return "{{ ti.xcom_pull(task_ids='wait_for_logs')['" + key + "'] }}"


@dag(
    schedule=CronTriggerTimetable("@daily", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one publisher at a time: the gate compares against what is live
    dagrun_timeout=dt.timedelta(days=2),
    tags=["esmm"],
    doc_md=__doc__,
    params={
        "log_root": Param(os.environ.get("ESMM_LOG_ROOT", "/data/esmm/logs"), type="string",
                          description="raw logs: impressions/, clicks/, conversions/ by dt="),
        "data_root": Param(os.environ.get("ESMM_DATA_ROOT", "/data/esmm/shards"), type="string",
                           description="shards are written to DATA_ROOT/<label day>/"),
        "score_root": Param(os.environ.get("ESMM_SCORE_ROOT", "/data/esmm/scores"), type="string",
                            description="scores of day D go to SCORE_ROOT/dt=D/"),
        "window_days": Param(7, type="integer", minimum=0, description="attribution window W after the click"),
        "click_horizon_days": Param(1, type="integer", minimum=0,
                                    description="H: clicks count up to H days after their impression"),
        "history_days": Param(14, type="integer", minimum=2, description="shard days per run, ending on the label day"),
        "test_days": Param(1, type="integer", minimum=1, description="the latest days held out as the test split"),
        "shards": Param(8, type="integer", minimum=1, description="Parquet shards per day"),
        "model": Param("esmm", type="string"),
        "workers": Param(2, type="integer", minimum=0, description="Ray Train workers (0: train in the job's driver)"),
        "gpus_per_worker": Param(0, type="number", minimum=0, description="GPUs per Ray worker (train and score)"),
        "warm_start": Param(True, type="boolean", description="train --init-from the production model"),
        "epochs": Param(2, type="integer", minimum=1),
        "batch_size": Param(None, type=["null", "integer"], minimum=1, description="null: the trainer's default"),
        "lr": Param(None, type=["null", "number"], minimum=0, description="learning rate (0 trains nothing)"),
        "tolerance": Param(0.0, type="number", minimum=0,
                           description="refuse only when the 95% interval of candidate - production is below -T"),
        "ray_conn_id": Param("ray_default", type="string",
                             description="connection naming the Ray job API; its password is the Ray token"),
        "spark_driver_memory": Param("2g", type="string"),
        "spark_shuffle_partitions": Param(400, type="integer", minimum=1,
                                          description="about 2-3x the cluster's executor cores (AQE coalesces)"),
    },
)
def esmm_daily():
    @task.sensor(poke_interval=600, timeout=dt.timedelta(days=2).total_seconds(), mode="reschedule")
    def wait_for_logs(ds=None, params=None, run_id=None) -> PokeReturnValue:
        """Done when every table has ``dt=D/_SUCCESS`` for each D from the label day through ds."""
        p = params
        plan = plan_days(ds, p["window_days"], p["click_horizon_days"], p["history_days"], p["test_days"])
        done = lambda t, d: (Path(p["log_root"]) / t / f"dt={d}" / "_SUCCESS").exists()  # noqa: E731
        missing = [f"{t}/dt={d}" for d in plan["wait"] for t in TABLES if not done(t, d)]
        if missing:
            print(f"waiting for {len(missing)} partition(s) under {p['log_root']}: {', '.join(missing[:6])}")
            return PokeReturnValue(is_done=False)
        # The first days of a deployment have less history: start where the impressions start.
        start = dt.date.fromisoformat(plan["end"])
        while start.isoformat() > plan["start"] and done("impressions", (start - dt.timedelta(days=1)).isoformat()):
            start -= dt.timedelta(days=1)
        if start.isoformat() >= plan["split_date"]:
            raise AirflowFailException(f"no training day: impressions under {p['log_root']} start at {start}, "
                                       f"the test split at {plan['split_date']}")
        name = f"{plan['label_day']}__{ray_jobs.safe(run_id)}"
        plan.update(start=start.isoformat(), data=str(Path(p["data_root"]) / plan["label_day"]),
                    candidate=str(Path(MODEL_ROOT) / "candidates" / name),
                    production=production())  # pinned for the whole run
        return PokeReturnValue(is_done=True, xcom_value=plan)

    etl = EtlSubmit(
        task_id="etl",
        conn_id="spark_default",
        application=str(REPO / "jobs" / "etl.py"),
        properties_file=str(REPO / "infra" / "spark" / "spark-defaults.conf"),
        name="esmm-etl-{{ ds }}",
        conf={"spark.driver.memory": "{{ params.spark_driver_memory }}",
              "spark.sql.shuffle.partitions": "{{ params.spark_shuffle_partitions }}"},
        application_args=["--logs", "{{ params.log_root }}", "--out", _plan("data"), "--start", _plan("start"),
                          "--end", _plan("end"), "--split-date", _plan("split_date"),
                          "--window-days", "{{ params.window_days }}",
                          "--click-horizon-days", "{{ params.click_horizon_days }}",
                          "--shards", "{{ params.shards }}"],
        outlets=[SHARDS],
        execution_timeout=dt.timedelta(hours=6),
        **RETRY,
    )

    # Every task reads the run's plan (days, paths, the production it started with) from
    # wait_for_logs; the graph is the chain at the bottom.
    @task(execution_timeout=dt.timedelta(hours=12), **RETRY)
    def train(params=None, run_id=None, ti=None) -> None:
        """Train the candidate on Ray; a retry stops the earlier try's job and resumes its checkpoints."""
        import logging

        plan = ti.xcom_pull(task_ids="wait_for_logs")
        ray_jobs.run("train", train_args(plan, params, ti.try_number), run_id, ti.try_number,
                     conn_id=params["ray_conn_id"], working_dir=RAY_WORKING_DIR,
                     log=logging.getLogger("esmm.train"), **ray_resources(params))

    @task(execution_timeout=dt.timedelta(hours=2), **RETRY)
    def evaluate(params=None, run_id=None, ti=None) -> None:
        """Score production and the candidate on the same test rows (CANDIDATE/compare.json)."""
        import logging

        ray_jobs.run("evaluate", compare_args(ti.xcom_pull(task_ids="wait_for_logs")), run_id, ti.try_number,
                     conn_id=params["ray_conn_id"], working_dir=RAY_WORKING_DIR,
                     log=logging.getLogger("esmm.evaluate"), num_cpus=1)

    @task
    def gate(params=None, ti=None) -> None:
        """Fail (no retry) when the candidate is worse than production beyond the interval.

        The same process as ``esmm publish --check``; its verdict line becomes the task's
        error, so the reason shows where a failed task is read first, whatever the log level."""
        import subprocess
        import sys

        r = subprocess.run(publish_args(ti.xcom_pull(task_ids="wait_for_logs"), params, check=True),
                           capture_output=True, text=True)
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
        if r.returncode != 0:
            lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
            raise AirflowFailException(lines[-1] if lines else f"esmm publish --check exited {r.returncode}")

    @task.bash(outlets=[MODEL])
    def publish(params=None, ti=None, outlet_events=None) -> str:
        """Swap MODEL_ROOT/production to the candidate (the gate runs again right before the swap)."""
        import json

        plan = ti.xcom_pull(task_ids="wait_for_logs")
        cmp = json.loads((Path(plan["candidate"]) / "compare.json").read_text())
        outlet_events[MODEL].extra = {"path": plan["candidate"], "label_day": plan["label_day"],
                                      "metrics": {k: m["values"][-1] for k, m in cmp["metrics"].items()}}
        return shlex.join(publish_args(plan, params, check=False))

    @task(execution_timeout=dt.timedelta(hours=4), **RETRY)
    def score(ds=None, params=None, run_id=None, ti=None) -> str:
        """Score every impression of ds (the newest complete day) with the published model."""
        import logging

        args = score_args(production(), params, ds)
        ray_jobs.run("score", args, run_id, ti.try_number, conn_id=params["ray_conn_id"],
                     working_dir=RAY_WORKING_DIR, log=logging.getLogger("esmm.score"), **ray_resources(params))
        return args[args.index("--out") + 1]

    wait_for_logs() >> etl >> train() >> evaluate() >> gate() >> publish() >> score()


esmm_daily()
