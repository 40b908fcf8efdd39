"""Where the project's ESMM training step spends its time (torch.profiler, CPU).

Runs ``--steps`` training steps of train.local.train_model's loop pieces (the same
shuffled batches, model, tower set-up and optimizers ``esmm train`` uses) on
bench/aliccp_like.py data (or ``--data`` made by anyone) and prints a per-phase split
(batch building, forward+loss, backward, optimizer steps): the minimum and the median
over the steps. On a shared machine the minimum is the load-robust figure (a phase of a
few ms often runs unpreempted), so the sum of the minima estimates the step on a quiet
machine. Then, with ``--torch-profile``, the self CPU time per step by kind of operator
(GEMM, embedding gathers/scatters, dedup, elementwise, ...) and the top operators.

    .venv/bin/python bench/profile_train.py --steps 40 [--torch-profile] [--plain]
    BENCH_CODE_ROOT=OLD_CHECKOUT .venv/bin/python bench/profile_train.py ...   # "before"
    ESMM_MALLOC=default .venv/bin/python bench/profile_train.py ...   # glibc's malloc defaults

It runs under train/malloc.py's settings, as ``esmm train`` does (a "before" checkout's
too), and prints the page faults and system CPU time per step.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# BENCH_CODE_ROOT=OLD_CHECKOUT profiles another checkout's train/ (the "before" of a change)
sys.path.insert(0, os.environ.get("BENCH_CODE_ROOT") or str(HERE.parent))


KINDS = [  # (kind, aten op names), first match wins
    ("GEMM (mm, addmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")),
    ("embedding gather/scatter", ("aten::index_select", "aten::index_add_", "aten::index_copy_", "aten::scatter_add_",
                                  "aten::index", "aten::index_put_", "aten::embedding_bag", "aten::_embedding_bag",
                                  "aten::embedding_dense_backward", "aten::_embedding_bag_backward",
                                  "aten::_embedding_bag_dense_backward", "aten::embedding",
                                  "aten::_embedding_bag_forward_only",
                                  "aten::_sparse_coo_tensor_with_dims_and_tensors", "aten::index_add")),
    ("dedup / sort (unique, coalesce)", ("aten::_unique2", "aten::unique_dim", "aten::sort", "aten::coalesce",
                                         "aten::_coalesce", "aten::argsort", "aten::unique_consecutive")),
    ("dense Adam (fused)", ("aten::_fused_adam_",)),
    ("activations (relu fwd/bwd)", ("aten::relu", "aten::clamp_min", "aten::threshold_backward", "aten::relu_")),
    ("copies, cat, fill, allocation", ("aten::copy_", "aten::cat", "aten::fill_", "aten::zero_", "aten::empty",
                                       "aten::zeros", "aten::clone", "aten::contiguous", "aten::new_zeros",
                                       "aten::empty_strided", "aten::_to_copy", "aten::to")),
]


def op_kind(name: str) -> str:
    for kind, ops in KINDS:
        if name in ops:
            return kind
    if name.startswith("esmm_row_kernels::"):  # train/shard/row_kernels.py
        return "fused row kernels (dedup, sparse optimizer)"
    if name.startswith("aten::"):
        return "other aten ops (elementwise, views, ...)"
    return "python / autograd / optimizer glue"


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
    ap.add_argument("--reference", action="store_true",
                    help="EsmmConfig(embedding='plain'): EmbeddingCollection + SparseAdam (default: the sharded one)")
    ap.add_argument("--plain", action="store_true", help="the plain loop of bench/train.py instead (reference)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--torch-profile", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import same_malloc

    tuned = same_malloc.apply()  # as train.loop.fit does (this checkout's settings, a "before" checkout's run too)
    if not (Path(a.data) / "manifest.json").is_file():
        aliccp_like.write_shards(aliccp_like.make(a.rows, 1000, 0), a.data)
    m = load_manifest(a.data)
    fields = manifest_fields(m)
    train = load_split(a.data, "train", fields, m)
    cfg = EsmmConfig.from_dict({**EsmmConfig().to_dict(), "tower_precision": "fp32",
                                "embedding": "plain" if a.reference else "sharded"})
    model = ESMM(fields, cfg)
    try:  # what train.local.train_model does after building the model (absent before issue 14)
        from train.device import prepare_towers

        prepare_towers(model, "fp32", "cpu")
    except ImportError:
        pass
    model.train()
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

    def steps(n):  # per step: wall seconds of each phase, then process CPU seconds of each
        clock = time.perf_counter
        cpu = time.process_time  # all threads; on a loaded machine it counts work, not waiting
        for _ in range(n):
            t0, c0 = clock(), cpu()
            b = next_batch()
            t1, c1 = clock(), cpu()
            loss = loss_of(b)
            t2, c2 = clock(), cpu()
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            t3, c3 = clock(), cpu()
            for o in opts:
                o.step()
            t4, c4 = clock(), cpu()
            yield t1 - t0, t2 - t1, t3 - t2, t4 - t3, c1 - c0, c2 - c1, c3 - c2, c4 - c3

    import numpy as np

    for _ in steps(a.warmup):
        pass
    names = list(phases)
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    dts = np.array(list(steps(a.steps)))  # [steps, 8]
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    mins, meds = dts[:, :4].min(0), np.median(dts[:, :4], 0)
    cmins, cmeds = dts[:, 4:].min(0), np.median(dts[:, 4:], 0)
    what = "plain loop (bench/train.py)" if a.plain else \
        "EmbeddingCollection + SparseAdam" if a.reference else "ShardedEmbeddingCollection(world 1) + lazy Adam"
    print(f"{a.steps} steps, batch 2048, {a.threads} threads, {what}; load avg {os.getloadavg()[0]:.1f}")
    print(f"  {'phase':14s} {'min ms':>8s} {'median ms':>10s} {'CPU min ms':>11s} {'CPU median ms':>14s}")
    for k, mn, md, cmn, cmd in zip(names, mins, meds, cmins, cmeds):
        print(f"  {k:14s} {1000 * mn:8.2f} {1000 * md:10.2f} {1000 * cmn:11.2f} {1000 * cmd:14.2f}")
    print(f"  {'step':14s} {1000 * mins.sum():8.2f} {1000 * meds.sum():10.2f} {1000 * cmins.sum():11.2f} "
          f"{1000 * cmeds.sum():14.2f}   -> {2048 / mins.sum():,.0f} samples/s from the wall minima, "
          f"{2048 / meds.sum():,.0f} from the medians, {2048 / cmeds.sum():,.0f} per CPU-s (medians)")
    malloc_off = "glibc's defaults or the user's settings"
    print(f"  page faults {(ru1.ru_minflt - ru0.ru_minflt) / a.steps:,.0f} and system CPU "
          f"{1000 * (ru1.ru_stime - ru0.ru_stime) / a.steps:.2f} ms per step (malloc: "
          f"{'train/malloc.py' if tuned else malloc_off})")
    if a.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        n_prof = min(a.steps, 20)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in steps(n_prof):
                pass
        avgs = prof.key_averages()
        kinds: dict[str, float] = {}
        for e in avgs:
            kinds[op_kind(e.key)] = kinds.get(op_kind(e.key), 0.0) + e.self_cpu_time_total / 1000 / n_prof
        total = sum(kinds.values())
        print(f"self CPU time per step by kind (torch.profiler, {n_prof} steps; all threads' time counted once):")
        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {k:34s} {v:8.2f} ms  {100 * v / total:5.1f} %")
        print(f"  {'total':34s} {total:8.2f} ms")
        print(avgs.table(sort_by="self_cpu_time_total", row_limit=a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
