"""Where the project's ESMM training step spends its time (torch.profiler, CPU).

Runs ``--steps`` training steps of train.local.train_model's loop pieces (the same
batches, model and optimizers ``esmm train`` uses) on bench/aliccp_like.py data and
prints a per-phase split (batch building, forward+loss, backward, optimizer steps):
the minimum and the median over the steps. On a shared machine the minimum is the
load-robust figure (a phase of a few ms often runs unpreempted), so the sum of the
minima estimates the step on a quiet machine. Then, with ``--torch-profile``, the top
operators by self CPU time.

    .venv/bin/python bench/profile_train.py --steps 40 [--sharded] [--torch-profile]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def main(argv=None) -> int:
    import torch

    import aliccp_like
    from train.data import load_manifest, load_split, manifest_fields
    from train.model import ESMM, EsmmConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/tmp/bench_profile")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sharded", action="store_true", help="ShardedEmbeddingCollection (world 1)")
    ap.add_argument("--plain", action="store_true", help="the plain loop of bench/train.py instead (reference)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--torch-profile", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not (Path(a.data) / "manifest.json").is_file():
        aliccp_like.write_shards(aliccp_like.make(a.rows, 1000, 0), a.data)
    m = load_manifest(a.data)
    fields = manifest_fields(m)
    train = load_split(a.data, "train", fields, m)
    cfg = EsmmConfig()
    factory = None
    if a.sharded:
        from train.shard import ShardedEmbeddingCollection

        factory = lambda fs, dim: ShardedEmbeddingCollection(fs, dim, init_std=cfg.init_std)  # noqa: E731
    model = ESMM(fields, cfg, embedding_factory=factory)
    opts = model.make_optimizers()
    phases = {"batch": 0.0, "forward+loss": 0.0, "backward": 0.0, "optimizer": 0.0}

    def forever():
        epoch = 0
        while True:
            yield from train.batches(2048, shuffle=True, seed=0, epoch=epoch, drop_last=True)
            epoch += 1

    it = forever()
    next_batch, loss_of = (lambda: next(it)), model.loss

    if a.plain:  # bench/train.py's plain loop: an [N, F] id matrix, one nn.Embedding, SparseAdam
        import itertools

        import torch.nn.functional as F
        from torch import nn

        data, fd = aliccp_like.read_shards(a.data)
        sizes = torch.tensor([f["vocab_size"] for f in fd])
        x = torch.from_numpy(data["train"].ids) + (torch.cumsum(sizes, 0) - sizes)
        y = torch.from_numpy(data["train"].click).float()
        z = torch.from_numpy(data["train"].conversion).float()
        emb = nn.Embedding(int(sizes.sum()), 18, sparse=True)
        tw = [nn.Sequential(nn.Linear(23 * 18, 200), nn.ReLU(), nn.Linear(200, 80), nn.ReLU(), nn.Linear(80, 1))
              for _ in range(2)]
        opts = [torch.optim.SparseAdam(emb.parameters(), lr=1e-3),
                torch.optim.Adam([*tw[0].parameters(), *tw[1].parameters()], lr=1e-3)]
        perm, step_no = torch.randperm(len(y)), itertools.count()

        def next_batch():
            idx = perm[(next(step_no) * 2048) % (len(y) - 2048):][:2048]
            return x[idx], y[idx], z[idx]

        def loss_of(batch):
            xb, yb, zb = batch
            e = emb(xb).flatten(1)
            ca, cb = tw[0](e).squeeze(-1), tw[1](e).squeeze(-1)
            lp = (F.logsigmoid(ca) + F.logsigmoid(cb)).clamp(max=-1e-7)
            return F.binary_cross_entropy_with_logits(ca, yb) - (yb * zb * lp + (1 - yb * zb)
                                                                 * torch.log(-torch.expm1(lp))).mean()

    def steps(n):  # per step: seconds of each phase
        for _ in range(n):
            t0 = time.perf_counter()
            b = next_batch()
            t1 = time.perf_counter()
            loss = loss_of(b)
            t2 = time.perf_counter()
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            for o in opts:
                o.step()
            t4 = time.perf_counter()
            yield t1 - t0, t2 - t1, t3 - t2, t4 - t3

    import numpy as np

    for _ in steps(a.warmup):
        pass
    names = list(phases)
    dts = np.array(list(steps(a.steps)))  # [steps, 4]
    mins, meds = dts.min(0), np.median(dts, 0)
    what = "plain loop (bench/train.py)" if a.plain else \
        "ShardedEmbeddingCollection(world 1)" if a.sharded else "EmbeddingCollection"
    print(f"{a.steps} steps, batch 2048, {a.threads} threads, {what}; load avg {os.getloadavg()[0]:.1f}")
    print(f"  {'phase':14s} {'min ms':>8s} {'median ms':>10s}")
    for k, mn, md in zip(names, mins, meds):
        print(f"  {k:14s} {1000 * mn:8.2f} {1000 * md:10.2f}")
    print(f"  {'step':14s} {1000 * mins.sum():8.2f} {1000 * meds.sum():10.2f}   -> "
          f"{2048 / mins.sum():,.0f} samples/s from the minima, {2048 / meds.sum():,.0f} from the medians")
    if a.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in steps(min(a.steps, 20)):
                pass
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
