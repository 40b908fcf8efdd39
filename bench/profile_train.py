"""Where the project's ESMM training step spends its time (torch.profiler, CPU).

Runs ``--steps`` training steps of train.local.train_model's loop pieces (the same
batches, model and optimizers ``esmm train`` uses) on bench/aliccp_like.py data and
prints the top operators by self CPU time, plus a per-phase split (batch building,
forward, backward, optimizer steps) timed with perf_counter.

    .venv/bin/python bench/profile_train.py --rows 100000 --steps 40 [--sharded]
"""
from __future__ import annotations

import argparse
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
    ap.add_argument("--top", type=int, default=25)
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

    def steps(n):
        it = train.batches(2048, shuffle=True, seed=0, epoch=0)
        for _ in range(n):
            t0 = time.perf_counter()
            b = next(it)
            t1 = time.perf_counter()
            loss = model.loss(b)
            t2 = time.perf_counter()
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            for o in opts:
                o.step()
            t4 = time.perf_counter()
            yield t1 - t0, t2 - t1, t3 - t2, t4 - t3

    for _ in steps(a.warmup):
        pass
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for dt in steps(a.steps):
            for k, v in zip(phases, dt):
                phases[k] += v
    total = sum(phases.values())
    print(f"{a.steps} steps, batch 2048, {a.threads} threads, {'sharded(world 1)' if a.sharded else 'EmbeddingCollection'}: "
          f"{1000 * total / a.steps:.1f} ms/step (under the profiler) = {2048 * a.steps / total:,.0f} samples/s")
    for k, v in phases.items():
        print(f"  {k:14s} {1000 * v / a.steps:7.2f} ms/step  {100 * v / total:5.1f} %")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
