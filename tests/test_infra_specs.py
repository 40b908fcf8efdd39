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


def test_ray_cluster_launcher_spec():
    spec = load("ray/cluster.yaml")
    types = spec["available_node_types"]
    assert spec["head_node_type"] in types
    gpu_types = [n for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and spec["head_node_type"] not in gpu_types
    assert types[spec["head_node_type"]]["resources"]["CPU"] == 0  # no Train workers on the head
    assert spec["max_workers"] >= max(t["max_workers"] for t in types.values())
    assert spec["docker"]["image"].startswith("rayproject/ray:2.60.0")  # the pinned Ray
    head = " ".join(spec["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head and "--dashboard-port=8265" in head
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in spec["worker_start_ray_commands"])
    # the repo is copied to every node and installed, so `python -m jobs.train` imports there
    assert spec["file_mounts"] == {"/home/ray/esmm": "."}
    assert "pip install -q -e /home/ray/esmm" in spec["setup_commands"]
    assert spec["setup_commands"][0] == "pip install -q torch==2.13.0"


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


def test_dockerfile_matches_pins():
    text = (INFRA / "k8s/Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in text
    assert text.index("torch==2.13.0") < text.index("pip install --no-cache-dir -e /app")
    for spec in ("k8s/rayjob.yaml", "k8s/sparkapplication.yaml"):
        assert "ghcr.io/example/esmm:0.1.0" in (INFRA / spec).read_text()
