"""ESMM training samples/s with 1 and with W data-parallel workers (sharded embedding + DDP).

What Ray Train runs per worker, without Ray's own start-up in the timing: W gloo
processes (``--threads / W`` intra-op threads each, so the machine's cores are shared
the same way in every run), each taking 1/W of every global batch; the embedding rows
are sharded (owner = id mod W), the towers replicated under DDP. W = 1 is the same code
with no communication. Same synthetic Ali-CCP-shaped batches as bench/shard.py.

    .venv/bin/python bench/train_workers.py                 # 1 vs 2 workers, batch 2048, dim 18
    .venv/bin/python bench/train_workers.py --workers 1 2 4

``samples_per_second(workers, args)`` is the function bench/train.py can call.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # robust timings when other processes share the cores

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from bench.shard_data import bench_batch, bench_fields  # noqa: E402
from train.jagged import Batch, take_batch  # noqa: E402
from train.loop import train_step  # noqa: E402
from train.model import ESMM, EsmmConfig  # noqa: E402
from train.shard import ShardedEmbeddingCollection, shard_group  # noqa: E402


def _batches(fields, args, rank: int, world: int) -> list[Batch]:
    out = []
    n = args.batch_size // world
    mine = torch.arange(rank * n, (rank + 1) * n)
    for s in range(args.distinct_batches):
        kjt = bench_batch(fields, args.batch_size, s, seed=args.seed)
        g = torch.Generator().manual_seed(10_000 + s)
        click = (torch.rand(args.batch_size, generator=g) < 0.04).float()
        conv = click * (torch.rand(args.batch_size, generator=g) < 0.2).float()
        out.append(take_batch(Batch(kjt, click, conv), mine))
    return out


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    fields = bench_fields(args.scale)
    group = shard_group()
    torch.manual_seed(args.seed)
    model = ESMM(fields, EsmmConfig(dim=args.dim, sparse_optimizer=args.optimizer),
                 embedding_factory=lambda fs, d: ShardedEmbeddingCollection(fs, d, group=group))
    if world > 1:
        model.dense = DDP(model.dense)
    opts = model.make_optimizers()
    batches = _batches(fields, args, rank, world)
    for i in range(args.warmup):
        train_step(model, batches[i % len(batches)], opts, None, apply_view=False)
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(args.steps):
        train_step(model, batches[i % len(batches)], opts, None, apply_view=False)
    t = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": float(t), "steps": args.steps}))
    dist.destroy_process_group()


def samples_per_second(workers: int, args) -> float:
    """Global samples per second of ``workers`` gloo workers training ESMM."""
    out = REPO / "bench" / "out" / f"train-workers-{workers}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(workers, port, args, str(out)), nprocs=workers, join=True,
                       start_method="spawn")
    r = json.loads(out.read_text())
    return r["steps"] * args.batch_size / r["seconds"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=2048, help="global batch")
    ap.add_argument("--dim", type=int, default=18)
    ap.add_argument("--threads", type=int, default=2, help="cores in all, shared by the workers")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--optimizer", default="adam", choices=["adam", "adagrad"])
    ap.add_argument("--distinct-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    res = {w: samples_per_second(w, args) for w in args.workers}
    base = res[args.workers[0]]
    print(f"ESMM training, batch {args.batch_size}, dim {args.dim}, 23 fields, {args.threads} threads in all:")
    for w, sps in res.items():
        print(f"  {w} worker{'s' if w > 1 else ' '}: {sps:10,.0f} samples/s  ({sps / base:.2f}x of {args.workers[0]})")
    print("TRAIN_WORKERS " + json.dumps({str(w): v for w, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
