"""``esmm cluster up|down|status``: a local Ray cluster on 127.0.0.1 for trying the Ray jobs.

    esmm cluster up [--port 6379] [--dashboard-port 8265] [--num-cpus N]
    esmm train --data DATA --out MODEL --workers 2 --address 127.0.0.1:6379
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.train --data DATA --out MODEL --workers 2
    esmm cluster down

``up`` runs ``ray start --head`` bound to loopback, every port explicit (busy defaults
fall back to free ports), with a temp dir of its own, and records that temp dir, the
ports and the pids in a state file (``--state``, default ~/.esmm/ray-cluster.json).
``down`` stops only the processes of THAT cluster (those whose command line names its
temp dir), never a bare ``ray stop``, which would stop every Ray cluster on the machine.
The cluster runs without token auth: it listens on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: python jobs/cluster.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.common import Parser, run_main  # noqa: E402

DEFAULT_STATE = Path.home() / ".esmm" / "ray-cluster.json"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pick(port: int | None, default: int, what: str) -> int:
    from train.errors import InputError

    if port is not None:
        if not _port_free(port):
            raise InputError(f"cluster: --{what} {port} is in use on 127.0.0.1")
        return port
    return default if _port_free(default) else _free_port()


def cluster_pids(temp_dir: str) -> list[int]:
    """Pids of processes whose command line names ``temp_dir`` (this cluster's, only)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmd:
            pids.append(int(p.name))
    return sorted(pids)


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def up(args) -> int:
    from train.errors import InputError

    state_path = Path(args.state)
    old = _read_state(state_path)
    if old and cluster_pids(old["temp_dir"]):
        raise InputError(f"cluster: already up at {old['address']} (state {state_path}); `esmm cluster down` first")
    port = _pick(args.port, 6379, "port")
    dash = _pick(args.dashboard_port, 8265, "dashboard-port")
    tmp = tempfile.mkdtemp(prefix="esmm-ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--dashboard-agent-listen-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
           "--temp-dir", tmp, "--disable-usage-stats"]
    if args.num_cpus:
        cmd += ["--num-cpus", str(args.num_cpus)]
    # `python` in a job entrypoint resolves on the raylet's PATH: the venv's first
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"cluster: `ray start` failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    state = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "temp_dir": tmp,
             "pids": cluster_pids(tmp), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    print(f"esmm cluster: up at {state['address']} (dashboard {state['dashboard']}, temp dir {tmp})")
    print(f"  esmm train --data DATA --out MODEL --workers 2 --address {state['address']}")
    print(f"  ray job submit --address {state['dashboard']} --working-dir . -- "
          "python -m jobs.train --data DATA --out MODEL --workers 2")
    print("  esmm cluster down")
    return 0


def down(args) -> int:
    state_path = Path(args.state)
    state = _read_state(state_path)
    if not state:
        print(f"esmm cluster: no cluster recorded in {state_path}")
        return 0
    tmp = state["temp_dir"]
    pids = cluster_pids(tmp)
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and (pids := cluster_pids(tmp)):
            time.sleep(0.2)
        if not pids:
            break
    shutil.rmtree(tmp, ignore_errors=True)
    state_path.unlink(missing_ok=True)
    print(f"esmm cluster: stopped {state['address']}" + (f" ({len(pids)} processes left)" if pids else ""))
    return 0 if not pids else 1


def status(args) -> int:
    state = _read_state(Path(args.state))
    if not state:
        print("esmm cluster: none recorded")
        return 1
    alive = cluster_pids(state["temp_dir"])
    print(f"esmm cluster: {state['address']} dashboard {state['dashboard']}: "
          f"{'up, ' + str(len(alive)) + ' processes' if alive else 'down (stale state)'}")
    return 0 if alive else 1


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="esmm cluster", description="A local Ray cluster on 127.0.0.1.")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--port", type=int, help="GCS port (default 6379, or a free one if busy)")
    p.add_argument("--dashboard-port", type=int, help="dashboard / job API port (default 8265, or a free one)")
    p.add_argument("--num-cpus", type=int, help="CPUs the cluster offers (default: all)")
    p.add_argument("--state", default=str(DEFAULT_STATE), help=f"state file (default {DEFAULT_STATE})")
    return p


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    return {"up": up, "down": down, "status": status}[args.action](args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
