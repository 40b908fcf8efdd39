"""Ray jobs for the esmm_daily DAG: submit, stream the logs, stop what an earlier try left running.

The DAG's Ray tasks call ``run(...)``. Each try of a task gets a deterministic submission
id, ``esmm-<task>-<run>-try<N>``, so a retry knows the ids of the tries before it and
stops any that still run (an Airflow worker that died, or a task killed by its timeout,
leaves its Ray job running: two jobs would write the same candidate). Nothing here
imports torch; ``ray.job_submission`` is imported only when a task runs.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import time

# Left out of the code shipped to Ray as the job's working_dir (Ray also honours .gitignore).
EXCLUDES = [".git", ".venv", "bench", "tests", "*.egg-info", "__pycache__", "runs", "build"]


def safe(s: str) -> str:
    """A run id as a path / Ray submission id component."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def submission_id(task: str, run_id: str, try_number: int) -> str:
    """The Ray job id of one try of one task of one DAG run."""
    return f"esmm-{task}-{safe(run_id)}-try{try_number}"


def endpoint(conn_id: str) -> tuple[str, dict]:
    """The Ray job API address and the HTTP headers it needs, from the Airflow connection
    ``conn_id`` (host, port, schema http/https). A cluster with token auth
    (RAY_AUTH_MODE=token, as the specs in infra/ set it) gets the connection's password
    as its bearer token.
    """
    from airflow.sdk import Connection

    conn = Connection.get(conn_id)
    if not conn.host:
        raise ValueError(f"connection {conn_id!r} has no host (the Ray job API)")
    host = conn.host if "://" in conn.host else f"{conn.schema or 'http'}://{conn.host}"
    address = f"{host}:{conn.port}" if conn.port else host
    return address, ({"Authorization": f"Bearer {conn.password}"} if conn.password else {})


def stop_earlier_tries(client, task: str, run_id: str, try_number: int, log, wait_s: float = 120) -> list[str]:
    """Stop the Ray jobs of this task's earlier tries that are still running; wait until they end.

    Returns the ids it stopped.
    """
    from ray.job_submission import JobStatus

    stopped = []
    for n in range(1, try_number):
        job = submission_id(task, run_id, n)
        try:
            status = client.get_job_status(job)
        except RuntimeError:  # never submitted (that try failed before submitting)
            continue
        if status.is_terminal():
            continue
        log.info("stopping Ray job %s of try %d (still %s)", job, n, status.value)
        client.stop_job(job)
        deadline = time.monotonic() + wait_s
        while not client.get_job_status(job).is_terminal():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray job {job} of try {n} did not stop within {wait_s:.0f} s")
            time.sleep(1)
        stopped.append(job)
        if client.get_job_status(job) == JobStatus.STOPPED:
            log.info("Ray job %s stopped", job)
    return stopped


def submit(client, args: list[str], job_id: str, working_dir: str, env: dict | None = None,
           num_cpus: float = 0, num_gpus: float = 0) -> str:
    """Submit ``args`` (quoted with shlex.join: no value reaches a shell raw) as job ``job_id``.

    ``num_cpus`` / ``num_gpus`` reserve the entrypoint's own resources: a job that computes
    in its driver process (scoring, one-process training) then runs on a node that has them,
    not on a head that has none.
    """
    runtime_env = {"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})}}
    if working_dir:
        runtime_env.update(working_dir=working_dir, excludes=EXCLUDES)
    return client.submit_job(entrypoint=shlex.join(args), submission_id=job_id, runtime_env=runtime_env,
                             entrypoint_num_cpus=num_cpus or None, entrypoint_num_gpus=num_gpus or None)


def wait(client, job_id: str, log) -> None:
    """Stream the job's logs into the task log; raise when it does not succeed.
    The task being killed (timeout, marked failed) stops the job too."""
    from ray.job_submission import JobStatus

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
        raise RuntimeError(f"Ray job {job_id} {status.value}: {info.message or ''}\n  " + "\n  ".join(tail[-15:]))


def run(task: str, args: list[str], run_id: str, try_number: int, *, conn_id: str,
        working_dir: str = "", log, env: dict | None = None, num_cpus: float = 0, num_gpus: float = 0) -> str:
    """One try of a Ray task: stop the earlier tries' jobs, submit this one, wait for it."""
    from ray.job_submission import JobSubmissionClient

    url, headers = endpoint(conn_id)
    client = JobSubmissionClient(url, headers=headers or None)
    stop_earlier_tries(client, task, run_id, try_number, log)
    job_id = submission_id(task, run_id, try_number)
    log.info("ray job submit to %s as %s: %s", url, job_id, shlex.join(args))
    submit(client, args, job_id, working_dir, env, num_cpus, num_gpus)
    wait(client, job_id, log)
    return job_id
