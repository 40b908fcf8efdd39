"""Session fixtures shared by all tests: one local SparkSession, one local Ray cluster.

Both bind to 127.0.0.1 only. The Ray cluster is a real ``ray start --head`` on free
ports and its own temp dir, so several clusters (tests, a user's) can coexist.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray 2.60 turns token auth on for `ray start` whenever ~/.ray/auth_token exists (any
# `ray.init()` of a local cluster writes one), but a client given an explicit address
# never sends it: the test clusters run without auth so tests do not depend on that file.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ALICCP_SAMPLES = SHARED / "data" / "aliccp"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def spark():
    from etl.spark import get_spark

    s = get_spark("local[2]", app="esmm-tests", conf={"spark.sql.shuffle.partitions": "4"})
    yield s
    s.stop()


def _descendants(pids: set[int]) -> set[int]:
    out, frontier = set(pids), set(pids)
    while frontier:
        r = subprocess.run(["pgrep", "-P", ",".join(map(str, frontier))], capture_output=True, text=True)
        frontier = {int(p) for p in r.stdout.split()} - out
        out |= frontier
    return out


def _kill_cluster(tmp: str, grace_s: float = 5.0) -> None:
    """Make sure every process of the cluster under ``tmp`` is gone.

    gcs_server, raylet and the agents can outlive SIGTERM for minutes on a loaded
    machine, and the agents and workers retitle themselves (``ray::...``), so a
    command-line match misses them: take the matches and all their descendants,
    SIGTERM, wait, then SIGKILL what is left. Only this cluster's processes are touched.
    """
    import signal

    found = subprocess.run(["pgrep", "-f", tmp], capture_output=True, text=True).stdout.split()
    pids = _descendants({int(p) for p in found}) - {os.getpid()}
    deadline = time.time() + grace_s
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        while pids and time.time() < deadline:
            time.sleep(0.2)
            pids = {p for p in pids if _alive(p)}
        if not pids:
            return
        deadline = time.time() + grace_s


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, parent has not reaped it) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ray_bin() -> str:
    return str(VENV_BIN / "ray")


@pytest.fixture(scope="session")
def ray_start_2_cpus():
    """A real local Ray head (2 CPUs) on loopback; yields its GCS address ``127.0.0.1:PORT``."""
    port, dash = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are length-limited
    cmd = [
        _ray_bin(), "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
        "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--ray-client-server-port", str(free_port()), "--min-worker-port", "0", "--max-worker-port", "0",
        # the dashboard agent serves job submission; its default port (52365) clashes
        # with any other cluster on the machine, so it gets a free one too
        "--dashboard-agent-listen-port", str(free_port()),
        "--temp-dir", tmp, "--disable-usage-stats",
    ]
    # The venv's bin first: `ray job submit` entrypoints say `python ...`, which the raylet
    # resolves on its PATH; without this they get the system python, which has no ray.
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "temp_dir": tmp}
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:
            pass
        # `ray stop` stops every cluster on the machine; stop only ours by its temp dir's processes.
        _kill_cluster(tmp)  # collects the process tree first: children outlive a killed parent
        subprocess.run(["pkill", "-f", "--", f"--temp-dir={tmp}"], check=False)
        subprocess.run(["pkill", "-f", tmp], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
