# Two entry points a new user needs; both create or reuse .venv/ first.
#   make demo   simulated logs -> Spark ETL -> training/experiment, prints Table 2
#   make test   the test suite (what .ci/run runs)
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: venv demo test

$(STAMP): pyproject.toml
	@command -v java >/dev/null || { echo "error: java (17+) is required by Spark; install a JDK" >&2; exit 2; }
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first, by exact version: a loose requirement would pull a multi-GB CUDA build
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev,airflow]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/esmm demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests
