"""The cluster specs parse, and every job command in them names a job module and
arguments that the job's own argparse parser accepts (parsed, never run)."""
from __future__ import annotations

import argparse
import importlib
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


class _Parsed(Exception):
    """Raised by the spy in place of running the job once its arguments are parsed."""


def parse_job_args(module: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Call ``module.main(argv)`` but stop right after argument parsing; return the namespace.

    The spy sits on ``parse_known_args`` (``parse_args`` calls it too), so a job that
    uses either is caught before it does any work. Unknown arguments fail the test,
    and so does a parser error (exit 2, or the job's one-line InputError).
    """
    mod = importlib.import_module(module)
    assert (REPO / (module.replace(".", "/") + ".py")).exists()
    orig = argparse.ArgumentParser.parse_known_args

    def spy(self, args=None, namespace=None):
        ns, extras = orig(self, args, namespace)
        raise _Parsed(ns, extras)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", spy)
    try:
        rc = mod.main(list(argv))
    except _Parsed as p:
        ns, extras = p.args
        assert extras == [], f"{module}: unknown arguments {extras}"
        return ns
    except SystemExit as e:
        pytest.fail(f"{module} rejected {argv}: exit {e.code}")
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", orig)
    pytest.fail(f"{module}.main returned {rc} without parsing {argv} (parser error?)")


def python_module_cmd(cmd: str) -> tuple[str, list[str]]:
    """``python -m MODULE ARGS...`` -> (MODULE, ARGS)."""
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "-m"], cmd
    return argv[2], argv[3:]


def load(path: str) -> dict:
    with open(INFRA / path) as f:
        return yaml.safe_load(f)


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def ray_start_commands(spec: dict, key: str) -> list[tuple[dict, list[str]]]:
    """Each ``ray start`` in the launcher's shell lines: (environment it runs with, argv)."""
    out = []
    for line in spec[key]:
        env: dict = {}
        for part in line.split(";"):
            argv = shlex.split(part)
            if argv[:1] == ["export"]:
                env.update(a.split("=", 1) for a in argv[1:])
            elif argv[:2] == ["ray", "start"]:
                out.append((env, argv))
    return out


def flag(argv: list[str], name: str) -> str | None:
    for a in argv:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def test_ray_cluster_launcher_spec():
    spec = load("ray/cluster.yaml")
    types = spec["available_node_types"]
    assert spec["head_node_type"] in types
    gpu_types = [n for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and spec["head_node_type"] not in gpu_types
    assert types[spec["head_node_type"]]["resources"]["CPU"] == 0  # no Train workers on the head
    assert spec["max_workers"] >= max(t["max_workers"] for t in types.values())
    assert spec["docker"]["image"].startswith("rayproject/ray:2.60.0")  # the pinned Ray
    # the repo is copied to every node and installed with the training extra
    assert spec["file_mounts"]["/home/ray/esmm"] == "."
    assert any(c.startswith("pip install") and "/home/ray/esmm[train]" in c for c in spec["setup_commands"])


def test_ray_cluster_launcher_turns_token_auth_on_everywhere():
    """Every node starts with token auth and a token file that is mounted from outside the repo;
    the job API is on loopback (or, if a deployer widens it, still behind the token)."""
    spec = load("ray/cluster.yaml")
    (head_env, head), = ray_start_commands(spec, "head_start_ray_commands")
    (worker_env, _), = ray_start_commands(spec, "worker_start_ray_commands")
    assert "--head" in head and flag(head, "dashboard-port") == "8265"
    assert flag(head, "dashboard-host") in LOOPBACK
    for env in (head_env, worker_env):  # a worker without the token could not join anyway
        assert env.get("RAY_AUTH_MODE") == "token"
        token = env["RAY_AUTH_TOKEN_PATH"]
        source = spec["file_mounts"][token]  # the token file reaches every node...
        assert not (REPO / Path(source).expanduser()).resolve().is_relative_to(REPO)  # ...but is not shipped with the code
    rsync = set(spec["rsync_exclude"])
    assert {".venv", ".git", "runs"} <= rsync


def pod_env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_kuberay_exposes_the_job_api_only_with_token_auth():
    spec = load("k8s/rayjob.yaml")["spec"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    groups = [("head", head["rayStartParams"], head["template"]["spec"]["containers"])]
    groups += [(g["groupName"], g["rayStartParams"], g["template"]["spec"]["containers"])
               for g in cluster["workerGroupSpecs"]]
    groups.append(("submitter", {}, spec["submitterPodTemplate"]["spec"]["containers"]))
    assert head["rayStartParams"]["dashboard-host"] not in LOOPBACK  # the submitter pod reaches it...
    for name, _, containers in groups:  # ...so every pod runs with the token, the submitter too
        for c in containers:
            env = pod_env(c)
            assert env.get("RAY_AUTH_MODE") == "token", (name, c["name"])
            # the token comes from a Secret, never a literal in the spec
            assert set(env["RAY_AUTH_TOKEN"]) == {"secretKeyRef"}, (name, c["name"])


def test_cluster_yaml_documented_job_submit_parses(monkeypatch):
    # the `ray job submit ... -- python -m jobs.train ...` in the file's header comment
    text = (INFRA / "ray/cluster.yaml").read_text()
    lines = [l.lstrip("# ").rstrip() for l in text.splitlines() if l.startswith("#")]
    start = next(i for i, l in enumerate(lines) if "ray job submit" in l)
    cmd = ""
    for l in lines[start:]:
        cmd += " " + l.rstrip("\\")
        if not l.endswith("\\"):
            break
    entry = cmd.split(" -- ", 1)[1]
    module, args = python_module_cmd(entry)
    assert module == "jobs.train"
    ns = parse_job_args(module, args, monkeypatch)
    assert ns.workers == 2 and ns.address == "auto"


def test_kuberay_rayjob_spec(monkeypatch):
    spec = load("k8s/rayjob.yaml")
    assert spec["apiVersion"] == "ray.io/v1" and spec["kind"] == "RayJob"
    job = spec["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    module, args = python_module_cmd(job["entrypoint"])
    assert module == "jobs.train"
    ns = parse_job_args(module, args, monkeypatch)
    cluster = job["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    (gpu,) = cluster["workerGroupSpecs"]
    container = gpu["template"]["spec"]["containers"][0]
    # one Train worker per GPU pod: --workers and --gpus-per-worker agree with the pods
    assert ns.workers == gpu["replicas"] == gpu["minReplicas"]
    assert float(ns.gpus_per_worker) == float(container["resources"]["limits"]["nvidia.com/gpu"])
    assert container["image"] == cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def spark_defaults() -> dict:
    conf = {}
    for line in (INFRA / "spark/spark-defaults.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, value = line.split(None, 1)
            assert key not in conf, f"duplicate {key}"
            conf[key] = value.strip()
    return conf


def test_spark_defaults():
    conf = spark_defaults()
    assert conf["spark.sql.adaptive.enabled"] == "true"
    assert conf["spark.sql.adaptive.skewJoin.enabled"] == "true"
    assert conf["spark.sql.adaptive.coalescePartitions.enabled"] == "true"
    assert 8 <= int(conf["spark.sql.shuffle.partitions"]) <= 10_000
    assert conf["spark.sql.session.timeZone"] == "UTC"
    assert "spark.master" not in conf  # the master comes from --master / the Airflow connection
    assert all(k.startswith("spark.") for k in conf)


def test_spark_operator_application(monkeypatch):
    spec = load("k8s/sparkapplication.yaml")
    assert spec["kind"] == "SparkApplication"
    app = spec["spec"]
    assert app["mainApplicationFile"] == "local:///app/jobs/etl.py"  # the image has the repo at /app
    assert (REPO / "jobs/etl.py").exists()
    ns = parse_job_args("jobs.etl", app["arguments"], monkeypatch)
    assert ns.window_days == 7 and ns.shards == 8
    conf = spark_defaults()
    for key, value in app["sparkConf"].items():
        assert conf[key] == value, key  # the same settings as spark-defaults.conf
    assert app["restartPolicy"]["onFailureRetries"] >= 1


# What the published base images hold (their own Dockerfiles): the paths and ENV this
# project's images rely on.
BASE_IMAGES = {
    "apache/spark:4.2.0-scala2.13-java17-python3-ubuntu": {
        "env": {"SPARK_HOME": "/opt/spark"},
        "files": {"/opt/entrypoint.sh", "/opt/spark/bin/spark-submit", "/opt/spark/python/pyspark/__init__.py",
                  "/usr/bin/python3", "/usr/bin/java"},
    },
    "rayproject/ray:2.60.0-py311-gpu": {
        "env": {}, "files": {"/home/ray/anaconda3/bin/python", "/home/ray/anaconda3/bin/ray"},
    },
}


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our patterns: a path is out if it or a parent matches."""
    import fnmatch

    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        pat = pat.rstrip("/")
        for pre in prefixes:
            if fnmatch.fnmatch(pre, pat) or (pat.startswith("**/") and fnmatch.fnmatch(pre.split("/")[-1], pat[3:])):
                return True
    return False


def image_layout(dockerfile: str) -> dict:
    """The files and ENV of the image a Dockerfile builds from this repo: the base image's,
    plus each ``COPY . DEST`` of the build context as .dockerignore filters it."""
    ignore = dockerignore()
    context = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*") if p.is_file()
               and ".git" not in p.relative_to(REPO).parts[:1]]
    layout = {"files": set(), "env": {}, "entrypoint": None, "workdir": None, "copied": set()}
    lines = (INFRA / dockerfile).read_text().replace("\\\n", " ").splitlines()
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        op, _, rest = line.strip().partition(" ")
        if op == "FROM":
            base = BASE_IMAGES[rest.strip()]
            layout["files"] |= base["files"]
            layout["env"].update(base["env"])
        elif op == "COPY":
            src, dest = [a for a in shlex.split(rest) if not a.startswith("--")]
            assert src == "."
            for rel in context:
                if not dockerignored(rel, ignore):
                    layout["files"].add(f"{dest}/{rel}")
                    layout["copied"].add(rel)
        elif op == "ENV":
            layout["env"].update(a.split("=", 1) for a in shlex.split(rest))
        elif op == "ENTRYPOINT":
            import json

            layout["entrypoint"] = json.loads(rest)
        elif op == "WORKDIR":
            layout["workdir"] = rest.strip()
    return layout


def built_image(tag: str) -> str:
    """The Dockerfile whose documented ``docker build -f FILE -t TAG`` builds ``tag``."""
    for f in (INFRA / "k8s").glob("Dockerfile*"):
        for line in f.read_text().splitlines():
            if line.startswith("#") and "docker build" in line:
                argv = shlex.split(line.lstrip("# ").split("&&")[0])
                if argv[argv.index("-t") + 1] == tag:
                    return argv[argv.index("-f") + 1].removeprefix("infra/")
    pytest.fail(f"no Dockerfile documents building {tag}")


def dockerignore() -> list[str]:
    return [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
            if l.strip() and not l.startswith("#")]


def test_dockerignore_keeps_environments_and_history_out_and_the_code_in():
    ignore = dockerignore()
    for junk in (".venv/bin/python", ".git/HEAD", "runs/airflow/airflow.db", "train/__pycache__/model.cpython-311.pyc",
                 "bench/.venv-peers/bin/python", "esmm_pipeline.egg-info/PKG-INFO"):
        assert dockerignored(junk, ignore), junk
    layout = image_layout(built_image(load("k8s/rayjob.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"]
                                      ["template"]["spec"]["containers"][0]["image"]))
    tracked = [p.relative_to(REPO).as_posix() for d in ("jobs", "etl", "train", "infra") for p in (REPO / d).rglob("*.py")
               if "__pycache__" not in p.parts]
    assert tracked and set(tracked) | {"pyproject.toml"} <= layout["copied"]


def test_spark_image_runs_what_the_spark_operator_starts(monkeypatch):
    app = load("k8s/sparkapplication.yaml")["spec"]
    layout = image_layout(built_image(app["image"]))
    # the operator's driver and executor pods run the image's entrypoint with SPARK_HOME's spark-submit
    (entry,) = layout["entrypoint"]
    assert entry in layout["files"]
    assert f"{layout['env']['SPARK_HOME']}/bin/spark-submit" in layout["files"]
    main = app["mainApplicationFile"].removeprefix("local://")
    assert main in layout["files"]
    # what the driver imports (etl/, jobs/) is in the image next to it
    app_root = main.rsplit("/jobs/", 1)[0]
    assert {f"{app_root}/etl/__init__.py", f"{app_root}/jobs/common.py"} <= layout["files"]


def test_ray_image_runs_the_rayjob_entrypoint():
    spec = load("k8s/rayjob.yaml")["spec"]
    container = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    layout = image_layout(built_image(container["image"]))
    module, _ = python_module_cmd(spec["entrypoint"])
    assert f"{container['workingDir']}/{module.replace('.', '/')}.py" in layout["files"]


def test_jobs_leave_spark_local_ip_to_the_master():
    """Importing a job does not bind Spark to loopback: with a cluster master
    (`esmm etl --master spark://...`) the executors must reach the driver's address."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SPARK_LOCAL_IP"}
    code = "import os, jobs.common, jobs.etl, etl.spark; print(os.environ.get('SPARK_LOCAL_IP'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
