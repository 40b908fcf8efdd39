"""esmm_daily: the daily Airflow DAG: logs -> Spark ETL -> Ray training -> evaluation -> gate -> publish.

One run per day ``ds`` (``airflow dags test esmm_daily 2026-01-14`` runs the day
2026-01-14, labelling 2026-01-07). The tasks run the same jobs a person runs (see README):

    wait_for_logs   the three tables' partitions dt=LABEL_DAY..ds have _SUCCESS
    etl             spark-submit jobs/etl.py (connection spark_default; master from it)
    train           ray job submit: python -m jobs.train (Ray cluster from a connection)
    evaluate        ray job submit: python -m jobs.evaluate on the latest test days
    gate            CTCVR AUC and CVR AUC not worse than production's by > tolerance
    publish         atomic swap of MODEL_ROOT/production (train/publish.py, as `esmm publish`)
    score           entire-space scoring with jobs/score.py, skipped when the build has none

Which day a run labels: the day ``ds - window_days``, not ``ds``. A conversion counts
when it comes within ``window_days`` of its click, so an impression of day D has its
final label only once the logs of day D + W are in. Labelling ``ds`` itself would
turn every conversion still to come into a negative: on the newest days the observed
CVR would be biased low (the delayed-feedback problem), and exactly on the days that
weigh most for a daily model. So the run for ``ds`` waits for ``ds``'s partitions (and
every day back to the label day, whose events the ETL reads), builds shards for
``history_days`` days ending on ``LABEL_DAY = ds - W``, holds the last ``test_days``
of them out as the test split, and trains on the rest. With W = 0 it labels ``ds``.

Schedule: ``@daily`` (Airflow 3: a cron trigger at 00:00 UTC, logical date = the day
``ds``). The sensor reschedules itself (frees its worker slot) until the upstream log
pipeline writes the day's ``_SUCCESS`` markers after the day ends.

Gate: the candidate's figures are ``esmm evaluate`` on this run's test days; production's
are the ones it was published with (its own ``evaluation.json``, on its test days).
Vocabularies are rebuilt per run from the training days, so the old model cannot be
re-scored on the new shards; the tolerance absorbs day-to-day drift, and a run of the
same day (as in the tests) compares like with like. ``tolerance`` is per metric.

Paths: shards go to ``DATA_ROOT/<LABEL_DAY>/`` (rewritten whole by a rerun of the day),
candidates to ``MODEL_ROOT/candidates/<LABEL_DAY>__<run>/``; production is the symlink
``MODEL_ROOT/production``. The Spark cluster and the Ray cluster must both see these
paths (one shared filesystem, or the same mount on all nodes).

Parsing stays cheap: no torch, ray or pyspark import at module level, no connection
or variable lookups at parse time; defaults for the roots come from environment
variables (ESMM_LOG_ROOT, ESMM_DATA_ROOT, ESMM_MODEL_ROOT) and run params override them.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shlex
import time
from pathlib import Path

import pendulum
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Asset, CronTriggerTimetable, Metadata, Param, PokeReturnValue, dag, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

# infra/airflow/dags/esmm_daily.py -> the repo root: jobs/ for spark-submit, the Ray working_dir.
REPO = Path(__file__).resolve().parents[3]
TABLES = ("impressions", "clicks", "conversions")

# Logical names: the physical paths are run params, so they travel in each event's extra.
SHARDS = Asset(name="esmm_shards", uri="esmm://shards/daily", group="esmm")
MODEL = Asset(name="esmm_production_model", uri="esmm://models/production", group="esmm")

# The Spark and Ray tasks retry with exponential back-off: a cluster that is briefly
# unreachable or preempted should not fail the day.
RETRY = dict(
    retries=2,
    retry_delay=dt.timedelta(minutes=2),
    retry_exponential_backoff=True,
    max_retry_delay=dt.timedelta(minutes=30),
)

# Left out of the code shipped to Ray as the job's working_dir (Ray also honours .gitignore).
RAY_EXCLUDES = [".git", ".venv", "bench", "tests", "*.egg-info", "__pycache__", "runs", "build"]


def plan_days(ds: str, window_days: int, history_days: int, test_days: int) -> dict:
    """The days a run for ``ds`` reads and writes.

    Returns:
        dict with ``label_day`` (ds - W, the newest day whose labels are final),
        ``start`` / ``end`` (the shard days, ``history_days`` ending on the label day),
        ``split_date`` (first test day) and ``wait`` (days whose logs must be complete).
    """
    if window_days < 0 or history_days < 2 or not 1 <= test_days < history_days:
        raise AirflowFailException(
            f"bad params: window_days={window_days} (>= 0), history_days={history_days} (>= 2), "
            f"test_days={test_days} (1 .. history_days-1)"
        )
    day = dt.date.fromisoformat(ds)
    label = day - dt.timedelta(days=window_days)
    start = label - dt.timedelta(days=history_days - 1)
    split = label - dt.timedelta(days=test_days - 1)
    wait = [label + dt.timedelta(days=i) for i in range(window_days + 1)]
    return {
        "ds": ds,
        "label_day": label.isoformat(),
        "start": start.isoformat(),
        "end": label.isoformat(),
        "split_date": split.isoformat(),
        "wait": [d.isoformat() for d in wait],
    }


def _partition_done(log_root: str, table: str, day: str) -> bool:
    return (Path(log_root) / table / f"dt={day}" / "_SUCCESS").exists()


def _safe(s: str) -> str:
    """A run id as a path / Ray submission id component."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def _ray_endpoint(params: dict) -> tuple[str, dict]:
    """The Ray dashboard (job API) address and HTTP headers.

    The ``ray_address`` param wins; else the connection ``ray_conn_id`` (host, port,
    schema http/https). A cluster with token auth (RAY_AUTH_MODE=token) gets the
    connection's password as its bearer token.
    """
    if params.get("ray_address"):
        return params["ray_address"], {}
    from airflow.sdk import Connection

    conn = Connection.get(params["ray_conn_id"])
    if not conn.host:
        raise AirflowFailException(f"connection {params['ray_conn_id']!r} has no host (the Ray dashboard)")
    host = conn.host if "://" in conn.host else f"{conn.schema or 'http'}://{conn.host}"
    headers = {"Authorization": f"Bearer {conn.password}"} if conn.password else {}
    return (f"{host}:{conn.port}" if conn.port else host), headers


def _ray_job(params: dict, args: list[str], submission_id: str, log) -> str:
    """Submit ``args`` as a Ray job, stream its logs into the task log, fail if the job fails.

    The entrypoint is ``shlex.join(args)``: every value is quoted, none pasted raw.
    The task being killed (timeout, mark failed) stops the job too.
    """
    import asyncio

    from ray.job_submission import JobStatus, JobSubmissionClient

    address, headers = _ray_endpoint(params)
    client = JobSubmissionClient(address, headers=headers or None)
    runtime_env = {"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}}
    if params.get("ray_working_dir"):
        runtime_env.update(working_dir=params["ray_working_dir"], excludes=RAY_EXCLUDES)
    entrypoint = shlex.join(args)
    log.info("ray job submit to %s: %s", address, entrypoint)
    job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env)
    tail: list[str] = []

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            for line in chunk.splitlines():
                log.info("[ray %s] %s", job_id, line)
                tail.append(line)
                del tail[:-40]

    try:
        asyncio.run(stream())
        status = client.get_job_status(job_id)
        while not status.is_terminal():  # the log stream can end a moment before the status flips
            time.sleep(1)
            status = client.get_job_status(job_id)
    except BaseException:
        with contextlib.suppress(Exception):
            client.stop_job(job_id)
        raise
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        raise AirflowException(
            f"Ray job {job_id} {status.value}: {info.message or ''}\n  " + "\n  ".join(tail[-15:])
        )
    return job_id


def train_args(data: str, out: str, params: dict) -> list[str]:
    """``jobs.train`` and its arguments (``--address auto``: the Ray cluster the job runs on)."""
    args = ["jobs.train", "--data", data, "--out", out, "--model", params["model"],
            "--epochs", str(params["epochs"]), "--workers", str(params["workers"]), "--address", "auto"]
    if params.get("batch_size") is not None:
        args += ["--batch-size", str(params["batch_size"])]
    if params.get("lr") is not None:
        args += ["--lr", repr(float(params["lr"]))]
    return args


def evaluate_args(model: str, data: str, out: str) -> list[str]:
    """``jobs.evaluate`` and its arguments: the model's metrics on DATA's test split."""
    return ["jobs.evaluate", "--model", model, "--data", data, "--out", out]


class EtlSubmit(SparkSubmitOperator):
    """spark-submit jobs/etl.py, then mark the SHARDS outlet with the manifest's counts."""

    def execute(self, context):
        super().execute(context)
        out = self.application_args[self.application_args.index("--out") + 1]
        manifest_path = Path(out) / "manifest.json"
        extra: dict = {"path": out, "day": context["ti"].xcom_pull(task_ids="wait_for_logs")["label_day"]}
        if manifest_path.exists():  # absent when the data root is remote (hdfs://, s3://)
            m = json.loads(manifest_path.read_text())
            extra["splits"] = {
                name: {k: s.get(k) for k in ("days", "impressions", "clicks", "conversions")}
                for name, s in m.get("splits", {}).items()
            }
            extra["rejected"] = int(sum(m.get("rejects", {}).values()))
        context["outlet_events"][SHARDS].extra = extra


def _xplan(key: str) -> str:
    return "{{ ti.xcom_pull(task_ids='wait_for_logs')['" + key + "'] }}"


@dag(
    dag_id="esmm_daily",
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
        "model_root": Param(os.environ.get("ESMM_MODEL_ROOT", "/data/esmm/models"), type="string",
                            description="candidates/ and the production pointer"),
        "window_days": Param(7, type="integer", minimum=0,
                             description="attribution window W: conversions count within W days of the click"),
        "history_days": Param(14, type="integer", minimum=2, description="shard days per run, ending on ds - W"),
        "test_days": Param(1, type="integer", minimum=1, description="the latest days held out as the test split"),
        "shards": Param(8, type="integer", minimum=1, description="Parquet shards per day"),
        "model": Param("esmm", type="string"),
        "workers": Param(2, type="integer", minimum=0,
                         description="Ray Train workers (0: train inside the Ray job's driver process)"),
        "epochs": Param(2, type="integer", minimum=1),
        "batch_size": Param(None, type=["null", "integer"], minimum=1, description="null: the trainer's default"),
        "lr": Param(None, type=["null", "number"], minimum=0,
                    description="learning rate override (0 trains nothing: a deliberately worse model)"),
        "tolerance": Param(0.005, type="number", minimum=0,
                           description="allowed drop of CTCVR AUC and CVR AUC versus production"),
        "ray_conn_id": Param("ray_default", type="string",
                             description="connection naming the Ray dashboard (job API), e.g. http://head:8265"),
        "ray_address": Param("", type="string", description="overrides the connection when set"),
        "ray_working_dir": Param(str(REPO), type="string",
                                 description="code shipped with each Ray job; empty when the image has it"),
        "code_dir": Param(str(REPO), type="string", description="repo holding jobs/etl.py for spark-submit"),
        "spark_driver_memory": Param("2g", type="string"),
        "spark_shuffle_partitions": Param(400, type="integer", minimum=1,
                                          description="about 2-3x the cluster's executor cores (AQE coalesces)"),
    },
)
def esmm_daily():
    @task.sensor(poke_interval=600, timeout=dt.timedelta(days=2).total_seconds(), mode="reschedule")
    def wait_for_logs(ds=None, params=None) -> PokeReturnValue:
        """Done when every table has ``dt=D/_SUCCESS`` for each D from the label day through ds."""
        plan = plan_days(ds, params["window_days"], params["history_days"], params["test_days"])
        missing = [f"{t}/dt={d}" for d in plan["wait"] for t in TABLES if not _partition_done(params["log_root"], t, d)]
        if missing:
            print(f"waiting for {len(missing)} partition(s) under {params['log_root']}: {', '.join(missing[:6])}")
            return PokeReturnValue(is_done=False)
        # The first days of a deployment have less history than history_days: start at the
        # earliest day from which every impression day through the label day is complete.
        start = dt.date.fromisoformat(plan["end"])
        while (start > dt.date.fromisoformat(plan["start"])
               and _partition_done(params["log_root"], "impressions", (start - dt.timedelta(days=1)).isoformat())):
            start -= dt.timedelta(days=1)
        if start.isoformat() >= plan["split_date"]:
            raise AirflowFailException(
                f"no training day: impression logs under {params['log_root']} start at {start}, "
                f"the test split starts at {plan['split_date']} (ds={ds}, window_days={params['window_days']})"
            )
        plan["start"] = start.isoformat()
        plan["data"] = str(Path(params["data_root"]) / plan["label_day"])
        print(f"logs complete; shards for {plan['start']} .. {plan['end']}, test from {plan['split_date']}")
        return PokeReturnValue(is_done=True, xcom_value=plan)

    etl = EtlSubmit(
        task_id="etl",
        conn_id="spark_default",
        application="{{ params.code_dir }}/jobs/etl.py",
        properties_file="{{ params.code_dir }}/infra/spark/spark-defaults.conf",
        name="esmm-etl-{{ ds }}",
        conf={
            "spark.driver.memory": "{{ params.spark_driver_memory }}",
            "spark.sql.shuffle.partitions": "{{ params.spark_shuffle_partitions }}",
        },
        application_args=[
            "--logs", "{{ params.log_root }}",
            "--out", _xplan("data"),
            "--start", _xplan("start"),
            "--end", _xplan("end"),
            "--split-date", _xplan("split_date"),
            "--window-days", "{{ params.window_days }}",
            "--shards", "{{ params.shards }}",
        ],
        outlets=[SHARDS],
        execution_timeout=dt.timedelta(hours=6),
        **RETRY,
    )

    # Each stage hands the next one the run's state dict (plan + what it added), so the
    # graph is the chain wait_for_logs >> etl >> train >> evaluate >> gate >> publish >> score.
    @task(execution_timeout=dt.timedelta(hours=12), **RETRY)
    def train(params=None, run_id=None, ti=None) -> dict:
        """ray job submit of ``python -m jobs.train``; adds the candidate model dir."""
        import logging

        state = dict(ti.xcom_pull(task_ids="wait_for_logs"))
        out = Path(params["model_root"]) / "candidates" / f"{state['label_day']}__{_safe(run_id)}"
        out.parent.mkdir(parents=True, exist_ok=True)
        args = ["python", "-m", *train_args(state["data"], str(out), params)]
        if ti.try_number > 1 and (out / "checkpoint.pt").exists():
            args.append("--resume")  # a retry continues the interrupted run instead of starting over
        _ray_job(params, args, f"esmm-train-{_safe(run_id)}-{ti.try_number}", logging.getLogger("esmm.train"))
        return {**state, "candidate": str(out)}

    @task(execution_timeout=dt.timedelta(hours=2), **RETRY)
    def evaluate(state: dict, params=None, run_id=None, ti=None) -> dict:
        """ray job submit of ``python -m jobs.evaluate`` on the test split (the latest days)."""
        import logging

        from train import publish as pub

        cand = state["candidate"]
        args = ["python", "-m", *evaluate_args(cand, state["data"], str(Path(cand) / pub.METRICS_FILE))]
        _ray_job(params, args, f"esmm-evaluate-{_safe(run_id)}-{ti.try_number}", logging.getLogger("esmm.evaluate"))
        return {**state, "metrics": pub.read_metrics(cand)}

    @task
    def gate(state: dict, params=None) -> dict:
        """Fail (no retry) unless the candidate is within tolerance of production on both AUCs."""
        from train import publish as pub

        result = pub.check(state["candidate"], params["model_root"], float(params["tolerance"]))
        if not result.passed:
            raise AirflowFailException(result.message())
        print(result.message())
        return {**state, "gate": result.message()}

    @task(outlets=[MODEL])
    def publish(state: dict, params=None):
        """Swap MODEL_ROOT/production to the candidate (the gate runs again right before the swap)."""
        from train import publish as pub

        result = pub.publish(state["candidate"], params["model_root"], float(params["tolerance"]))
        if not result.passed:  # production changed since the gate task ran
            raise AirflowFailException(result.message())
        prod = str(pub.production_dir(params["model_root"]))
        yield Metadata(MODEL, {"path": prod, "label_day": state["label_day"], "metrics": result.candidate})
        return {**state, "production": prod}

    @task
    def score(state: dict, params=None, run_id=None, ti=None) -> str:
        """Entire-space scoring with jobs/score.py when the shipped code has one; else skipped."""
        import logging

        code = Path(params["ray_working_dir"] or params["code_dir"])
        if not (code / "jobs" / "score.py").exists():
            raise AirflowSkipException(f"no scoring job ({code}/jobs/score.py) in this build")
        out = str(Path(state["data"]) / "scores")
        args = ["python", "-m", "jobs.score", "--model", state["production"], "--data", state["data"], "--out", out]
        _ray_job(params, args, f"esmm-score-{_safe(run_id)}-{ti.try_number}", logging.getLogger("esmm.score"))
        return out

    trained = train()
    wait_for_logs() >> etl >> trained
    score(publish(gate(evaluate(trained))))


esmm_daily()
