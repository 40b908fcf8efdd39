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
  plain         a minimal plain-PyTorch loop over in-memory tensors: one nn.Embedding
                (sparse grads) + SparseAdam, Adam on the towers, loss from logits
  rechub        torch-rechub 0.9.0: its ESMM + DataGenerator + MTLTrainer.train_one_epoch,
                as its Ali-CCP example runs it (its MLP adds BatchNorm; dense Adam, wd 1e-5)
  deepctr       DeepCTR-Torch 0.3.0: its ESMM (towers 200-80, final Linear) with
                compile("adam", bce x2) and fit(verbose=2), its defaults (L2 1e-5 on embeddings)

The peers run in bench/.venv-peers (``bash bench/setup_peers.sh``); the project's
contenders in the interpreter running this script. Every child gets OMP_WAIT_POLICY=PASSIVE
(``--omp-active`` to leave it): on a shared machine torch's spinning OpenMP threads otherwise
time each other out (measured here: 1.3k -> 18.8k samples/s for the same run). Training time is the epoch loop only;
loading the split into memory is timed apart ("load_s"). Then each scores the test split:
CTR AUC (all), CTCVR AUC (all), CVR AUC (clicked), exact global AUCs.

    .venv/bin/python bench/train.py                       # 1M rows, all contenders
    .venv/bin/python bench/train.py --rows 200000 --only ours,plain
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
sys.path.insert(0, str(ROOT))
import aliccp_like  # noqa: E402

DIM, HIDDEN, BATCH, LR = 18, (200, 80), 2048, 1e-3
CONTENDERS = ["ours", "ours-bf16", "ours-ref", "plain", "rechub", "deepctr"]
PEERS = {"rechub", "deepctr"}
PEERS_PY = HERE / ".venv-peers" / "bin" / "python"


# ------------------------------------------------------------------ contenders (run in a child)

class StepTimer:
    """Forward pre-hook that stamps each training step's start; the gaps between stamps
    are whole steps (batch, forward, backward, optimizer). A low percentile of them is
    a load-robust speed figure: a step that ran without being preempted."""

    def __init__(self):
        self.stamps: list[float] = []
        self.on = True

    def __call__(self, module, args):
        if self.on:
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
    with Clock() as c:
        model, res = train_model("esmm", train, cfg, tcfg, embedding_factory=factory, progress=False)
    timer.on = False
    p = predict(model, test)
    return {"train_s": c.wall, "cpu_s": c.cpu, "load_s": load_s, "steps": res["steps"], "rows": len(train) * epochs,
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


RUNNERS = {"ours": run_ours, "ours-ref": lambda d, e, t: run_ours(d, e, t, embedding="plain"),
           "ours-bf16": lambda d, e, t: run_ours(d, e, t, tower_precision="bf16"),
           "plain": run_plain, "rechub": run_rechub, "deepctr": run_deepctr}


def child(name: str, data_dir: str, epochs: int, threads: int, out: str) -> None:
    r = RUNNERS[name](data_dir, epochs, threads)
    test, _ = aliccp_like.read_shards(data_dir)
    aucs = aliccp_like.esmm_aucs(test["test"], np.asarray(r.pop("p_ctr"), np.float64),
                                 np.asarray(r.pop("p_cvr"), np.float64))
    r.update(aucs, samples_per_s=r["rows"] / r["train_s"], samples_per_cpu_s=r["rows"] / r["cpu_s"], name=name,
             loadavg=os.getloadavg()[0])
    Path(out).write_text(json.dumps(r))


# ------------------------------------------------------------------ parent

def ensure_data(data_dir: str, rows: int, test_rows: int, seed: int) -> None:
    m = Path(data_dir) / "manifest.json"
    if m.is_file():
        sp = json.loads(m.read_text())["splits"]
        if sp["train"]["impressions"] == rows and sp["test"]["impressions"] == test_rows:
            return
    t = time.perf_counter()
    aliccp_like.write_shards(aliccp_like.make(rows, test_rows, seed), data_dir)
    print(f"wrote {rows} + {test_rows} rows to {data_dir} in {time.perf_counter() - t:.1f}s", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(HERE / "out" / "aliccp_like"), help="shards + manifest (made if missing)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--test-rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(CONTENDERS), help=f"comma list of {CONTENDERS}")
    ap.add_argument("--peers-python", default=str(PEERS_PY))
    ap.add_argument("--workers", default="", help="also W data-parallel gloo workers (sharded embedding + DDP), "
                    "e.g. 1,2: bench/train_workers.py on its synthetic batches")
    ap.add_argument("--omp-active", action="store_true",
                    help="leave OMP_WAIT_POLICY alone (default: PASSIVE for every contender, so threads that wait "
                         "sleep instead of spinning: on a shared machine spinning threads time each other out)")
    ap.add_argument("--json", default=None, help="also write all results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.data, a.epochs, a.threads, a.child_out)
        return 0
    names = [n for n in a.only.split(",") if n]
    for n in names:
        if n not in RUNNERS:
            print(f"error: unknown contender {n!r} (have {CONTENDERS})", file=sys.stderr)
            return 2
    ensure_data(a.data, a.rows, a.test_rows, a.seed)
    truth = aliccp_like.make(a.rows, a.test_rows, a.seed)["test"]  # same seed: the true probabilities
    oracle = aliccp_like.esmm_aucs(truth, truth.p_click, truth.p_cvr)
    print(f"oracle (true probabilities): CTR {oracle['ctr_auc']:.4f}  CTCVR {oracle['ctcvr_auc']:.4f}  "
          f"CVR(clicked) {oracle['cvr_auc_clicked']:.4f}; test {int(truth.click.sum())} clicks, "
          f"{int(truth.conversion.sum())} conversions", flush=True)
    del truth
    results = []
    for n in names:
        py = a.peers_python if n in PEERS else sys.executable
        if n in PEERS and not os.path.exists(py):
            print(f"{n}: skipped, no {py} (run: bash bench/setup_peers.sh)", flush=True)
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [py, __file__, "--child", n, "--child-out", out, "--data", a.data,
               "--epochs", str(a.epochs), "--threads", str(a.threads)]
        t = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if not a.omp_active:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if proc.returncode != 0:
            print(f"{n}: FAILED (exit {proc.returncode}) after {time.perf_counter() - t:.0f}s\n"
                  + proc.stdout[-3000:], flush=True)
            continue
        r = json.loads(Path(out).read_text())
        os.unlink(out)
        results.append(r)
        print(f"{n:12s} {r['samples_per_s']:9,.0f} samples/s wall, {r.get('samples_per_s_p10', 0):,.0f} at the p10 step, "
              f"{r['samples_per_cpu_s']:,.0f} per CPU-s; train {r['train_s']:.1f}s, load {r['load_s']:.1f}s; "
              f"CTR {r['ctr_auc']:.4f} CTCVR {r['ctcvr_auc']:.4f} CVR(clicked) {r['cvr_auc_clicked']:.4f}; "
              f"load avg {r['loadavg']:.1f}", flush=True)
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
    peers = [r for r in results if r["name"] in PEERS]
    keys = [("samples_per_s", "wall"), ("samples_per_s_p10", "p10 step"), ("samples_per_cpu_s", "per CPU-s")]
    refs = {k: max(peers, key=lambda r: r.get(k, 0)) for k, _ in keys} if peers else {}
    print(f"\nESMM dim {DIM}, towers {HIDDEN[0]}-{HIDDEN[1]}-1, batch {BATCH}, {a.threads} threads "
          f"(OMP_WAIT_POLICY={'as set' if a.omp_active else 'PASSIVE'}), "
          f"{a.epochs} epoch(s) of {a.rows:,} rows, {len(aliccp_like.FIELDS)} fields, test {a.test_rows:,} rows.\n"
          "samples/s three ways, each with its ratio to the faster peer: wall = rows / epoch time; p10 step =\n"
          "batch / 10th-percentile step time (steps not preempted: the figure to trust on a shared machine);\n"
          "per CPU-s = rows / process CPU time (all threads).")
    print(f"{'contender':12s}" + "".join(f" {lbl:>11s} {'ratio':>6s}" for _, lbl in keys)
          + f"  {'CTR AUC':>8s} {'CTCVR AUC':>9s} {'CVR AUC':>8s}  what was measured")
    for r in results:
        cells = ""
        for k, _ in keys:
            ratio = f"{r.get(k, 0) / refs[k][k]:.2f}x" if refs and refs[k].get(k) else "-"
            cells += f" {r.get(k, 0):11,.0f} {ratio:>6s}"
        print(f"{r['name']:12s}{cells}  {r['ctr_auc']:8.4f} {r['ctcvr_auc']:9.4f} {r['cvr_auc_clicked']:8.4f}  "
              f"{r['what']}")
    if refs:
        print("faster peer: " + ", ".join(f"{lbl} {refs[k]['name']}" for k, lbl in keys)
              + "; target: ours >= 3x it at equal or better AUC after the same epochs")
    load = os.getloadavg()
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "oracle": oracle, "results": results, "loadavg": load,
                                            "workers": workers},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
