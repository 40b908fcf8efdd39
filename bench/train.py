"""Training samples/s of ESMM, the project's trainer beside what users would pick instead.

Same data (Ali-CCP-shaped shards from bench/aliccp_like.py, 23 single-valued fields),
same shape (embedding dim 18, towers 200-80-1, batch 2048, 2 torch threads), same
number of epochs, one contender per fresh subprocess, one after another:

  ours          the project's trainer as ``esmm train`` runs it: train.data.load_split ->
                train.local.train_model("esmm") -> train.loop.fit with the default
                EsmmConfig embedding (train/shard's collection at world size 1, lazy Adam
                rows); every row trains (no hold-out), no early stopping
  ours-bf16     ours with EsmmConfig(tower_precision="bf16"): the towers under bf16 autocast
                (fp32 weights, rows and losses), for CPUs with avx512_bf16 / AMX
  ours-ref      the same with embedding="plain": the reference EmbeddingCollection
                (one sparse-gradient table + torch.optim.SparseAdam)
  ours-before   ours with another checkout's train/ (``--ours-from CHECKOUT``): before/after in one run
  plain         a minimal plain-PyTorch loop over in-memory tensors: one nn.Embedding
                (sparse grads) + SparseAdam, Adam on the towers, loss from logits
  rechub        torch-rechub 0.9.0: its ESMM + DataGenerator + MTLTrainer.train_one_epoch,
                as its Ali-CCP example runs it (its MLP adds BatchNorm; dense Adam, wd 1e-5)
  deepctr       DeepCTR-Torch 0.3.0: its ESMM (towers 200-80, final Linear) with
                compile("adam", bce x2) and fit(verbose=2), its defaults (L2 1e-5 on embeddings)

The peers run in bench/.venv-peers (``bash bench/setup_peers.sh``); the project's
contenders in the interpreter running this script. Every child gets the OpenMP wait policy
the ``esmm`` jobs run with (``--omp esmm``, default: spin ~50 us, then sleep; jobs/common.py),
or ``--omp passive`` (sleep at once; the policy of the figures before the fourth session
of 2026-12-04), or ``--omp asis`` (this shell's; libgomp's own default spins ~3 ms, and on a shared
machine such threads time each other out: 1.3k -> 18.8k samples/s once here), and the malloc
settings ``esmm train`` uses (``--malloc esmm``, default: train/malloc.py) or glibc's own
(``--malloc default``; every figure before the fifth session of 2026-12-04). Training time is the epoch loop only;
loading the split into memory is timed apart ("load_s"). Then each scores the test split:
CTR AUC (all), CTCVR AUC (all), CVR AUC (clicked), exact global AUCs.

The same run measures the GEMM ceiling (``--ceiling``, on by default): the model's own
matmuls of one training step (forward, input and weight gradients of every tower layer,
fp32, the same threads), timed alone; ``batch / that time`` is the most samples/s any
trainer of this model could reach here, and each contender is printed as a fraction of it.
It is timed before and after the contenders and the faster of the two is kept.

``--data DIR`` runs every contender on any data root with a manifest (``esmm etl`` or
``esmm aliccp`` output, or bench/aliccp_like.py's); an existing manifest is never
rewritten. The plain loop and the peers read single-valued fields only.

    .venv/bin/python bench/train.py                       # 1M rows, all contenders
    .venv/bin/python bench/train.py --rows 200000 --only ours,plain
    .venv/bin/python bench/train.py --vocab real --only ours,plain   # Ali-CCP's vocabulary sizes
    .venv/bin/python bench/train.py --data DATA --only ours,plain    # someone else's shards
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
# BENCH_CODE_ROOT (set by --ours-from for the "ours-before" child): another checkout's train/
sys.path.insert(0, os.environ.get("BENCH_CODE_ROOT") or str(ROOT))
import aliccp_like  # noqa: E402

SHELL_ENV = dict(os.environ)  # before jobs.common (omp_env) sets esmm's OpenMP policy in this process

DIM, HIDDEN, BATCH, LR = 18, (200, 80), 2048, 1e-3
CONTENDERS = ["ours", "ours-bf16", "ours-ref", "plain", "rechub", "deepctr", "ours-before"]
PEERS = {"rechub", "deepctr"}
PEERS_PY = HERE / ".venv-peers" / "bin" / "python"


# ------------------------------------------------------------------ contenders (run in a child)

class StepTimer:
    """Forward pre-hook that stamps each training step's start; the gaps between stamps
    are whole steps (batch, forward, backward, optimizer). A low percentile of them is
    a load-robust speed figure: a step that ran without being preempted."""

    def __init__(self):
        self.stamps: list[float] = []
        self.first_cpu = None
        self.on = True

    def __call__(self, module, args):
        if self.on:
            if not self.stamps:
                self.first_cpu = time.process_time()
            self.stamps.append(time.perf_counter())

    def summary(self, batch: int) -> dict:
        d = np.diff(np.asarray(self.stamps))
        if len(d) < 3:
            return {}
        return {"step_ms_p10": 1000 * float(np.percentile(d, 10)), "step_ms_p50": 1000 * float(np.median(d)),
                "samples_per_s_p10": batch / float(np.percentile(d, 10)),
                "samples_per_s_p50": batch / float(np.median(d)), "timed_steps": int(len(d))}


class Clock:
    """Wall and process-CPU seconds of a block: on a loaded machine the wall time also
    counts waiting for a core, the CPU time (all threads) much less so."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    torch.manual_seed(0)


def run_ours(data_dir: str, epochs: int, threads: int, embedding: str | None = None,
             tower_precision: str = "fp32") -> dict:
    """What ``esmm train --model esmm`` runs (train.local.train_model), minus its hold-out.

    ``embedding`` None keeps the project's default (EsmmConfig.embedding), else "plain"
    (the reference EmbeddingCollection + SparseAdam) or "sharded" (world size 1)."""
    from train.data import load_manifest, load_split, manifest_fields
    from train.evaluate import predict
    from train.local import train_model
    from train.loop import TrainConfig
    from train.model import EsmmConfig, default_embedding_factory

    _threads(threads)
    t = time.perf_counter()
    manifest = load_manifest(data_dir)
    fields = manifest_fields(manifest)
    train = load_split(data_dir, "train", fields, manifest)
    test = load_split(data_dir, "test", fields, manifest)
    load_s = time.perf_counter() - t
    cfg = EsmmConfig(dim=DIM, hidden=HIDDEN, lr=LR, tower_precision=tower_precision)
    if embedding is not None:
        cfg = EsmmConfig.from_dict({**cfg.to_dict(), "embedding": embedding})
    make = default_embedding_factory(cfg)
    timer = StepTimer()

    def factory(fs, dim):  # the project's own embedding, with the step timer on it
        emb = make(fs, dim)
        emb.register_forward_pre_hook(timer)
        return emb

    # every row trains (the peers hold nothing out), no early stopping, same epochs
    tcfg = TrainConfig(epochs=epochs, batch_size=BATCH, threads=threads, patience=0, val_fraction=0.0)
    print(f"{len(train):,} train rows, {sum(f.vocab_size for f in fields):,} embedding rows", flush=True)
    with Clock() as c:
        model, res = train_model("esmm", train, cfg, tcfg, embedding_factory=factory, progress=False)
    timer.on = False
    # training time from the first step on, like the plain loop's: building the model (row
    # init, optimizer state: seconds at ~9M rows) is setup, reported apart
    end_wall, end_cpu = c.w + c.wall, c.c + c.cpu
    train_s, cpu_s = end_wall - timer.stamps[0], end_cpu - timer.first_cpu
    p = predict(model, test)
    return {"train_s": train_s, "cpu_s": cpu_s, "setup_s": c.wall - train_s, "load_s": load_s,
            "steps": res["steps"], "rows": len(train) * epochs,
            "p_ctr": p["p_ctr"], "p_cvr": p["p_cvr"], **timer.summary(BATCH),
            "what": f"train.local.train_model('esmm'), embedding={cfg.embedding} "
                    f"({type(model.embeddings[0]).__name__}), sparse {cfg.sparse_optimizer}"}


def run_plain(data_dir: str, epochs: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    _threads(threads)
    t = time.perf_counter()
    data, fields = aliccp_like.read_shards(data_dir)
    sizes = torch.tensor([f["vocab_size"] for f in fields])
    base = torch.cumsum(sizes, 0) - sizes
    x = torch.from_numpy(data["train"].ids) + base  # global row ids, [N, F]
    y = torch.from_numpy(data["train"].click).float()
    z = torch.from_numpy(data["train"].conversion).float()
    xt = torch.from_numpy(data["test"].ids) + base
    load_s = time.perf_counter() - t

    def tower():
        return nn.Sequential(nn.Linear(len(fields) * DIM, HIDDEN[0]), nn.ReLU(),
                             nn.Linear(HIDDEN[0], HIDDEN[1]), nn.ReLU(), nn.Linear(HIDDEN[1], 1))

    emb = nn.Embedding(int(sizes.sum()), DIM, sparse=True)
    nn.init.normal_(emb.weight, std=0.01)
    ctr, cvr = tower(), tower()
    opt_s = torch.optim.SparseAdam(emb.parameters(), lr=LR)
    opt_d = torch.optim.Adam([*ctr.parameters(), *cvr.parameters()], lr=LR)
    timer = StepTimer()
    emb.register_forward_pre_hook(timer)

    def forward(ids):
        e = emb(ids).flatten(1)
        return ctr(e).squeeze(-1), cvr(e).squeeze(-1)

    n, steps = len(y), 0
    c = Clock().__enter__()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for s in range(0, n, BATCH):
            idx = perm[s:s + BATCH]
            a, b = forward(x[idx])
            yb, zb = y[idx], z[idx]
            log_p = (F.logsigmoid(a) + F.logsigmoid(b)).clamp(max=-1e-7)
            loss = F.binary_cross_entropy_with_logits(a, yb) \
                - (yb * zb * log_p + (1 - yb * zb) * torch.log(-torch.expm1(log_p))).mean()
            opt_s.zero_grad()
            opt_d.zero_grad()
            loss.backward()
            opt_s.step()
            opt_d.step()
            steps += 1
    c.__exit__()
    timer.on = False
    with torch.no_grad():
        outs = [forward(xt[s:s + 65536]) for s in range(0, len(xt), 65536)]
    a = torch.cat([o[0] for o in outs]).sigmoid().double().numpy()
    b = torch.cat([o[1] for o in outs]).sigmoid().double().numpy()
    return {"train_s": c.wall, "cpu_s": c.cpu, "load_s": load_s, "steps": steps, "rows": n * epochs, "p_ctr": a, "p_cvr": b,
            **timer.summary(BATCH), "what": "nn.Embedding(sparse) + SparseAdam, Adam towers, tensors in memory"}


def run_rechub(data_dir: str, epochs: int, threads: int) -> dict:
    import torch
    from torch_rechub.basic.features import SparseFeature
    from torch_rechub.models.multi_task import ESMM
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    _threads(threads)
    t = time.perf_counter()
    data, fields = aliccp_like.read_shards(data_dir)
    names = [f["name"] for f in fields]
    group = {f["name"]: f.get("group") for f in fields}

    def xy(s):
        x = {n: s.ids[:, i] for i, n in enumerate(names)}
        # rechub's ESMM label order: cvr, ctr, ctcvr (its loss uses ctr and ctcvr only)
        y = np.stack([s.conversion, s.click, s.conversion], axis=1).astype(np.float32)
        return x, y

    x_tr, y_tr = xy(data["train"])
    x_te, y_te = xy(data["test"])
    user = [SparseFeature(n, f["vocab_size"], embed_dim=DIM) for n, f in zip(names, fields) if group[n] == "user"]
    item = [SparseFeature(n, f["vocab_size"], embed_dim=DIM) for n, f in zip(names, fields) if group[n] != "user"]
    model = ESMM(user, item, cvr_params={"dims": list(HIDDEN)}, ctr_params={"dims": list(HIDDEN)})
    train_dl, _, test_dl = DataGenerator(x_tr, y_tr).generate_dataloader(
        x_val=x_te, y_val=y_te, x_test=x_te, y_test=y_te, batch_size=BATCH)
    tmp = tempfile.mkdtemp(prefix="bench_rechub_")
    trainer = MTLTrainer(model, task_types=["classification"] * 3, n_epoch=epochs, device="cpu", model_path=tmp)
    load_s = time.perf_counter() - t
    timer = StepTimer()
    model.register_forward_pre_hook(timer)
    with Clock() as c:
        for _ in range(epochs):  # fit() = this + a validation pass per epoch + saving; we time the training
            trainer.train_one_epoch(train_dl)
    timer.on = False
    model.eval()
    with torch.no_grad():
        n = len(y_te)
        outs = [model({k: torch.from_numpy(v[s:s + 65536]) for k, v in x_te.items()}) for s in range(0, n, 65536)]
    out = torch.cat(outs).double().numpy()  # columns: cvr, ctr, ctcvr
    return {"train_s": c.wall, "cpu_s": c.cpu, "load_s": load_s, "steps": len(train_dl) * epochs, "rows": len(y_tr) * epochs,
            "p_ctr": out[:, 1], "p_cvr": out[:, 0], **timer.summary(BATCH),
            "what": "torch_rechub ESMM + DataGenerator + MTLTrainer.train_one_epoch (MLP with BatchNorm)"}


def run_deepctr(data_dir: str, epochs: int, threads: int) -> dict:
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import ESMM

    _threads(threads)
    t = time.perf_counter()
    data, fields = aliccp_like.read_shards(data_dir)
    names = [f["name"] for f in fields]
    feats = [SparseFeat(n, vocabulary_size=f["vocab_size"], embedding_dim=DIM) for n, f in zip(names, fields)]
    model = ESMM(feats, tower_dnn_hidden_units=HIDDEN, task_names=("ctr", "ctcvr"), device="cpu")
    model.compile("adam", loss=["binary_crossentropy", "binary_crossentropy"])
    tr, te = data["train"], data["test"]
    x_tr = {n: tr.ids[:, i] for i, n in enumerate(names)}
    y_tr = np.stack([tr.click, tr.conversion], axis=1).astype(np.float32)
    x_te = {n: te.ids[:, i] for i, n in enumerate(names)}
    load_s = time.perf_counter() - t
    timer = StepTimer()
    model.register_forward_pre_hook(timer)
    with Clock() as c:
        model.fit(x_tr, y_tr, batch_size=BATCH, epochs=epochs, verbose=2, shuffle=True)
    timer.on = False
    out = model.predict(x_te, batch_size=65536)  # columns: ctr, ctcvr
    p_ctr = out[:, 0]
    p_cvr = np.clip(out[:, 1] / np.maximum(p_ctr, 1e-12), 0, 1)  # = its cvr sigmoid, up to rounding
    return {"train_s": c.wall, "cpu_s": c.cpu, "load_s": load_s, "steps": -(-len(y_tr) // BATCH) * epochs, "rows": len(y_tr) * epochs,
            "p_ctr": p_ctr, "p_cvr": p_cvr, **timer.summary(BATCH),
            "what": "deepctr_torch ESMM (DNN 200-80 + Linear(80,1)) compile('adam') + fit(verbose=2)"}


def gemm_step_flops(in_dim: int, hidden=HIDDEN, towers: int = 2) -> int:
    """FLOPs per sample of one training step's matmuls: 2 per multiply-add, forward + input
    gradient + weight gradient (3x), every layer of every tower."""
    dims = [in_dim, *hidden, 1]
    return 2 * 3 * towers * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def run_ceiling(data_dir: str, threads: int, reps: int = 60) -> dict:
    """The model's GEMMs of one step, fp32, alone: [B, in] x [in, out] forward, [B, out] x
    [out, in] for the input's gradient, [out, B] x [B, in] for the weight's, per layer and
    tower (what torch's Linear runs). p10 over ``reps`` steps, wall and process CPU time.

    Beside it, the same products as ours runs them (``own``, train.fused_towers): both
    towers' first layers as one matmul, by oneDNN where torch has it (forward with its bias
    and ReLU, and the input's gradient), else MKL with the input's gradient 16-column
    aligned; the weight gradient as ``x^T g``. Ours' step against that is the share of its
    step that is matmuls: it can beat the ceiling above, not this one."""
    import torch

    from train.fused_towers import _first_weights, _onednn

    _threads(threads)
    with open(os.path.join(data_dir, "manifest.json")) as f:
        in_dim = len(json.load(f)["fields"]) * DIM
    dims = [in_dim, *HIDDEN, 1]
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(2):
        for a, b in zip(dims[:-1], dims[1:]):
            layers.append((torch.randn(BATCH, a, generator=g), torch.randn(b, a, generator=g),
                           torch.randn(BATCH, b, generator=g)))
    x1, firsts = layers[0][0], [layers[0][1], layers[len(dims) - 1][1]]  # each tower's first layer
    g1, b1 = torch.randn(BATCH, 2 * HIDDEN[0], generator=g), torch.zeros(2 * HIDDEN[0])
    w1 = _first_weights(firsts, x1)  # as ours stacks them for MKL (16-column aligned)
    w1c, w1t = torch.cat(firsts), torch.cat([w.t() for w in firsts], 1)  # as ours gives them to oneDNN
    dnnl = _onednn(x1)
    upper = [lay for i, lay in enumerate(layers) if i % (len(dims) - 1) != 0]  # every layer but the first

    def step():
        for x, w, gy in layers:
            torch.mm(x, w.t())  # forward
            torch.mm(gy, w)  # input gradient
            torch.mm(gy.t(), x)  # weight gradient

    def own():
        if dnnl is not None:
            dnnl(x1, w1c, b1, "relu", [], "")
            dnnl(g1, w1t, None, "none", [], "")
        else:
            torch.mm(x1, w1[:, :in_dim].t())
            torch.mm(g1, w1)
        torch.mm(x1.t(), g1)
        for x, w, gy in upper:
            torch.mm(x, w.t())
            torch.mm(gy, w)
            torch.mm(gy.t(), x)

    for _ in range(5):
        step()
        own()
    walls, cpus, owns = [], [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        t = time.perf_counter()
        own()
        owns.append(time.perf_counter() - t)
    flops = gemm_step_flops(in_dim) * BATCH
    w10, wmed, c10 = (float(np.percentile(walls, 10)), float(np.median(walls)), float(np.percentile(cpus, 10)))
    o10 = float(np.percentile(owns, 10))
    return {"name": "gemm-ceiling", "in_dim": in_dim, "flops_per_sample": gemm_step_flops(in_dim),
            "gemm_ms_p10": 1000 * w10, "gflops_p10": flops / w10 / 1e9, "samples_per_s_p10": BATCH / w10,
            "samples_per_s_p50": BATCH / wmed, "samples_per_cpu_s": BATCH / c10, "loadavg": os.getloadavg()[0],
            "own_gemm_ms_p10": 1000 * o10, "own_samples_per_s_p10": BATCH / o10,
            "own_how": "first layers fused, " + ("by oneDNN" if dnnl is not None else "the input gradient 16-column aligned")}


RUNNERS = {"ours": run_ours, "ours-before": run_ours, "ours-ref": lambda d, e, t: run_ours(d, e, t, embedding="plain"),
           "ours-bf16": lambda d, e, t: run_ours(d, e, t, tower_precision="bf16"),
           "plain": run_plain, "rechub": run_rechub, "deepctr": run_deepctr}


def child(name: str, data_dir: str, epochs: int, threads: int, out: str) -> None:
    import same_malloc

    same_malloc.apply()  # every contender, the ceiling too, under the same malloc settings (--malloc)
    if name == "gemm-ceiling":
        Path(out).write_text(json.dumps(run_ceiling(data_dir, threads)))
        return
    r = RUNNERS[name](data_dir, epochs, threads)
    test = test_labels(data_dir)
    aucs = aliccp_like.esmm_aucs(test, np.asarray(r.pop("p_ctr"), np.float64),
                                 np.asarray(r.pop("p_cvr"), np.float64))
    r.update(aucs, samples_per_s=r["rows"] / r["train_s"], samples_per_cpu_s=r["rows"] / r["cpu_s"], name=name,
             loadavg=os.getloadavg()[0])
    Path(out).write_text(json.dumps(r))


# ------------------------------------------------------------------ parent

def test_labels(data_dir: str) -> aliccp_like.Split:
    """The test split's labels (any data root: list columns of any length are fine here)."""
    import pyarrow.parquet as pq

    with open(os.path.join(data_dir, "manifest.json")) as f:
        files = json.load(f)["splits"]["test"]["files"]
    t = [pq.read_table(os.path.join(data_dir, x), columns=["click", "conversion"]) for x in files]
    click = np.concatenate([x.column("click").to_numpy() for x in t]).astype(np.int8)
    conv = np.concatenate([x.column("conversion").to_numpy() for x in t]).astype(np.int8)
    return aliccp_like.Split(np.zeros((len(click), 0), np.int64), click, conv)


def ensure_data(data_dir: str, rows: int, test_rows: int, seed: int, vocab: str, own: bool) -> dict:
    """The manifest of ``data_dir``; bench data is written there first when it has none (or,
    for the bench's own default folder only, when it was made with other rows/seed/vocab)."""
    m = Path(data_dir) / "manifest.json"
    if m.is_file():
        man = json.loads(m.read_text())
        if not own:
            return man
        sp, b = man["splits"], man.get("bench", {})
        if (sp["train"]["impressions"], sp["test"]["impressions"], b.get("seed"), b.get("vocab")) == \
                (rows, test_rows, seed, vocab):
            return man
    t = time.perf_counter()
    aliccp_like.write_shards(aliccp_like.make(rows, test_rows, seed, vocab), data_dir, vocab=vocab, seed=seed)
    print(f"wrote {rows} + {test_rows} rows ({vocab} vocabularies) to {data_dir} in {time.perf_counter() - t:.1f}s",
          flush=True)
    return json.loads(m.read_text())


def omp_env(env: dict, policy: str) -> dict:
    """``env`` with the OpenMP wait policy ``--omp`` names (esmm | passive | asis)."""
    if policy == "asis":
        return env
    env = {k: v for k, v in env.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy == "passive":
        return {**env, "OMP_WAIT_POLICY": "PASSIVE"}
    from jobs.common import OMP_SPIN  # this checkout's (a child of another checkout never gets here)

    return {**env, "GOMP_SPINCOUNT": OMP_SPIN}


def malloc_env(env: dict, policy: str) -> dict:
    """``env`` with the malloc settings ``--malloc`` names: esmm's (train/malloc.py; the user's
    own ``MALLOC_*`` / ``GLIBC_TUNABLES`` dropped) or glibc's defaults."""
    from train.malloc import tunes_malloc  # this checkout's (a child of another checkout never gets here)

    env = {k: v for k, v in env.items() if not (tunes_malloc(k) or k == "ESMM_MALLOC")}
    return {**env, "ESMM_MALLOC": "default"} if policy == "default" else env


def spawn(name: str, py: str, a, omp: str, code_root: str | None = None) -> dict | None:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [py, __file__, "--child", name, "--child-out", out, "--data", a.data,
           "--epochs", str(a.epochs), "--threads", str(a.threads)]
    t = time.perf_counter()
    env = {**SHELL_ENV, "PYTHONPATH": code_root or str(ROOT)}
    if code_root:
        env["BENCH_CODE_ROOT"] = code_root
        if (Path(code_root) / "train" / "shard" / "row_kernels.py").is_file():
            # another checkout's kernels: their own build folder (alternating sources in one
            # folder rebuilds each time), built before the run, not in its first timed step
            env["TORCH_EXTENSIONS_DIR"] = str(Path(tempfile.gettempdir()) / f"esmm-ext-{Path(code_root).name}")
            subprocess.run([py, "-c", "from train.shard import row_kernels; row_kernels.build()"], env=env,
                           cwd=code_root, check=False)  # cwd: python -c puts it first on sys.path
    env = malloc_env(omp_env(env, omp), a.malloc)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if proc.returncode != 0:
        print(f"{name}: FAILED (exit {proc.returncode}) after {time.perf_counter() - t:.0f}s\n"
              + proc.stdout[-3000:], flush=True)
        return None
    r = json.loads(Path(out).read_text())
    os.unlink(out)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None,
                    help="any data root with a manifest (used as it is); default: bench/out/aliccp_like[_real], "
                         "made (or remade) with --rows/--test-rows/--seed/--vocab")
    ap.add_argument("--vocab", choices=aliccp_like.VOCABS, default="bench",
                    help="vocabulary sizes of the generated data: bench (~0.7M rows) or real (Ali-CCP's, ~9.2M)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--test-rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(CONTENDERS), help=f"comma list of {CONTENDERS}")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the GEMM ceiling")
    ap.add_argument("--ours-from", default=None, metavar="CHECKOUT",
                    help="also run 'ours-before': ours with the train/ package of another checkout (before/after)")
    ap.add_argument("--peers-python", default=str(PEERS_PY))
    ap.add_argument("--workers", default="", help="also W data-parallel gloo workers (sharded embedding + DDP), "
                    "e.g. 1,2: bench/train_workers.py on its synthetic batches")
    ap.add_argument("--omp", choices=("esmm", "passive", "asis"), default="esmm",
                    help="every contender's OpenMP wait policy: esmm's (spin ~50 us, then sleep), passive (sleep at "
                         "once) or asis (this shell's)")
    ap.add_argument("--malloc", choices=("esmm", "default"), default="esmm",
                    help="every contender's malloc settings: esmm's (train/malloc.py: a step's tensors stay in the "
                         "heap) or glibc's defaults")
    ap.add_argument("--json", default=None, help="also write all results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.data, a.epochs, a.threads, a.child_out)
        return 0
    names = [n for n in a.only.split(",") if n]
    if a.ours_from and "ours-before" not in names:
        names.insert(0, "ours-before")
    for n in names:
        if n not in RUNNERS:
            print(f"error: unknown contender {n!r} (have {CONTENDERS})", file=sys.stderr)
            return 2
    own = a.data is None
    if own:
        a.data = str(HERE / "out" / ("aliccp_like" if a.vocab == "bench" else f"aliccp_like_{a.vocab}"))
    man = ensure_data(a.data, a.rows, a.test_rows, a.seed, a.vocab, own)
    fields = man["fields"]
    n_train, n_test = man["splits"]["train"]["impressions"], man["splits"]["test"]["impressions"]
    all_single = all(f["kind"] == "single" for f in fields)
    b = man.get("bench") or {}
    print(f"data {a.data}: {n_train:,} train rows, {n_test:,} test rows, {len(fields)} fields, "
          f"{sum(int(f['vocab_size']) for f in fields):,} embedding rows", flush=True)
    oracle = None
    if man.get("created_by") == "bench/aliccp_like.py" and b.get("seed") is not None:
        truth = aliccp_like.make(n_train, n_test, b["seed"], b.get("vocab", "bench"))["test"]
        oracle = aliccp_like.esmm_aucs(truth, truth.p_click, truth.p_cvr)
        print(f"oracle (true probabilities): CTR {oracle['ctr_auc']:.4f}  CTCVR {oracle['ctcvr_auc']:.4f}  "
              f"CVR(clicked) {oracle['cvr_auc_clicked']:.4f}; test {int(truth.click.sum())} clicks, "
              f"{int(truth.conversion.sum())} conversions", flush=True)
        del truth
    ceilings = []

    def ceiling():
        if a.no_ceiling:
            return
        r = spawn("gemm-ceiling", sys.executable, a, a.omp)
        if r:
            ceilings.append(r)
            print(f"{'GEMM ceiling':12s} {r['samples_per_s_p10']:9,.0f} samples/s (p10 step of the model's matmuls alone: "
                  f"{r['gemm_ms_p10']:.1f} ms, {r['gflops_p10']:.0f} GFLOP/s fp32 at {r['flops_per_sample'] / 1e6:.2f} "
                  f"MFLOP/sample), {r['samples_per_cpu_s']:,.0f} per CPU-s; as ours runs them: "
                  f"{r['own_samples_per_s_p10']:,.0f} ({r['own_gemm_ms_p10']:.1f} ms); load avg {r['loadavg']:.1f}",
                  flush=True)

    ceiling()
    results = []
    for n in names:
        py = a.peers_python if n in PEERS else sys.executable
        if n in PEERS and not os.path.exists(py):
            print(f"{n}: skipped, no {py} (run: bash bench/setup_peers.sh)", flush=True)
            continue
        if n == "ours-before" and not a.ours_from:
            print("ours-before: skipped, needs --ours-from CHECKOUT", flush=True)
            continue
        if not n.startswith("ours") and not all_single:
            print(f"{n}: skipped, it reads single-valued fields only and {a.data} has multi-valued ones", flush=True)
            continue
        r = spawn(n, py, a, a.omp, os.path.abspath(a.ours_from) if n == "ours-before" else None)
        if r is None:
            continue
        results.append(r)
        print(f"{n:12s} {r['samples_per_s']:9,.0f} samples/s wall, {r.get('samples_per_s_p10', 0):,.0f} at the p10 step, "
              f"{r['samples_per_cpu_s']:,.0f} per CPU-s; train {r['train_s']:.1f}s, load {r['load_s']:.1f}s; "
              f"CTR {r['ctr_auc']:.4f} CTCVR {r['ctcvr_auc']:.4f} CVR(clicked) {r['cvr_auc_clicked']:.4f}; "
              f"load avg {r['loadavg']:.1f}", flush=True)
    ceiling()
    workers = {}
    if a.workers:
        import train_workers  # helper "ray"'s bench: what each Ray Train worker runs, without Ray's start-up

        wargs = train_workers.parser().parse_args(["--threads", str(a.threads), "--dim", str(DIM),
                                                   "--batch-size", str(BATCH)])
        for w in [int(x) for x in a.workers.split(",") if x]:
            workers[w] = train_workers.samples_per_second(w, wargs)
            print(f"{w} worker(s): {workers[w]:,.0f} samples/s (global batch {BATCH}, {a.threads} threads in all; "
                  f"bench/train_workers.py)", flush=True)
    if not results:
        return 1 if not workers else 0
    keys = [("samples_per_s", "wall"), ("samples_per_s_p10", "p10 step"), ("samples_per_cpu_s", "per CPU-s")]
    # the ceiling: the faster of its two timings, per measure (wall: its p10 step as well)
    ceil = {}
    if ceilings:
        ceil = {"samples_per_s": max(c["samples_per_s_p10"] for c in ceilings),
                "samples_per_s_p10": max(c["samples_per_s_p10"] for c in ceilings),
                "samples_per_cpu_s": max(c["samples_per_cpu_s"] for c in ceilings)}
    plain = next((r for r in results if r["name"] == "plain"), None)
    peers = [r for r in results if r["name"] in PEERS]
    refs = {k: max(peers, key=lambda r: r.get(k, 0)) for k, _ in keys} if peers else {}
    print(f"\nESMM dim {DIM}, towers {HIDDEN[0]}-{HIDDEN[1]}-1, batch {BATCH}, {a.threads} threads "
          f"(OpenMP wait: {a.omp}, malloc: {a.malloc}), "
          f"{a.epochs} epoch(s) of {n_train:,} rows, {len(fields)} fields, test {n_test:,} rows.\n"
          "samples/s three ways: wall = rows / training time; p10 step = batch / 10th-percentile step time\n"
          "(steps not preempted: the figure to trust on a shared machine); per CPU-s = rows / process CPU time.\n"
          "Each as a fraction of the GEMM ceiling (/ceil), and as a ratio to the plain SparseAdam loop (/plain)"
          + (" and to the faster peer (/peer)" if refs else "") + ".")
    hdr = "".join(f" {lbl:>10s} {'/ceil':>5s} {'/plain':>6s}" + (f" {'/peer':>6s}" if refs else "") for _, lbl in keys)
    print(f"{'contender':12s}{hdr}  {'CTR AUC':>8s} {'CTCVR AUC':>9s} {'CVR AUC':>8s}  what was measured")
    if ceil:
        print(f"{'GEMM ceiling':12s}" + "".join(f" {ceil[k]:10,.0f} {'':>5s} {'':>6s}" + (f" {'':>6s}" if refs else "")
                                                 for k, _ in keys) + "  (the model's fp32 matmuls alone)")
    for r in results:
        cells = ""
        for k, _ in keys:
            v = r.get(k, 0)
            cells += f" {v:10,.0f} {(f'{v / ceil[k]:.0%}' if ceil else '-'):>5s}"
            cells += f" {(f'{v / plain[k]:.2f}x' if plain and plain.get(k) else '-'):>6s}"
            if refs:
                cells += f" {(f'{v / refs[k][k]:.2f}x' if refs[k].get(k) else '-'):>6s}"
        print(f"{r['name']:12s}{cells}  {r['ctr_auc']:8.4f} {r['ctcvr_auc']:9.4f} {r['cvr_auc_clicked']:8.4f}  "
              f"{r['what']}")
    if ceilings:  # the share of a step that is matmuls, against the matmuls as ours runs them
        own = max(c["own_samples_per_s_p10"] for c in ceilings)
        print(f"{'own GEMMs':12s} {own:10,.0f}  (the same matmuls as ours runs them: {ceilings[0]['own_how']}); "
              + ", ".join(
                  f"{r['name']} {r['samples_per_s'] / own:.0%} wall, {r.get('samples_per_s_p10', 0) / own:.0%} "
                  f"p10 step" for r in results if r["name"].startswith("ours")))
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "oracle": oracle, "results": results, "loadavg": load,
                                            "ceiling": ceilings, "workers": workers}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
