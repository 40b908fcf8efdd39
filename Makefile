# Two entry points a new user needs; both create or reuse .venv/ first.
#   make demo   simulated logs -> Spark ETL -> training/experiment, prints Table 2
#   make test   the test suite (what .ci/run runs)
# torch comes from pip's default index unless TORCH_INDEX names another, e.g. the CPU-only
# wheels (no CUDA libraries, ~200 MB instead of GBs on Linux):
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
TORCH_INDEX ?=
EXTRAS ?= train,etl,dev,airflow

.PHONY: venv demo test

$(STAMP): pyproject.toml
	@command -v java >/dev/null || { echo "error: java (17+) is required by Spark; install a JDK" >&2; exit 2; }
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first, by exact version, from TORCH_INDEX when given: the project's range accepts
	# it, so the next install keeps it instead of choosing a build itself
	$(VENV)/bin/pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install -q -e '.[$(EXTRAS)]'
	$(VENV)/bin/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda or 'none (CPU build)')"
	@# the fused row kernels, built once (g++, ninja); without them training uses torch ops
	$(VENV)/bin/python -c "from train.shard.row_kernels import build; build()"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/esmm demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=25 tests
