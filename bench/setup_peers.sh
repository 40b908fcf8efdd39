#!/usr/bin/env bash
# Builds bench/.venv-peers/ from nothing: the peer libraries bench/train.py and
# bench/shard.py compare against (torch-rechub, DeepCTR-Torch, TorchRec), kept out
# of the project's .venv so they can never change its torch.
#
#   bash bench/setup_peers.sh            # ~1.5 GB, about a minute with a warm pip cache
#
# torch goes first, by exact version (a loose requirement pulls a multi-GB CUDA
# build); every peer then goes in with --no-deps, and its real remaining
# dependencies by hand, so none of them can replace torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
VENV=bench/.venv-peers
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q torch==2.13.0
"$PIP" install -q --no-deps torch-rechub==0.9.0 deepctr-torch==0.3.0 \
    fbgemm-gpu-cpu==1.8.0 torchrec==1.9.2
# what they import: rechub/deepctr -> numpy pandas scikit-learn tqdm requests;
# torchrec -> iopath pyre-extensions tensordict torchmetrics (pinned by torchrec 1.9.2);
# pyarrow reads the project's shards. (pip then warns "torchrec requires fbgemm-gpu": the
# CPU build, fbgemm-gpu-cpu, provides the same fbgemm_gpu module under another name.)
"$PIP" install -q numpy "pandas<3" scikit-learn tqdm requests pyarrow \
    iopath pyre-extensions tensordict torchmetrics==1.0.3
# the project itself (bench/ imports train/ for the shared model pieces), without deps
"$PIP" install -q --no-deps -e .
"$VENV/bin/python" - <<'PY'
import torch, torchrec, fbgemm_gpu, torch_rechub, deepctr_torch  # noqa: F401
from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("peers venv ok: torch", torch.__version__)
PY
